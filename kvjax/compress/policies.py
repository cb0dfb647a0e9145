"""Eviction policies: scorer + budget allocator + selection.

A `Scorer` maps (cache, ctx) to scores [L, B, K, S] (higher = kept first).
`scored_policy` turns a scorer into a transform with a uniform budget per
(layer, row, kv head); `pyramidkv` varies the budget by layer; `adakv`
varies it by head. Selection compacts the cache physically (see
`base.compact`).

Definitions follow each method's paper (cited where the scorer is
defined below) and NVIDIA kvpress (`kvpress/presses/*`), which the peer
tests (`tests/compress/test_kvpress_parity.py`) compare against. Where kvjax
differs, the factory's docstring says so.

Budgets: `ratio` is the fraction of entries removed, per (layer, row, kv
head): kept = max(1, floor(live * (1 - ratio))) as in kvpress; or `budget`,
an absolute number of entries kept per head. With ragged rows each row's
budget follows its own length; the static capacity follows the longest.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache, replace_dropping
from kvjax.compress import base
from kvjax.model import rope_inv_freq

Array = jax.Array
_BIG = 1e30  # score of entries a policy always keeps (sinks, window)


class Scorer(NamedTuple):
  """Scores cache slots for eviction.

  Attributes:
    score: (cache, ctx, *, <extras>) -> [L, B, K, S] float32; higher is
      kept first. Invalid slots may get any value (selection ignores them).
    needs: `CompressContext` fields it reads.
    extras: the extra keyword-only inputs `score` takes (the policy built
      on it declares them, see `KVTransform.extras`).
    name: a label.
    spec: value identity set by `base.by_value` (equal factory arguments:
      equal scorers).
  """

  score: Callable[..., Array]
  needs: tuple[str, ...] = ()
  name: str = "scorer"
  extras: tuple[str, ...] = ()
  spec: Any = None

  # Value equality, as KVTransform's (see `base.by_value`).
  __eq__ = base._spec_eq  # pylint: disable=protected-access
  __ne__ = base._spec_ne  # pylint: disable=protected-access
  __hash__ = base._spec_hash  # pylint: disable=protected-access


Scorer._replace = replace_dropping("spec")


_check_int = base.check_int  # one argument check for every module


def _group_mean(x: Array, num_kv_heads: int) -> Array:
  """[..., N, S] -> [..., K, S]: mean over the G query heads of a kv head."""
  *lead, N, S = x.shape
  return x.reshape(*lead, num_kv_heads, N // num_kv_heads, S).mean(-2)


def _keys(cache: KVCache) -> Array:
  if not isinstance(cache.k, jax.Array) or cache.k.ndim != 5:
    raise ValueError(
      "this scorer reads float keys [L, B, K, S, H]; apply it "
      "before any codec in a chain (evict, then quantize)."
    )
  return cache.k


def _last_valid_index(mask: Array, w: int) -> Array:
  """[B, w] indices of the last w True entries of mask [B, T] (in order)."""
  T = mask.shape[1]
  key = jnp.where(mask, jnp.arange(T), -1)
  return jnp.sort(jnp.argsort(key, axis=1, stable=True)[:, -w:], axis=1)


def window_attention(
  cache: KVCache, ctx: base.CompressContext, w: int
) -> tuple[Array, Array]:
  """Attention of the last w (unmasked) queries over the cache.

  Rows with fewer than w tokens use all of theirs (padding queries get zero
  weight); a window longer than the prompt is cut to the prompt.

  Returns:
    probs: [L, B, N, w, S] float32 softmax over visible slots; zero for
      padding queries.
    first_pos: [B] position of each row's first window query.
  """
  if ctx.q is None:
    raise ValueError("window attention needs ctx.q (list 'q' in needs).")
  w = min(w, ctx.q_mask.shape[1])
  idx = _last_valid_index(ctx.q_mask, w)  # [B, w]
  q = jnp.take_along_axis(ctx.q, idx[None, :, :, None, None], axis=2)
  q_pos = jnp.take_along_axis(ctx.q_pos, idx, axis=1)  # [B, w]
  q_live = jnp.take_along_axis(ctx.q_mask, idx, axis=1)  # [B, w]
  k = _keys(cache)
  L, B, K, S, H = k.shape
  N = q.shape[3]
  qg = q.reshape(L, B, w, K, N // K, H)
  logits = jnp.einsum(
    "lbwkgh,lbksh->lbkgws", qg.astype(jnp.float32), k.astype(jnp.float32)
  ) / np.sqrt(H)
  visible = cache.valid[:, :, :, None, None, :] & (
    cache.pos[:, :, :, None, None, :] <= q_pos[None, :, None, None, :, None]
  )
  logits = jnp.where(visible, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  visible &= q_live[None, :, None, None, :, None]
  probs = jnp.where(visible, probs, 0.0).reshape(L, B, N, w, S)
  first = jnp.min(jnp.where(q_live, q_pos, jnp.iinfo(jnp.int32).max), axis=1)
  return probs, first


def _avg_pool(x: Array, kernel: int) -> Array:
  """1-D average pool over the last axis, zero padding, stride 1
  (torch `avg_pool1d(kernel, padding=kernel // 2)`, count_include_pad)."""
  if kernel <= 1:
    return x
  pad = kernel // 2
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
  S = x.shape[-1]
  return sum(xp[..., i : i + S] for i in range(kernel)) / kernel


# ----------------------------------------------------------------------------
# Scorers.


@base.by_value
def random_scorer(seed: int = 0) -> Scorer:
  """Uniform random scores (the baseline). Uses `seed`, not ctx.rng, so
  that a transform is reproducible on its own."""

  def score(cache, ctx):
    del ctx
    return jax.random.uniform(jax.random.key(seed), cache.pos.shape)

  return Scorer(score, (), "random")


@base.by_value
def knorm_scorer() -> Scorer:
  """-||k||: keys with the smallest L2 norm are kept."""

  def score(cache, ctx):
    del ctx
    return -jnp.linalg.norm(_keys(cache).astype(jnp.float32), axis=-1)

  return Scorer(score, (), "knorm")


def first_position(cache: KVCache) -> Array:
  """[B] the earliest position each row holds (0 for a row without any).

  Attention sinks are the first `n_sink` positions of the sequence the
  cache holds: positions 0.. for a prompt, the last read's first
  positions after `kvjax.ingest.last_read` drops the reads before it."""
  big = jnp.iinfo(jnp.int32).max
  first = jnp.min(jnp.where(cache.valid, cache.pos, big), axis=(0, 2, 3))
  return jnp.where(first == big, 0, first)


def _sinks(cache: KVCache, n_sink: int) -> Array:
  """[L, B, K, S] bool: the row's first `n_sink` positions."""
  first = first_position(cache)[None, :, None, None]
  return cache.valid & (cache.pos < first + n_sink)


