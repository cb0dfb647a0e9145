"""The KV cache: an explicit pytree with static capacity.

One `KVCache` holds every layer, leaves stacked on a leading L axis so the
decoder can `lax.scan` over layers with the cache as a scanned input. Each
(layer, row, kv head) owns S slots. A slot holds a key and a value (as the
codec stores them), the original token position of what it holds, and a
validity bit. Compression may leave different heads holding different
positions (eviction is per head), which is why `pos` and `valid` are per
head.

Writes go to slot `end[b]` onwards for row b; queries get positions
`length[b]` onwards. The two counters differ once a cache is compacted
(slots are reused, positions keep counting).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import AttentionGeometry, ModelConfig

Array = jax.Array


def host_array(x) -> np.ndarray:
  """The global value of x on the host. A jax.Array that spans devices of
  other processes (a multi-process mesh) is gathered with
  `multihost_utils.process_allgather`, a collective: every process must
  call this at the same point."""
  if isinstance(x, jax.Array) and not (
    x.is_fully_addressable or x.is_fully_replicated
  ):
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def replace_dropping(*fields: str):
  """A NamedTuple `_replace` that resets the value-identity `field` to its
  default unless it is given: a transform, scorer or codec changed with
  `_replace` is a new value, never equal to the one it came from (else a
  jitted entry would reuse the program compiled for the original)."""

  def _replace(self, **kwargs):
    unknown = sorted(set(kwargs) - set(self._fields))
    if unknown:
      raise ValueError(f"got unexpected field names: {unknown}")
    for field in fields:
      kwargs.setdefault(field, type(self)._field_defaults[field])
    return type(self)._make(
      [kwargs.get(f, v) for f, v in zip(self._fields, self)]
    )

  return _replace


class Codec(NamedTuple):
  """How a codec stores one key or value vector (static, hashable).

  A codec encodes each entry on its own (per token), so coded entries can
  be written one decode step at a time and gathered by compaction. It is
  called one layer at a time, on entries laid out [B, K, S, H] (the kv head
  at axis -3), with that layer's `shared` leaves (no L axis).

  Attributes:
    name: a label, e.g. "int4/g32".
    encode: (x [B, K, S, H], shared) -> dict of per-entry leaves
      [B, K, S, X_i].
    decode: (enc, shared) -> x_hat [B, K, S, H] (float32).
    scores: optional (q [B, K, M, H], enc, shared) -> q.k [B, K, M, S]
      float32, computed from the codes without decoding the keys; None if
      the codec has none.
    bits: (H) -> stored bits per element, overhead (scales, norms) included.
    params: hashable parameters that determine the codec; two codecs with
      equal non-empty params compare and hash equal (so equal codecs built
      twice share a compiled program); empty params: identity.
    tile: the codec's `pallas_kernels.tiles.TileCodec`, how the Pallas
      kernels read its payload block by block; None: the Pallas backends
      run this codec's attention on the XLA engine (and warn).
    shared_axes: ((leaf name, axes), ...): which of the codec's shared
      leaves are per row and/or per kv head, `axes` naming their dims after
      L ("bk": [L, B, K, ...], a basis per row and head; "k": [L, K, ...],
      a channel order per head). A mesh splits those dims with the rows
      and heads; a leaf not listed is replicated (a rotation [L, H, H]).
  """

  name: str
  encode: Any
  decode: Any
  scores: Any = None
  bits: Any = None
  params: tuple = ()
  tile: Any = None
  shared_axes: tuple = ()

  def __eq__(self, other):
    if not isinstance(other, Codec):
      return NotImplemented
    if not self.params or not other.params:
      return self is other
    return self.params == other.params

  def __ne__(self, other):
    eq = self.__eq__(other)
    return eq if eq is NotImplemented else not eq

  def __hash__(self):
    return hash(self.params) if self.params else id(self)


Codec._replace = replace_dropping("params", "tile")


@jax.tree_util.register_pytree_node_class
class CodedKV:
  """Keys or values stored by a `Codec`.

  Attributes:
    slots: dict of per-slot leaves [L, B, K, S, X_i] (codes, scales, norms).
    shared: dict of leaves shared by the slots of a layer, each with a
      leading L (e.g. a random rotation [L, H, H]).
    codec: the static `Codec`.
  """

  def __init__(
    self, slots: dict[str, Array], shared: dict[str, Array], codec: Codec
  ):
    self.slots, self.shared, self.codec = slots, shared, codec

  def tree_flatten(self):
    return (self.slots, self.shared), self.codec

  @classmethod
  def tree_unflatten(cls, codec, children):
    return cls(*children, codec)

  def __repr__(self):
    shapes = {k: tuple(v.shape) for k, v in self.slots.items()}
    return f"CodedKV({self.codec.name}, slots={shapes})"

  def decode(self) -> Array:
    """[B, K, S, H] float32 entries of one layer's payload."""
    return self.codec.decode(self.slots, self.shared)

  def decode_layers(self) -> Array:
    """[L, B, K, S, H] float32 entries of a whole cache's payload."""
    return jax.vmap(self.codec.decode)(self.slots, self.shared)

  def write(
    self, x: Array, rows: Array, slots: Array, layer: Array | None = None
  ) -> "CodedKV":
    """Encodes x [B, T, K, H] into slots [B, T] of rows [B, 1].

    With `layer` ([] int32, may be traced) the payload is L-stacked and
    only that layer's slots are written, in place; without it the payload
    is one layer's.
    """
    shared = (
      self.shared
      if layer is None
      else jax.tree.map(lambda a: a[layer], self.shared)
    )
    enc = self.codec.encode(
      jnp.swapaxes(x.astype(jnp.float32), 1, 2), shared
    )  # [B, K, T, X]
    at = (
      (lambda a: a.at[rows, :, slots])
      if layer is None
      else (lambda a: a.at[layer, rows, :, slots])
    )
    new = {
      name: at(self.slots[name]).set(
        jnp.swapaxes(enc[name], 1, 2).astype(self.slots[name].dtype),
        mode="drop",
      )
      for name in self.slots
    }
    return CodedKV(new, self.shared, self.codec)

  def gather(self, idx: Array) -> "CodedKV":
    """Gathers slots along S with idx [L, B, K, S'] (compaction)."""
    new = {
      name: jnp.take_along_axis(
        leaf, idx.reshape(idx.shape + (1,) * (leaf.ndim - 4)), axis=3
      )
      for name, leaf in self.slots.items()
    }
    return CodedKV(new, self.shared, self.codec)


