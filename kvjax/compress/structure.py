"""Structure wrappers: chunks, blocks, lazy layers, streaming heads, layer
budgets (kvpress' ChunkKV, Chunk, Block, SimLayerKV, DuoAttention and
PerLayerCompression presses, issue 18).

The wrappers `chunkkv`, `chunk`, `block` and `per_layer` take the wrapped
policy as their first argument, as kvpress' wrappers take a press:
`chunkkv(snapkv(ratio=0.5), chunk_length=20)`. The wrapped policy must be a
*scored policy*: `policies.scored_policy(scorer, ratio | budget)` or a
factory that returns one (`snapkv`, `knorm`, `random`, `expected_attention`,
`oracle`, `keydiff` ...). Its scorer and its ratio or budget are read from
its value identity (`spec`): a factory's result is rebuilt once by calling
the factory's undecorated body with the same arguments, which returns the
inner `scored_policy` value. To wrap a bare `Scorer`, pass
`scored_policy(scorer, ratio)`. Anything else (a decode-time policy such
as `streaming_llm` or `h2o`, `adakv`, `pyramidkv`, a codec, a chain, a
wrapper) is refused with a TypeError: its selection is not "score, then
keep the top entries".

Chunks and blocks are runs of consecutive live entries in position order
(the i-th live entry of a (layer, row, kv head) belongs to chunk
i // chunk_length). On a freshly prefilled cache, where slot s holds
position s, these are kvpress' chunks of positions [c * n, (c + 1) * n);
each row of a ragged batch is chunked over its own length.

Where a wrapper lets the scorer "see a chunk (or block) on its own", the
scorer is called on a *view*: the cache with `valid` restricted to the
chunk's entries and the context with `q_mask` restricted to the queries at
the chunk's positions (and `live_bound` set to the chunk's size). A scorer
that ignores invalid slots and masked queries (SnapKV's softmax runs over
valid slots and unmasked queries, KeyDiff's anchor and Expected
Attention's statistics over valid entries and queries; Knorm scores each
key alone) then scores the chunk as if it were the whole prompt, without
slicing (shapes stay static). A scorer that reads a precomputed tap over
the whole pass (`attn_mass`, the oracle's `future_mass`) still sees the
whole prompt's mass: documented, not hidden.

SimLayerKV and DuoAttention are not wrappers (kvpress' are not either).
Their budgets vary by layer or head and depend on the data, while a kvjax
cache stacks layers and heads in one array with one static capacity: the
capacity is the largest budget (all entries, unless every head is a
streaming head), so their saving is *logical* (`kvjax.cache.logical_bytes`)
and the gap to `kvjax.kv_bytes` is the padding, reported, not hidden.
`per_layer`'s budgets are static, its capacity the largest layer budget.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compress import base
from kvjax.compress import policies
from kvjax.model import rope_inv_freq

Array = jax.Array

_SCORED = ("kvjax.compress.policies", "scored_policy")
_ALLOWED = (
  "a scored policy: policies.scored_policy(scorer, ratio=... | budget=...) "
  "or a factory returning one (snapkv, knorm, random, expected_attention, "
  "oracle, keydiff, ...)"
)


# ----------------------------------------------------------------------------
# Reading the wrapped policy.


def _call_raw(raw: Callable, args: dict):
  """Calls a factory's undecorated body with its bound (frozen) arguments."""
  pos, kw = [], {}
  for name, p in inspect.signature(raw).parameters.items():
    if name not in args:
      continue
    value = args[name]
    if p.kind is p.VAR_POSITIONAL:
      pos.extend(value)
    elif p.kind is p.VAR_KEYWORD:
      kw.update(dict(value))
    elif p.kind is p.POSITIONAL_ONLY:
      pos.append(value)
    else:
      kw[name] = value
  return raw(*pos, **kw)