@base.by_value
def streaming_llm_scorer(n_sink: int = 4) -> Scorer:
  """Sinks (the row's first n_sink positions, `first_position`) first,
  then the most recent positions."""

  _check_int(n_sink, "n_sink", 0)

  def score(cache, ctx):
    del ctx
    pos = cache.pos.astype(jnp.float32)
    return jnp.where(_sinks(cache, n_sink), _BIG, pos)

  return Scorer(score, (), "streaming_llm")


@base.by_value
def snapkv_scorer(window_size: int = 64, kernel_size: int = 5) -> Scorer:
  """SnapKV: attention of the last `window_size` prompt queries.

  Softmax attention of each window query over all visible slots, averaged
  over the window (kvpress averages; the paper sums: the order is the same),
  restricted to the slots before the window, 1-D average pooled over
  neighbouring slots (kernel 5, zero padding), averaged over the query heads
  of each kv head; the window itself is always kept. Pooling runs over slot
  order, which is position order in a freshly prefilled cache (SnapKV is a
  prefill-time method).

  Refused (`base.Degenerate`, at trace time) when the observed window
  covers every cached entry (min(window_size, observed queries) >= the
  live bound, as for a prompt no longer than the window observed by its
  own queries): SnapKV would then only keep the newest entries.
  """
  _check_int(window_size, "window_size", 1)
  _check_int(kernel_size, "kernel_size", 1)

  def score(cache, ctx):
    live = base.live_bound(cache, ctx)
    observed = ctx.q_mask.shape[1]
    if ctx.phase == "prefill" and min(window_size, observed) >= live:
      raise base.Degenerate(
        f"snapkv: its observation window (window_size={window_size}, "
        f"{observed} observed queries) covers all {live} cached entries, "
        "so it would keep only the newest ones; use a longer context or a "
        "smaller window_size."
      )
    probs, first = window_attention(cache, ctx, window_size)
    prefix = cache.valid & (cache.pos < first[None, :, None, None])  # [L,B,K,S]
    K = cache.pos.shape[2]
    G = probs.shape[2] // K
    prefix_n = jnp.repeat(prefix, G, axis=2)  # [L, B, N, S]
    w = probs.shape[3]
    n_live = jnp.minimum(jnp.sum(ctx.q_mask, axis=1), w)  # [B]
    mean = probs.sum(axis=3) / jnp.maximum(n_live, 1)[None, :, None, None]
    s = jnp.where(prefix_n, mean, 0.0)
    s = jnp.where(prefix_n, _avg_pool(s, kernel_size), 0.0)
    s = _group_mean(s, K)
    in_window = cache.valid & ~prefix
    # Window entries outrank the prefix; among them (a budget smaller than
    # the window) the newest win.
    return jnp.where(in_window, 1e6 + cache.pos.astype(jnp.float32), s)

  return Scorer(score, ("q",), "snapkv")