@jax.tree_util.register_pytree_node_class
class TailedKV:
  """A coded region of slots followed by a full-precision tail.

  Slots [0, Sc) live in `code` (a CodedKV); slots [Sc, Sc + R) in `tail`
  [L, B, K, R, H]. This is KIVI's residual window: the newest entries stay
  exact until a whole block of R can be quantized together.
  """

  def __init__(self, code: CodedKV, tail: Array):
    self.code, self.tail = code, tail

  def tree_flatten(self):
    return (self.code, self.tail), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  def __repr__(self):
    return f"TailedKV({self.code!r}, tail={tuple(self.tail.shape)})"

  @property
  def code_slots(self) -> int:
    return self.code_capacity(self.code)

  @staticmethod
  def code_capacity(code: CodedKV) -> int:
    return code.slots["codes"].shape[-2]

  def decode(self) -> Array:
    return jnp.concatenate(
      [self.code.decode(), self.tail.astype(jnp.float32)], axis=-2
    )

  def write(
    self, x: Array, rows: Array, slots: Array, layer: Array | None = None
  ) -> "TailedKV":
    """As `CodedKV.write`: slots in the tail go there, the others to the
    code region (when its codec encodes one entry at a time)."""
    sc, r = self.code_slots, self.tail.shape[-2]
    in_tail = (slots >= sc) & (slots < sc + r)
    tail_slots = jnp.where(in_tail, slots - sc, r)
    at = (
      (lambda a: a.at[rows, :, tail_slots])
      if layer is None
      else (lambda a: a.at[layer, rows, :, tail_slots])
    )
    tail = at(self.tail).set(x.astype(self.tail.dtype), mode="drop")
    code = self.code
    if code.codec.encode is not None:
      code = code.write(x, rows, jnp.where(in_tail, sc, slots), layer)
    return TailedKV(code, tail)

  def gather(self, idx: Array):
    raise ValueError(
      "a cache with a quantized region and a residual window "
      "cannot be compacted: evict before quantizing (chain "
      "the policy first)."
    )