def wrapped_policy(policy, who: str):
  """(scorer, ratio, budget) of a scored policy (see the module docstring).

  Raises:
    TypeError: `policy` is not a scored policy (the message says what is).
  """
  t = policy
  for _ in range(4):  # a factory of a factory of scored_policy at most
    if not isinstance(t, base.KVTransform) or t.spec is None:
      break
    module, qualname, frozen = t.spec
    args = dict(frozen)
    if (module, qualname) == _SCORED:
      return args["scorer"], args["ratio"], args["budget"]
    try:
      factory = getattr(importlib.import_module(module), qualname, None)
    except ImportError:
      break
    raw = getattr(factory, "__wrapped__", None)
    if raw is None:
      break
    t = _call_raw(raw, args)
  got = (
    f"the transform {policy.name!r}"
    if isinstance(policy, base.KVTransform)
    else f"a {type(policy).__name__}"
  )
  raise TypeError(
    f"{who} wraps {_ALLOWED}; got {got}, which is not one (decode-time "
    "policies, adakv, pyramidkv, codecs, chains and wrappers select "
    "differently). Wrap scored_policy(<its scorer>, ratio) instead."
  )


def _check_size(value, name: str) -> int:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < 1
  ):
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
  return int(value)


# ----------------------------------------------------------------------------
# Chunks and views.


def position_rank(cache) -> Array:
  """[L, B, K, S] rank of each valid slot among the valid slots of its
  (layer, row, head) in position order (invalid slots rank after them)."""
  key = jnp.where(cache.valid, cache.pos, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def _view(cache, ctx, entries: Array, bound: int):
  """The cache and context a scorer sees for the subset `entries`
  [L, B, K, S]: only those slots valid, only the queries at positions from
  the subset's oldest to its newest entry (per row) unmasked, besides the
  queries after every cached entry (an observed question), and
  `live_bound` = `bound`."""
  cache_v = cache._replace(valid=entries)
  ctx_v = ctx._replace(live_bound=bound)
  if ctx.q_mask is not None and ctx.q_pos is not None:
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(entries, cache.pos, big), axis=(0, 2, 3))  # [B]
    hi = jnp.max(jnp.where(entries, cache.pos, -1), axis=(0, 2, 3))  # [B]
    # Queries past every cached entry (a question observed after the
    # context, `compress_observing` / the sweep's aware mode) see every
    # chunk; the prompt's own queries only their chunk's.
    newest = jnp.max(jnp.where(cache.valid, cache.pos, -1), axis=(0, 2, 3))
    after = ctx.q_pos > newest[:, None]
    ctx_v = ctx_v._replace(
      q_mask=ctx.q_mask
      & (((ctx.q_pos >= lo[:, None]) & (ctx.q_pos <= hi[:, None])) | after)
    )
  return cache_v, ctx_v


def _degenerate(who: str, kept: int, live: int, why: str) -> None:
  if kept >= live:
    raise base.Degenerate(
      f"{who}: keeps {kept} of {live} entries per head ({why}), so it "
      "would compress nothing; use a longer context or a higher ratio."
    )


# ----------------------------------------------------------------------------
# ChunkKV.