@base.by_value
def tova_scorer() -> Scorer:
  """TOVA: attention of the current (last) query, averaged over all query
  heads, the same for every kv head; the last token is always kept."""

  def score(cache, ctx):
    if ctx.phase == "decode" and ctx.attn_probs is not None:
      probs = ctx.attn_probs[:, :, :, -1]  # [L, B, N, S]
      last = ctx.q_pos[:, -1]
    else:
      probs, last = window_attention(cache, ctx, 1)
      probs = probs[:, :, :, 0]
    s = jnp.broadcast_to(probs.mean(axis=2, keepdims=True), cache.pos.shape)
    return jnp.where(cache.pos == last[None, :, None, None], _BIG, s)

  return Scorer(score, ("q", "attn_probs"), "tova")


@base.by_value
def expected_attention_scorer(
  n_future_positions: int = 512,
  n_sink: int = 4,
  use_covariance: bool = True,
  use_vnorm: bool = True,
  epsilon: float = 0.0,
) -> Scorer:
  """Expected Attention (arXiv 2510.00636), as kvpress defines it.

  Fits a Gaussian to the pre-RoPE queries of the prompt (positions after the
  sinks), rotates mean and covariance by the RoPE matrix averaged over the
  next `n_future_positions` positions, and scores each non-sink key by
  softmax(k.mu/sqrt(d) + k^T Sigma k/(2d)) (softmax over the non-sink keys
  of the row), averaged over the query heads of the kv head, times ||v||.
  Sinks (the row's first `n_sink` positions, `first_position`) are always
  kept.
  """
  _check_int(n_future_positions, "n_future_positions", 1)
  _check_int(n_sink, "n_sink", 0)
  if (
    not isinstance(epsilon, (int, float))
    or not np.isfinite(epsilon)
    or (epsilon < 0)
  ):
    raise ValueError(f"epsilon must be a finite float >= 0, got {epsilon!r}.")

  def score(cache, ctx):
    qpr = ctx.q_pre_rope.astype(jnp.float32)  # [L, B, T, N, H]
    first = first_position(cache)  # [B]
    use = ctx.q_mask & (ctx.q_pos >= first[:, None] + n_sink)  # [B, T]
    count = jnp.maximum(jnp.sum(use, axis=1), 1).astype(jnp.float32)  # [B]
    wts = use.astype(jnp.float32)[None, :, :, None, None]  # [1, B, T, 1, 1]
    mu = jnp.sum(qpr * wts, axis=2) / count[None, :, None, None]  # [L,B,N,H]
    H = qpr.shape[-1]
    # R = mean over the future positions t of (cos_t I + sin_t P), with
    # P x = rotate_half(x): the RoPE matrix averaged over t, per row.
    # Next position of each row (the observed queries may be a question
    # run after a prefilled context, so count from their positions).
    length = jnp.max(jnp.where(ctx.q_mask, ctx.q_pos, -1), axis=1) + 1  # [B]
    future = length[:, None] + jnp.arange(n_future_positions)  # [B, P]
    freqs = future[..., None].astype(jnp.float32) * rope_inv_freq(ctx.geometry)
    angles = jnp.concatenate([freqs, freqs], -1)  # [B, P, H]
    half = H // 2
    rot_half = jnp.block(
      [
        [jnp.zeros((half, half)), -jnp.eye(half)],
        [jnp.eye(half), jnp.zeros((half, half))],
      ]
    )
    R = (
      jnp.cos(angles).mean(1)[:, :, None] * jnp.eye(H)[None]
      + jnp.sin(angles).mean(1)[:, :, None] * rot_half[None]
    )  # [B, H, H]
    k = _keys(cache).astype(jnp.float32)  # [L, B, K, S, H]
    K = k.shape[2]
    G = mu.shape[2] // K
    kn = jnp.repeat(k, G, axis=2)  # [L, B, N, S, H]
    mu_rot = jnp.einsum("bij,lbnj->lbni", R, mu)
    logits = jnp.einsum("lbnsh,lbnh->lbns", kn, mu_rot) / np.sqrt(H)
    if use_covariance:
      centered = (qpr - mu[:, :, None]) * wts  # [L, B, T, N, H]
      cov = (
        jnp.einsum("lbtni,lbtnj->lbnij", centered, centered)
        / count[None, :, None, None, None]
      )  # [L, B, N, H, H]
      cov = jnp.einsum("bij,lbnjk,bmk->lbnim", R, cov, R)  # R cov R^T
      logits = (
        logits + jnp.einsum("lbnsi,lbnij,lbnsj->lbns", kn, cov, kn) / H / 2
      )
    sinks = _sinks(cache, n_sink)
    non_sink = cache.valid & ~sinks
    non_sink_n = jnp.repeat(non_sink, G, axis=2)
    logits = jnp.where(non_sink_n, logits, -jnp.inf)
    probs = jnp.where(non_sink_n, jax.nn.softmax(logits, axis=-1), 0.0)
    s = _group_mean(probs, K)
    if use_vnorm:
      vnorm = jnp.linalg.norm(cache.v.astype(jnp.float32), axis=-1)
      s = (s + epsilon) * vnorm
    return jnp.where(sinks, _BIG, s)

  return Scorer(score, ("q_pre_rope",), "expected_attention")


