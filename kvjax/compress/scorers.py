"""More scorers from kvpress: KeyDiff, ObservedAttention, LagKV,
NonCausalAttn, LeverageScore, Compactor, CUR and Q-Filters.

Each method is a `Scorer` factory (`<name>_scorer`, usable by name from
`SCORERS`, e.g. by Ada-KV or a block/chunk wrapper) and a prefill policy
factory with the method's fixed name (`keydiff(ratio)`, ...), a plain
score-then-top-k through `policies.scored_policy`: the kept entries are
compacted into a smaller static capacity (memory saved for real, batched,
jitted), where kvpress gathers one unbatched row per layer.

Slot order. kvpress scores the keys of a layer in sequence order; here the
methods that depend on order (LagKV's partitions, CUR's windows,
NonCausalAttn's chunks and pooling, Compactor's sinks) work on each (layer,
row, kv head)'s *valid* slots sorted by position, so a method given a
subset of the slots as valid (a block wrapper) scores that subset as
kvpress scores a sequence of that length. Rows of a ragged batch are scored
on their own live entries only (padding never enters a statistic).

Normalisations that kvpress takes over the whole (batch, kv head, sequence)
tensor of a layer (the z-scores of NonCausalAttn, LeverageScore and
Compactor) are taken per (layer, row) here: equal for batch 1, and a row's
selection then does not depend on the other rows of its batch.
"""

from __future__ import annotations

import types
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache
from kvjax.compress import base
from kvjax.compress import policies
from kvjax.model import rope_inv_freq

Array = jax.Array
Scorer = policies.Scorer
_BIG = policies._BIG  # pylint: disable=protected-access
_INT_MAX = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------
# Helpers.


_check_int = base.check_int


def _check_bool(value, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}.")
  return bool(value)


_check_float = base.check_float


def _sort_slots(cache: KVCache) -> tuple[Array, Array, Array, Array]:
  """Each (layer, row, head)'s valid slots in position order, first.

  Returns:
    order: [L, B, K, S] source slot of each sorted index (valid first).
    inverse: [L, B, K, S] sorted index of each slot.
    n: [L, B, K] valid slots.
    live: [L, B, K, S] bool, sorted index < n.
  """
  key = jnp.where(cache.valid, cache.pos, _INT_MAX)
  order = jnp.argsort(key, axis=-1, stable=True)
  inverse = jnp.argsort(order, axis=-1, stable=True)
  n = base.live_counts(cache)
  live = jnp.arange(cache.pos.shape[-1]) < n[..., None]
  return order, inverse, n, live


def _gather(x: Array, idx: Array) -> Array:
  return base._gather_slots(x, idx)  # pylint: disable=protected-access


def _unsort(scores: Array, inverse: Array) -> Array:
  return jnp.take_along_axis(scores, inverse, axis=-1)


def _floats(x: Array, what: str) -> Array:
  if not isinstance(x, jax.Array) or x.ndim != 5:
    raise ValueError(
      f"this scorer reads float {what} [L, B, K, S, H]; apply it before any "
      "codec in a chain (evict, then quantize)."
    )
  return x.astype(jnp.float32)


def _zscore(x: Array, live: Array) -> Array:
  """(x - mean) / max(std, 1e-6) over the live entries of each (layer,
  row) (all kv heads), std unbiased as torch's `Tensor.std`."""
  w = live.astype(jnp.float32)
  count = jnp.sum(w, axis=(2, 3), keepdims=True)
  mean = jnp.sum(x * w, axis=(2, 3), keepdims=True) / jnp.maximum(count, 1)
  var = jnp.sum(jnp.square(x - mean) * w, axis=(2, 3), keepdims=True)
  std = jnp.sqrt(var / jnp.maximum(count - 1, 1))
  return jnp.where(live, (x - mean) / jnp.maximum(std, 1e-6), 0.0)


def _pool3(x: Array) -> Array:
  """avg_pool1d(kernel 3, padding 1, stride 1), zero padding counted."""
  return policies._avg_pool(x, 3)  # pylint: disable=protected-access


