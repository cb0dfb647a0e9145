"""Attention over a KV cache: the reference (the definition), the blockwise
XLA engine, and the typed backend choice.

`reference_attention` is the definition every other backend is tested
against: plain jnp, softmax in float32, grouped-query attention by
reshaping the queries into [K, G] groups, and masks built only from the
cache's `valid` bits and original positions (so it is correct for any
compacted or evicted cache, not only for a contiguous one). It materializes
the [T, S] logits over the whole static capacity.

`blockwise_attention` (the `xla` backend) computes the same function with
an online softmax over key blocks: a block no query of the query block may
see (beyond the live slots, after the newest query, outside a sliding
window) is skipped by a `lax.switch` on its position bounds (and a block
every query sees in full skips the mask), so the work grows
with the live, visible entries and not with the capacity. Coded caches are
read one block at a time through their codec (scores from the codes where
the codec has them); a `TailedKV` is two regions, read in turn. Every
backend returns the output and the log-sum-exp of the logits, so partial
results over disjoint key sets merge (`merge_attention`), and the per-key
attention mass comes from a second blockwise pass against that LSE
(`attention_mass`), never from materialized probabilities.

Conventions (shared with `kvjax.model` and `kvjax.cache`): keys are stored
after RoPE; query head n attends with kv head n // G (heads grouped
consecutively); `pos` is each slot's original token position and `valid`
its liveness; a query at position p sees the valid slots with pos <= p
(and pos > p - sliding_window).
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kvjax.cache import (
  CodedKV,
  KVCache,
  TailedKV,
  check_layer,
  is_coded,
  plain_head_dim,
)

Array = jax.Array


class Backend(enum.Enum):
  """Which attention implementation runs (resolve once: `resolve_backend`).

  AUTO picks by platform; REFERENCE is the definition (materializes [T, S]);
  XLA is the blockwise engine; PALLAS_TPU / PALLAS_GPU run the kernels of
  `pallas_kernels` (flash attention for prefill over a plain cache, split-K
  decode attention reading coded payloads through their codec's tile
  plug-in; `kvjax.kernels`), compiled on their platform and in interpret
  mode elsewhere (slow: for checking on a CPU machine).
  """

  AUTO = "auto"
  REFERENCE = "reference"
  XLA = "xla"
  PALLAS_TPU = "pallas_tpu"
  PALLAS_GPU = "pallas_gpu"


# What AUTO means on each platform.
_AUTO = {
  "cpu": Backend.XLA,
  "gpu": Backend.PALLAS_GPU,
  "tpu": Backend.PALLAS_TPU,
}
_PALLAS_TARGET = {Backend.PALLAS_TPU: "tpu", Backend.PALLAS_GPU: "gpu"}


def resolve_backend(backend: Backend | str) -> Backend:
  """A concrete `Backend` (never AUTO) from a `Backend` or its name.

  Raises:
    TypeError: for anything but a `Backend` or a str.
    ValueError: for an unknown name.
  """
  if isinstance(backend, str):
    try:
      backend = Backend(backend)
    except ValueError:
      raise ValueError(
        f"backend must be one of {[b.value for b in Backend]} (or a "
        f"kvjax.attention.Backend), got {backend!r}."
      ) from None
  if not isinstance(backend, Backend):
    raise TypeError(
      f"backend must be a kvjax.attention.Backend or its name, "
      f"got {type(backend).__name__}."
    )
  if backend is Backend.AUTO:
    return _AUTO.get(jax.default_backend(), Backend.XLA)
  return backend


class AttentionOutput(NamedTuple):
  """What an attention backend returns.

  Attributes:
    out: [B, T, N, H] in the queries' dtype (zeros for a query that sees no
      slot).
    lse: [B, N, T] float32 log-sum-exp of each query's scaled logits over
      the slots it sees (-inf when it sees none).
    probs: [B, N, T, S] float32 probabilities, only when asked for
      (`return_probs=True`); None otherwise.
  """

  out: Array
  lse: Array
  probs: Array | None = None


class KeyBias(NamedTuple):
  """A per-slot additive logit bias for keys outside a local window (SP-KV's
  write gate, `kvjax.model.WriteGate`).

  A query at position p adds `bias[b, k, s]` to its logit for slot s when
  pos[s] <= p - window (older than its local window); keys inside the
  window are unbiased. Supported by the reference backend only.

  Attributes:
    bias: [B, K, S] float32 (0: no change; -inf: never visible).
    window: static int >= 1, the local window.
  """

  bias: Array
  window: int


def einsum_f32(subscripts: str, a: Array, b: Array) -> Array:
  """einsum accumulated in float32.

  On GPU/TPU this asks for float32 accumulation of low-precision inputs;
  XLA's CPU backend cannot run bf16 x bf16 -> f32 dots, so there the inputs
  are upcast first (same result, more memory).
  """
  if jax.default_backend() == "cpu":
    return jnp.einsum(subscripts, a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _entries(x):
  """Plain [B, K, S, H] entries of a plain or coded layer payload."""
  return x.decode() if is_coded(x) else x


def attention_mask(
  q_pos: Array,  # [B, T] int32
  k_pos: Array,  # [B, K, S] int32
  k_valid: Array,  # [B, K, S] bool
  sliding_window: int | None = None,
) -> Array:
  """[B, K, 1, T, S] bool: may query t attend to slot s of kv head k."""
  q = q_pos[:, None, None, :, None]  # [B, 1, 1, T, 1]
  k = k_pos[:, :, None, None, :]  # [B, K, 1, 1, S]
  mask = k_valid[:, :, None, None, :] & (k <= q)
  if sliding_window is not None:
    mask &= k > q - sliding_window
  return mask


def _check_heads(N: int, K: int) -> int:
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}.")
  return N // K


def _dense_logits(qg, k, scale):
  """[B, K, G, T, S] float32 scaled logits of qg [B, T, K, G, H] over a
  whole layer payload k (codec scores where it has them)."""
  B, T, K, G, H = qg.shape
  if isinstance(k, TailedKV) and k.code.codec.scores is not None:
    # The code region through its codec, the full-precision tail plainly
    # (slot order: the code region, then the tail, as `_entries`).
    tail = einsum_f32("btkgh,bksh->bkgts", qg, k.tail) * scale
    return jnp.concatenate([_dense_logits(qg, k.code, scale), tail], -1)
  if isinstance(k, CodedKV) and k.codec.scores is not None:
    # q.k from the codes: the codec transforms the query once instead of
    # decoding every key.
    q_bk = jnp.moveaxis(qg, 1, 3).astype(jnp.float32)  # [B, K, G, T, H]
    return (
      k.codec.scores(q_bk.reshape(B, K, G * T, H), k.slots, k.shared).reshape(
        B, K, G, T, -1
      )
      * scale
    )
  return einsum_f32("btkgh,bksh->bkgts", qg, _entries(k)) * scale


def _lse_of(m: Array, l: Array) -> Array:
  """log-sum-exp from a running max m and sum l (-inf where l == 0)."""
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def reference_attention(
  q: Array,  # [B, T, N, H]
  k: Array,  # [B, K, S, H]
  v: Array,  # [B, K, S, H]
  *,
  q_pos: Array,  # [B, T]
  k_pos: Array,  # [B, K, S]
  k_valid: Array,  # [B, K, S]
  scale: float | None = None,
  sliding_window: int | None = None,
  key_bias: KeyBias | None = None,
) -> AttentionOutput:
  """Causal grouped-query attention of T queries over S cache slots: the
  definition.

  A query with no visible slot (e.g. a padding query of an empty row) gets
  all-zero probabilities, a zero output and LSE -inf, never NaN.

  Args:
    q: [B, T, N, H] queries (RoPE applied).
    k: [B, K, S, H] keys (RoPE applied), or a `CodedKV` / `TailedKV` layer
      payload (a codec's `scores` are used when it has them, else it is
      decoded); N must be a multiple of K.
    v: [B, K, S, H] values, or a coded layer payload (decoded).
    q_pos: [B, T] positions of the queries.
    k_pos: [B, K, S] positions of the keys held in each slot.
    k_valid: [B, K, S] whether each slot holds a live entry.
    scale: logit scale; defaults to 1/sqrt(H).
    sliding_window: optional window length (keys with q_pos - k_pos >=
      window are masked).
    key_bias: optional `KeyBias` added to the logits of keys older than
      its window (None: no bias).

  Returns:
    An `AttentionOutput` with `probs` [B, N, T, S] (always, here).
  """
  B, T, N, H = q.shape
  K = k_valid.shape[1]
  G = _check_heads(N, K)
  scale = H**-0.5 if scale is None else scale
  qg = q.reshape(B, T, K, G, H)
  logits = _dense_logits(qg, k, scale)
  mask = attention_mask(q_pos, k_pos, k_valid, sliding_window)  # [B,K,1,T,S]
  if key_bias is not None:
    old = (
      k_pos[:, :, None, None, :]
      <= q_pos[:, None, None, :, None] - key_bias.window
    )  # [B, K, 1, T, S]
    logits = logits + jnp.where(old, key_bias.bias[:, :, None, None, :], 0.0)
    mask &= ~(old & (key_bias.bias[:, :, None, None, :] == -jnp.inf))
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, T, S]
  v = _entries(v)
  out = einsum_f32("bkgts,bksh->btkgh", probs.astype(v.dtype), v)
  out = out.reshape(B, T, N, H).astype(q.dtype)
  lse = _lse_of(row_max[..., 0], denom[..., 0]).reshape(B, N, T)
  return AttentionOutput(out, lse, probs.reshape(B, N, T, -1))


def merge_attention(a: AttentionOutput, b: AttentionOutput) -> AttentionOutput:
  """Attention over the union of two disjoint key sets from the partial
  results over each (weights exp(lse_i - lse)); an empty part (LSE -inf)
  weighs 0. `probs` are not merged (None)."""
  lse = jnp.logaddexp(a.lse, b.lse)  # [B, N, T]
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  w = lambda x: jnp.moveaxis(jnp.exp(x.lse - safe), 1, 2)[..., None]
  out = w(a) * a.out.astype(jnp.float32) + w(b) * b.out.astype(jnp.float32)
  return AttentionOutput(out.astype(a.out.dtype), lse)


# ----------------------------------------------------------------------------
# The blockwise engine. It reads a layer in place from L-stacked leaves (the
# model's scan carries the whole cache and passes the layer index), one key
# block at a time.


class LayerView(NamedTuple):
  """One layer of L-stacked cache leaves, read in place.

  Attributes:
    k, v: [L, B, K, S, H] arrays, or `CodedKV` / `TailedKV` payloads whose
      leaves all start with L.
    pos: [L, B, K, S] int32.
    valid: [L, B, K, S] bool.
    layer: [] int32 (may be traced): the layer to read.
  """

  k: Any
  v: Any
  pos: Array
  valid: Array
  layer: Array


def layer_view(k, v, k_pos, k_valid) -> LayerView:
  """A `LayerView` of single-layer arrays ([B, K, S, ...] and coded
  payloads without an L axis): adds L = 1 (a free reshape)."""
  add = lambda x: jax.tree.map(lambda a: a[None], x)
  return LayerView(add(k), add(v), k_pos[None], k_valid[None], jnp.int32(0))


def _as_view(view, layer) -> LayerView:
  """A `LayerView` of a (KVCache, layer) pair or of a LayerView."""
  if isinstance(view, LayerView):
    if layer is not None:
      raise ValueError(
        "layer must be None with a LayerView (it names its own layer)."
      )
    return view
  if isinstance(view, KVCache):
    if layer is None:
      raise ValueError(
        "cached_attention over a KVCache needs the layer to "
        "read: cached_attention(q, cache, layer, ...)."
      )
    check_layer(layer, view.num_layers)
    return LayerView(
      view.k, view.v, view.pos, view.valid, jnp.asarray(layer, jnp.int32)
    )
  raise TypeError(
    "cached_attention reads a KVCache (with layer=) or a "
    f"LayerView, got {type(view).__name__}."
  )


def _regions(x, capacity: int) -> list[tuple[int, int, Any]]:
  """(first slot, slot count, L-stacked region payload) of each storage
  region of a payload: one region, or a TailedKV's code region and tail."""
  if isinstance(x, TailedKV):
    sc = x.code_slots
    return [(0, sc, x.code), (sc, capacity - sc, x.tail)]
  return [(0, capacity, x)]