@base.by_value
def attention_mass_scorer() -> Scorer:
  """Attention accumulated over every query of the pass (H2O's heavy
  hitters at prefill), summed over the query heads of each kv head."""

  def score(cache, ctx):
    K = cache.pos.shape[2]
    return _group_mean(ctx.attn_mass, K)

  return Scorer(score, ("attn_mass",), "attention_mass")


@base.by_value
def oracle_scorer() -> Scorer:
  """The attention the *future* queries actually pay (an upper bound).

  Reads `future_mass` [L, B, N, S] from the transform's extra arguments:
  attention of the queries that come after compression (question, answer)
  on each slot, e.g. from `oracle_future_mass`.
  """

  def score(cache, ctx, *, future_mass=None):
    del ctx
    if future_mass is None:
      raise ValueError(
        "the oracle needs future_mass=[L, B, N, S] (see "
        "kvjax.compress.oracle_future_mass)."
      )
    return _group_mean(future_mass.astype(jnp.float32), cache.pos.shape[2])

  return Scorer(score, (), "oracle", extras=("future_mass",))


# ----------------------------------------------------------------------------
# Policies.


def _free(ctx: base.CompressContext) -> int:
  """Free slots a prefill-only policy leaves: the reserve for `forward`,
  and room for the decode steps run after it (it never evicts again)."""
  return ctx.reserve + ctx.decode_reserve


@base.by_value
def scored_policy(
  scorer: Scorer,
  ratio: float | None = None,
  budget: int | None = None,
  name: str | None = None,
) -> base.KVTransform:
  """Keeps the top-scoring entries per (layer, row, kv head) at prefill.

  Args:
    scorer: a `Scorer`.
    ratio: fraction of entries removed, in [0, 1).
    budget: or an absolute number of entries kept per head.
  """
  base.check_budget(ratio, budget)

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    n = base.n_keep(base.live_counts(cache), ratio, budget, cache.capacity)
    capacity = base.static_keep(base.live_bound(cache, ctx), ratio, budget)
    scores = scorer.score(cache, ctx, **extra)
    cache, _ = base.evict(cache, scores, n, capacity + _free(ctx))
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, budget),
    needs=scorer.needs,
    extras=scorer.extras,
    name=name or scorer.name,
  )


@base.by_value
def random(ratio=None, budget=None, seed: int = 0) -> base.KVTransform:
  """Random eviction (baseline)."""
  return scored_policy(random_scorer(seed), ratio, budget)


