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

from kvjax.config import ModelConfig

Array = jax.Array


def replace_dropping(field: str):
  """A NamedTuple `_replace` that resets the value-identity `field` to its
  default unless it is given: a transform, scorer or codec changed with
  `_replace` is a new value, never equal to the one it came from (else a
  jitted entry would reuse the program compiled for the original)."""

  def _replace(self, **kwargs):
    unknown = sorted(set(kwargs) - set(self._fields))
    if unknown:
      raise ValueError(f"got unexpected field names: {unknown}")
    kwargs.setdefault(field, type(self)._field_defaults[field])
    return type(self)._make([kwargs.get(f, v)
                             for f, v in zip(self._fields, self)])

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
  """

  name: str
  encode: Any
  decode: Any
  scores: Any = None
  bits: Any = None
  params: tuple = ()

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


Codec._replace = replace_dropping("params")


@jax.tree_util.register_pytree_node_class
class CodedKV:
  """Keys or values stored by a `Codec`.

  Attributes:
    slots: dict of per-slot leaves [L, B, K, S, X_i] (codes, scales, norms).
    shared: dict of leaves shared by the slots of a layer, each with a
      leading L (e.g. a random rotation [L, H, H]).
    codec: the static `Codec`.
  """

  def __init__(self, slots: dict[str, Array], shared: dict[str, Array],
               codec: Codec):
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

  def write(self, x: Array, rows: Array, slots: Array,
            layer: Array | None = None) -> "CodedKV":
    """Encodes x [B, T, K, H] into slots [B, T] of rows [B, 1].

    With `layer` ([] int32, may be traced) the payload is L-stacked and
    only that layer's slots are written, in place; without it the payload
    is one layer's.
    """
    shared = self.shared if layer is None else jax.tree.map(
        lambda a: a[layer], self.shared)
    enc = self.codec.encode(jnp.swapaxes(x.astype(jnp.float32), 1, 2),
                            shared)  # [B, K, T, X]
    at = (lambda a: a.at[rows, :, slots]) if layer is None else (
        lambda a: a.at[layer, rows, :, slots])
    new = {name: at(self.slots[name]).set(
        jnp.swapaxes(enc[name], 1, 2).astype(self.slots[name].dtype),
        mode="drop") for name in self.slots}
    return CodedKV(new, self.shared, self.codec)

  def gather(self, idx: Array) -> "CodedKV":
    """Gathers slots along S with idx [L, B, K, S'] (compaction)."""
    new = {name: jnp.take_along_axis(
        leaf, idx.reshape(idx.shape + (1,) * (leaf.ndim - 4)), axis=3)
           for name, leaf in self.slots.items()}
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
    return jnp.concatenate([self.code.decode(),
                            self.tail.astype(jnp.float32)], axis=-2)

  def write(self, x: Array, rows: Array, slots: Array,
            layer: Array | None = None) -> "TailedKV":
    """As `CodedKV.write`: slots in the tail go there, the others to the
    code region (when its codec encodes one entry at a time)."""
    sc, r = self.code_slots, self.tail.shape[-2]
    in_tail = (slots >= sc) & (slots < sc + r)
    tail_slots = jnp.where(in_tail, slots - sc, r)
    at = (lambda a: a.at[rows, :, tail_slots]) if layer is None else (
        lambda a: a.at[layer, rows, :, tail_slots])
    tail = at(self.tail).set(x.astype(self.tail.dtype), mode="drop")
    code = self.code
    if code.codec.encode is not None:
      code = code.write(x, rows, jnp.where(in_tail, sc, slots), layer)
    return TailedKV(code, tail)

  def gather(self, idx: Array):
    raise ValueError("a cache with a quantized region and a residual window "
                     "cannot be compacted: evict before quantizing (chain "
                     "the policy first).")


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


def init_cache(
    config: ModelConfig,
    batch_size: int,
    capacity: int,
    dtype: Any = None,
    sharding: Any = None,
) -> KVCache:
  """Returns an empty cache with `capacity` slots per layer, row and kv head.

  Args:
    config: the model's config.
    batch_size: B.
    capacity: S, the static number of slots; prefill plus decode must fit.
    dtype: key/value dtype; defaults to `config.dtype`.
    sharding: optional `jax.sharding.Sharding` (or pytree of them matching
      the cache) to place the empty cache with.

  Raises:
    ValueError: for a non-positive batch size or capacity.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if not isinstance(capacity, (int, np.integer)) or capacity <= 0:
    raise ValueError(f"capacity must be a positive int, got {capacity!r}.")
  dtype = jnp.dtype(dtype or config.dtype)
  L, B, K, S, H = (config.num_layers, batch_size, config.num_kv_heads,
                   capacity, config.head_dim)
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
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree)))


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
  valid = np.asarray(cache.valid)
  total = 0.0
  per_slot_leaves = []
  for x in (cache.k, cache.v):
    for leaves, start, count in _regions(x, cache.capacity):
      per_slot_leaves.append(leaves)
      slots = int(np.prod(valid.shape[:-1])) * count
      live = int(valid[..., start:start + count].sum())
      total += _tree_bytes(leaves) * live / max(slots, 1)
  shared = payload_bytes(cache) - _tree_bytes(per_slot_leaves)
  return int(round(total)) + shared


def coded_share(cache: KVCache) -> tuple[float, float]:
  """(keys, values): the share of valid entries stored by a codec (0 for a
  plain payload, 1 for a coded one, the code region's share for a
  TailedKV). A quantizer that stored nothing coded shows 0 here."""
  valid = np.asarray(cache.valid)
  n = max(int(valid.sum()), 1)
  out = []
  for x in (cache.k, cache.v):
    if isinstance(x, TailedKV):
      out.append(int(valid[..., :x.code_slots].sum()) / n)
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