def _leaf_granule(region, size: int) -> int:
  """Slots per leaf entry of a region (1, or G for KIVI's per-channel
  statistics): block offsets and sizes must be multiples of it."""
  if not isinstance(region, CodedKV):
    return 1
  granule = 1
  for leaf in region.slots.values():
    if size % leaf.shape[3]:
      raise ValueError(
        f"a {size}-slot region has a per-slot leaf of "
        f"{leaf.shape[3]} entries: not a whole group each."
      )
    granule = max(granule, size // leaf.shape[3])
  return granule


class _Run(NamedTuple):
  """Key blocks of `size` slots inside one k region and one v region
  (static). Block i covers slots [offsets[i], offsets[i] + size) and counts
  those from lows[i] on: a run that does not divide into blocks ends with a
  block shifted back to end at the run's end, whose first slots (read by
  the block before) are masked, so every block of a run has one shape and
  one loop runs them all."""

  size: int
  offsets: tuple[int, ...]
  lows: tuple[int, ...]
  k_region: Any
  k_start: int  # first slot of the k region
  k_slots: int  # slots of the k region
  v_region: Any
  v_start: int
  v_slots: int


def _plan(view: LayerView, block: int) -> list[_Run]:
  """Splits the slots [0, S) into runs of blocks of at most `block` slots,
  each run inside one k region and one v region."""
  S = view.pos.shape[-1]
  kr, vr = _regions(view.k, S), _regions(view.v, S)
  cuts = sorted({0, S} | {r[0] for r in kr} | {r[0] for r in vr})
  runs = []
  for a, b in zip(cuts[:-1], cuts[1:]):
    if b <= a:
      continue
    ks, kn, kreg = next(r for r in kr if r[0] <= a < r[0] + r[1])
    vs, vn, vreg = next(r for r in vr if r[0] <= a < r[0] + r[1])
    g = math.lcm(_leaf_granule(kreg, kn), _leaf_granule(vreg, vn))
    if (a - ks) % g or (a - vs) % g or (b - a) % g:
      raise ValueError(
        f"slots [{a}, {b}) do not align with the payload's {g}-slot groups."
      )
    size = min(b - a, max(g, (block // g) * g))
    full, rest = divmod(b - a, size)
    offsets = [a + i * size for i in range(full)]
    lows = list(offsets)
    if rest:
      offsets.append(b - size)
      lows.append(a + full * size)
    runs.append(
      _Run(size, tuple(offsets), tuple(lows), kreg, ks, kn, vreg, vs, vn)
    )
  return runs


def _slice_slots(leaf: Array, layer: Array, start, size: int) -> Array:
  """leaf [L, B, K, S, ...] -> [B, K, size, ...] of `layer` from `start`."""
  starts = (layer, 0, 0, start) + (0,) * (leaf.ndim - 4)
  sizes = (1,) + tuple(leaf.shape[1:3]) + (size,) + tuple(leaf.shape[4:])
  return jax.lax.dynamic_slice(leaf, starts, sizes)[0]


def _layer_of(tree, layer: Array):
  return jax.tree.map(
    lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), tree
  )


class _Block(NamedTuple):
  """One key block of one layer: a plain [B, K, n, H] array, or a codec's
  per-slot leaves of the block with the layer's shared leaves."""

  entries: Array | None
  enc: dict | None = None
  shared: dict | None = None
  codec: Any = None


def _fetch(region, region_size: int, layer: Array, offset, size: int) -> _Block:
  if isinstance(region, CodedKV):
    enc = {}
    for name, leaf in region.slots.items():
      per = region_size // leaf.shape[3]
      enc[name] = _slice_slots(leaf, layer, offset // per, size // per)
    return _Block(None, enc, _layer_of(region.shared, layer), region.codec)
  return _Block(_slice_slots(region, layer, offset, size))


def _block_entries(blk: _Block) -> Array:
  if blk.codec is None:
    return blk.entries
  return blk.codec.decode(blk.enc, blk.shared)


def _block_logits(qm: Array, blk: _Block) -> Array:
  """[B, K, M, n] float32 logits of qm [B, K, M, H] over a block (the
  engine scales the queries once, so no pass over the scores scales them;
  codec scores are linear in q)."""
  if blk.codec is not None and blk.codec.scores is not None:
    return blk.codec.scores(qm.astype(jnp.float32), blk.enc, blk.shared)
  return einsum_f32("bkmh,bknh->bkmn", qm, _block_entries(blk))


def _block_mask(pos_b, valid_b, qpos, window):
  """[B, K, 1, tq, n] visibility of a block's slots (pos_b, valid_b
  [B, K, n]) to queries at qpos [B, tq]."""
  kp = pos_b[:, :, None, None, :]
  qp = qpos[:, None, None, :, None]
  mask = valid_b[:, :, None, None, :] & (kp <= qp)
  if window is not None:
    mask &= kp > qp - window
  return mask


def _any_visible(pos_b, valid_b, qpos, window):
  """[] bool: does any query of qpos [B, tq] see any slot of the block."""
  hi = jnp.max(qpos, axis=1)[:, None, None]  # [B, 1, 1]
  vis = valid_b & (pos_b <= hi)
  if window is not None:
    lo = jnp.min(qpos, axis=1)[:, None, None]
    vis &= pos_b > lo - window
  return jnp.any(vis)


class _Keys(NamedTuple):
  """The bookkeeping of one key block: first slot, [B, K, n] positions and
  liveness (slots before the block's low mark count as not live)."""

  offset: Array
  pos: Array
  valid: Array


def _read_keys(view: LayerView, run: _Run, offset, low) -> _Keys:
  pos_b = _slice_slots(view.pos, view.layer, offset, run.size)
  valid_b = _slice_slots(view.valid, view.layer, offset, run.size)
  valid_b &= offset + jnp.arange(run.size) >= low
  return _Keys(offset, pos_b, valid_b)


def _read_k(view: LayerView, run: _Run, offset) -> _Block:
  return _fetch(
    run.k_region, run.k_slots, view.layer, offset - run.k_start, run.size
  )


def _read_v(view: LayerView, run: _Run, offset) -> _Block:
  return _fetch(
    run.v_region, run.v_slots, view.layer, offset - run.v_start, run.size
  )


def _block_xs(run: _Run):
  return (jnp.asarray(run.offsets, jnp.int32), jnp.asarray(run.lows, jnp.int32))


def _all_visible(pos_b, valid_b, qpos, window):
  """[] bool: does every query of qpos [B, tq] see every slot of the block
  (no mask needed)."""
  lo = jnp.min(qpos, axis=1)[:, None, None]  # [B, 1, 1]
  full = valid_b & (pos_b <= lo)
  if window is not None:
    hi = jnp.max(qpos, axis=1)[:, None, None]
    full &= pos_b > hi - window
  return jnp.all(full)


def _scan_blocks(view: LayerView, runs: list[_Run], carry, visit, qpos, window):
  """Folds `visit(carry, run, keys, masked) -> carry` over the key blocks
  a query of qpos [B, tq] may see, skipping the others (a `lax.switch` on
  the block's position bounds; a block every query sees in full is visited
  with masked=False). Blocks run inside a loop even when there is one, so
  a read never fuses with the cache write before it (which would make XLA
  copy the whole buffer)."""
  for run in runs:

    def step(carry, xs, run=run):
      keys = _read_keys(view, run, *xs)
      branch = jnp.where(
        _all_visible(keys.pos, keys.valid, qpos, window),
        2,
        _any_visible(keys.pos, keys.valid, qpos, window).astype(jnp.int32),
      )
      return jax.lax.switch(
        branch,
        (
          lambda c: c,
          lambda c: visit(c, run, keys, True),
          lambda c: visit(c, run, keys, False),
        ),
        carry,
      ), None

    carry, _ = jax.lax.scan(step, carry, _block_xs(run))
  return carry


def _attend_block(view, runs, qg, qpos, scale, window):
  """Online softmax of one query block qg [B, K, G, tq, H] (positions
  qpos [B, tq]) over the visible key blocks: (out [B, K, G, tq, H]
  float32, lse [B, K, G, tq])."""
  B, K, G, tq, H = qg.shape
  # In the queries' dtype: a bf16 cache keeps its bf16 x bf16 -> f32 dot.
  qm = (qg * scale).astype(qg.dtype).reshape(B, K, G * tq, H)
  # Many queries: summing the probabilities is a pass worth folding into
  # the dot; a decode step's few are cheaper summed than a copied block.
  ones_column = G * tq > 4 * DECODE_QUERIES

  def visit(carry, run, keys, masked):
    m, l, acc = carry
    kb, vb = _read_k(view, run, keys.offset), _read_v(view, run, keys.offset)
    s = _block_logits(qm, kb).reshape(B, K, G, tq, run.size)
    vals = _block_entries(vb)
    if ones_column:
      # The softmax denominator comes out of the same dot as the output,
      # not from another pass over the [G * tq, n] probabilities.
      vals = jnp.concatenate(
        [vals, jnp.ones(vals.shape[:-1] + (1,), vals.dtype)], axis=-1
      )
    if masked:
      mask = _block_mask(keys.pos, keys.valid, qpos, window)
      s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    else:  # every slot seen: nothing to mask (a codec's scores may be
      # -inf: range search's pruned keys, a whole block of them at once)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)  # 0 where m = -inf
    pv = einsum_f32("bkgtn,bknh->bkgth", p.astype(vals.dtype), vals)
    total = pv[..., H] if ones_column else jnp.sum(p, axis=-1)
    return (m_new, alpha * l + total, alpha[..., None] * acc + pv[..., :H])

  init = (
    jnp.full((B, K, G, tq), -jnp.inf, jnp.float32),
    jnp.zeros((B, K, G, tq), jnp.float32),
    jnp.zeros((B, K, G, tq, H), jnp.float32),
  )
  m, l, acc = _scan_blocks(view, runs, init, visit, qpos, window)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out, _lse_of(m, l)


# Block sizes of the engine (measured on a 2-core CPU: small blocks pay
# loop overhead, large ones spill the caches): key blocks of KEY_BLOCK slots
# and query blocks of QUERY_BLOCK queries; a step of DECODE_QUERIES queries
# or fewer reads key blocks of DECODE_KEY_BLOCK slots (its [T, n] scores
# are small, the loop overhead is what counts).
KEY_BLOCK = 512
QUERY_BLOCK = 512
DECODE_QUERIES = 16
DECODE_KEY_BLOCK = 1024
# At most this many [B, N, tq, n] scores per block (8 MB of float32, what
# one 512 x 512 block of 8 heads holds): a larger batch or more heads get
# smaller blocks (`_tiles`), so a block's scores stay in cache.
SCORE_TILE = 1 << 21


def _tiles(
  key_block: int | None, query_block: int, T: int, B: int, N: int
) -> tuple[int, int]:
  """(slots per key block, queries per query block).

  A decode step (T <= DECODE_QUERIES) reads DECODE_KEY_BLOCK slots at a
  time. Otherwise the [B, N, tq, n] scores of a block are kept to
  SCORE_TILE elements, as square as the query block allows (KEY_BLOCK x
  QUERY_BLOCK at B = 1 and 8 heads, 256 x 128 at B = 8): smaller key
  blocks keep the causal skipping that a batch would otherwise lose.
  """
  if key_block is not None and (
    isinstance(key_block, bool)
    or not isinstance(key_block, int)
    or key_block < 1
  ):
    raise ValueError(
      f"key_block must be a positive int or None, got {key_block!r}."
    )
  area = max(SCORE_TILE // max(B * N, 1), 1)
  if key_block is None:
    if T <= DECODE_QUERIES:
      return DECODE_KEY_BLOCK, min(T, query_block)
    side = 1 << max(4, math.ceil(math.log2(math.sqrt(area))))
    key_block = min(KEY_BLOCK, side)
  tq = min(T, query_block, max(DECODE_QUERIES, area // key_block))
  return key_block, tq


def _query_blocks(q, q_pos, tq):
  """q [B, T, N, H] -> [nq, B, tq, N, H] (padded queries at position -1
  see nothing), positions [nq, B, tq]."""
  B, T = q_pos.shape
  nq = -(-T // tq)
  pad = nq * tq - T
  q = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)])
  q_pos = jnp.pad(q_pos, [(0, 0), (0, pad)], constant_values=-1)
  split = lambda x: jnp.moveaxis(x.reshape((B, nq, tq) + x.shape[2:]), 1, 0)
  return split(q), split(q_pos)


def cached_attention(
  q: Array,  # [B, T, N, H]
  view: "LayerView | KVCache",
  layer: int | Array | None = None,
  *,
  q_pos: Array,  # [B, T]
  scale: float | None = None,
  sliding_window: int | None = None,
  backend: Backend | str = Backend.AUTO,
  return_probs: bool = False,
  key_block: int | None = None,
  query_block: int = QUERY_BLOCK,
  key_bias: KeyBias | None = None,
) -> AttentionOutput:
  """Attention of queries q over one layer of a cache, read in place.

  Args:
    q: [B, T, N, H] queries (RoPE applied); N a multiple of K, query head
      n reading kv head n // (N / K).
    view: a `KVCache` (plain, compacted or coded) with `layer`, or a
      `LayerView` (`layer_view` wraps single-layer arrays).
    layer: the layer of a `KVCache` to read (an int or [] int32, may be
      traced); must be None with a `LayerView`.
    q_pos: [B, T] int32 query positions: a query at p sees the valid slots
      with pos <= p (and p - pos < sliding_window).
    scale: logit scale; defaults to 1/sqrt(H).
    sliding_window: optional window length.
    backend: a `Backend` or its name (AUTO resolves by platform).
    return_probs: also return the [B, N, T, S] probabilities (materialized:
      for analysis only).
    key_block: slots per key block of the XLA engine (None: chosen from
      T, B and N, see `_tiles`).
    query_block: at most this many queries per query block of the XLA
      engine (fewer for a large batch, see `SCORE_TILE`).
    key_bias: optional `KeyBias` (SP-KV's write gate) for the keys older
      than its window; the reference backend only (others raise), and not
      under a mesh.

  Returns:
    An `AttentionOutput`.
  """
  backend = resolve_backend(backend)
  if key_bias is not None and backend is not Backend.REFERENCE:
    raise ValueError(
      f"key_bias (the write gate's logit bias) is supported by the "
      f"reference backend only, got backend={backend.value!r}; use "
      "backend='reference'."
    )
  view = _as_view(view, layer)
  H_cache = plain_head_dim(view.k)
  if (
    getattr(q, "ndim", None) != 4
    or q.shape[0] != view.pos.shape[1]
    or (H_cache is not None and q.shape[-1] != H_cache)
  ):
    raise ValueError(
      f"q must be [B={view.pos.shape[1]}, T, N, "
      f"H={H_cache or 'head_dim'}], got "
      f"{getattr(q, 'shape', q)}."
    )
  B, T, N, H = q.shape
  K = view.pos.shape[2]
  G = _check_heads(N, K)
  if tuple(q_pos.shape) != (B, T):
    raise ValueError(f"q_pos must be [B={B}, T={T}], got {tuple(q_pos.shape)}.")
  scale = H**-0.5 if scale is None else scale
  from kvjax.parallel import mesh as parallel_mesh  # imports kvjax.cache only

  mesh = parallel_mesh.context_mesh()
  if mesh is not None and key_bias is not None:
    raise ValueError("key_bias is not supported under a mesh.")
  if mesh is not None:  # a sharded cache: per-shard partials, merged by LSE
    from kvjax.parallel import attention as parallel_attention

    return parallel_attention.sharded_attention(
      q,
      view,
      q_pos=q_pos.astype(jnp.int32),
      scale=scale,
      sliding_window=sliding_window,
      backend=backend,
      return_probs=return_probs,
      key_block=key_block,
      query_block=query_block,
      mesh=mesh,
    )
  if backend is Backend.REFERENCE:
    kl, vl = _layer_of(view.k, view.layer), _layer_of(view.v, view.layer)
    res = reference_attention(
      q,
      kl,
      vl,
      q_pos=q_pos,
      k_pos=_layer_of(view.pos, view.layer),
      k_valid=_layer_of(view.valid, view.layer),
      scale=scale,
      sliding_window=sliding_window,
      key_bias=key_bias,
    )
    return res if return_probs else res._replace(probs=None)
  if (
    isinstance(query_block, bool)
    or not isinstance(query_block, int)
    or (query_block < 1)
  ):
    raise ValueError(
      f"query_block must be a positive int, got {query_block!r}."
    )
  _tiles(key_block, query_block, T, B, N)  # checks key_block
  if backend in _PALLAS_TARGET:
    from kvjax import kernels  # pallas_kernels imports lazily

    parts = kernels.attention(
      view,
      q,
      q_pos=q_pos.astype(jnp.int32),
      scale=scale,
      sliding_window=sliding_window,
      target=_PALLAS_TARGET[backend],
    )
    if parts is not None:
      res = AttentionOutput(*parts[0])
      for part in parts[1:]:
        res = merge_attention(res, AttentionOutput(*part))
      probs = None
      if return_probs:
        probs = attention_probs(
          q,
          view,
          res.lse,
          q_pos=q_pos,
          scale=scale,
          sliding_window=sliding_window,
        )
      return AttentionOutput(res.out.astype(q.dtype), res.lse, probs)
    backend = Backend.XLA  # the kernels cannot take this payload (warned)
  if backend is not Backend.XLA:
    raise ValueError(f"backend {backend} is not available in this build.")
  kb, tq = _tiles(key_block, query_block, T, B, N)
  runs = _plan(view, kb)
  q_pos = q_pos.astype(jnp.int32)
  to_blocks = lambda qb: jnp.moveaxis(
    qb.reshape(B, -1, K, G, H), 1, 3
  )  # [B, T', N, H] -> [B, K, G, T', H]
  if tq == T:
    out, lse = _attend_block(
      view, runs, to_blocks(q), q_pos, scale, sliding_window
    )
  else:
    qs, ps = _query_blocks(q, q_pos, tq)

    def one(_, xs):
      qb, pb = xs
      return None, _attend_block(
        view, runs, to_blocks(qb), pb, scale, sliding_window
      )

    _, (out, lse) = jax.lax.scan(one, None, (qs, ps))
    # [nq, B, K, G, tq, ...] -> [B, K, G, nq * tq, ...][..., :T]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, -1, H)[:, :, :, :T]
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, -1)[..., :T]
  out = jnp.moveaxis(out, 3, 1).reshape(B, T, N, H).astype(q.dtype)
  lse = lse.reshape(B, N, T)
  probs = None
  if return_probs:
    probs = attention_probs(
      q, view, lse, q_pos=q_pos, scale=scale, sliding_window=sliding_window
    )
  return AttentionOutput(out, lse, probs)


def attention_probs(
  q, view: LayerView, lse, *, q_pos, scale=None, sliding_window=None
) -> Array:
  """[B, N, T, S] float32 probabilities exp(logit - lse) over the whole
  layer (materialized; what `capture=("attn_probs",)` asks for)."""
  B, T, N, H = q.shape
  K = view.pos.shape[2]
  G = _check_heads(N, K)
  scale = H**-0.5 if scale is None else scale
  kl = _layer_of(view.k, view.layer)
  logits = _dense_logits(q.reshape(B, T, K, G, H), kl, scale)
  mask = attention_mask(
    q_pos,
    _layer_of(view.pos, view.layer),
    _layer_of(view.valid, view.layer),
    sliding_window,
  )
  lse_g = lse.reshape(B, K, G, T)[..., None]
  safe = jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)
  probs = jnp.where(mask, jnp.exp(logits - safe), 0.0)
  return probs.reshape(B, N, T, -1)


def attention_mass(
  q: Array,  # [B, T, N, H]
  view: LayerView,
  lse: Array,  # [B, N, T]
  weights: Array,  # [B, T]
  *,
  q_pos: Array,  # [B, T]
  scale: float | None = None,
  sliding_window: int | None = None,
  key_block: int | None = None,
  query_block: int = QUERY_BLOCK,
  backend: Backend | str = Backend.XLA,
) -> Array:
  """Per-slot attention mass sum_t weights[t] * p[t, s], [B, N, S] float32,
  from the queries' LSE in a second blockwise pass (as flash attention's
  backward does): no [T, S] probabilities are allocated. A Pallas backend
  runs the flash mass kernel over a plain cache (a coded one: this
  engine's pass).

  Args:
    q: the queries attention ran with.
    view: the layer they attended over.
    lse: [B, N, T] their log-sum-exp (`AttentionOutput.lse`).
    weights: [B, T] float weight of each query (0 for padding).
    q_pos: [B, T] query positions.
  """
  B, T, N, H = q.shape
  K = view.pos.shape[2]
  G = _check_heads(N, K)
  scale = H**-0.5 if scale is None else scale
  backend = resolve_backend(backend)
  from kvjax.parallel import mesh as parallel_mesh

  mesh = parallel_mesh.context_mesh()
  if mesh is not None:  # each shard sums its own slots' mass
    from kvjax.parallel import attention as parallel_attention

    return parallel_attention.sharded_mass(
      q,
      view,
      lse,
      weights,
      q_pos=q_pos.astype(jnp.int32),
      scale=scale,
      sliding_window=sliding_window,
      key_block=key_block,
      query_block=query_block,
      backend=backend,
      mesh=mesh,
    )
  if backend in _PALLAS_TARGET:
    from kvjax import kernels

    mass = kernels.mass(
      view,
      q,
      lse,
      weights.astype(jnp.float32),
      q_pos=q_pos.astype(jnp.int32),
      scale=scale,
      sliding_window=sliding_window,
      target=_PALLAS_TARGET[backend],
    )
    if mass is not None:
      return mass
  kb, tq = _tiles(key_block, query_block, T, B, N)
  runs = _plan(view, kb)
  qs, ps = _query_blocks(q, q_pos.astype(jnp.int32), tq)
  ls, _ = _query_blocks(
    jnp.moveaxis(lse, 1, 2)[..., None], q_pos.astype(jnp.int32), tq
  )  # [nq, B, tq, N, 1]
  ws, _ = _query_blocks(
    weights.astype(jnp.float32)[..., None, None], q_pos, tq
  )  # [nq, B, tq, 1, 1]
  to_g = lambda x: jnp.moveaxis(x.reshape(B, tq, K, G, -1), 1, 3)
  outs = []
  for run in runs:

    def per_key_block(_, xs, run=run):
      keys = _read_keys(view, run, *xs)
      kb = _read_k(view, run, keys.offset)

      def per_query_block(acc, xs):
        qb, pb, lb, wb = xs
        qg = to_g(qb)  # [B, K, G, tq, H]
        lse_b = to_g(lb)[..., 0]  # [B, K, G, tq]
        w_b = to_g(jnp.broadcast_to(wb, (B, tq, N, 1)))[..., 0]

        def add(acc):
          qm = (qg * scale).astype(qg.dtype).reshape(B, K, G * tq, H)
          s = _block_logits(qm, kb).reshape(B, K, G, tq, run.size)
          mask = _block_mask(keys.pos, keys.valid, pb, sliding_window)
          safe = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)[..., None]
          p = jnp.where(mask, jnp.exp(s - safe), 0.0)
          return acc + jnp.einsum("bkgtn,bkgt->bkgn", p, w_b)

        vis = _any_visible(keys.pos, keys.valid, pb, sliding_window)
        return jax.lax.cond(vis, add, lambda a: a, acc), None

      acc = jnp.zeros((B, K, G, run.size), jnp.float32)
      acc, _ = jax.lax.scan(per_query_block, acc, (qs, ps, ls, ws))
      return None, acc

    _, mass = jax.lax.scan(per_key_block, None, _block_xs(run))
    # [count, B, K, G, size]: each block's slots from its low mark on.
    for i, (o, lo) in enumerate(zip(run.offsets, run.lows)):
      outs.append(mass[i, ..., lo - o :])
  return jnp.concatenate(outs, axis=-1).reshape(B, N, -1)


def attention(
  q,
  k,
  v,
  *,
  q_pos,
  k_pos,
  k_valid,
  scale=None,
  sliding_window=None,
  backend: Backend | str = Backend.AUTO,
  return_probs: bool = False,
) -> AttentionOutput:
  """Attention over single-layer arrays ([B, K, S, H] or coded layer
  payloads) with the chosen backend; the same contract as
  `reference_attention` (`probs` only with `return_probs`)."""
  view = layer_view(k, v, k_pos, k_valid)
  return cached_attention(
    q,
    view,
    q_pos=q_pos,
    scale=scale,
    sliding_window=sliding_window,
    backend=backend,
    return_probs=return_probs,
  )