@base.by_value
def knorm(ratio=None, budget=None) -> base.KVTransform:
  """Keeps the keys of smallest L2 norm."""
  return scored_policy(knorm_scorer(), ratio, budget)


@base.by_value
def snapkv(
  ratio=None, budget=None, window_size: int = 64, kernel_size: int = 5
) -> base.KVTransform:
  """SnapKV at prefill (see `snapkv_scorer`)."""
  return scored_policy(snapkv_scorer(window_size, kernel_size), ratio, budget)


@base.by_value
def expected_attention(
  ratio=None,
  budget=None,
  n_future_positions=512,
  n_sink=4,
  use_covariance=True,
  use_vnorm=True,
  epsilon=0.0,
) -> base.KVTransform:
  """Expected Attention at prefill (see `expected_attention_scorer`)."""
  return scored_policy(
    expected_attention_scorer(
      n_future_positions, n_sink, use_covariance, use_vnorm, epsilon
    ),
    ratio,
    budget,
  )


@base.by_value
def oracle(ratio=None, budget=None) -> base.KVTransform:
  """Keeps what the future queries attend to most (an upper bound)."""
  return scored_policy(oracle_scorer(), ratio, budget)


class BudgetState(NamedTuple):
  """State of a decode-time policy (StreamingLLM, TOVA).

  Attributes:
    budget: [B] int32 entries each row keeps per (layer, kv head) at
      decode: the prefill budget.
  """

  budget: Array


class H2OState(NamedTuple):
  """State of `h2o`.

  Attributes:
    budget: [B] int32 entries each row keeps per (layer, kv head).
    mass: [L, B, K, S] float32 attention accumulated by each slot's entry
      over every query so far (moves with its entry on compaction).
  """

  budget: Array
  mass: Array


def _decode_policy(
  scorer: Scorer, ratio, budget, every: int, name: str, protect_recent: int = 0
) -> base.KVTransform:
  """A policy that compresses at prefill and keeps a fixed budget during
  decode: every `every` steps, entries beyond each row's budget are evicted
  by the scorer. The prefill budget becomes the decode budget."""
  base.check_budget(ratio, budget)
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be an int >= 1, got {every!r}.")

  def init(cache):
    return BudgetState(jnp.zeros(cache.pos.shape[1:2], jnp.int32))

  def apply(cache, state, ctx, **extra):
    scores = scorer.score(cache, ctx, **extra)
    budget_row = state.budget  # [B]
    if protect_recent:
      newest = jnp.max(cache.pos, axis=-1, keepdims=True)
      scores = jnp.where(cache.pos > newest - protect_recent, _BIG, scores)
    if ctx.phase == "prefill":
      live = base.live_counts(cache)
      n = base.n_keep(live, ratio, budget, cache.capacity)
      # Budget + the reserve + `every` slots of headroom: a decode step
      # writes its token before the policy evicts.
      cap = (
        base.static_keep(base.live_bound(cache, ctx), ratio, budget)
        + ctx.reserve
        + every
      )
      cache, _ = base.evict(cache, scores, n, cap)
      return cache, BudgetState(jnp.max(n, axis=(0, 2)))
    # Decode: keep each row's budget; the capacity does not change.
    sort = lambda c: base.evict(
      c, scores, budget_row[None, :, None], c.capacity
    )[0]
    if every == 1:  # one in, one out: O(S) swap-remove, no sort
      live = jnp.max(base.live_counts(cache), axis=(0, 2))
      one = lambda c: base.evict_one(c, scores, live > budget_row)[0]
      # Entries fed by `forward` since the last step (a question) put a row
      # more than one over: back to the budget in one sort.
      return jax.lax.cond(
        jnp.any(live > budget_row + 1), sort, one, cache
      ), state
    return sort(cache), state

  return base.KVTransform(
    init=init,
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, budget),
    needs=scorer.needs,
    extras=scorer.extras,
    every=every,
    name=name,
    bounded=True,
  )


@base.by_value
def streaming_llm(
  ratio=None, budget=None, n_sink: int = 4, every: int = 1
) -> base.KVTransform:
  """StreamingLLM: `n_sink` attention sinks + the most recent entries, at
  prefill and then every `every` decode steps.

  Raises:
    ValueError: an absolute budget smaller than n_sink + 1 (no room for
      any recent entry).
  """
  if budget is not None and isinstance(budget, int) and budget < n_sink + 1:
    raise ValueError(
      f"budget={budget} is smaller than n_sink + 1 = "
      f"{n_sink + 1} (sinks plus at least one recent entry)."
    )
  return _decode_policy(
    streaming_llm_scorer(n_sink), ratio, budget, every, "streaming_llm"
  )