@base.by_value
def chunkkv(
  policy: base.KVTransform, chunk_length: int = 20
) -> base.KVTransform:
  """ChunkKV: keeps whole chunks, ranked by their mean token score.

  Definition (ChunkKV, arXiv 2502.00299; kvpress `ChunkKVPress`): the
  wrapped policy's scorer scores every entry of the whole prompt; per layer
  and row, a chunk's score is the mean over its tokens of the score summed
  over kv heads; the top `max(1, int(n_chunks * (1 - ratio)))` chunks are
  kept whole, in every kv head (n_chunks counts the last, partial chunk).
  A row shorter than one chunk falls back to the wrapped policy (its
  per-head top entries), as kvpress does.

  Args:
    policy: a scored policy (module docstring), e.g. `snapkv(ratio=0.5)`.
      Its ratio is applied to the chunk count as kvpress does, so the kept
      share in tokens is about 1 - ratio (whole chunks, rounded down).
      With a `budget` (entries kept per head), `max(1, budget //
      chunk_length)` chunks are kept: at most `budget` entries.
    chunk_length: tokens per chunk (kvpress' default 20).

  Differences from kvpress: ragged rows are chunked over their own length
  and choose their own chunks (kvpress takes batch row 0's chunks for the
  whole batch); the cache is compacted to the kept chunks (as kvpress).

  Capacity: the kept count when every kept chunk is whole; a row whose
  kept chunks include the short last chunk keeps fewer entries, so it has
  up to chunk_length - 1 more free slots than the reserve (the layout
  rounds up, as Ada-KV's does).

  Raises:
    TypeError: `policy` is not a scored policy.
    ValueError: a bad chunk_length, or a budget below one chunk.
    base.Degenerate (at trace time): every chunk would be kept.
  """
  scorer, ratio, budget = wrapped_policy(policy, "chunkkv")
  cs = _check_size(chunk_length, "chunk_length")
  if budget is not None and budget < cs:
    raise ValueError(
      f"chunkkv keeps whole chunks: the wrapped policy's budget={budget} "
      f"is smaller than chunk_length={cs}; give a budget >= chunk_length "
      "or a ratio."
    )

  def chunks_kept(n_chunks: int) -> int:
    if ratio is not None:
      return base.static_keep(n_chunks, ratio, None)
    return min(n_chunks, max(1, budget // cs))

  def static_kept(live: int) -> int:
    if live < cs:  # kvpress falls back to the wrapped press
      return base.static_keep(live, ratio, budget)
    return min(live, chunks_kept(-(-live // cs)) * cs)

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    bound = base.live_bound(cache, ctx)
    cap = static_kept(bound)
    _degenerate(
      "chunkkv", cap, bound, f"chunks of {cs}, ratio={ratio}, budget={budget}"
    )
    K = cache.pos.shape[2]
    C = -(-bound // cs)
    valid = cache.valid
    scores = scorer.score(cache, ctx, **extra).astype(jnp.float32)
    cid = jnp.where(valid, position_rank(cache) // cs, C)  # [L, B, K, S]
    onehot = cid[..., None] == jnp.arange(C)  # [L, B, K, S, C]
    total = jnp.sum(jnp.where(onehot, scores[..., None], 0.0), axis=(2, 3))
    count = jnp.sum(onehot, axis=(2, 3)) / K  # tokens per chunk [L, B, C]
    chunk_score = total / jnp.maximum(count, 1)
    live = base.live_counts(cache)  # [L, B, K]
    n_chunks = -(-jnp.max(live, axis=2) // cs)  # [L, B]
    if ratio is not None:
      n_ck = base.n_keep(n_chunks, ratio, None, C)
    else:
      n_ck = jnp.minimum(n_chunks, max(1, budget // cs))
    exists = jnp.arange(C) < n_chunks[..., None]  # [L, B, C]
    top = base.keep_top(
      chunk_score[:, :, None], n_ck[:, :, None], exists[:, :, None]
    )[:, :, 0]  # [L, B, C]
    top = jnp.concatenate([top, jnp.zeros_like(top[..., :1])], axis=-1)
    top = jnp.broadcast_to(top[:, :, None], cid.shape[:3] + (C + 1,))
    keep = jnp.take_along_axis(top, cid, axis=-1) & valid
    # Rows shorter than one chunk: the wrapped policy's own selection.
    n_tok = base.n_keep(live, ratio, budget, cache.capacity)
    tok = base.keep_top(scores, n_tok, valid)
    keep = jnp.where((live < cs)[..., None], tok, keep)
    cache, _ = base.compact(cache, keep, cap + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=static_kept,
    needs=scorer.needs,
    extras=scorer.extras,
    name="chunkkv",
  )


# ----------------------------------------------------------------------------
# Chunk.


@base.by_value
def chunk(
  policy: base.KVTransform, chunk_length: int = 1024
) -> base.KVTransform:
  """Chunk: the wrapped policy applied to each chunk on its own.

  Definition (FINCH's chunking, kvpress `ChunkPress`): the prompt is cut
  into chunks of `chunk_length` entries; the scorer scores each chunk as if
  it were the whole prompt (a view, see the module docstring: for SnapKV,
  the last queries *of the chunk* over the chunk's keys), and each chunk
  keeps its share, `max(1, int(n * (1 - ratio)))` of its n entries, per
  (layer, row, kv head).

  Args:
    policy: a scored policy with a ratio (module docstring). A `budget` is
      refused: each chunk keeps a share, not an absolute count.
    chunk_length: entries per chunk (kvpress' default 1024).

  Differences from kvpress: kvpress' ChunkPress hands the scorer the
  chunk's hidden states but the *whole sequence's* position embeddings, so
  its SnapKV rotates the queries of every chunk but the last with the
  RoPE angles of the sequence's last positions; kvjax's view uses each
  query's own (already rotated) query, so the two agree on the last chunk
  and differ on the others (tests/compress/test_kvpress_parity_structure
  checks both). kvpress' SnapKV also refuses a chunk not longer than its
  window; kvjax keeps the newest entries of such a (last, partial) chunk.

  Raises:
    TypeError: `policy` is not a scored policy.
    ValueError: a bad chunk_length, or a budget-built policy.
    base.Degenerate (at trace time): every entry would be kept.
  """
  scorer, ratio, budget = wrapped_policy(policy, "chunk")
  cs = _check_size(chunk_length, "chunk_length")
  if ratio is None:
    raise ValueError(
      f"chunk keeps a share of each chunk: build the wrapped policy with a "
      f"ratio (got budget={budget})."
    )

  def static_kept(live: int) -> int:
    return (live // cs) * base.static_keep(cs, ratio, None) + base.static_keep(
      live % cs, ratio, None
    )

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    bound = base.live_bound(cache, ctx)
    cap = static_kept(bound)
    _degenerate("chunk", cap, bound, f"chunks of {cs}, ratio={ratio}")
    C = -(-bound // cs)
    cid = jnp.where(cache.valid, position_rank(cache) // cs, C)

    def body(c, keep):
      entries = cid == c
      n = base.n_keep(jnp.sum(entries, axis=-1), ratio, None, cs)
      view_cache, view_ctx = _view(cache, ctx, entries, min(cs, bound))
      s = scorer.score(view_cache, view_ctx, **extra)
      return keep | base.keep_top(s, n, entries)

    keep = jax.lax.fori_loop(0, C, body, jnp.zeros_like(cache.valid))
    cache, _ = base.compact(cache, keep, cap + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=static_kept,
    needs=scorer.needs,
    extras=scorer.extras,
    name="chunk",
  )


# ----------------------------------------------------------------------------
# Block.


@base.by_value
def block(policy: base.KVTransform, block_size: int = 128) -> base.KVTransform:
  """Block: block-wise iterative selection, as a block prefill would do.

  Definition (KeyDiff, arXiv 2504.15364; kvpress `BlockPress`): with n the
  budget per head, the first n entries are kept; then block by block (the
  next `block_size` entries), the scorer scores the kept entries together
  with the block, on their own (a view: for KeyDiff, the mean key of
  those entries), and the top n of them stay kept. Per (layer, row, kv
  head); a ragged row runs over its own length.

  Args:
    policy: a scored policy (module docstring) with a ratio or a budget.
    block_size: entries per block (kvpress' default 128).

  Differences from kvpress: the scorer's view unmasks the queries up to the
  block's last position (a block prefill's queries); kvpress gathers the
  hidden states of the kept entries and the block (the same for
  key-only scorers such as KeyDiff and Knorm, which BlockPress is meant
  for). As in kvpress, it is a simulation: the whole prompt was computed
  before the blocks are scored.

  Raises:
    TypeError: `policy` is not a scored policy.
    ValueError: a bad block_size.
    base.Degenerate (at trace time): every entry would be kept.
  """
  scorer, ratio, budget = wrapped_policy(policy, "block")
  bs = _check_size(block_size, "block_size")

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    bound = base.live_bound(cache, ctx)
    cap = base.static_keep(bound, ratio, budget)
    _degenerate("block", cap, bound, f"ratio={ratio}, budget={budget}")
    n = base.n_keep(base.live_counts(cache), ratio, budget, cache.capacity)
    rank = position_rank(cache)
    kept = cache.valid & (rank < n[..., None])
    steps = -(-(bound - cap) // bs)

    def body(i, kept):
      lo = (n + i * bs)[..., None]
      entries = kept | (cache.valid & (rank >= lo) & (rank < lo + bs))
      view_cache, view_ctx = _view(cache, ctx, entries, min(cap + bs, bound))
      s = scorer.score(view_cache, view_ctx, **extra)
      return base.keep_top(s, n, entries)

    kept = jax.lax.fori_loop(0, steps, body, kept)
    cache, _ = base.compact(cache, kept, cap + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, budget),
    needs=scorer.needs,
    extras=scorer.extras,
    name="block",
  )


# ----------------------------------------------------------------------------
# Per-layer budgets.


@base.by_value
def per_layer(
  policy: base.KVTransform,
  compression_ratios: tuple[float, ...] | None = None,
  *,
  linear: tuple[float, float] | None = None,
) -> base.KVTransform:
  """PerLayerCompression: the wrapped policy with one ratio per layer.

  Definition (kvpress `PerLayerCompressionPress`): layer l keeps
  `max(1, int(live * (1 - compression_ratios[l])))` entries per (row, kv
  head), the top ones by the wrapped policy's scorer.

  Args:
    policy: a scored policy built with a ratio (module docstring); its
      ratio is replaced by each layer's, as kvpress does. A budget-built
      policy is refused (the per-layer ratios would silently override it).
    compression_ratios: one fraction removed per layer, each in [0, 1); the
      length must be the model's layer count (checked at trace time).
    linear: instead of `compression_ratios` (kvjax only), (first, last):
      ratios interpolated linearly from the first layer to the last over
      however many layers the model has (their mean is (first + last) /
      2), so one transform fits models of any depth. Exactly one of the two.

  Differences from kvpress: kvpress needs flash attention (it compacts
  per layer, a ragged layout); kvjax's cache stacks layers with one
  capacity, the largest layer budget, and the gap to the smaller layers'
  budgets is padding (`kv_bytes` - `logical_bytes`).

  Raises:
    TypeError: `policy` is not a scored policy.
    ValueError: bad ratios (at build), or a `compression_ratios` length
      other than the model's layer count (at trace time).
    base.Degenerate (at trace time): no layer would evict anything.
  """
  scorer, ratio, budget = wrapped_policy(policy, "per_layer")
  if budget is not None:
    raise ValueError(
      f"per_layer replaces the wrapped policy's ratio by each layer's; "
      f"build it with a ratio, not budget={budget}."
    )
  if (compression_ratios is None) == (linear is None):
    raise ValueError(
      "per_layer takes exactly one of compression_ratios (one ratio per "
      "layer) or linear=(first, last); got "
      f"compression_ratios={compression_ratios!r}, linear={linear!r}."
    )
  given, name = (
    (compression_ratios, "compression_ratios")
    if linear is None
    else (linear, "linear")
  )
  if (
    not isinstance(given, (tuple, list))
    or not given
    or (linear is not None and len(given) != 2)
  ):
    raise ValueError(
      f"{name} must be a non-empty tuple of floats in [0, 1) "
      f"({'one per layer' if linear is None else '(first, last)'}), got "
      f"{given!r}."
    )
  given = tuple(
    base.check_ratio(r, f"{name}[{i}]") for i, r in enumerate(given)
  )

  def layer_ratios(L: int) -> tuple[float, ...]:
    if linear is None:
      if len(given) != L:
        raise ValueError(
          f"per_layer: compression_ratios has {len(given)} entries, the "
          f"model has {L} layers; give one ratio per layer (or linear=)."
        )
      return given
    if L == 1:
      return ((given[0] + given[1]) / 2,)
    return tuple(float(r) for r in np.linspace(given[0], given[1], L))

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return cache, state
    ratios = layer_ratios(cache.num_layers)
    bound = base.live_bound(cache, ctx)
    cap = max(base.static_keep(bound, r, None) for r in ratios)
    _degenerate("per_layer", cap, bound, f"layer ratios {ratios}")
    live = base.live_counts(cache)  # [L, B, K]
    n = jnp.stack(
      [
        base.n_keep(live[l], r, None, cache.capacity)
        for l, r in enumerate(ratios)
      ]
    )
    scores = scorer.score(cache, ctx, **extra)
    cache, _ = base.evict(cache, scores, n, cap + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    # The smallest ratio keeps the most (an interpolated one lies between).
    keeps=lambda live: base.static_keep(live, min(given), None),
    needs=scorer.needs,
    extras=scorer.extras,
    name="per_layer",
  )


# ----------------------------------------------------------------------------
# SimLayerKV.


@base.by_value
def simlayerkv(
  lazy_threshold: float = 1.0,
  n_last: int = 1,
  n_recent: int = 1024,
  n_initial: int = 4,
) -> base.KVTransform:
  """SimLayerKV: lazy layers keep only the initial and recent entries.

  Definition (SimLayerKV, arXiv 2410.13846; kvpress `SimLayerKVPress`):
  per layer and row, the attention of the last `n_last` prompt queries
  (softmax over the whole prompt), averaged over query heads and those
  queries, is summed over the first `n_initial` and the last `n_recent`
  positions; above `lazy_threshold` the layer is "lazy" and keeps only its
  first `n_initial` and last `n_recent - n_last` entries (kvpress' slice
  `[-n_recent + n_last:]`, followed exactly); other layers keep all. A
  row no longer than n_initial + n_recent + n_last is not compressed.

  kvpress' defaults are kept: lazy_threshold=1.0 (which marks no layer
  lazy: refused as degenerate, see below; the paper recommends 0.9 for
  Llama 3, 0.65 Llama 2, 0.8 Mistral, 0.85 Qwen), n_last=1 (SimLayerKV's
  decode variant), n_recent=1024, n_initial=4.

  Differences from kvpress: kvpress averages the lazy score over the batch
  (one decision per layer for all rows); kvjax decides per row. kvpress
  keeps each layer at its own length (a ragged, per-layer layout); kvjax's
  stacked cache keeps the static capacity of the longest row (a lazy
  layer cannot be known before tracing), so the saving is logical only:
  `kvjax.cache.logical_bytes` counts it, `kv_bytes` - `logical_bytes` is
  the padding. The reserve is exact while a layer of the fullest row is
  not lazy; when all its layers are lazy the row has more free slots.

  Raises:
    ValueError: a bad argument.
    base.Degenerate (at trace time): lazy_threshold >= 1 (no layer is ever
      lazy) or a prompt no longer than n_initial + n_recent + n_last.
  """
  if (
    isinstance(lazy_threshold, bool)
    or not isinstance(lazy_threshold, (int, float))
    or not 0.0 <= lazy_threshold <= 1.0
  ):
    raise ValueError(
      f"lazy_threshold must be a float in [0, 1], got {lazy_threshold!r}."
    )
  n_last = _check_size(n_last, "n_last")
  n_recent = _check_size(n_recent, "n_recent")
  if n_recent <= n_last:
    raise ValueError(
      f"n_recent must exceed n_last (a lazy layer keeps the last n_recent - "
      f"n_last entries), got n_recent={n_recent}, n_last={n_last}."
    )
  if (
    isinstance(n_initial, bool)
    or not isinstance(n_initial, int)
    or n_initial < 0
  ):
    raise ValueError(f"n_initial must be an int >= 0, got {n_initial!r}.")
  min_length = n_initial + n_recent + n_last

  def apply(cache, state, ctx):
    if ctx.phase != "prefill":
      return cache, state
    bound = base.live_bound(cache, ctx)
    if lazy_threshold >= 1.0:
      raise base.Degenerate(
        f"simlayerkv: lazy_threshold={lazy_threshold} marks no layer lazy "
        "(the attention share is at most 1), so it would compress nothing; "
        "the paper recommends 0.9 for Llama 3."
      )
    if bound <= min_length:
      raise base.Degenerate(
        f"simlayerkv: {bound} entries are not more than n_initial + "
        f"n_recent + n_last = {min_length}, so it would compress nothing."
      )
    probs, _ = policies.window_attention(cache, ctx, n_last)  # [L,B,N,w,S]
    K = cache.pos.shape[2]
    G = probs.shape[2] // K
    live = base.live_counts(cache)  # [L, B, K]
    newest = jnp.max(jnp.where(cache.valid, cache.pos, -1), axis=-1)
    first = cache.valid & (cache.pos < n_initial)
    # kvpress scores the keys before the last n_last (its window's own):
    # the first n_initial and the n_recent just before the window.
    before = newest[..., None] - n_last
    recent_n = (
      cache.valid & (cache.pos > before - n_recent) & (cache.pos <= before)
    )
    share = jnp.where(first | recent_n, 1.0, 0.0)  # [L, B, K, S]
    share = jnp.repeat(share, G, axis=2)[:, :, :, None]  # [L, B, N, 1, S]
    mass = jnp.sum(probs * share, axis=(2, 3, 4))  # [L, B]
    w = probs.shape[3]
    n_q = jnp.minimum(jnp.sum(ctx.q_mask, axis=1), w)  # [B]
    score = mass / (probs.shape[2] * jnp.maximum(n_q, 1))[None]
    long_row = jnp.max(live, axis=2) > min_length  # [L, B]
    lazy = (score > lazy_threshold) & long_row  # [L, B]
    tail = cache.pos > newest[..., None] - (n_recent - n_last)
    keep = cache.valid & (~lazy[:, :, None, None] | first | tail)
    cache, _ = base.compact(cache, keep, bound + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: live,  # a non-lazy layer keeps everything
    needs=("q",),
    name="simlayerkv",
  )


# ----------------------------------------------------------------------------
# DuoAttention.


def _rotate(x: Array, angles: Array) -> Array:
  """Rotate-half RoPE of x [..., H] by angles [..., H/2]."""
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def duo_head_scores(cache, ctx, q_len: int = 500) -> Array:
  """[L, B, K] DuoAttention head scores computed from the prompt itself.

  kvpress' `duo_attention_on_the_fly`, with the prompt in place of its
  BookSum samples: the mean pre-RoPE query of each query head over the
  prompt tokens (`ctx.q_pre_rope`) and the mean pre-RoPE key of each kv
  head over the cached entries (the cached keys rotated back by their own
  positions, RoPE being a rotation) are repeated `q_len` times and rotated
  to positions 0..q_len-1; the score of a head is the area under the
  cumulated attention of the last query over those keys, mean(cumsum(p)),
  averaged over the query heads of each kv head. A low score means the
  attention sits on the first positions: a streaming head.
  """
  inv_freq = jnp.asarray(rope_inv_freq(ctx.geometry))  # [H/2]
  k = policies._keys(cache).astype(jnp.float32)  # pylint: disable=protected-access
  angles = cache.pos.astype(jnp.float32)[..., None] * inv_freq
  k_pre = _rotate(k, -angles)  # [L, B, K, S, H]
  w = cache.valid.astype(jnp.float32)[..., None]
  mean_k = jnp.sum(k_pre * w, axis=3) / jnp.maximum(jnp.sum(w, axis=3), 1.0)
  q = ctx.q_pre_rope.astype(jnp.float32)  # [L, B, T, N, H]
  qm = ctx.q_mask.astype(jnp.float32)[None, :, :, None, None]
  mean_q = jnp.sum(q * qm, axis=2) / jnp.maximum(jnp.sum(qm, axis=2), 1.0)
  L, B, N, H = mean_q.shape
  K = mean_k.shape[2]
  pos = jnp.arange(q_len, dtype=jnp.float32)[:, None] * inv_freq  # [P, H/2]
  q_last = _rotate(mean_q, pos[-1])  # [L, B, N, H]
  k_all = _rotate(mean_k[:, :, :, None], pos)  # [L, B, K, P, H]
  k_all = jnp.repeat(k_all, N // K, axis=2)  # [L, B, N, P, H]
  logits = jnp.einsum("lbnh,lbnph->lbnp", q_last, k_all) / np.sqrt(H)
  p = jax.nn.softmax(logits, axis=-1)
  s = jnp.cumsum(p, axis=-1).mean(-1)  # [L, B, N]
  return s.reshape(L, B, K, N // K).mean(-1)


@base.by_value
def duo_attention(
  head_compression_ratio: float = 0.0,
  sink_size: int = 128,
  recent_size: int = 256,
  q_len: int = 500,
) -> base.KVTransform:
  """DuoAttention: streaming heads keep sink + recent entries, retrieval
  heads keep all.

  Definition (DuoAttention, arXiv 2410.10819; kvpress `DuoAttentionPress`
  with `on_the_fly_scoring=True`): each (layer, kv head) gets a score
  (`duo_head_scores`); the `round(L * K * head_compression_ratio)` heads
  with the lowest scores over all layers are streaming heads: they keep
  positions < `sink_size` and the last `recent_size` entries of the row;
  the others (retrieval heads) keep everything.

  kvpress' on-the-fly defaults are kept: sink_size=128, recent_size=256
  (fixed there), q_len=500 (its argument of `duo_attention_on_the_fly`);
  head_compression_ratio=0.0 (kvpress' default) streams no head: refused as
  degenerate.

  Differences from kvpress: kvpress estimates head scores once per model
  from 50 BookSum samples (a dataset download) or loads the authors'
  patterns; kvjax computes them from each prompt row on the fly (so rows
  of a batch may choose different streaming heads). kvpress masks the
  streaming heads' middle entries (no memory saved, batch size 1); kvjax
  compacts, with a capacity of the largest head budget: all entries while
  any head is a retrieval head (the saving is then logical only:
  `kv_bytes` - `logical_bytes` is the padding), sink + recent when every
  head streams. The reserve is exact for the fullest row (a retrieval head
  keeps its every entry; with every head streaming, its window fills the
  capacity).

  Raises:
    ValueError: a bad argument.
    base.Degenerate (at trace time): no head streams, or the prompt is no
      longer than sink_size + recent_size.
  """
  if (
    isinstance(head_compression_ratio, bool)
    or not isinstance(head_compression_ratio, (int, float))
    or not 0.0 <= head_compression_ratio <= 1.0
  ):
    raise ValueError(
      "head_compression_ratio must be a float in [0, 1] (the share of "
      f"heads that stream), got {head_compression_ratio!r}."
    )
  if (
    isinstance(sink_size, bool)
    or not isinstance(sink_size, int)
    or sink_size < 0
  ):
    raise ValueError(f"sink_size must be an int >= 0, got {sink_size!r}.")
  recent_size = _check_size(recent_size, "recent_size")
  q_len = _check_size(q_len, "q_len")

  def apply(cache, state, ctx):
    if ctx.phase != "prefill":
      return cache, state
    L, B, K, S = cache.pos.shape
    bound = base.live_bound(cache, ctx)
    n_stream = round(L * K * head_compression_ratio)  # Python's, as kvpress
    if n_stream == 0:
      raise base.Degenerate(
        f"duo_attention: head_compression_ratio={head_compression_ratio} "
        f"streams round({L * K} * {head_compression_ratio}) = 0 heads, so "
        "it would compress nothing."
      )
    if bound <= sink_size + recent_size:
      raise base.Degenerate(
        f"duo_attention: {bound} entries are not more than sink_size + "
        f"recent_size = {sink_size + recent_size}, so streaming heads would "
        "keep everything."
      )
    scores = duo_head_scores(cache, ctx, q_len)  # [L, B, K]
    flat = jnp.moveaxis(scores, 1, 0).reshape(B, L * K)
    order = jnp.argsort(flat, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    streaming = jnp.moveaxis((rank < n_stream).reshape(B, L, K), 0, 1)
    newest = jnp.max(jnp.where(cache.valid, cache.pos, -1), axis=-1)
    window = (cache.pos < sink_size) | (
      cache.pos > newest[..., None] - recent_size
    )
    keep = cache.valid & (~streaming[..., None] | window)
    cap = bound if n_stream < L * K else sink_size + recent_size
    cache, _ = base.compact(cache, keep, cap + policies._free(ctx))  # pylint: disable=protected-access
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: live,  # a retrieval head keeps everything
    needs=("q_pre_rope",),
    name="duo_attention",
  )


# ----------------------------------------------------------------------------
# Registry hook: defaults for a 3-layer kvjax-tiny model at ~500 tokens.


def _keydiff(ratio: float) -> base.KVTransform:
  """KeyDiff, the scorer BlockPress was written for (imported late:
  `kvjax.compress.scorers` is another module's)."""
  from kvjax.compress import scorers  # pylint: disable=g-import-not-at-top

  return scorers.keydiff(ratio)


def _spread(ratio: float) -> tuple[float, float]:
  """(first, last) layer ratios with mean `ratio`: the first layer removes
  least, the last most (each in [0, 1))."""
  d = min(ratio, 0.99 - ratio) / 2 if ratio > 0 else 0.0
  return (ratio - d, ratio + d)


METHODS: Mapping[str, Callable[[float], base.KVTransform]] = (
  types.MappingProxyType(
    {
      "chunkkv": lambda ratio: chunkkv(policies.snapkv(ratio), chunk_length=20),
      "chunk": lambda ratio: chunk(policies.snapkv(ratio), chunk_length=128),
      "block": lambda ratio: block(_keydiff(ratio), block_size=64),
      # No ratio in SimLayerKV: the paper's Llama 3 threshold (0.9), a
      # recent window sized from the ratio (a lazy layer keeps 4 + n_recent
      # - 1 entries). Which layers are lazy depends on the model: on a
      # random-weight model (near-uniform attention) none is.
      "simlayerkv": lambda ratio: simlayerkv(
        lazy_threshold=0.9,
        n_last=1,
        n_recent=max(8, round(64 * (1 - ratio))),
        n_initial=4,
      ),
      # `ratio` of the heads stream (sink 16 + recent 64 entries).
      "duo_attention": lambda ratio: duo_attention(
        head_compression_ratio=ratio,
        sink_size=16,
        recent_size=64,
      ),
      # Ratios rising linearly with depth, mean `ratio`, any layer count.
      "per_layer": lambda ratio: per_layer(
        policies.snapkv(ratio), linear=_spread(ratio)
      ),
    }
  )
)