def is_coded(x) -> bool:
  """True for a coded payload (anything but a plain [.., S, H] array)."""
  return isinstance(x, (CodedKV, TailedKV))


class KVCache(NamedTuple):
  """Key/value cache of a whole model.

  Attributes:
    k: [L, B, K, S, H] keys, post-RoPE (or a codec payload pytree whose
      leaves all start with [L, B, K, S]).
    v: [L, B, K, S, H] values (or a codec payload pytree, same leading axes).
    pos: [L, B, K, S] int32 original token position held by each slot;
      -1 for an empty slot.
    valid: [L, B, K, S] bool; False slots never receive attention.
    end: [B] int32 next slot to write, per row (shared by layers and heads).
    length: [B] int32 tokens seen so far per row: the position of the next
      token.
    state: per-transform state (a pytree; `()` when no transform keeps any).
  """

  k: Any
  v: Any
  pos: Array
  valid: Array
  end: Array
  length: Array
  state: Any = ()

  @property
  def capacity(self) -> int:
    """S, the number of slots per (layer, row, kv head)."""
    return self.pos.shape[-1]

  @property
  def batch_size(self) -> int:
    return self.pos.shape[1]

  @property
  def num_layers(self) -> int:
    return self.pos.shape[0]

  @classmethod
  def from_dense(
    cls,
    k: Array,
    v: Array,
    lengths: Array | None = None,
    *,
    positions: Array | None = None,
    capacity: int | None = None,
  ) -> "KVCache":
    """A cache holding a model's own keys and values.

    Args:
      k: [L, B, T, K, H] keys after RoPE (rotate-half; see
        `kvjax.config.AttentionGeometry` for the conventions), entry t of
        row b in slot t.
      v: [L, B, T, K, H] values.
      lengths: optional [B] int, live entries per row (the first
        `lengths[b]` of T; default T). Entries past a row's length are
        padding: stored invalid, never attended.
      positions: optional [B, T] int original positions of the entries
        (default 0..T-1). The next token of row b gets position
        `max(positions[b, :lengths[b]]) + 1`.
      capacity: S >= T slots per (layer, row, kv head); the free
        `S - T` slots receive later writes (default T: no room).

    Returns:
      A plain `KVCache` (compress it with `kvjax.compress_cache` to get a
      compacted or coded one).

    Raises:
      ValueError: mismatched shapes, lengths outside [0, T], a capacity
        below T.
    """
    k, v = jnp.asarray(k), jnp.asarray(v)
    if k.ndim != 5 or k.shape != v.shape:
      raise ValueError(
        "k and v must both be [L, B, T, K, H], got "
        f"{tuple(k.shape)} and {tuple(v.shape)}."
      )
    L, B, T, K, H = k.shape
    S = T if capacity is None else capacity
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < T:
      raise ValueError(f"capacity must be an int >= T={T}, got {capacity!r}.")
    if lengths is None:
      lengths = jnp.full((B,), T, jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    if lengths.shape != (B,):
      raise ValueError(f"lengths must be [B={B}], got {tuple(lengths.shape)}.")
    if not isinstance(lengths, jax.core.Tracer):
      host = np.asarray(lengths)
      if host.size and (host.min() < 0 or host.max() > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got {host}.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    positions = jnp.asarray(positions).astype(jnp.int32)
    if positions.shape != (B, T):
      raise ValueError(
        f"positions must be [B={B}, T={T}], got {tuple(positions.shape)}."
      )
    live = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    if not isinstance(positions, jax.core.Tracer) and not isinstance(
      lengths, jax.core.Tracer
    ):
      if (np.asarray(positions)[np.asarray(live)] < 0).any():
        raise ValueError(
          "positions of live entries must be >= 0 (-1 marks an empty slot)."
        )
    pad = [(0, 0)] * 3 + [(0, S - T)]  # the slot axis of [L, B, K, S]
    to_slots = lambda x: jnp.pad(jnp.swapaxes(x, 2, 3), pad + [(0, 0)])
    pos = jnp.where(live, positions, -1)  # [B, T]
    pos = jnp.pad(
      jnp.broadcast_to(pos[None, :, None], (L, B, K, T)),
      pad,
      constant_values=-1,
    )  # [L, B, K, S]
    valid = jnp.pad(jnp.broadcast_to(live[None, :, None], (L, B, K, T)), pad)
    length = (
      jnp.max(jnp.where(live, positions, -1), axis=1, initial=-1) + 1
    )  # [B]
    return cls(
      k=to_slots(k),
      v=to_slots(v),
      pos=pos,
      valid=valid,
      end=lengths,
      length=length.astype(jnp.int32),
    )

  def to_dense(self) -> "DenseKV":
    """Every slot as plain arrays in the [L, B, S, K, H] layout of
    `from_dense`, coded payloads decoded (float32; a `TailedKV`'s code
    region and full-precision tail in slot order). Slots are per (layer,
    row, kv head): after eviction each head holds its own positions, so
    read `pos` and `valid` with them."""

    def dense(x):
      if isinstance(x, TailedKV):
        x = jnp.concatenate(
          [x.code.decode_layers(), x.tail.astype(jnp.float32)], axis=-2
        )
      elif isinstance(x, CodedKV):
        x = x.decode_layers()
      return jnp.swapaxes(x, 2, 3)

    return DenseKV(
      dense(self.k),
      dense(self.v),
      jnp.swapaxes(self.pos, 2, 3),
      jnp.swapaxes(self.valid, 2, 3),
    )


class DenseKV(NamedTuple):
  """A cache's slots as plain arrays (`KVCache.to_dense`).

  Attributes:
    k: [L, B, S, K, H] keys (decoded when the cache is coded).
    v: [L, B, S, K, H] values.
    pos: [L, B, S, K] int32 original position per slot (-1: empty).
    valid: [L, B, S, K] bool.
  """

  k: Array
  v: Array
  pos: Array
  valid: Array


# ----------------------------------------------------------------------------
# Writing new entries.


def write_slots(
  # k, v [L, B, K, S, H] (or coded payloads); pos, valid [L, B, K, S]
  layer_cache: tuple[Any, Any, Array, Array],
  k: Array,  # [B, T, K, H]
  v: Array,  # [B, T, K, H]
  positions: Array,  # [B, T]
  slots: Array,  # [B, T] target slot per token; S (out of range) = skip
  *,
  layer: Array,  # [] int32 layer to write (may be traced)
) -> tuple[Any, Any, Array, Array]:
  """Scatters new entries into one layer of the L-stacked cache leaves, in
  place (only the written slots move); out-of-range slots drop."""
  ck, cv, cpos, cvalid = layer_cache
  B, T, K, _ = k.shape
  rows = jnp.arange(B)[:, None]  # [B, 1]

  # Advanced indices (layer, rows, slots) around a slice put [B, T] first:
  # the updates are [B, T, K, H] and [B, T, K]. Coded payloads encode first.
  def put(c, x):
    if is_coded(c):
      return c.write(x, rows, slots, layer)
    return c.at[layer, rows, :, slots].set(x.astype(c.dtype), mode="drop")

  ck, cv = put(ck, k), put(cv, v)
  pos_btk = jnp.broadcast_to(positions[:, :, None], (B, T, K))
  cpos = cpos.at[layer, rows, :, slots].set(
    pos_btk.astype(jnp.int32), mode="drop"
  )
  cvalid = cvalid.at[layer, rows, :, slots].set(True, mode="drop")
  return ck, cv, cpos, cvalid


class NewEntries(NamedTuple):
  """Where the next tokens of a forward pass go (`next_entries`).

  Attributes:
    positions: [B, T] int32 positions of the tokens.
    slots: [B, T] int32 slot of each token; S (the capacity, out of range)
      for a masked token, which is not written.
    count: [B] int32 tokens written per row.
  """

  positions: Array
  slots: Array
  count: Array


def next_entries(
  cache: KVCache, token_mask: Array, positions: Array | None = None
) -> NewEntries:
  """Slots and positions of the next tokens, token_mask [B, T] bool:
  unmasked tokens go to slots `end[b]` onwards and get positions
  `length[b]` onwards unless `positions` ([B, T]) says otherwise."""
  token_mask = token_mask.astype(bool)
  cum = jnp.cumsum(token_mask.astype(jnp.int32), axis=1)  # [B, T]
  if positions is None:
    positions = cache.length[:, None] + cum - 1
  slots = jnp.where(token_mask, cache.end[:, None] + cum - 1, cache.capacity)
  return NewEntries(
    positions.astype(jnp.int32), slots.astype(jnp.int32), cum[:, -1]
  )


def plain_head_dim(x) -> int | None:
  """H of a plain payload or a TailedKV's tail; None for codes."""
  if isinstance(x, TailedKV):
    return x.tail.shape[-1]
  return None if isinstance(x, CodedKV) else x.shape[-1]


def check_layer(layer, num_layers: int) -> None:
  """A concrete `layer` must lie in [0, num_layers) (a traced one is not
  checked: under `jit` a write to a missing layer is dropped and a read
  clips)."""
  if isinstance(layer, jax.core.Tracer):
    return
  if (
    isinstance(layer, bool)
    or np.ndim(layer) != 0
    or not np.issubdtype(np.asarray(layer).dtype, np.integer)
  ):
    raise TypeError(f"layer must be an int, got {layer!r}.")
  if not 0 <= int(layer) < num_layers:
    raise ValueError(f"layer must be in [0, {num_layers}), got {layer!r}.")


def _check_entries(cache: KVCache, k, v, token_mask, positions, all_layers):
  """Shapes of new entries for `write` / `append`; returns the mask."""
  want = "[L, B, T, K, H]" if all_layers else "[B, T, K, H]"
  nd = 5 if all_layers else 4
  if getattr(k, "ndim", None) != nd or getattr(v, "shape", None) != k.shape:
    raise ValueError(
      f"k and v must both be {want}, got "
      f"{getattr(k, 'shape', k)} and {getattr(v, 'shape', v)}."
    )
  L, B, K, S = cache.pos.shape
  lead = (L, B) if all_layers else (B,)
  H = plain_head_dim(cache.k)
  if (
    tuple(k.shape[: len(lead)]) != lead
    or k.shape[-2] != K
    or (H is not None and k.shape[-1] != H)
  ):
    raise ValueError(
      f"k has shape {tuple(k.shape)}; this cache needs "
      f"{want} with {'L=%d, ' % L if all_layers else ''}"
      f"B={B}, K={K}" + (f", H={H}." if H else ".")
    )
  T = k.shape[-3]
  if token_mask is None:
    token_mask = jnp.ones((B, T), bool)
  if tuple(token_mask.shape) != (B, T):
    raise ValueError(
      f"token_mask must be [B={B}, T={T}], got {tuple(token_mask.shape)}."
    )
  if positions is not None and tuple(positions.shape) != (B, T):
    raise ValueError(
      f"positions must be [B={B}, T={T}], got {tuple(positions.shape)}."
    )
  concrete = not any(
    isinstance(x, jax.core.Tracer) for x in (token_mask, cache.end)
  )
  if concrete:
    need = host_array(token_mask).astype(bool).sum(1)
    room = cache.capacity - host_array(cache.end)
    if (need > room).any():
      b = int(np.argmax(need - room))
      raise ValueError(
        f"cache capacity exceeded: row {b} writes "
        f"{int(need[b])} entries into {int(room[b])} free "
        f"slots (capacity {cache.capacity})."
      )
  return jnp.asarray(token_mask).astype(bool)


def write(
  cache: KVCache,
  k: Array,
  v: Array,
  *,
  layer: int | Array,
  positions: Array | None = None,
  token_mask: Array | None = None,
) -> KVCache:
  """Writes one layer's entries for the next tokens, in place; the
  counters do not move (call `advance` once after the last layer).

  This is the write of `kvjax.forward`, for a model kvjax did not build:
  in layer `layer`, write the new keys (after RoPE) and values, then
  attend with `kvjax.cached_attention(q, cache, layer, ...)`.

  Args:
    cache: the cache (every layer).
    k: [B, T, K, H] new keys after RoPE.
    v: [B, T, K, H] new values.
    layer: the layer (an int or a [] int32, may be traced).
    positions: optional [B, T] positions (default: `length[b]` onwards,
      counting unmasked tokens).
    token_mask: optional [B, T] bool; False tokens are not written.

  Returns:
    The cache with the entries in slots `end[b]` onwards of that layer
    (a coded payload encodes them on write).

  Raises:
    ValueError: mis-shaped entries, a layer outside [0, L), or (eagerly)
      a write past capacity. Under `jit` a write past capacity is dropped
      and `cache_overflowed` reports it after `advance`; a traced layer
      is not checked (a missing layer's write is dropped).
  """
  check_layer(layer, cache.num_layers)
  mask = _check_entries(cache, k, v, token_mask, positions, False)
  new = next_entries(cache, mask, positions)
  k_, v_, pos, valid = write_slots(
    (cache.k, cache.v, cache.pos, cache.valid),
    k,
    v,
    new.positions,
    new.slots,
    layer=jnp.asarray(layer, jnp.int32),
  )
  return cache._replace(k=k_, v=v_, pos=pos, valid=valid)


def advance(cache: KVCache, token_mask: Array) -> KVCache:
  """Moves the counters past the tokens `write` stored, token_mask [B, T]
  bool (all True: T tokens per row)."""
  n = jnp.sum(jnp.asarray(token_mask).astype(jnp.int32), axis=1)
  return cache._replace(end=cache.end + n, length=cache.length + n)


def append(
  cache: KVCache,
  k: Array,
  v: Array,
  *,
  positions: Array | None = None,
  token_mask: Array | None = None,
) -> KVCache:
  """Writes every layer's entries for the next tokens and advances.

  Args:
    cache: the cache.
    k: [L, B, T, K, H] new keys after RoPE.
    v: [L, B, T, K, H] new values.
    positions, token_mask: as in `write`.

  Returns:
    The cache with the entries written and `end`/`length` advanced.
  """
  mask = _check_entries(cache, k, v, token_mask, positions, True)
  new = next_entries(cache, mask, positions)

  def body(leaves, xs):
    kl, vl, layer = xs
    return write_slots(
      leaves, kl, vl, new.positions, new.slots, layer=layer
    ), None

  leaves, _ = jax.lax.scan(
    body,
    (cache.k, cache.v, cache.pos, cache.valid),
    (k, v, jnp.arange(k.shape[0], dtype=jnp.int32)),
  )
  k_, v_, pos, valid = leaves
  return cache._replace(
    k=k_,
    v=v_,
    pos=pos,
    valid=valid,
    end=cache.end + new.count,
    length=cache.length + new.count,
  )


def init_cache(
  config: ModelConfig | AttentionGeometry,
  batch_size: int,
  capacity: int,
  dtype: Any = None,
  sharding: Any = None,
  *,
  num_layers: int | None = None,
) -> KVCache:
  """Returns an empty cache with `capacity` slots per layer, row and kv head.

  Args:
    config: the model's config, or the `AttentionGeometry` of a model
      kvjax did not build (then `num_layers` and `dtype` are required).
    batch_size: B.
    capacity: S, the static number of slots; prefill plus decode must fit.
    dtype: key/value dtype; defaults to `config.dtype` (required with an
      `AttentionGeometry`).
    sharding: optional `jax.sharding.Sharding` (or pytree of them matching
      the cache) to place the empty cache with.
    num_layers: L; defaults to `config.num_layers` (required with an
      `AttentionGeometry`).

  Raises:
    ValueError: for a non-positive batch size, capacity or layer count, or
      a geometry without `num_layers` / `dtype`.
    TypeError: a `config` that is neither.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if not isinstance(capacity, (int, np.integer)) or capacity <= 0:
    raise ValueError(f"capacity must be a positive int, got {capacity!r}.")
  if isinstance(config, AttentionGeometry):
    if num_layers is None or dtype is None:
      raise ValueError(
        "init_cache with an AttentionGeometry needs num_layers= and dtype=."
      )
    L = num_layers
  elif isinstance(config, ModelConfig):
    L = config.num_layers if num_layers is None else num_layers
    dtype = dtype or config.dtype
  else:
    raise TypeError(
      "config must be a ModelConfig or AttentionGeometry, got "
      f"{type(config).__name__}."
    )
  if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L <= 0:
    raise ValueError(f"num_layers must be a positive int, got {L!r}.")
  dtype = jnp.dtype(dtype)
  B, K, S, H = batch_size, config.num_kv_heads, capacity, config.head_dim
  cache = KVCache(
    k=jnp.zeros((L, B, K, S, H), dtype),
    v=jnp.zeros((L, B, K, S, H), dtype),
    pos=jnp.full((L, B, K, S), -1, jnp.int32),
    valid=jnp.zeros((L, B, K, S), bool),
    end=jnp.zeros((B,), jnp.int32),
    length=jnp.zeros((B,), jnp.int32),
  )
  if sharding is not None:
    cache = jax.device_put(cache, sharding)
  return cache


def kv_bytes(cache: KVCache) -> int:
  """Physical bytes of every leaf of the cache (payload, bookkeeping, state).

  This is what the cache occupies in device memory, padding included.
  """
  return _tree_bytes(cache)


def _tree_bytes(tree) -> int:
  return int(
    sum(
      np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
      for x in jax.tree.leaves(tree)
    )
  )


def payload_bytes(cache: KVCache) -> int:
  """Physical bytes of the key and value payloads only (no bookkeeping)."""
  return _tree_bytes((cache.k, cache.v))


def _regions(x, capacity: int) -> list[tuple[Any, int, int]]:
  """(per-slot leaves, first slot, slot count) of each storage region of
  a payload: one region, or a TailedKV's code region and its tail."""
  if isinstance(x, TailedKV):
    sc = x.code_slots
    return [(x.code.slots, 0, sc), (x.tail, sc, capacity - sc)]
  return [(x.slots if is_coded(x) else x, 0, capacity)]


def logical_bytes(cache: KVCache) -> int:
  """Bytes a ragged layout would need: payload bytes of valid slots only.

  Each storage region (a plain or coded payload; a TailedKV's code region
  and its full-precision tail apart) costs its per-slot leaves' bytes
  divided by its slot count, times its valid slots; leaves shared by all
  slots of a layer (a codec's rotation, a low-rank basis) count once;
  bookkeeping (`pos`, `valid`, counters) does not count. Leaves shared by a
  group of slots (KIVI's per-channel key statistics) are spread over the
  group. The gap between `kv_bytes` and this figure is the padding a
  static layout pays.
  """
  valid = host_array(cache.valid)
  total = 0.0
  per_slot_leaves = []
  for x in (cache.k, cache.v):
    for leaves, start, count in _regions(x, cache.capacity):
      per_slot_leaves.append(leaves)
      slots = int(np.prod(valid.shape[:-1])) * count
      live = int(valid[..., start : start + count].sum())
      total += _tree_bytes(leaves) * live / max(slots, 1)
  shared = payload_bytes(cache) - _tree_bytes(per_slot_leaves)
  return int(round(total)) + shared


def coded_share(cache: KVCache) -> tuple[float, float]:
  """(keys, values): the share of valid entries stored by a codec (0 for a
  plain payload, 1 for a coded one, the code region's share for a
  TailedKV). A quantizer that stored nothing coded shows 0 here."""
  valid = host_array(cache.valid)
  n = max(int(valid.sum()), 1)
  out = []
  for x in (cache.k, cache.v):
    if isinstance(x, TailedKV):
      out.append(int(valid[..., : x.code_slots].sum()) / n)
    else:
      out.append(1.0 if is_coded(x) else 0.0)
  return tuple(out)


def cache_overflowed(cache: KVCache) -> bool:
  """True when a jitted write ran past capacity (those writes were dropped).

  `forward` raises eagerly when a write would not fit; under `jit` the
  counters cannot be checked, so writes past capacity are dropped and this
  function reveals it afterwards.
  """
  return bool(jnp.any(cache.end > cache.capacity))