@base.by_value
def tova(ratio=None, budget=None, every: int = 1) -> base.KVTransform:
  """TOVA: at prefill and at every decode step, drop the entries the
  current query attends to least (averaged over heads)."""
  return _decode_policy(tova_scorer(), ratio, budget, every, "tova")


@base.by_value
def h2o(
  ratio=None, budget=None, recent_fraction: float = 0.5, every: int = 1
) -> base.KVTransform:
  """H2O: heavy hitters by accumulated attention + a recent window.

  The budget is split: `recent_fraction` of it for the most recent entries,
  the rest for the highest accumulated attention (summed over every query
  so far, averaged over the query heads of each kv head). Applied at
  prefill and every `every` decode steps; the accumulated attention moves
  with its entries when the cache is compacted.
  """
  base.check_budget(ratio, budget)
  _check_int(every, "every", 1)
  if not isinstance(recent_fraction, (int, float)) or (
    not 0.0 <= recent_fraction < 1.0
  ):
    raise ValueError(
      f"recent_fraction must be in [0, 1), got {recent_fraction!r}."
    )

  def init(cache):
    return H2OState(
      jnp.zeros(cache.pos.shape[1:2], jnp.int32),
      jnp.zeros(cache.pos.shape, jnp.float32),
    )

  def select(cache, acc, n, capacity):
    n_recent = jnp.floor(n * recent_fraction).astype(jnp.int32)  # [L,B,K]
    recent_rank = jnp.argsort(
      jnp.argsort(
        jnp.where(cache.valid, -cache.pos, jnp.iinfo(jnp.int32).max),
        axis=-1,
        stable=True,
      ),
      axis=-1,
      stable=True,
    )
    recent = (recent_rank < n_recent[..., None]) & cache.valid
    scores = jnp.where(recent, _BIG, acc)
    cache, idx = base.evict(cache, scores, n, capacity)
    acc = jnp.where(cache.valid, jnp.take_along_axis(acc, idx, axis=-1), 0.0)
    return cache, acc

  def apply(cache, state, ctx):
    budget_row, acc = state
    K = cache.pos.shape[2]
    mass = _group_mean(ctx.attn_mass, K)  # [L, B, K, S]
    if ctx.phase == "prefill":
      live = base.live_counts(cache)
      n = base.n_keep(live, ratio, budget, cache.capacity)
      cap = (
        base.static_keep(base.live_bound(cache, ctx), ratio, budget)
        + ctx.reserve
        + every
      )  # see _decode_policy
      cache, acc = select(cache, mass, n, cap)
      return cache, H2OState(jnp.max(n, axis=(0, 2)), acc)
    acc = acc + mass

    def sort(cache, acc):
      n = jnp.broadcast_to(budget_row[None, :, None], cache.pos.shape[:3])
      return select(cache, acc, n, cache.capacity)

    if every > 1:
      cache, acc = sort(cache, acc)
      return cache, H2OState(budget_row, acc)
    live = jnp.max(base.live_counts(cache), axis=(0, 2))

    def one(cache, acc):  # one in, one out: O(S), no sort
      n_recent = jnp.floor(budget_row * recent_fraction).astype(jnp.int32)
      newest = jnp.max(cache.pos, axis=-1, keepdims=True)  # [L, B, K, 1]
      recent = cache.pos > newest - n_recent[None, :, None, None]
      cache, e, last = base.evict_one(
        cache, jnp.where(recent, _BIG, acc), live > budget_row
      )
      L, B, K, S = acc.shape
      li, bi, ki = jnp.meshgrid(
        jnp.arange(L), jnp.arange(B), jnp.arange(K), indexing="ij"
      )
      src = jnp.broadcast_to(last[None, :, None], (L, B, K))
      acc = acc.at[li, bi, ki, e].set(acc[li, bi, ki, src], mode="drop")
      return cache, jnp.where(cache.valid, acc, 0.0)

    # A row more than one over (entries fed by `forward` since the last
    # step): back to the budget in one sort.
    cache, acc = jax.lax.cond(
      jnp.any(live > budget_row + 1), sort, one, cache, acc
    )
    return cache, H2OState(budget_row, acc)

  return base.KVTransform(
    init=init,
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, budget),
    needs=("attn_mass",),
    every=every,
    name="h2o",
    bounded=True,
  )


