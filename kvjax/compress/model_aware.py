"""Model-aware and decode-time policies: CriticalKV, CriticalAdaKV, Finch,
KVzip and decode-time compression to a target size (kvpress'
DecodingPress).

These methods need more than the observed taps: the model's weights
(CriticalKV's W_o), the model itself (KVzip replays the context through
it), the prompt's token ids (KVzip, Finch's delimiter), or a buffer of
decode-time queries (`decoding`). A transform asks for the model with
`needs=("params",)` (and the prompt's ids with "tokens"); `prefill`,
`compress_observing`, `compress_cache(params=...)` and the decode loop
then fill `CompressContext.params` / `.model_config` / `.tokens` (see
`kvjax.compress.base.MODEL_NEEDS`). The transforms stay values (factories
take static arguments only), so a jitted entry compiles once.

Definitions follow each paper and NVIDIA kvpress 0.5.5
(`kvpress/presses/{criticalkv,finch,kvzip,decoding}_press.py`); the parity
tests are `tests/compress/test_kvpress_parity_model_aware.py`. Every
factory's docstring lists where kvjax differs and why.
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import parallel
from kvjax.cache import CodedKV, KVCache
from kvjax.compress import base
from kvjax.compress import policies
from kvjax.compress import structure

Array = jax.Array
_PIN = 1e5  # kvjax scorers mark always-kept entries (windows, sinks) above
_F32_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------
# Shared pieces.


_check_float = base.check_float


def _float_values(cache: KVCache) -> Array:
  if not isinstance(cache.v, jax.Array) or cache.v.ndim != 5:
    raise ValueError(
      "this method reads float values [L, B, K, S, H]; apply it before any "
      "codec in a chain (evict, then quantize)."
    )
  return cache.v


def output_value_norm(params: Any, cache: KVCache, ord: int = 1) -> Array:  # pylint: disable=redefined-builtin
  """||v W_o[n]||_ord per slot, averaged over the G query heads n of each kv
  head (CriticalKV's `vwl1norm` with ord=1).

  Computed one layer at a time (`lax.map`), so the [B, N, S, D] projection
  of a single layer is the largest intermediate.

  Args:
    params: the model parameters (`wo` [L, N, H, D]).
    cache: a cache with float values [L, B, K, S, H].
    ord: 1 (CriticalKV) or 2 (KVzip+).

  Returns:
    [L, B, K, S] float32.
  """
  v = _float_values(cache)
  wo = params["layers"]["wo"]  # [L, N, H, D]
  L, B, K, S, H = v.shape
  N = wo.shape[1]

  def layer(args):
    v_l, wo_l = args  # [B, K, S, H], [N, H, D]
    wo_g = wo_l.reshape(K, N // K, H, -1).astype(jnp.float32)
    proj = jnp.einsum("bksh,kghd->bkgsd", v_l.astype(jnp.float32), wo_g)
    if ord == 1:
      n = jnp.sum(jnp.abs(proj), axis=-1)
    else:
      n = jnp.sqrt(jnp.sum(proj * proj, axis=-1))
    return n.mean(axis=2)  # [B, K, S]

  return jax.lax.map(layer, (v, wo))


def _unpin(scores: Array, valid: Array) -> Array:
  """kvjax scorers pin always-kept entries (SnapKV's window: 1e6 + pos,
  sinks: 1e30); kvpress pads them with max(other scores) + 1 per layer.
  CriticalKV rescales scores by a value norm, after which the pin's size
  matters, so pinned entries get kvpress' value: the largest unpinned
  valid score of the (layer, row) + 1."""
  s = scores.astype(jnp.float32)
  pinned = valid & (s >= _PIN)
  rest = jnp.where(valid & ~pinned, s, -jnp.inf)
  top = jnp.max(rest, axis=(2, 3), keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  return jnp.where(pinned, top + 1.0, s)


def _table(max_live: int, fn: Callable[[int], int]) -> Array:
  return jnp.asarray(np.array([fn(n) for n in range(max_live + 1)], np.int32))


def _rank(scores: Array, valid: Array) -> Array:
  """[L, B, K, S] rank of each slot among its (l, b, k), best first
  (the order `base.keep_top` uses: ties to the lower slot)."""
  s = base.rank_scores(scores, valid)
  order = jnp.argsort(-s, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


# ----------------------------------------------------------------------------
# CriticalKV / CriticalAdaKV (arXiv 2502.03805).


@base.by_value
def criticalkv(
  ratio: float | None = None,
  budget: int | None = None,
  scorer: policies.Scorer | str = "snapkv",
  epsilon: float = 1e-4,
  first_stage_ratio: float = 0.5,
) -> base.KVTransform:
  """CriticalKV: two-stage selection rescaled by the output-projected value.

  Stage 1 keeps the top `first_stage_ratio` share of the budget by the
  wrapped scorer's scores s (at least one entry): selection_budget =
  max(1, int((1 - ratio) * live * first_stage_ratio)) per row (int(budget
  * first_stage_ratio) with an absolute budget). Stage 2 fills the rest of
  the budget by (s + epsilon) * ||v W_o||_1, the L1 norm of each value
  projected by its query heads' slice of W_o, averaged over the G query
  heads of the kv head. Source: CriticalKV (arXiv 2502.03805), kvpress
  `CriticalKVPress`.

  Differences from kvpress: entries the wrapped scorer pins (SnapKV's
  observation window, sinks) enter the rescaling with kvpress' pad value,
  max(other scores of the layer and row) + 1, as kvpress' SnapKV pads them
  (kvjax's own SnapKV pins them higher); ties go to the lower slot
  (kvpress' `topk` leaves their order unspecified). kvpress computes the
  budget per batch; kvjax per row (ragged rows keep their own share).

  Args:
    ratio: fraction of entries removed, in [0, 1).
    budget: or an absolute number of entries kept per head.
    scorer: the base `Scorer` or its name (default "snapkv", kvpress'
      default for its examples; its defaults: window 64, kernel 5).
    epsilon: added to s before rescaling (kvpress default 1e-4), >= 0.
    first_stage_ratio: share of the budget chosen in stage 1, in [0, 1].
  """
  base.check_budget(ratio, budget)
  scorer = policies.resolve_scorer(scorer, "criticalkv")
  epsilon = _check_float(epsilon, "epsilon", 0.0)
  first_stage_ratio = _check_float(
    first_stage_ratio, "first_stage_ratio", 0.0, 1.0
  )

  def first(live: int) -> int:
    if ratio is not None:
      sel = int((1 - ratio) * live * first_stage_ratio)
    else:
      sel = int(min(live, budget) * first_stage_ratio)
    if first_stage_ratio > 0 and live > 0:
      sel = max(1, sel)
    return sel

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    live = base.live_counts(cache)
    n = base.n_keep(live, ratio, budget, cache.capacity)
    n1 = _table(cache.capacity, first)[live]
    s = _unpin(scorer.score(cache, ctx, **extra), cache.valid)
    stage1 = base.keep_top(s, n1, cache.valid)
    s2 = (s + epsilon) * output_value_norm(ctx.params, cache)
    s2 = jnp.where(stage1, _F32_MAX, s2)
    capacity = base.static_keep(base.live_bound(cache, ctx), ratio, budget)
    cache, _ = base.evict(cache, s2, n, capacity + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, budget),
    needs=tuple(sorted(set(scorer.needs) | {"params"})),
    extras=scorer.extras,
    name="criticalkv",
  )


@base.by_value
def critical_adakv(
  ratio: float,
  scorer: policies.Scorer | str = "snapkv",
  alpha_safeguard: float = 0.2,
  epsilon: float = 1e-4,
  first_stage_ratio: float = 0.5,
) -> base.KVTransform:
  """CriticalAdaKV: Ada-KV's head budgets with CriticalKV's two stages.

  Per (layer, row): each head's top n_safe = max(1, int(n *
  alpha_safeguard)) entries are safe (n = max(1, int(live * (1 - ratio))));
  a top-(K * n) over all heads' scores (safe ones first) sets each head's
  budget b_h; stage 1 keeps each head's top int(b_h * first_stage_ratio)
  by the base scores; stage 2 fills the head to b_h by (s + epsilon) *
  ||v W_o||_1 (see `criticalkv`). Source: CriticalKV (arXiv 2502.03805),
  kvpress `CriticalAdaKVPress`.

  Differences from kvpress: kvpress masks the evicted entries (no memory
  saved, batch 1); kvjax compacts. The capacity is the largest budget a
  head can reach, min(live, K * n - (K - 1) * n_safe), as `adakv`'s; the
  gap to the ragged size is reported by `kvjax.cache.logical_bytes`.
  Pinned entries get kvpress' pad value and ties go to the lower slot, as
  in `criticalkv`.

  Args:
    ratio: fraction removed, in [0, 1).
    scorer: the base `Scorer` or its name (default "snapkv").
    alpha_safeguard: minimum share of the uniform budget each head keeps,
      in [0, 1].
    epsilon: added to the scores before rescaling, >= 0.
    first_stage_ratio: share of each head's budget chosen in stage 1, in
      [0, 1].
  """
  base.check_ratio(ratio)
  scorer = policies.resolve_scorer(scorer, "critical_adakv")
  alpha_safeguard = _check_float(alpha_safeguard, "alpha_safeguard", 0.0, 1.0)
  epsilon = _check_float(epsilon, "epsilon", 0.0)
  first_stage_ratio = _check_float(
    first_stage_ratio, "first_stage_ratio", 0.0, 1.0
  )

  def safe(n: int) -> int:
    s = int(n * alpha_safeguard)
    if alpha_safeguard > 0:
      s = max(1, s) if n > 0 else 0
    return s

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    L, B, K, S = cache.pos.shape
    valid = cache.valid
    live = base.live_counts(cache)  # [L, B, K]
    n = base.n_keep(live, ratio, None, cache.capacity)
    n_safe = _table(cache.capacity, lambda m: safe(m))[n]
    s = _unpin(scorer.score(cache, ctx, **extra), valid)
    s = jnp.where(valid, s, -jnp.inf)
    s = jnp.where(base.keep_top(s, n_safe, valid), _F32_MAX, s)
    total = jnp.sum(n, axis=2)  # [L, B]
    flat = base.keep_top(
      s.reshape(L, B, 1, K * S), total[..., None], valid.reshape(L, B, 1, K * S)
    ).reshape(L, B, K, S)
    head_budget = jnp.sum(flat, axis=-1).astype(jnp.int32)  # [L, B, K]
    n1 = jnp.floor(head_budget * first_stage_ratio).astype(jnp.int32)
    s = jnp.where(base.keep_top(s, n1, valid), _F32_MAX, s)
    s2 = (s + epsilon) * output_value_norm(ctx.params, cache)
    keep = base.keep_top(s2, head_budget, valid)
    bound = base.live_bound(cache, ctx)
    m = base.static_keep(bound, ratio, None)
    cap = min(bound, K * m - (K - 1) * safe(m))
    cache, _ = base.compact(cache, keep, cap + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: live,  # a head may keep all it had (K unknown here)
    needs=tuple(sorted(set(scorer.needs) | {"params"})),
    extras=scorer.extras,
    name="critical_adakv",
  )


# ----------------------------------------------------------------------------
# Decode-time compression to a target size (kvpress' DecodingPress).


class DecodingState(NamedTuple):
  """State of `decoding`.

  Attributes:
    budget: [B] int32 entries each row keeps per (layer, kv head) after a
      compression (the target size, or the prefill budget with a ratio).
    count: [] int32 decode steps since the last compression.
    q: [L, B, W, N, H] the last W decode queries after RoPE (W = 0 when
      the scorer reads no queries).
    q_pre_rope: [L, B, W, N, H] the same before RoPE (W = 0 unless the
      scorer reads them).
    q_pos: [B, W] int32 their positions.
    q_mask: [B, W] bool, the buffered queries that count.
  """

  budget: Array
  count: Array
  q: Array
  q_pre_rope: Array
  q_pos: Array
  q_mask: Array


def _decoded(cache: KVCache) -> KVCache:
  """The cache with float keys / values for a scorer: a per-entry codec's
  payload (`chain(decoding(...), uniform(...))`) decoded, as attention
  sees it."""
  dense = lambda x: x.decode_layers() if isinstance(x, CodedKV) else x
  return cache._replace(k=dense(cache.k), v=dense(cache.v))


def _push(buf: Array, new: Array, axis: int) -> Array:
  """Drops the oldest entry along `axis` and appends `new` (size 1)."""
  if buf.shape[axis] == 0:
    return buf
  rest = jax.lax.slice_in_dim(buf, 1, buf.shape[axis], axis=axis)
  return jnp.concatenate([rest, new.astype(buf.dtype)], axis=axis)


@base.by_value
def decoding(
  scorer: policies.Scorer | str = "knorm",
  compression_interval: int = 512,
  target_size: int | None = 2048,
  hidden_states_buffer_size: int = 256,
  ratio: float | None = None,
) -> base.KVTransform:
  """Decode-time compression to a target size every N steps, for any
  scorer (kvpress' `DecodingPress`).

  Every `compression_interval` decode steps, each (layer, row, kv head)
  holding more than `target_size` entries is cut back to its
  `target_size` best by `scorer`. The scorer sees the cache and, as its
  observed queries, the queries of the last `hidden_states_buffer_size`
  decode steps since the previous compression (kvpress buffers the hidden
  states of those steps and recomputes their queries; kvjax buffers the
  queries themselves, after and, if the scorer reads them, before RoPE,
  with their true positions) plus this step's attention taps.

  Differences from kvpress, and why:
  * kvjax's capacity is static, so memory is saved only if the cache is
    small from the start: the prefill-phase apply already cuts the prompt
    to the target (kvpress leaves the prompt whole and cuts it at its
    first decode-time compression). The capacity is then the target +
    `compression_interval` slots of headroom (+ the reserve), or the whole
    prompt + planned decode steps if that is smaller.
  * The cadence is counted in the transform's state (as kvpress counts
    per layer), across `decode` calls; a row whose cache is full also
    compresses early (kvpress' cache grows instead).
  * With `ratio` instead of `target_size` (kvjax's addition, for the
    method registry), each row's target is its prefill budget
    max(1, int(live * (1 - ratio))).
  * kvpress' SnapKV at decode rotates every buffered query by the current
    position's RoPE; kvjax's queries keep their own positions.

  The transform's `every` is 1 (it runs at every decode step to buffer
  queries); it is `bounded`: each row stays within its capacity. Its
  headroom is `compression_interval` slots (not `every`): the reserve
  contract's fullest row has reserve + compression_interval free slots
  after prefill. After a per-entry codec in a chain (evict, then
  quantize), the scorer reads the decoded entries.

  Args:
    scorer: a `Scorer` or its name (default "knorm": needs no queries).
    compression_interval: decode steps between compressions, >= 1.
    target_size: entries kept per (layer, row, kv head), >= 1 (kvpress
      default 2048); or None with `ratio`.
    hidden_states_buffer_size: decode queries buffered for the scorer,
      >= 0 (0: only the current step's).
    ratio: instead of `target_size`, the fraction of the prompt removed.

  Raises:
    ValueError: bad arguments; `base.Degenerate` (at trace time) when the
      prompt plus the planned decode steps never exceed the target.
  """
  scorer = policies.resolve_scorer(scorer, "decoding")
  interval = base.check_int(compression_interval, "compression_interval", 1)
  buf = base.check_int(
    hidden_states_buffer_size, "hidden_states_buffer_size", 0
  )
  if (ratio is None) == (target_size is None):
    raise ValueError(
      "decoding: give exactly one of target_size (entries kept per head) "
      "or ratio (fraction of the prompt removed), the other None; got "
      f"target_size={target_size!r}, ratio={ratio!r}."
    )
  base.check_budget(ratio, target_size)
  reads_q = "q" in scorer.needs
  reads_qpr = "q_pre_rope" in scorer.needs
  W = buf if (reads_q or reads_qpr) else 0

  def init(cache):
    L, B = cache.pos.shape[:2]
    # Placeholders: the prefill-phase apply sizes the query buffers.
    return DecodingState(
      jnp.zeros((B,), jnp.int32),
      jnp.int32(0),
      jnp.zeros((L, B, 0, 1, 1), jnp.float32),
      jnp.zeros((L, B, 0, 1, 1), jnp.float32),
      jnp.zeros((B, 0), jnp.int32),
      jnp.zeros((B, 0), bool),
    )

  def apply(cache, state, ctx, **extra):
    L, B, K, S = cache.pos.shape
    if ctx.phase == "prefill":
      bound = base.live_bound(cache, ctx)
      live = base.live_counts(cache)
      n = base.n_keep(live, ratio, target_size, cache.capacity)
      keep = base.static_keep(bound, ratio, target_size)
      most = bound + ctx.decode_reserve
      if target_size is not None and most <= target_size:
        raise base.Degenerate(
          f"decoding: the prompt ({bound} entries) plus the planned decode "
          f"steps ({ctx.decode_reserve}) never exceed target_size="
          f"{target_size}, so nothing would be compressed; lower "
          "target_size or plan more decode steps (prefill(decode_steps=...))."
        )
      cap = min(max(keep, 1) + interval, most) + ctx.reserve
      s = scorer.score(cache, ctx, **extra)
      cache, _ = base.evict(cache, s, n, cap)
      budget_row = (
        jnp.full((B,), target_size, jnp.int32)
        if target_size is not None
        else jnp.max(n, axis=(0, 2))
      )
      N = ctx.q.shape[3] if ctx.q is not None else 1
      N = ctx.q_pre_rope.shape[3] if ctx.q_pre_rope is not None else N
      H = cache.k.shape[-1]
      zeros = lambda on: jnp.zeros(
        (L, B, W if on else 0, N if on else 1, H if on else 1), jnp.float32
      )
      return cache, DecodingState(
        budget_row,
        jnp.int32(0),
        zeros(reads_q),
        zeros(reads_qpr),
        jnp.zeros((B, W), jnp.int32),
        jnp.zeros((B, W), bool),
      )
    # Decode: buffer this step's queries, then compress on the cadence.
    q = _push(state.q, ctx.q, 2) if reads_q else state.q
    qpr = (
      _push(state.q_pre_rope, ctx.q_pre_rope, 2)
      if reads_qpr
      else state.q_pre_rope
    )
    q_pos = _push(state.q_pos, ctx.q_pos, 1)
    q_mask = _push(state.q_mask, ctx.q_mask, 1)
    count = state.count + 1
    full = jnp.any(cache.end >= S)
    due = (count >= interval) | full

    def compress(c):
      if W:
        obs = ctx._replace(
          q=q if reads_q else ctx.q,
          q_pre_rope=qpr if reads_qpr else ctx.q_pre_rope,
          q_pos=q_pos,
          q_mask=q_mask,
        )
      else:
        obs = ctx
      s = scorer.score(_decoded(c), obs, **extra)
      return base.evict(c, s, state.budget[None, :, None], S)[0]

    cache = jax.lax.cond(due, compress, lambda c: c, cache)
    return cache, DecodingState(
      state.budget,
      jnp.where(due, 0, count),
      q,
      qpr,
      q_pos,
      jnp.where(due, False, q_mask),
    )

  return base.KVTransform(
    init=init,
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, target_size),
    needs=scorer.needs,
    extras=scorer.extras,
    every=1,
    name="decoding",
    bounded=True,
  )


# ----------------------------------------------------------------------------
# Finch (TACL 2024, doi 10.1162/tacl_a_00716).


def _question_start(ctx, question_lengths, delimiter_token_id, window_size):
  """([B] position of each row's first question query, [B, T] bool the
  question's queries)."""
  mask = ctx.q_mask
  big = jnp.iinfo(jnp.int32).max
  if question_lengths is None and delimiter_token_id is None and window_size:
    question_lengths = jnp.full((mask.shape[0],), window_size, jnp.int32)
  if question_lengths is not None:
    ql = jnp.asarray(question_lengths, jnp.int32).reshape(-1)
    n_valid = jnp.sum(mask, axis=1).astype(jnp.int32)
    # The last ql valid queries of each row: rank from the end.
    from_end = n_valid[:, None] - jnp.cumsum(mask.astype(jnp.int32), axis=1)
    q_window = mask & (from_end < ql[:, None])
  elif delimiter_token_id is not None:
    if ctx.tokens is None:
      raise ValueError(
        "finch(delimiter_token_id=...) finds the question in the prompt's "
        "tokens: use it with prefill; with compress_observing / "
        "compress_cache the observed queries are the question."
      )
    delim = mask & (ctx.tokens == delimiter_token_id)
    last = jnp.max(jnp.where(delim, ctx.q_pos, -1), axis=1)  # [B]
    q_window = mask & (ctx.q_pos > last[:, None]) & (last[:, None] >= 0)
  else:  # every observed query is the question (compress_observing)
    q_window = mask
  return jnp.min(jnp.where(q_window, ctx.q_pos, big), axis=1), q_window


@base.by_value
def finch(
  ratio: float | None = None,
  budget: int | None = None,
  chunk_length: int | None = None,
  normalize_scores: bool = True,
  delimiter_token_id: int | None = None,
  window_size: int | None = None,
) -> base.KVTransform:
  """Finch: the question's queries score the context (prompt-guided).

  The input is context + question. Each context entry scores the
  attention the question's queries pay it (softmax over every visible
  entry), each query's attention multiplied by its position (the number
  of entries before it: `normalize_scores`, kvpress' normalization), then
  averaged over the question's queries and over the G query heads of the
  kv head; the question's own entries are always kept (kvpress pads them
  with max + 1). With `chunk_length`, the cache is cut into chunks of
  `chunk_length` positions and each chunk keeps max(1, int(len * (1 -
  ratio))) of its own entries (kvpress' chunked mode); else the whole
  cache keeps the budget. The window is dynamic: it is the question,
  whatever its length. Source: Finch (Corallo & Papotti, TACL 2024), kvpress
  `FinchPress`.

  How the split is given (kvjax works on token ids, with batches):
  * `compress_observing(params, context_cache, question, transform=finch(...))`:
    the observed tokens are the question; the cache (the context) is
    compressed, the question is not written (feed it next). Budgets count
    the context only.
  * `prefill(context + question, transform=finch(...),
    question_lengths=[B] ints)`: the last `question_lengths[b]` tokens of
    row b are the question (ragged rows welcome); the cache keeps context
    and question, as kvpress' does, and the budget counts both.
  * `prefill(..., transform=finch(..., delimiter_token_id=d))`: the
    question is what follows the last `d` of each row. kvpress removes its
    delimiter from the embedded sequence; kvjax cannot change the
    sequence the model sees, so the delimiter stays, as a context entry.
  * `finch(..., window_size=w)` without either: the last w observed
    queries of each row are the question (a fixed window, as a
    question-agnostic fallback: the method registry's "finch" uses it).
  * Otherwise every observed query is the question (compress_observing,
    compress_cache); at prefill that is the whole prompt, refused
    (`base.Degenerate`, at trace time).

  Differences from kvpress: kvpress re-rotates the kept keys to
  consecutive positions (`rerotate_keys=True`); kvjax keeps the original
  positions (chain the key-rerotation transform for that). kvpress
  requires chunk_length > window / (1 - ratio) so the question fits its
  chunk's budget; kvjax does not check it (the question's entries are
  kept first within their chunk, newest first, the rest of such a chunk
  is evicted). Equal scores go to the newest entry (kvpress' `topk`
  leaves their order unspecified; on CPU it picks the newest too).

  Args:
    ratio: fraction of entries removed, in [0, 1).
    budget: or an absolute number kept per head (per chunk with
      `chunk_length`).
    chunk_length: positions per chunk (>= 1), or None: no chunks.
    normalize_scores: multiply each query's attention by its position.
    delimiter_token_id: the token id that separates context and question
      at prefill (None: give `question_lengths` instead).
    window_size: without `question_lengths` or a delimiter, the question
      is the last `window_size` observed queries (None: all of them).

  Raises:
    ValueError: bad arguments; a delimiter without the prompt's tokens.
    base.Degenerate: (at trace time) a question that covers every cached
      entry (at prefill without a split).
  """
  base.check_budget(ratio, budget)
  if chunk_length is not None:
    base.check_int(chunk_length, "chunk_length", 1)
  if not isinstance(normalize_scores, bool):
    raise TypeError(
      f"normalize_scores must be a bool, got {normalize_scores!r}."
    )
  if delimiter_token_id is not None:
    base.check_int(delimiter_token_id, "delimiter_token_id", 0)
  if window_size is not None:
    base.check_int(window_size, "window_size", 1)

  def static_cap(live: int) -> int:
    if chunk_length is None:
      return base.static_keep(live, ratio, budget)
    sizes = [min(chunk_length, live - i) for i in range(0, live, chunk_length)]
    return sum(base.static_keep(n, ratio, budget) for n in sizes)

  def apply(cache, state, ctx, *, question_lengths=None):
    if ctx.phase != "prefill":
      return cache, state
    if question_lengths is None and delimiter_token_id is None:
      observed = ctx.q_mask.shape[1]
      w = observed if window_size is None else min(window_size, observed)
      live = base.live_bound(cache, ctx)
      if w >= live:
        raise base.Degenerate(
          f"finch: its question ({w} observed queries: "
          f"window_size={window_size}) covers all {live} cached entries, "
          "so there is no context to score. At prefill give the split: "
          "question_lengths=[B] ints, finch(..., delimiter_token_id=...) "
          "or finch(..., window_size=...); or compress a context cache "
          "with compress_observing(observe=question)."
        )
    start, q_window = _question_start(
      ctx, question_lengths, delimiter_token_id, window_size
    )
    q = ctx.q
    L, B, T, N, H = q.shape
    k = policies._keys(cache).astype(jnp.float32)  # pylint: disable=protected-access
    K, S = k.shape[2], k.shape[3]
    qg = q.reshape(L, B, T, K, N // K, H).astype(jnp.float32)
    logits = jnp.einsum("lbtkgh,lbksh->lbkgts", qg, k) / np.sqrt(H)
    visible = cache.valid[:, :, :, None, None, :] & (
      cache.pos[:, :, :, None, None, :]
      <= ctx.q_pos[None, :, None, None, :, None]
    )
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    w = q_window[None, :, None, None, :, None]
    probs = jnp.where(visible & w, probs, 0.0)
    if normalize_scores:
      probs = (
        probs * ctx.q_pos.astype(jnp.float32)[None, :, None, None, :, None]
      )
    n_q = jnp.maximum(jnp.sum(q_window, axis=1), 1).astype(jnp.float32)
    s = probs.sum(axis=4) / n_q[None, :, None, None, None]  # [L, B, K, G, S]
    s = s.mean(axis=3)  # [L, B, K, S]
    context = cache.valid & (cache.pos < start[None, :, None, None])
    top = jnp.max(jnp.where(context, s, -jnp.inf), axis=(2, 3), keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    s = jnp.where(context, s, top + 1.0)
    bound = base.live_bound(cache, ctx)
    cap = static_cap(bound) + policies._free(ctx)  # pylint: disable=protected-access
    # Chunks of live entries (one chunk without chunk_length): rank within
    # the chunk, keep each chunk's share. Ties go to the newest entry (the
    # question's pinned entries when a chunk cannot hold all of them).
    if chunk_length is None:
      chunk = jnp.where(cache.valid, 0, 1)
      n_chunks, width = 1, cache.capacity
    else:
      # By rank among the live entries in position order (kvpress' index
      # in its cache), not by position: after an earlier compaction
      # positions run past the capacity.
      rank_in_row = structure.position_rank(cache)
      chunk = jnp.where(cache.valid, rank_in_row // chunk_length, S)
      n_chunks, width = -(-S // chunk_length), chunk_length
    onehot = chunk[..., None] == jnp.arange(n_chunks)  # [L, B, K, S, C]
    sizes = jnp.sum(onehot, axis=3)  # [L, B, K, C]
    n = base.n_keep(sizes, ratio, budget, width)  # [L, B, K, C]
    r = base.rank_scores(s, cache.valid)
    order = jnp.lexsort((-cache.pos, -r, chunk), axis=-1)  # chunk-major
    rank = jnp.argsort(order, axis=-1, stable=True)
    offset = jnp.cumsum(sizes, axis=-1) - sizes  # first rank of each chunk
    c = jnp.minimum(chunk, n_chunks - 1)
    take = lambda x: jnp.take_along_axis(x, c, axis=-1)
    keep = cache.valid & (rank - take(offset) < take(n))
    cache, _ = base.compact(cache, keep, cap)
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=static_cap,
    needs=("q", "tokens") if delimiter_token_id is not None else ("q",),
    extras=("question_lengths",),
    name="finch",
  )


# ----------------------------------------------------------------------------
# KVzip (arXiv 2505.23416).


def _grow(cache: KVCache, extra: int) -> KVCache:
  """The cache with `extra` more (empty) slots, for a replay pass."""
  pad = lambda x, v: jnp.pad(
    x,
    [(0, 0)] * 3 + [(0, extra)] + [(0, 0)] * (x.ndim - 4),
    constant_values=v,
  )
  return cache._replace(
    k=pad(cache.k, 0),
    v=pad(cache.v, 0),
    pos=pad(cache.pos, -1),
    valid=pad(cache.valid, False),
    state=(),
  )


def kvzip_scores(
  cache: KVCache,
  ctx: base.CompressContext,
  *,
  n_sink: int = 4,
  chunk_size: int = 2048,
  prompt_ids: tuple[int, ...] = (),
  continue_ids: tuple[int, ...] = (),
  suffix_ids: tuple[int, ...] = (),
  prev_postfix_size: int = 8,
) -> Array:
  """KVzip's replay scores [L, B, K, S] of a freshly prefilled cache.

  The prompt (`ctx.tokens`: token t of row b is the entry at position t;
  row b's first `live` tokens count, `live` its entries) is cut into
  chunks of `chunk_size` tokens. For each chunk the model runs, on top of
  the uncompressed cache, the replay [`prompt_ids` (chunk 0) or
  `continue_ids` + the previous chunk's last `prev_postfix_size` tokens
  (later chunks), `suffix_ids`, the chunk's tokens]; each replay query's
  attention is taken (softmax) over the first min(n_sink, chunk start)
  entries, the chunk's entries and the replay's own (causal) keys, and an
  entry of the chunk scores the largest attention any replay query of any
  query head of its kv head pays it. The first `n_sink` positions score
  the overall maximum + 1. Entries outside the prompt score 0.
  """
  params, config = ctx.params, ctx.model_config
  tokens = ctx.tokens
  if params is None or tokens is None:
    raise ValueError(
      "kvzip replays the prompt through the model: it needs the params and "
      "the prompt's tokens: prefill(transform=kvzip(...)), or "
      "compress_cache(..., params=params, tokens=prompt_tokens); "
      "compress_observing cannot run it."
    )
  from kvjax import model as model_lib  # pylint: disable=g-import-not-at-top

  B, T = tokens.shape
  L, _, K, S = cache.pos.shape
  k_all = policies._keys(cache)  # pylint: disable=protected-access
  H = k_all.shape[-1]
  # Each row's prompt: its first `lengths` tokens (the cache's entries).
  lengths = jnp.max(base.live_counts(cache), axis=(0, 2))  # [B]
  mask = jnp.arange(T)[None] < lengths[:, None]
  tokens = jnp.where(mask, tokens, 0).astype(jnp.int32)
  scores = jnp.zeros((L, B, K, S), jnp.float32)
  for start in range(0, T, chunk_size):
    width = min(chunk_size, T - start)
    head = prompt_ids if start == 0 else continue_ids
    parts = [jnp.broadcast_to(jnp.asarray(head, jnp.int32), (B, len(head)))]
    if start > 0:
      p = min(prev_postfix_size, start)
      parts.append(tokens[:, start - p : start])
    parts.append(
      jnp.broadcast_to(jnp.asarray(suffix_ids, jnp.int32), (B, len(suffix_ids)))
    )
    lead = sum(x.shape[1] for x in parts)
    parts.append(tokens[:, start : start + width])
    replay = jnp.concatenate(parts, axis=1)  # [B, R]
    R = replay.shape[1]
    has = lengths > start  # rows with tokens in this chunk
    r_mask = jnp.concatenate(
      [
        jnp.broadcast_to(has[:, None], (B, lead)),
        mask[:, start : start + width],
      ],
      axis=1,
    )
    # Under a mesh that splits the slots the scratch capacity splits too.
    scratch = _grow(
      cache, parallel.mesh.round_up(S + R, parallel.seq_shards()) - S
    )
    _, _, aux = model_lib.forward(
      params,
      replay,
      scratch,
      config=config,
      token_mask=r_mask,
      capture=("q", "k"),
    )
    q, k_new = aux["q"], aux["k"]  # [L, B, R, N, H], [L, B, R, K, H]
    N = q.shape[3]
    sink = min(n_sink, start)
    in_chunk = (cache.pos >= start) & (cache.pos < start + width)
    allowed = cache.valid & (in_chunk | (cache.pos < sink))  # [L, B, K, S]
    causal = jnp.tril(jnp.ones((R, R), bool))
    self_ok = causal[None] & r_mask[:, None, :]  # [B, R(q), R(k)]

    def layer(args):
      q_l, k_l, kn_l, ok_l = args  # [B,R,N,H], [B,K,S,H], [B,R,K,H], [B,K,S]
      qg = q_l.reshape(B, R, K, N // K, H).astype(jnp.float32)
      lc = jnp.einsum("brkgh,bksh->bkgrs", qg, k_l.astype(jnp.float32))
      lr = jnp.einsum("brkgh,btkh->bkgrt", qg, kn_l.astype(jnp.float32))
      lc = jnp.where(ok_l[:, :, None, None, :], lc, -jnp.inf) / np.sqrt(H)
      lr = jnp.where(self_ok[:, None, None], lr, -jnp.inf) / np.sqrt(H)
      p = jax.nn.softmax(jnp.concatenate([lc, lr], axis=-1), axis=-1)[..., :S]
      p = jnp.where(r_mask[:, None, None, :, None], p, 0.0)
      return jnp.max(p, axis=(2, 3))  # [B, K, S]

    chunk_scores = jax.lax.map(layer, (q, k_all, k_new, allowed))
    scores = jnp.where(in_chunk & cache.valid, chunk_scores, scores)
  top = jnp.max(jnp.where(cache.valid, scores, -jnp.inf))
  return jnp.where(cache.valid & (cache.pos < n_sink), top + 1.0, scores)


@base.by_value
def kvzip(
  ratio: float,
  layerwise: bool = False,
  n_sink: int = 4,
  chunk_size: int = 2048,
  head_capacity: float | None = None,
  prompt_ids: tuple[int, ...] = (),
  continue_ids: tuple[int, ...] = (),
  suffix_ids: tuple[int, ...] = (),
  prev_postfix_size: int = 8,
) -> base.KVTransform:
  """KVzip: query-agnostic eviction by context reconstruction.

  The model replays the prompt ("repeat the previous context") on top of
  its uncompressed cache; each entry scores the largest attention a replay
  query pays it (see `kvzip_scores`), the first `n_sink` positions are
  always kept, and the lowest-scoring entries are evicted: int(L * K *
  live * ratio) of them per row over all layers and heads
  (`layerwise=False`, kvpress' default: layers and heads get different
  budgets), or int(K * live * ratio) per layer over its heads
  (`layerwise=True`). Source: KVzip (arXiv 2505.23416), kvpress
  `KVzipPress`.

  The replay prompt: kvpress builds it as chat text with the model's
  tokenizer ("\\n\\nRepeat the previous context exactly." then the chat
  template's assistant header; for later chunks "...starting with" and the
  previous chunk's last 8 tokens). kvjax works on token ids: pass the
  tokenized instruction as `prompt_ids` / `continue_ids` and the template
  suffix as `suffix_ids` (the defaults, all empty, replay the bare
  context, which is what the scores mostly measure). The prompt must be
  the context alone (no chat prefix: kvpress' `prefix_length` is 0).

  Cost: one extra forward pass over the prompt (plus the replay prompt
  per chunk) at prefill, and per chunk a materialized [R, S + R]
  attention per layer for the scores (R = replay length), as kvpress'.
  Measured on CPU (kvjax "tiny", batch 1, jitted, median of 5): T=512,
  2.3-4.8x a plain prefill (chunk_size 256 / 2048); T=2048, 5.2x with
  chunk_size=256 and 24x with one 2048-token chunk (the [T, 2T] scores
  dominate): keep `chunk_size` a few hundred tokens on long prompts.

  Memory: kvpress masks evicted entries (nothing saved, batch 1). kvjax
  compacts; budgets vary by layer and head, so the capacity is the largest
  budget a (layer, head) may reach: all of its entries unless
  `head_capacity` caps it. With `head_capacity=c` (kvjax's addition, in
  [1 - ratio, 1]) each (layer, head) keeps at most max(1, ceil(c * live))
  entries: the selection is the top of the scores under that cap (the
  same total; an entry of a head at its cap gives way to the next best of
  another head), and the capacity is that cap. Padding is reported by
  `kvjax.cache.logical_bytes`.

  Not offered: kvpress' `kvzip_plus_normalization`.

  Args:
    ratio: fraction of entries removed, in [0, 1).
    layerwise: the same number evicted per layer (True) or one budget over
      all layers (False).
    n_sink: first positions always kept, >= 0.
    chunk_size: prompt tokens replayed per pass, >= 1 (kvpress 2048).
    head_capacity: None (kvpress: no cap) or the cap share in
      [1 - ratio, 1].
    prompt_ids, continue_ids, suffix_ids: token ids of the replay prompt.
    prev_postfix_size: tokens of the previous chunk repeated before a later
      chunk, >= 0.
  """
  base.check_ratio(ratio)
  if not isinstance(layerwise, bool):
    raise TypeError(f"layerwise must be a bool, got {layerwise!r}.")
  base.check_int(n_sink, "n_sink", 0)
  base.check_int(chunk_size, "chunk_size", 1)
  base.check_int(prev_postfix_size, "prev_postfix_size", 0)
  for name, ids in (
    ("prompt_ids", prompt_ids),
    ("continue_ids", continue_ids),
    ("suffix_ids", suffix_ids),
  ):
    if not isinstance(ids, tuple) or not all(
      isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
      raise ValueError(
        f"{name} must be a tuple of token ids (ints >= 0), got {ids!r}."
      )
  if head_capacity is not None:
    head_capacity = _check_float(head_capacity, "head_capacity", 0.0, 1.0)
    if head_capacity < 1 - ratio:
      raise ValueError(
        f"head_capacity={head_capacity} is below 1 - ratio = {1 - ratio}: "
        "the heads could not hold the kept entries."
      )

  def cap_of(live: int) -> int:
    if head_capacity is None:
      return live
    # Rounded up, so the caps never sum to less than the budget.
    return min(live, max(1, math.ceil(head_capacity * live)))

  def apply(cache, state, ctx):
    if ctx.phase != "prefill":
      return cache, state
    L, B, K, S = cache.pos.shape
    s = kvzip_scores(
      cache,
      ctx,
      n_sink=n_sink,
      chunk_size=chunk_size,
      prompt_ids=prompt_ids,
      continue_ids=continue_ids,
      suffix_ids=suffix_ids,
      prev_postfix_size=prev_postfix_size,
    )
    valid = cache.valid
    live = base.live_counts(cache)  # [L, B, K]: the row's prompt length
    row = jnp.max(live, axis=(0, 2))  # [B]
    # Eligible: within each (layer, head)'s cap (all without a cap).
    cap_n = _table(cache.capacity, cap_of)[live]
    eligible = base.keep_top(s, cap_n, valid)
    r = jnp.where(eligible, s, -jnp.inf)
    if layerwise:
      pruned = jnp.floor(K * row * ratio).astype(jnp.int32)  # [B]
      total = jnp.sum(live, axis=2) - pruned[None]  # [L, B]
      keep = base.keep_top(
        r.reshape(L, B, 1, K * S),
        total[..., None],
        eligible.reshape(L, B, 1, K * S),
      ).reshape(L, B, K, S)
    else:
      # int(numel * ratio) as kvpress, in float64 on the host table.
      table = _table(
        L * K * cache.capacity,
        lambda m: m - int(m * ratio),
      )
      total = table[jnp.sum(live, axis=(0, 2))]  # [B]
      flat = jnp.moveaxis(r, 1, 0).reshape(1, B, 1, L * K * S)
      flat_ok = jnp.moveaxis(eligible, 1, 0).reshape(1, B, 1, L * K * S)
      keep = base.keep_top(flat, total[None, :, None], flat_ok)
      keep = jnp.moveaxis(keep.reshape(B, L, K, S), 0, 1)
    capacity = cap_of(base.live_bound(cache, ctx))
    cache, _ = base.compact(cache, keep, capacity + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=cap_of,
    needs=("params", "tokens"),
    name="kvzip",
  )


# ----------------------------------------------------------------------------
# The method registry hook (merged into `kvjax.compress.registry`).

METHODS: Mapping[str, Callable[[float], base.KVTransform]] = (
  types.MappingProxyType(
    {
      "criticalkv": lambda ratio: criticalkv(ratio),
      "critical_adakv": lambda ratio: critical_adakv(ratio),
      # Question-agnostic fallback: the last 64 tokens are the question.
      "finch": lambda ratio: finch(ratio, window_size=64),
      # A head keeps at most 1.25x the mean budget (kvpress: no cap).
      "kvzip": lambda ratio: kvzip(
        ratio, head_capacity=min(1.0, 1.25 * (1.0 - ratio))
      ),
      "decoding": lambda ratio: decoding(
        policies.snapkv_scorer(window_size=16),
        compression_interval=16,
        target_size=None,
        hidden_states_buffer_size=32,
        ratio=ratio,
      ),
    }
  )
)
