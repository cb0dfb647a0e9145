"""Compute before eviction: read the context more than once, keep one read.

A cache that will be compressed holds what one causal pass over the
context computed: an entry written at position i saw only the tokens
before it. An ingestion phase can spend more compute on the context before
the cache is compressed, and leave the answer phase's cost unchanged:

  1. the context is read `passes` times in a row, one causal prefill over
     [context; context; ...] (each read continues the positions of the one
     before, so every entry of a later read has seen the whole context
     once already);
  2. every read but the last is dropped (`last_read`): the cache keeps as
     many entries as a single read writes, each computed with more context;
  3. a compression transform then runs on that cache (one that reads the
     prefill's per-slot attention, as H2O, is refused: those captures
     cover every read's slots), and the question
     continues at position passes * length, so its distance to each kept
     entry is the distance in a single read.

`reread` is that prefill; `reread_logits` is the differentiable path a
model is trained on to use the extra read (teacher-forced question and
answer after the last read, exactly what evaluation runs).

  out = ingest.reread(params, context, config=config, passes=2,
                      transform=compress.snapkv(0.9), capacity_reserve=8)
  logits, cache, _ = kvjax.forward(params, question, out.cache,
                                   config=config)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvjax import checks
from kvjax import model as model_lib
from kvjax.cache import KVCache, init_cache
from kvjax.compress import base
from kvjax.config import ModelConfig
from kvjax.generate import PrefillOutput, prefill

Array = jax.Array


def _check_passes(passes) -> int:
  return base.check_int(passes, "passes", 1)


# Prefill captures indexed by cache slot ([L, B, N, S] attention mass):
# over a re-read context they cover every read's slots, not the last
# read's. (Decode-time attention, "attn_probs", is over the compressed
# cache and fine.)
PER_SLOT_TAPS = tuple(
  n for n in model_lib.PREFILL_TAPS if n in ("attn_mass", "attn_probs")
)


def per_slot_captures(transform) -> list[str]:
  """The per-slot prefill captures (`PER_SLOT_TAPS`) `transform` reads:
  what a re-read context cannot give it (empty for None)."""
  return sorted(set(PER_SLOT_TAPS) & set(getattr(transform, "needs", ())))


def repeat_context(
  tokens: Array, prompt_lengths: Array | None, passes: int
) -> tuple[Array, Array]:
  """Each row's context `passes` times in a row.

  Args:
    tokens: [B, T] right-padded context ids.
    prompt_lengths: [B] true lengths (None: all T).
    passes: reads (>= 1).

  Returns:
    (tokens [B, passes * T] with row b's first prompt_lengths[b] ids
    repeated contiguously then padding (the pad id of `tokens`' last
    column, as given), lengths [B] = passes * prompt_lengths).
  """
  passes = _check_passes(passes)
  B, T = tokens.shape
  lengths = (
    jnp.full((B,), T, jnp.int32)
    if prompt_lengths is None
    else jnp.asarray(prompt_lengths, jnp.int32)
  )
  j = jnp.arange(passes * T)[None, :]  # [1, P*T]
  src = j % jnp.maximum(lengths, 1)[:, None]  # [B, P*T]
  live = j < passes * lengths[:, None]  # [B, P*T]
  out = jnp.take_along_axis(tokens, jnp.minimum(src, T - 1), axis=1)
  out = jnp.where(live, out, tokens[:, -1:])  # [B, P*T]
  return out.astype(tokens.dtype), passes * lengths


@base.by_value
def last_read(passes: int = 2) -> base.KVTransform:
  """Keeps the entries of the last of `passes` reads, drops the others.

  A row that has seen n = cache.length[b] tokens keeps the positions
  >= n - n / passes, i.e. its last read (n must be a multiple of
  `passes`, as `repeat_context` writes it). The result has capacity
  ceil(live / passes) + the reserve: what one read of the context needs.
  At decode it does nothing (the reads are over).

  Raises:
    ValueError: passes < 1.
  """
  passes = _check_passes(passes)

  def apply(cache, state, ctx, **extra):
    del extra
    if ctx.phase != "prefill" or passes == 1:
      return cache, state
    one = cache.length // passes  # [B] tokens per read
    start = cache.length - one  # [B] first position of the last read
    keep = cache.valid & (cache.pos >= start[None, :, None, None])
    capacity = -(-base.live_bound(cache, ctx) // passes)
    capacity += ctx.reserve + ctx.decode_reserve
    cache, _ = base.compact(cache, keep, capacity)
    return cache, state

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: -(-live // passes),
    name=f"last_read{passes}",
  )


def reread(
  params,
  tokens: Array,
  *,
  config: ModelConfig,
  passes: int = 2,
  transform: base.KVTransform | None = None,
  prompt_lengths: Array | None = None,
  reserve: int = 0,
  **prefill_kwargs,
) -> PrefillOutput:
  """Prefills the context `passes` times, keeps the last read, compresses.

  Args:
    params: model parameters.
    tokens: [B, T] right-padded context ids.
    config: the model config.
    passes: reads of the context (1: a plain prefill).
    transform: compression applied to the last read (None: none).
    prompt_lengths: [B] true context lengths (None: all T).
    reserve: free slots left after compression for the question.
    **prefill_kwargs: passed to `kvjax.prefill` (backend, extras, ...).

  Returns:
    `kvjax.prefill`'s output over the repeated context: logits [B,
    passes * T, V] and the cache of the last read (compressed by
    `transform`), whose `length` is passes * prompt_lengths, so a
    question continues after the last read.

  Raises:
    ValueError: passes < 1, reserve < 0, a transform reading per-slot
      attention captures (`attn_mass`, `attn_probs`) with passes > 1, and
      whatever `prefill` refuses.
  """
  passes = _check_passes(passes)
  reserve = base.check_int(reserve, "reserve", 0)
  tokens = checks.check_tokens(tokens, config)
  T = tokens.shape[1]
  prompt_lengths = checks.check_prompt_lengths(
    prompt_lengths, tokens.shape[0], T
  )
  per_slot = per_slot_captures(transform)
  if passes > 1 and per_slot:
    # Captured per cache slot of all the reads; after `last_read` compacts
    # the cache they would point at the wrong slots.
    raise ValueError(
      f"transform {transform.name!r} reads {per_slot} per cache slot, "
      "which reread cannot give for the last read alone; use a transform "
      "that reads queries or keys (SnapKV, Expected Attention, KNorm, ...)."
    )
  many, lengths = repeat_context(tokens, prompt_lengths, passes)
  chained = last_read(passes)
  if transform is not None:
    chained = base.chain(chained, transform)
  return prefill(
    params,
    many,
    config=config,
    transform=chained,
    capacity=passes * T + reserve,
    prompt_lengths=lengths,
    **prefill_kwargs,
  )


@functools.partial(jax.jit, static_argnames=("config", "passes"))
def reread_logits(
  params,
  context: Array,
  question: Array,
  question_mask: Array,
  *,
  config: ModelConfig,
  passes: int,
) -> Array:
  """[B, Tq, V] logits of a teacher-forced question after `passes` reads.

  The differentiable twin of `reread` (no compression): every row's
  context has the same length T (the task batches' context_end); the
  question attends only to the last read, as after `last_read`. Train on
  these logits to teach a model to use the extra reads.

  Args:
    params: model parameters.
    context: [B, T] context ids (no padding).
    question: [B, Tq] question (and teacher-forced answer) ids.
    question_mask: [B, Tq] bool, False at padding.
    config: the model config.
    passes: reads of the context.
  """
  B, T = context.shape
  many = jnp.tile(context, (1, passes))  # [B, P*T]
  cache: KVCache = init_cache(config, B, passes * T + question.shape[1])
  _, cache, _ = model_lib.forward(params, many, cache, config=config)
  start = (passes - 1) * T
  cache = cache._replace(valid=cache.valid & (cache.pos >= start))
  logits, _, _ = model_lib.forward(
    params, question, cache, config=config, token_mask=question_mask
  )
  return logits