def pyramid_budgets(
  live: Array,
  ratio: float,
  num_layers: int,
  window_size: int = 64,
  beta: int = 20,
  xp=jnp,
) -> Array:
  """PyramidKV's per-layer budgets (kvpress `get_layer_budget`).

  Budgets fall linearly with depth from max_num to min_num, where the
  average matches the ratio: max_capacity = window + live * (1 - ratio),
  min_num = (max_capacity - window) / beta, max_num = 2 (max_capacity -
  window) - min_num (clipped to live - window). Where these do not fit
  (short prompts), every layer keeps max(1, round(live * (1 - ratio))).

  Args:
    live: [B] live entries per row.
    xp: `jnp`, or `np` for static (trace-time) budgets.

  Returns:
    [L, B] int32 budgets.
  """
  q = xp.asarray(live).astype(xp.float32)
  cap = window_size + q * (1 - ratio)
  min_num = (cap - window_size) / beta
  max_num = (cap - window_size) * 2 - min_num
  clip = max_num >= q - window_size
  max_num = xp.where(clip, q - window_size, max_num)
  min_num = xp.where(clip, (cap - window_size) * 2 - max_num, min_num)
  ok = (q >= max_num) & (max_num >= min_num) & (min_num >= window_size)
  steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
  layer = xp.arange(num_layers, dtype=xp.float32)[:, None]
  # torch's round() is round-half-to-even, like xp.round.
  pyramid = xp.round(max_num[None] - layer * steps)
  flat = xp.maximum(1.0, xp.round(q * (1 - ratio)))[None]
  return xp.where(ok[None], pyramid, flat).astype(xp.int32)


@base.by_value
def pyramidkv(
  ratio: float, window_size: int = 64, kernel_size: int = 5, beta: int = 20
) -> base.KVTransform:
  """PyramidKV: SnapKV scores with budgets falling linearly with depth."""
  base.check_ratio(ratio)
  scorer = snapkv_scorer(window_size, kernel_size)

  def static_cap(live: int, num_layers: int) -> int:
    b = pyramid_budgets(
      np.array([live]), ratio, num_layers, window_size, beta, xp=np
    )
    return int(np.max(b))

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    L = cache.num_layers
    live = jnp.max(base.live_counts(cache), axis=(0, 2))  # [B]
    n = pyramid_budgets(live, ratio, L, window_size, beta)[:, :, None]
    cap = static_cap(base.live_bound(cache, ctx), L)
    cache, _ = base.evict(
      cache, scorer.score(cache, ctx, **extra), n, cap + _free(ctx)
    )
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    # Layer 0 keeps the most; a static bound without knowing L:
    keeps=lambda live: min(live, 2 * base.static_keep(live, ratio, None)),
    needs=scorer.needs,
    extras=scorer.extras,
    name="pyramidkv",
  )