def _derotate(k: Array, pos: Array, geometry) -> Array:
  """Keys [L, B, K, S, H] stored after RoPE, rotated back to pre-RoPE."""
  inv_freq = rope_inv_freq(geometry)
  freqs = -pos.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(freqs), jnp.sin(freqs)
  x1, x2 = jnp.split(k, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _queries_for(ctx: base.CompressContext, pos: Array) -> tuple[Array, Array]:
  """The query of this pass at each slot's position.

  Args:
    ctx: the context (`ctx.q` [L, B, T, N, H], `q_pos`, `q_mask`).
    pos: [L, B, K, S] positions.

  Returns:
    q: [L, B, K, G, S, H] float32 (zero where no query has that position),
    found: [L, B, K, S] bool.
  """
  q = ctx.q.astype(jnp.float32)
  L, B, T, N, H = q.shape
  K = pos.shape[2]
  qpos = jnp.where(ctx.q_mask, ctx.q_pos, _INT_MAX)
  qorder = jnp.argsort(qpos, axis=1, stable=True)  # [B, T]
  qsorted = jnp.take_along_axis(qpos, qorder, axis=1)
  t = jax.vmap(lambda srt, p: jnp.searchsorted(srt, p, side="left"), (0, 1), 1)(
    qsorted, pos
  )  # [L, B, K, S]
  t = jnp.clip(t, 0, T - 1)
  bi = jnp.arange(B)[None, :, None, None]
  found = qsorted[bi, t] == pos
  idx = qorder[bi, t]  # [L, B, K, S]
  qk = q.reshape(L, B, T, K, N // K, H).transpose(0, 1, 3, 4, 2, 5)
  out = jnp.take_along_axis(qk, idx[:, :, :, None, :, None], axis=4)
  return jnp.where(found[:, :, :, None, :, None], out, 0.0), found


def _needs_own_queries(ctx: base.CompressContext, cache: KVCache, name: str):
  """Static check: the observed queries can cover every live entry."""
  if ctx.q is None:
    raise ValueError(f"{name} needs ctx.q (list 'q' in needs).")
  live = base.live_bound(cache, ctx)
  observed = ctx.q.shape[2]
  if ctx.phase == "prefill" and observed < live:
    # Refused, not an error: a question observed after the context (the
    # sweep's aware mode) is not what these methods read.
    raise base.Degenerate(
      f"{name} scores each entry with the attention of the queries of the "
      f"entries themselves (as kvpress, at prefill): {observed} observed "
      f"queries cannot cover up to {live} cached entries; compress at "
      "prefill, not with a question's queries."
    )
  if ctx.phase != "prefill":
    raise ValueError(
      f"{name} scores each entry with the attention of the queries of the "
      f"entries themselves (prefill only, as kvpress): got phase="
      f"{ctx.phase!r} with {observed} observed queries for up to {live} "
      "cached entries."
    )


# ----------------------------------------------------------------------------
# KeyDiff.


@base.by_value
def keydiff_scorer() -> Scorer:
  """KeyDiff (arXiv 2504.15364; kvpress `KeyDiffPress`).

  score = -cos(k, a), a = the mean of the L2-normalised keys over the valid
  slots of each (layer, row, kv head). Keys most unlike the average key are
  kept. The mean runs over the slots the scorer is given as valid, so a
  block wrapper gets KeyDiff's block-wise variant. Keys are the stored
  (post-RoPE) keys, as kvpress'. Normalisation epsilons as torch's
  `F.normalize` (1e-12) and `F.cosine_similarity` (1e-8).
  """

  def score(cache, ctx):
    del ctx
    k = _floats(cache.k, "keys")
    valid = cache.valid[..., None]
    norm = jnp.linalg.norm(k, axis=-1, keepdims=True)
    unit = k / jnp.maximum(norm, 1e-12)
    n = jnp.maximum(jnp.sum(valid, axis=3, keepdims=True), 1)
    anchor = jnp.sum(jnp.where(valid, unit, 0.0), axis=3, keepdims=True) / n
    dot = jnp.sum(k * anchor, axis=-1)
    den = norm[..., 0] * jnp.linalg.norm(anchor, axis=-1)
    return -dot / jnp.maximum(den, 1e-8)

  return Scorer(score, (), "keydiff")


# ----------------------------------------------------------------------------
# Observed attention.


def queries_seeing(ctx: base.CompressContext, pos: Array) -> Array:
  """[L, B, K, S] float32: live queries of this pass at positions >= pos
  (the queries that can see an entry at `pos` under causal attention)."""
  qpos = jnp.where(ctx.q_mask, ctx.q_pos, -1)
  srt = jnp.sort(qpos, axis=1)
  T = srt.shape[1]
  before = jax.vmap(
    lambda s, p: jnp.searchsorted(s, p, side="left"), (0, 1), 1
  )(srt, pos)
  return (T - before).astype(jnp.float32)


@base.by_value
def observed_attention_scorer() -> Scorer:
  """Observed attention (H2O's prefill score; kvpress
  `ObservedAttentionPress`).

  score = (attention the entry receives, summed over the prompt queries) /
  (number of prompt queries that see it), averaged over the query heads of
  each kv head. kvpress divides the column sums of the eager attention
  matrix by `arange(T, 0, -1)` (key j is seen by the T - j queries at
  positions >= j) and then averages over the head group; kvjax reads the
  same column sums from the `attn_mass` tap (the engine's blockwise LSE
  pass, no [T, S] probabilities) and divides by the live queries of the
  row at positions >= the entry's position (the same count at prefill,
  and right for ragged rows: padding queries never count).
  """

  def score(cache, ctx):
    if ctx.attn_mass is None:
      raise ValueError("observed_attention needs ctx.attn_mass.")
    K = cache.pos.shape[2]
    mass = policies._group_mean(ctx.attn_mass.astype(jnp.float32), K)  # pylint: disable=protected-access
    count = queries_seeing(ctx, cache.pos)
    return mass / jnp.maximum(count, 1.0)

  return Scorer(score, ("attn_mass",), "observed_attention")


# ----------------------------------------------------------------------------
# LagKV.


def _lag_stat(x: Array, lag: int) -> Array:
  """x [..., P, lag, H] partitions -> [..., P - 1, lag] softmax over each
  partition of the channel std of its entries min-max scaled by the next
  partition's per-channel range (LagKV's lag-relative statistic)."""
  ref, cur = x[..., 1:, :, :], x[..., :-1, :, :]
  lo = jnp.min(ref, axis=-2, keepdims=True)
  hi = jnp.max(ref, axis=-2, keepdims=True)
  scaled = (cur - lo) / (hi - lo)
  std = jnp.std(scaled, axis=-1, ddof=1)
  return jax.nn.softmax(std, axis=-1)


@base.by_value
def lagkv_scorer(
  n_sink: int = 4, lag_size: int = 128, cross_scoring: bool = False
) -> Scorer:
  """LagKV (arXiv 2504.04704; kvpress `LagKVPress`), attention-free.

  After `n_sink` sinks, a row's n live entries are cut into partitions of
  `lag_size`; each partition but the last full one is scored against the
  next (its reference): each entry's key and value are min-max scaled by
  the reference's per-channel min and max, the std over channels is taken
  (unbiased) and softmaxed over the partition; keys and values are
  averaged. Without `cross_scoring` a score is the entry's rank within its
  partition / lag_size. The sinks, the last full partition and the
  remainder (the tail) score 1 and are kept first. A row shorter than
  n_sink + 2 lag_size keeps its sinks and then the newest entries (kvpress'
  fallback); see `lagkv` for when that is refused.

  Ties (equal ranks in different partitions, or more 1s than the budget)
  go to the earlier entry; kvpress leaves them to `torch.topk`.
  """
  _check_int(n_sink, "n_sink", 0)
  _check_int(lag_size, "lag_size", 1)
  _check_bool(cross_scoring, "cross_scoring")

  def score(cache, ctx):
    del ctx
    order, inverse, n, live = _sort_slots(cache)
    L, B, K, S = cache.pos.shape
    i = jnp.arange(S)
    nf = n[..., None].astype(jnp.float32)
    # kvpress' fallback for short rows: sinks, then the newest entries.
    fallback = jnp.where(
      i < n_sink, 1.0, (i - n_sink) / jnp.maximum(nf - n_sink, 1.0)
    )
    n_parts = max(0, (S - n_sink) // lag_size)  # static, for the longest
    if n_parts < 2:
      return _unsort(fallback, inverse)
    span = n_parts * lag_size
    parts = []
    for x in (cache.k, cache.v):
      xs = _gather(_floats(x, "keys and values"), order)
      xs = xs[:, :, :, n_sink : n_sink + span]
      parts.append(
        _lag_stat(xs.reshape(L, B, K, n_parts, lag_size, -1), lag_size)
      )
    s = (parts[0] + parts[1]) / 2  # [L, B, K, n_parts - 1, lag]
    if not cross_scoring:
      s = jnp.argsort(jnp.argsort(s, axis=-1), axis=-1) / lag_size
    s = s.reshape(L, B, K, -1)
    s = jnp.pad(s, [(0, 0)] * 3 + [(n_sink, S - n_sink - s.shape[-1])])
    row_parts = (n - n_sink) // lag_size  # [L, B, K]
    scored = (i >= n_sink) & (
      (i - n_sink) // lag_size < row_parts[..., None] - 1
    )
    full = jnp.where(scored, s, 1.0)
    short = (n < n_sink + 2 * lag_size)[..., None]
    return _unsort(jnp.where(short, fallback, full), inverse)

  return Scorer(score, (), "lagkv")


# ----------------------------------------------------------------------------
# Non-causal chunked attention.


def _noncausal_mass(q, k, n, found, chunk_size, kvpress_padding) -> Array:
  """`_noncausal_layers` one layer at a time (`lax.map`): the [chunk,
  chunk] attention tiles of one layer are live at once, as in kvpress."""
  return jax.lax.map(
    lambda a: _noncausal_layers(
      *(x[None] for x in a), chunk_size, kvpress_padding
    )[0],
    (q, k, n, found),
  )


def _noncausal_layers(
  q: Array,
  k: Array,
  n: Array,
  found: Array,
  chunk_size: int,
  kvpress_padding: bool,
) -> Array:
  """Sum over queries of within-chunk, non-causal softmax(q.k) (no 1/sqrt
  scale, as kvpress), in sorted slot order.

  Args:
    q: [L, B, K, G, S, H] queries aligned with the sorted slots.
    k: [L, B, K, S, H] sorted keys.
    n: [L, B, K] live entries (sorted indices < n).
    found: [L, B, K, S] the entry has a query.
    kvpress_padding: reproduce kvpress' padded last chunk (see
      `non_causal_attn_scorer`).

  Returns:
    [L, B, K, S]: the column sums, averaged over the G query heads.
  """
  L, B, K, G, S, H = q.shape
  C = chunk_size
  pad = -S % C
  nc = (S + pad) // C
  i = jnp.arange(S + pad)
  live = i < n[..., None]  # [L, B, K, S + pad]
  ok_q = live & jnp.pad(found, [(0, 0)] * 3 + [(0, pad)])
  qp = jnp.pad(q, [(0, 0)] * 4 + [(0, pad), (0, 0)]).reshape(
    L, B, K, G, nc, C, H
  )
  kp = jnp.pad(k, [(0, 0)] * 3 + [(0, pad), (0, 0)]).reshape(L, B, K, nc, C, H)
  logits = jnp.einsum("lbkgcqh,lbkcsh->lbkgcqs", qp, kp)
  kcol = lambda x: x.reshape(L, B, K, nc, C)[:, :, :, None, :, None, :]
  qrow = lambda x: x.reshape(L, B, K, nc, C)[:, :, :, None, :, :, None]
  logits = jnp.where(kcol(live) & qrow(ok_q), logits, -jnp.inf)
  rows = ok_q
  if kvpress_padding:
    # kvpress pads a row's last chunk to chunk_size with zero queries and
    # keys: padded keys take logit -1e-9 from every query, padded queries
    # logit 0 on the real keys, and the padded queries' rows are summed.
    padded = (i >= n[..., None]) & (i < -(-n[..., None] // C) * C)
    logits = jnp.where(kcol(live) & qrow(padded), 0.0, logits)
    logits = jnp.where(kcol(padded) & qrow(live | padded), -1e-9, logits)
    rows = ok_q | padded
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(qrow(rows) & kcol(live), probs, 0.0)
  mass = probs.sum(axis=-2).reshape(L, B, K, G, nc * C)[..., :S]
  return mass.mean(axis=3)


def _noncausal_scores(cache, ctx, chunk_size, kvpress_padding, order, n):
  """NonCausalAttn's z-scores in sorted order (see `non_causal_attn_scorer`)."""
  k = _gather(_floats(cache.k, "keys"), order)
  v = _gather(_floats(cache.v, "values"), order)
  pos = jnp.take_along_axis(cache.pos, order, axis=-1)
  q, found = _queries_for(ctx, pos)
  live = jnp.arange(k.shape[3]) < n[..., None]
  mass = _noncausal_mass(q, k, n, found, chunk_size, kvpress_padding)
  s = jnp.where(live, mass * jnp.linalg.norm(v, axis=-1), 0.0)
  s = _pool3(s)
  return _zscore(s, live)


@base.by_value
def non_causal_attn_scorer(
  chunk_size: int = 256, kvpress_padding: bool = False
) -> Scorer:
  """Non-causal chunked attention (Compactor, arXiv 2507.08143; kvpress
  `NonCausalAttnPress`).

  The live entries of each (layer, row, kv head), in position order, are
  cut into chunks of `chunk_size`; within a chunk every entry's query
  attends to every key of the chunk (no causal mask, logits q.k without the
  1/sqrt(head_dim) scale, as kvpress); an entry's score is the attention
  its key receives summed over the chunk's queries, averaged over the
  query heads of its kv head, times ||v||, average-pooled over neighbours
  (kernel 3, zero padding), then z-normalised over the (layer, row).

  Differences from kvpress: kvpress pads a short last chunk (live length
  not a multiple of `chunk_size`) with zero queries and zero keys that
  take part in its softmax: every query gives its padded keys logit -1e-9
  (so they absorb attention), and each padded query spreads ~1 / chunk_size
  over every key of the chunk (adding ~pad / chunk_size to each real key's
  score). That changes the kept set a lot (Jaccard 0.67-0.89 on the peer
  model at chunk_size 100), so it is no detail: by default kvjax's last
  chunk is just shorter (the definition without padding artefacts);
  `kvpress_padding=True` reproduces kvpress' padded chunk exactly. Both
  agree when the live length is a multiple of `chunk_size`. The z-score
  is per (layer, row), not over the batch (see the module docstring).
  Prefill only: each entry needs its own query (`ValueError` otherwise).
  """
  _check_int(chunk_size, "chunk_size", 1)
  _check_bool(kvpress_padding, "kvpress_padding")

  def score(cache, ctx):
    _needs_own_queries(ctx, cache, "non_causal_attn")
    order, inverse, n, _ = _sort_slots(cache)
    s = _noncausal_scores(cache, ctx, chunk_size, kvpress_padding, order, n)
    return _unsort(s, inverse)

  return Scorer(score, ("q",), "non_causal_attn")


# ----------------------------------------------------------------------------
# Leverage scores.


def _leverage_scores(
  cache, ctx, order, live, sketch_dimension, seed, ridge
) -> Array:
  """Ridge leverage of the centred pre-RoPE keys, in sorted order (z-scored
  over the live entries of each (layer, row))."""
  k = _gather(_floats(cache.k, "keys"), order)
  pos = jnp.take_along_axis(cache.pos, order, axis=-1)
  if ctx.geometry is None:
    raise ValueError(
      "leverage scores need ctx.geometry (RoPE) to un-rotate keys."
    )
  x = _derotate(k, pos, ctx.geometry)
  w = live[..., None].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w, axis=3, keepdims=True), 1.0)
  x = (x - jnp.sum(x * w, axis=3, keepdims=True) / n) * w
  H = x.shape[-1]
  if sketch_dimension < H:
    L, B, K = x.shape[:3]
    phi = jax.random.normal(
      jax.random.key(seed), (L, B, K, H, sketch_dimension), jnp.float32
    ) / np.sqrt(sketch_dimension)
    x = jnp.einsum("lbksh,lbkhd->lbksd", x, phi)
  d = x.shape[-1]
  gram = jnp.einsum("lbksi,lbksj->lbkij", x, x) + ridge * jnp.eye(d)
  chol = jnp.linalg.cholesky(gram)
  y = jax.scipy.linalg.cho_solve((chol, True), jnp.swapaxes(x, -1, -2))
  lev = jnp.maximum(jnp.sum(x * jnp.swapaxes(y, -1, -2), axis=-1), 0.0)
  return _zscore(lev, live)


@base.by_value
def leverage_score_scorer(
  sketch_dimension: int = 48, seed: int = 0, ridge: float = 1e-2
) -> Scorer:
  """Leverage scores of the keys (Compactor, arXiv 2507.08143; kvpress
  `LeverageScorePress`).

  score = z-score of diag(X (X^T X + ridge I)^-1 X^T), X the pre-RoPE keys
  of the (layer, row, kv head)'s live entries centred over them (kvjax
  stores keys after RoPE and rotates them back by their positions).

  kvpress right-multiplies X by a Gaussian sketch Phi [head_dim,
  sketch_dimension] from torch's global RNG and adds a 1e-2 jitter to the
  sketched Gram matrix (more if its Cholesky fails). When sketch_dimension
  >= head_dim (the default 48 on heads of <= 48 dims) the sketch spans the
  same column space and both equal the exact leverage up to the jitter, so
  kvjax computes it without a sketch (deterministic). With
  sketch_dimension < head_dim kvjax draws its own sketch from `seed`
  (jax's RNG): the same definition, a different random draw (no parity).
  The z-score is per (layer, row) (see the module docstring).
  """
  _check_int(sketch_dimension, "sketch_dimension", 1)
  _check_int(seed, "seed", 0)
  _check_float(ridge, "ridge", 0.0)
  if ridge <= 0:
    raise ValueError(f"ridge must be > 0 (Cholesky of X^T X), got {ridge!r}.")

  def score(cache, ctx):
    order, inverse, _, live = _sort_slots(cache)
    s = _leverage_scores(cache, ctx, order, live, sketch_dimension, seed, ridge)
    return _unsort(s, inverse)

  return Scorer(score, (), "leverage_score")


# ----------------------------------------------------------------------------
# Compactor.


@base.by_value
def compactor_scorer(
  blending: float = 0.35,
  sink_size_start: int = 8,
  sink_size_end: int = 4,
  chunk_size: int = 256,
  sketch_dimension: int = 48,
  seed: int = 0,
  kvpress_padding: bool = False,
) -> Scorer:
  """Compactor (arXiv 2507.08143; kvpress `CompactorPress`).

  The first `sink_size_start` and last `sink_size_end` live entries of
  each (layer, row, kv head) are kept first; the entries in between are
  scored blending * leverage z-score + non-causal attention z-score, both
  computed on those middle entries alone (centring, chunks and z-scores
  start at the first middle entry), as `leverage_score_scorer` and
  `non_causal_attn_scorer` define them. `compactor` sets blending to the
  ratio by default, as kvpress. kvpress gives the sinks the largest middle
  score (a tie with the best middle entry); kvjax ranks them above it.
  `kvpress_padding` as in `non_causal_attn_scorer` (kvpress' default
  chunk_size 256 pads whenever the middle is not a multiple of it). Prefill
  only.
  """
  _check_float(blending, "blending", 0.0)
  _check_int(sink_size_start, "sink_size_start", 0)
  _check_int(sink_size_end, "sink_size_end", 0)
  _check_int(chunk_size, "chunk_size", 1)
  _check_int(sketch_dimension, "sketch_dimension", 1)
  _check_int(seed, "seed", 0)
  _check_bool(kvpress_padding, "kvpress_padding")

  def score(cache, ctx):
    _needs_own_queries(ctx, cache, "compactor")
    order, inverse, n, live = _sort_slots(cache)
    i = jnp.arange(cache.pos.shape[-1])
    left = jnp.minimum(sink_size_start, n)[..., None]
    right = jnp.minimum(sink_size_end, jnp.maximum(0, n - left[..., 0]))[
      ..., None
    ]
    middle = live & (i >= left) & (i < n[..., None] - right)
    # Score the middle as a sequence of its own: shift it to the front.
    shift = jnp.argsort(jnp.where(middle, i, _INT_MAX), axis=-1, stable=True)
    sub = jnp.take_along_axis(order, shift, axis=-1)
    m = jnp.sum(middle, axis=-1)
    sub_live = i < m[..., None]
    lev = _leverage_scores(
      cache, ctx, sub, sub_live, sketch_dimension, seed, 1e-2
    )
    att = _noncausal_scores(cache, ctx, chunk_size, kvpress_padding, sub, m)
    s_sub = blending * lev + att
    s_sorted = jnp.take_along_axis(s_sub, jnp.argsort(shift, axis=-1), axis=-1)
    s_sorted = jnp.where(middle, s_sorted, _BIG)
    return _unsort(s_sorted, inverse)

  return Scorer(score, ("q",), "compactor")


# ----------------------------------------------------------------------------
# CUR.


@base.by_value
def cur_scorer(
  num_sinks: int = 4,
  leverage_type: str = "kv_product",
  use_random_leverage: bool = False,
  use_local_approximation: bool = True,
  local_window_size: int = 16,
  seed: int = 0,
) -> Scorer:
  """CurDKV's leverage approximation (arXiv 2509.15038; kvpress `CURPress`).

  k2 = ||k||^2, v2 = ||v||^2 per entry (RoPE keeps norms, so the stored
  keys do); with `use_local_approximation` each is normalised to sum 1
  within windows of `local_window_size` consecutive live entries (from the
  first; the last window may be short); the score is k2, v2, (k2 + v2) / 2
  or k2 * v2 (`leverage_type` "key", "value", "kv_avg", "kv_product"),
  normalised to sum 1 over the row; the first `num_sinks` entries score 1.

  `use_random_leverage` first projects keys and values on a Gaussian
  [head_dim, 20] / sqrt(20) matrix: kvpress draws it from torch's global
  RNG, kvjax from `seed` (the same definition, no parity for that option).
  """
  _check_int(num_sinks, "num_sinks", 0)
  _check_int(local_window_size, "local_window_size", 1)
  _check_int(seed, "seed", 0)
  _check_bool(use_random_leverage, "use_random_leverage")
  _check_bool(use_local_approximation, "use_local_approximation")
  types_ = ("key", "value", "kv_avg", "kv_product")
  if leverage_type not in types_:
    raise ValueError(
      f"leverage_type must be one of {types_}, got {leverage_type!r}."
    )

  def score(cache, ctx):
    del ctx
    order, inverse, _, live = _sort_slots(cache)
    k = _gather(_floats(cache.k, "keys"), order)
    v = _gather(_floats(cache.v, "values"), order)
    if use_random_leverage:
      g = jax.random.normal(jax.random.key(seed), (k.shape[-1], 20)) / np.sqrt(
        20
      )
      k, v = k @ g, v @ g
    k2 = jnp.where(live, jnp.sum(k * k, axis=-1), 0.0)
    v2 = jnp.where(live, jnp.sum(v * v, axis=-1), 0.0)
    if use_local_approximation:
      w = local_window_size
      S = k2.shape[-1]
      pad = -S % w

      def local(x):
        xw = jnp.pad(x, [(0, 0)] * 3 + [(0, pad)]).reshape(*x.shape[:3], -1, w)
        xw = xw / jnp.sum(xw, axis=-1, keepdims=True)
        return jnp.where(live, xw.reshape(*x.shape[:3], -1)[..., :S], 0.0)

      k2, v2 = local(k2), local(v2)
    s = {
      "key": lambda: k2,
      "value": lambda: v2,
      "kv_avg": lambda: (k2 + v2) / 2,
      "kv_product": lambda: k2 * v2,
    }[leverage_type]()
    s = s / jnp.sum(s, axis=-1, keepdims=True)
    s = jnp.where(jnp.arange(s.shape[-1]) < num_sinks, 1.0, s)
    return _unsort(s, inverse)

  return Scorer(score, (), "cur")


# ----------------------------------------------------------------------------
# Q-Filters.


def qfilter_filters(q: Array, q_mask: Array, num_kv_heads: int) -> Array:
  """Q-Filters computed from the given queries (the authors' recipe).

  Per (layer, row, query head): v = the dominant right singular vector of
  the live queries Q [n, H] (top eigenvector of Q^T Q, uncentred), sign s =
  +1 if most queries project positively on v, else -1; the head's filter
  is -s v; a kv head's filter is the mean of its query heads' filters.
  (This follows `make_filters.py` of github.com/NathanGodey/qfilters, which
  made the filters kvpress downloads; kvpress then scores -filter . k.)

  Args:
    q: [L, B, T, N, H] queries after RoPE.
    q_mask: [B, T] bool, live queries.
    num_kv_heads: K.

  Returns:
    [L, B, K, H] float32 filters.
  """
  q = q.astype(jnp.float32) * q_mask[None, :, :, None, None]
  gram = jnp.einsum("lbtni,lbtnj->lbnij", q, q)
  _, vecs = jnp.linalg.eigh(gram)
  v = vecs[..., -1]  # [L, B, N, H], largest eigenvalue
  proj = jnp.einsum("lbtnh,lbnh->lbtn", q, v)
  positive = jnp.sum((proj > 0) & q_mask[None, :, :, None], axis=2)
  live = jnp.sum(q_mask, axis=1)[None, :, None]
  sign = jnp.where(positive > live / 2, 1.0, -1.0)
  filt = -sign[..., None] * v  # [L, B, N, H]
  L, B, N, H = filt.shape
  return filt.reshape(L, B, num_kv_heads, N // num_kv_heads, H).mean(3)


@base.by_value
def qfilter_scorer(filters: np.ndarray | None = None) -> Scorer:
  """Q-Filters (arXiv 2503.02812; kvpress `QFilterPress`).

  score = -(f . k), f the (layer, kv head) filter, k the stored key.
  kvpress downloads filters computed offline from a calibration corpus;
  kvjax computes them, by the authors' recipe (`qfilter_filters`), from
  the model's own prompt queries of each row (so no download, but the
  filters depend on the prompt, where the paper's are context-agnostic).
  Pass `filters` [L, K, H] (e.g. the published ones) to use fixed filters.
  """
  if filters is not None:
    if not isinstance(filters, np.ndarray) or filters.ndim != 3:
      raise ValueError(
        "filters must be a numpy array [num_layers, num_kv_heads, head_dim], "
        f"got {type(filters).__name__} "
        f"{getattr(filters, 'shape', '')}."
      )

  def score(cache, ctx):
    k = _floats(cache.k, "keys")
    if filters is not None:
      if filters.shape != (k.shape[0], k.shape[2], k.shape[4]):
        raise ValueError(
          f"filters has shape {filters.shape}; this cache needs "
          f"{(k.shape[0], k.shape[2], k.shape[4])}."
        )
      f = jnp.asarray(filters, jnp.float32)[:, None]  # [L, 1, K, H]
    else:
      if ctx.q is None:
        raise ValueError("qfilter needs ctx.q (list 'q' in needs).")
      f = qfilter_filters(ctx.q, ctx.q_mask, k.shape[2])
    return -jnp.einsum("lbksh,lbkh->lbks", k, f)

  return Scorer(score, () if filters is not None else ("q",), "qfilter")


# ----------------------------------------------------------------------------
# Policies.


@base.by_value
def keydiff(ratio=None, budget=None) -> base.KVTransform:
  """KeyDiff at prefill (see `keydiff_scorer`; kvpress `KeyDiffPress`).

  Args:
    ratio: fraction of entries removed, in [0, 1); or
    budget: entries kept per (layer, row, kv head).
  """
  return policies.scored_policy(keydiff_scorer(), ratio, budget, "keydiff")


@base.by_value
def observed_attention(ratio=None, budget=None) -> base.KVTransform:
  """Observed attention at prefill (see `observed_attention_scorer`;
  kvpress `ObservedAttentionPress`, which needs eager attention: kvjax
  reads the engine's `attn_mass`)."""
  return policies.scored_policy(
    observed_attention_scorer(), ratio, budget, "observed_attention"
  )


@base.by_value
def lagkv(
  ratio=None,
  budget=None,
  n_sink: int = 4,
  lag_size: int = 128,
  cross_scoring: bool = False,
) -> base.KVTransform:
  """LagKV at prefill (see `lagkv_scorer`; kvpress `LagKVPress`).

  Raises:
    base.Degenerate: at trace time, when the live bound is shorter than
      n_sink + 2 lag_size: no row has a partition with a reference, so
      LagKV would only keep sinks and the newest entries (StreamingLLM;
      kvpress silently falls back to that). Shorter rows of a batch with a
      long enough row do fall back, as in kvpress.
  """
  scorer = lagkv_scorer(n_sink, lag_size, cross_scoring)
  inner = policies.scored_policy(scorer, ratio, budget, "lagkv")

  def apply(cache, state, ctx, **extra):
    live = base.live_bound(cache, ctx)
    if ctx.phase == "prefill" and live < n_sink + 2 * lag_size:
      raise base.Degenerate(
        f"lagkv: {live} cached entries are fewer than n_sink + 2 * lag_size "
        f"= {n_sink} + 2 * {lag_size}, so no partition has a reference and "
        "it would only keep the sinks and the newest entries; use a longer "
        "context or a smaller lag_size."
      )
    return inner.apply(cache, state, ctx, **extra)

  return inner._replace(apply=apply)


@base.by_value
def non_causal_attn(
  ratio=None, budget=None, chunk_size: int = 256, kvpress_padding: bool = False
) -> base.KVTransform:
  """NonCausalAttn at prefill (see `non_causal_attn_scorer`; kvpress
  `NonCausalAttnPress`)."""
  return policies.scored_policy(
    non_causal_attn_scorer(chunk_size, kvpress_padding),
    ratio,
    budget,
    "non_causal_attn",
  )


@base.by_value
def leverage_score(
  ratio=None,
  budget=None,
  sketch_dimension: int = 48,
  seed: int = 0,
  ridge: float = 1e-2,
) -> base.KVTransform:
  """Leverage scores at prefill (see `leverage_score_scorer`; kvpress
  `LeverageScorePress`)."""
  return policies.scored_policy(
    leverage_score_scorer(sketch_dimension, seed, ridge),
    ratio,
    budget,
    "leverage_score",
  )


@base.by_value
def compactor(
  ratio=None,
  budget=None,
  sink_size_start: int = 8,
  sink_size_end: int = 4,
  chunk_size: int = 256,
  sketch_dimension: int = 48,
  blending: float | None = None,
  seed: int = 0,
  kvpress_padding: bool = False,
) -> base.KVTransform:
  """Compactor at prefill (see `compactor_scorer`; kvpress
  `CompactorPress`).

  Args:
    blending: weight of the leverage scores; None: the ratio, as kvpress
      (0.35, kvpress' fallback, with an absolute budget).
  """
  base.check_budget(ratio, budget)
  if blending is None:
    blending = ratio if ratio is not None else 0.35
  return policies.scored_policy(
    compactor_scorer(
      blending,
      sink_size_start,
      sink_size_end,
      chunk_size,
      sketch_dimension,
      seed,
      kvpress_padding,
    ),
    ratio,
    budget,
    "compactor",
  )


@base.by_value
def cur(
  ratio=None,
  budget=None,
  num_sinks: int = 4,
  leverage_type: str = "kv_product",
  use_random_leverage: bool = False,
  use_local_approximation: bool = True,
  local_window_size: int = 16,
  seed: int = 0,
) -> base.KVTransform:
  """CUR at prefill (see `cur_scorer`; kvpress `CURPress`)."""
  return policies.scored_policy(
    cur_scorer(
      num_sinks,
      leverage_type,
      use_random_leverage,
      use_local_approximation,
      local_window_size,
      seed,
    ),
    ratio,
    budget,
    "cur",
  )


@base.by_value
def qfilter(ratio=None, budget=None, filters=None) -> base.KVTransform:
  """Q-Filters at prefill (see `qfilter_scorer`; kvpress `QFilterPress`)."""
  return policies.scored_policy(
    qfilter_scorer(filters), ratio, budget, "qfilter"
  )


# Scorers by name (for Ada-KV and the wrappers that take a scorer name).
SCORERS: Mapping[str, Callable[..., Scorer]] = types.MappingProxyType(
  {
    "keydiff": keydiff_scorer,
    "observed_attention": observed_attention_scorer,
    "lagkv": lagkv_scorer,
    "non_causal_attn": non_causal_attn_scorer,
    "leverage_score": leverage_score_scorer,
    "compactor": compactor_scorer,
    "cur": cur_scorer,
    "qfilter": qfilter_scorer,
  }
)

# The registry hook: fixed method name -> ratio -> transform (defaults sized
# for kvjax-tiny at ~500-token contexts).
METHODS: Mapping[str, Callable[[float], base.KVTransform]] = (
  types.MappingProxyType(
    {
      "keydiff": lambda ratio: keydiff(ratio),
      "observed_attention": lambda ratio: observed_attention(ratio),
      # lag 64: a 500-token prompt has ~7 partitions (128 would leave 3).
      "lagkv": lambda ratio: lagkv(ratio, lag_size=64),
      "non_causal_attn": lambda ratio: non_causal_attn(ratio),
      "leverage_score": lambda ratio: leverage_score(ratio),
      "compactor": lambda ratio: compactor(ratio),
      "cur": lambda ratio: cur(ratio),
      "qfilter": lambda ratio: qfilter(ratio),
    }
  )
)