@base.by_value
def adakv(
  scorer: Scorer | str,
  ratio: float,
  alpha_safeguard: float = 0.2,
  **scorer_kwargs,
) -> base.KVTransform:
  """Ada-KV: per layer, a global top-(K * n) over all heads' scores, so
  budgets vary by head; each head keeps at least floor(alpha * n) (>= 1).

  Unlike kvpress, which masks evicted entries and saves no memory, kvjax
  compacts: the capacity is the largest head budget and the gap to the
  ragged size is reported by `kvjax.cache.logical_bytes`.

  Args:
    scorer: a `Scorer` or the name of one ("snapkv", "knorm",
      "expected_attention", "streaming_llm", "random", "tova").
    ratio: fraction removed, in [0, 1).
    alpha_safeguard: minimum share of the uniform budget each head keeps.
  """
  base.check_ratio(ratio)
  if not 0.0 <= alpha_safeguard <= 1.0:
    raise ValueError(
      f"alpha_safeguard must be in [0, 1], got {alpha_safeguard!r}."
    )
  if isinstance(scorer, str):
    scorer = scorer_by_name(scorer, **scorer_kwargs)

  def safe_count(n):
    n_safe = jnp.floor(n.astype(jnp.float32) * alpha_safeguard).astype(
      jnp.int32
    )
    if alpha_safeguard > 0:
      n_safe = jnp.where(n > 0, jnp.maximum(n_safe, 1), 0)
    return n_safe

  def sizes(live):
    n = base.static_keep(live, ratio, None)
    n_safe = int(n * alpha_safeguard)
    if alpha_safeguard > 0:
      n_safe = max(1, n_safe)
    return live, n, n_safe

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    L, B, K, S = cache.pos.shape
    live = base.live_counts(cache)  # [L, B, K]
    n = base.n_keep(live, ratio, None, cache.capacity)
    scores = jnp.where(cache.valid, scorer.score(cache, ctx, **extra), -jnp.inf)
    safe = base.keep_top(scores, safe_count(n), cache.valid)
    scores = jnp.where(safe, jnp.finfo(jnp.float32).max, scores)
    total = jnp.sum(n, axis=2)  # [L, B]
    flat_valid = cache.valid.reshape(L, B, 1, K * S)
    keep = base.keep_top(
      scores.reshape(L, B, 1, K * S), total[..., None], flat_valid
    ).reshape(L, B, K, S)
    s_live, s_n, s_safe = sizes(base.live_bound(cache, ctx))
    cap = min(s_live, K * s_n - (K - 1) * s_safe)
    cache, _ = base.compact(cache, keep, cap + _free(ctx))
    return cache, state

  def keeps(live):
    # Without K the tight bound is unknown; a head may keep all it had.
    return live

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=keeps,
    needs=scorer.needs,
    extras=scorer.extras,
    name=f"adakv_{scorer.name}",
  )


SCORERS = {
  "random": random_scorer,
  "knorm": knorm_scorer,
  "streaming_llm": streaming_llm_scorer,
  "snapkv": snapkv_scorer,
  "tova": tova_scorer,
  "expected_attention": expected_attention_scorer,
  "attention_mass": attention_mass_scorer,
}


def scorer_by_name(name: str, **kwargs) -> Scorer:
  """The scorer `name` of `SCORERS` or of `kvjax.compress.scorers.SCORERS`
  (KeyDiff, LagKV, ...), built with `kwargs`.

  Raises:
    ValueError: an unknown name (the message lists the allowed ones).
  """
  from kvjax.compress import scorers  # pylint: disable=g-import-not-at-top

  known = {**SCORERS, **scorers.SCORERS}
  if name not in known:
    raise ValueError(f"unknown scorer {name!r}; allowed: {sorted(known)}.")
  return known[name](**kwargs)


def resolve_scorer(scorer: Scorer | str, what: str) -> Scorer:
  """`scorer` itself, or the scorer its name gives (`scorer_by_name`).

  Raises:
    ValueError: an unknown name. TypeError: neither a `Scorer` nor a name.
  """
  if isinstance(scorer, str):
    try:
      return scorer_by_name(scorer)
    except ValueError as e:
      raise ValueError(f"{what}: {e}") from None
  if not isinstance(scorer, Scorer):
    raise TypeError(
      f"{what}: scorer must be a kvjax.compress Scorer or the name of one, "
      f"got {type(scorer).__name__}."
    )
  return scorer


def oracle_future_mass(
  params: Any, tokens: Array, *, config: Any, context_end: int
) -> Array:
  """Attention the queries at positions >= context_end pay to each slot.

  Runs the full sequence uncompressed and sums the attention probabilities
  of the future queries, restricted to the first `context_end` slots (the
  context that will be compressed).

  Args:
    params: model parameters.
    tokens: [B, T] the whole sequence (context, then what follows).
    config: the model config.
    context_end: static length of the context prefix.

  Returns:
    [L, B, N, context_end] float32, to pass as `future_mass=` to an oracle.
  """
  from kvjax import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from kvjax import model as model_lib  # pylint: disable=g-import-not-at-top

  B, T = tokens.shape
  # The mass of the queries after the context, from the engine's LSE pass
  # (no [T, T] probabilities).
  future = jnp.broadcast_to(jnp.arange(T) >= context_end, (B, T))
  _, _, aux = model_lib.forward(
    params,
    tokens,
    cache_lib.init_cache(config, B, T),
    config=config,
    capture=("attn_mass",),
    mass_mask=future,
  )
  return aux["attn_mass"][..., :context_end]  # [L, B, N, context_end]
