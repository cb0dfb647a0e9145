"""Prefill, decode and sampling: jitted, batched, ragged prompts.

`generate` = one jitted prefill over right-padded prompts, then a
`lax.while_loop` of single-token decode steps over a static-capacity
cache, so a call compiles once per (shapes, sampling settings) and a second
call with new prompt values compiles nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import checks
from kvjax import parallel
from kvjax.attention import Backend, resolve_backend
from kvjax import model as model_lib
from kvjax.cache import KVCache, host_array, init_cache
from kvjax.compress import base as compress_base
from kvjax.config import AttentionGeometry, ModelConfig, as_geometry

Array = jax.Array


class GenerateOutput(NamedTuple):
  """What `generate` returns.

  Attributes:
    tokens: [B, max_new_tokens] int32 generated tokens; after a row's stop
      token the rest of the row is `pad_token`.
    num_generated: [B] int32 tokens generated per row, stop token included.
    cache: the cache after the last decode step.
    prompt_logits: [B, V] float32 logits at each row's last prompt token.
  """

  tokens: Array
  num_generated: Array
  cache: KVCache
  prompt_logits: Array


class PrefillOutput(NamedTuple):
  """What `prefill` returns.

  Attributes:
    logits: [B, T, V] float32 logits of the prompt.
    cache: the (compressed) cache.
  """

  logits: Array
  cache: KVCache


class StepOutput(NamedTuple):
  """What `decode_step` returns.

  Attributes:
    token: [B] int32 sampled next token.
    logits: [B, V] float32 logits of the step.
    cache: the extended cache.
  """

  token: Array
  logits: Array
  cache: KVCache


class DecodeOutput(NamedTuple):
  """What `decode` returns.

  Attributes:
    tokens: [B, max_new_tokens] int32 generated tokens (`pad_token` after
      a row's stop token).
    num_generated: [B] int32 tokens generated per row, stop token included.
    cache: the cache after the last step.
  """

  tokens: Array
  num_generated: Array
  cache: KVCache


class DecodeState(NamedTuple):
  """The carry of the decode `lax.while_loop`.

  Attributes:
    step: [] int32, the column of `tokens` the step fills.
    tokens: [B, length] int32; column 0 is the first fed token.
    cache: the cache.
    done: [B] bool, rows that emitted the stop token.
    num_generated: [B] int32 tokens per row so far (column 0 included).
    rng: the PRNG key.
  """

  step: Array
  tokens: Array
  cache: KVCache
  done: Array
  num_generated: Array
  rng: Array


def sample_logits(
  logits: Array, rng: Array, temperature: float = 0.0, top_k: int | None = None
) -> Array:
  """Samples a token per row from logits [B, V].

  Args:
    logits: [B, V] float.
    rng: a PRNG key (unused when greedy).
    temperature: 0 for greedy argmax, else softmax temperature.
    top_k: keep only the k largest logits before sampling (None: all).

  Returns:
    [B] int32 tokens.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prompt_mask(tokens: Array, prompt_lengths: Array) -> Array:
  T = tokens.shape[1]
  return jnp.arange(T)[None, :] < prompt_lengths[:, None]


def _context(
  phase,
  step,
  positions,
  mask,
  aux,
  reserve,
  config,
  live_bound=None,
  decode_reserve=0,
  transform=None,
  params=None,
  tokens=None,
):
  """The `CompressContext` of one application of `transform`: the model's
  params (and config) and the prompt's tokens only when it lists "params"
  / "tokens" in `needs` (`compress_base.MODEL_NEEDS`)."""
  needs = () if transform is None else transform.needs
  model = "params" in needs
  if model and params is None:
    raise ValueError(
      f"{transform.name} needs the model's params (it lists 'params' in "
      "needs); pass params= (compress_cache) or use prefill / "
      "compress_observing."
    )
  if model and not isinstance(config, ModelConfig):
    raise ValueError(
      f"{transform.name} needs the model (it lists 'params' in needs): "
      f"pass its ModelConfig as config, got {type(config).__name__}."
    )
  return compress_base.CompressContext(
    phase=phase,
    step=step,
    q_pos=positions,
    q_mask=mask,
    reserve=reserve,
    geometry=as_geometry(config),
    live_bound=live_bound,
    decode_reserve=decode_reserve,
    params=params if model else None,
    model_config=config if model else None,
    tokens=tokens if "tokens" in needs else None,
    **{name: aux.get(name) for name in model_lib.COMPRESS_TAPS},
  )


def _live_bound(cache: KVCache) -> int | None:
  """The largest write index of a concrete cache (a static bound on its
  live entries per head, entries lying in slots [0, end)); None when
  traced (the transform then bounds by the capacity)."""
  if not checks.is_concrete(cache.end):
    return None
  return int(np.max(host_array(cache.end))) if cache.end.size else 0


def _on_mesh(mesh, params, kv_heads, rows=(), cache=None):
  """The context to run a jitted entry in, and its inputs placed on `mesh`:
  params replicated, per-row arrays `rows` split along `data`, the cache
  in its sharded layout (padded when it does not split; warned). Without a
  mesh: a null context and the inputs unchanged."""
  mesh = parallel.mesh.check_mesh(mesh)
  if mesh is None:
    return contextlib.nullcontext(), params, rows, cache
  batch = rows[0].shape[0] if cache is None else cache.batch_size
  parallel.mesh._check_rows_heads(batch, kv_heads, mesh, "mesh")
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  data = parallel.mesh._axis(mesh, "data")
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  params = put(params, P())
  rows = tuple(
    None if x is None else put(x, P(data, *([None] * (jnp.ndim(x) - 1))))
    for x in rows
  )
  if cache is not None:
    cache = parallel.shard_cache(cache, mesh).cache
  return jax.set_mesh(mesh), params, rows, cache


def _check_gate_use(params, write_gate, backend, prefill_chunk):
  """`write_gate` validated for `prefill` / `generate`.

  Raises:
    TypeError / ValueError: not a `kvjax.model.WriteGate`, params without
      write gates, a backend other than auto / reference for the prefill
      (the gate's bias lives in the reference path), or `prefill_chunk`
      (a later chunk would see the earlier chunks' entries ungated).
  """
  write_gate = model_lib.check_write_gate(write_gate)
  if write_gate is None:
    return None
  if not model_lib.has_write_gate(params):
    raise ValueError(
      "write_gate is set but params have no 'write_gate' (see "
      "kvjax.model.add_write_gate)."
    )
  if resolve_backend(backend) is not Backend.REFERENCE and backend not in (
    Backend.AUTO,
    "auto",
  ):
    raise ValueError(
      f"write_gate runs the prefill on the reference backend; got "
      f"backend={backend!r} (use 'auto' or 'reference')."
    )
  if prefill_chunk:
    raise ValueError(
      "write_gate needs the prompt in one call: prefill_chunk must be None "
      f"(got {prefill_chunk}); a chunk would see earlier chunks ungated."
    )
  return write_gate


def _chunked_forward(
  params, tokens, cache, mask, capture, chunk, config, backend
):
  """`forward` over the prompt in chunks of `chunk` tokens (a scan): each
  chunk's activations (MLP [chunk, F], logits) instead of the whole
  prompt's; the blockwise engine skips the slots not yet written, the
  reference backend materializes [chunk, S] scores. Numerically the same
  computation as one call (up to float order)."""
  B, T = tokens.shape
  n = -(-T // chunk)
  pad = n * chunk - T
  split = lambda x: jnp.moveaxis(
    jnp.pad(x, [(0, 0), (0, pad)]).reshape(B, n, chunk), 1, 0
  )

  def body(cache, xs):
    t, m = xs
    logits, cache, aux = model_lib.forward(
      params,
      t,
      cache,
      config=config,
      token_mask=m,
      capture=capture,
      backend=backend,
    )
    return cache, (logits, aux)

  cache, (logits, aux) = jax.lax.scan(body, cache, (split(tokens), split(mask)))
  logits = jnp.moveaxis(logits, 0, 1).reshape(B, n * chunk, -1)[:, :T]
  out = {}
  for name, x in aux.items():  # x: [n, L, B, chunk, ...] or [n, L, B, N, S]
    if name == "attn_mass":
      out[name] = jnp.sum(x, axis=0)
    else:
      x = jnp.moveaxis(x, 0, 2)  # [L, B, n, chunk, ...]
      out[name] = x.reshape(x.shape[:2] + (n * chunk,) + x.shape[4:])[:, :, :T]
  return logits, cache, out


def _prefill_and_compress(
  params,
  tokens,
  prompt_lengths,
  transform,
  extra,
  *,
  config,
  capacity,
  cache_dtype,
  backend,
  prefill_chunk=None,
  decode_reserve=0,
  write_gate=None,
):
  """Prefill on an empty cache, then apply `transform` (if any). Of the
  `capacity - T` free slots, `decode_reserve` are for decode steps run
  through the transform (`generate`), the rest the reserve for `forward`.
  A `write_gate` gates the prefill's attention (reference backend)."""
  B, T = tokens.shape
  # Under a mesh that splits the slots: a capacity that splits evenly (the
  # extra slots stay empty; the reserve below counts the asked capacity).
  cache = parallel.constrain_cache(
    init_cache(
      config,
      B,
      parallel.mesh.round_up(capacity, parallel.seq_shards()),
      dtype=cache_dtype,
    )
  )
  mask = _prompt_mask(tokens, prompt_lengths)
  capture = (
    ()
    if transform is None
    else tuple(n for n in transform.needs if n in model_lib.PREFILL_TAPS)
  )
  if prefill_chunk and T > prefill_chunk:
    logits, cache, aux = _chunked_forward(
      params, tokens, cache, mask, capture, prefill_chunk, config, backend
    )
  else:
    logits, cache, aux = model_lib.forward(
      params,
      tokens,
      cache,
      config=config,
      token_mask=mask,
      capture=capture,
      backend=Backend.REFERENCE if write_gate is not None else backend,
      context_parallel=True,
      write_gate=write_gate,
    )
  if transform is not None:
    positions = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    cache = _apply_transform(
      cache,
      transform,
      extra,
      positions,
      mask,
      aux,
      capacity - T - decode_reserve,
      config,
      live_bound=T,
      decode_reserve=decode_reserve,
      params=params,
      tokens=tokens,
    )
  return logits, parallel.constrain_cache(cache)


def _apply_transform(
  cache,
  transform,
  extra,
  positions,
  mask,
  observed,
  reserve,
  config,
  live_bound=None,
  decode_reserve=0,
  params=None,
  tokens=None,
):
  """Prefill-phase `transform` on `cache`, observing the queries at
  `positions` / `mask` and the captures in `observed` (and, where the
  transform needs them, the model's `params` and the prompt's `tokens`)."""
  ctx = _context(
    "prefill",
    jnp.int32(0),
    positions,
    mask,
    observed,
    reserve,
    config,
    live_bound=live_bound,
    decode_reserve=decode_reserve,
    transform=transform,
    params=params,
    tokens=tokens,
  )
  new, state = transform.apply(
    cache,
    transform.init(cache),
    ctx,
    **compress_base.extras_for(transform, extra),
  )
  return new._replace(state=state)


@functools.partial(
  jax.jit,
  static_argnames=(
    "transform",
    "config",
    "capacity",
    "cache_dtype",
    "backend",
    "prefill_chunk",
    "decode_steps",
    "write_gate",
  ),
)
def _prefill(
  params,
  tokens,
  prompt_lengths,
  transform,
  extra,
  *,
  config,
  capacity,
  cache_dtype,
  backend,
  prefill_chunk,
  decode_steps,
  write_gate,
):
  return _prefill_and_compress(
    params,
    tokens,
    prompt_lengths,
    transform,
    extra,
    config=config,
    capacity=capacity,
    cache_dtype=cache_dtype,
    backend=backend,
    prefill_chunk=prefill_chunk,
    decode_reserve=decode_steps,
    write_gate=write_gate,
  )


def prefill(
  params,
  tokens: Array,
  *,
  config: ModelConfig,
  transform: compress_base.KVTransform | None = None,
  capacity: int | None = None,
  prompt_lengths: Array | None = None,
  cache_dtype: Any = None,
  backend: Backend | str = Backend.AUTO,
  prefill_chunk: int | None = None,
  decode_steps: int = 0,
  mesh: Any = None,
  write_gate: model_lib.WriteGate | None = None,
  **extra,
) -> PrefillOutput:
  """Runs the prompt through an empty cache, then compresses it (jitted).

  Question-agnostic compression: pass the context alone, then feed the
  question with `forward`. Question-aware: pass context + question.

  Args:
    params: model parameters.
    tokens: [B, T] right-padded prompt tokens.
    config: the model config.
    transform: a `kvjax.compress` transform applied after the prompt (reuse
      one transform object across calls: it is a static argument).
    capacity: cache slots during prefill; defaults to T. The `capacity - T`
      free slots survive compression: `decode_steps` of them for decoding
      through the transform, the rest (the reserve) for `forward`.
    prompt_lengths: [B] true prompt lengths (None: all T).
    cache_dtype: key/value dtype (default: the model dtype).
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.
    prefill_chunk: run the prompt through the model `prefill_chunk` tokens
      at a time (bounds the activations to [prefill_chunk, ...]; the
      default engine needs no chunking for time or attention memory, the
      reference backend's [T, S] scores shrink to [prefill_chunk, S]);
      None: in one call.
    decode_steps: of the free slots, how many are for `decode(...,
      transform=transform)` steps, which run through the transform: a
      decode-time policy keeps its budget and needs none of them, KIVI
      flushes its window into the coded region (0: every free slot is
      reserve for `forward`, e.g. a question).
    mesh: a `jax.sharding.Mesh` (`kvjax.parallel.make_mesh`) to run on:
      the cache's slots split along `seq`, rows along `data`, kv heads
      along `heads`, params replicated; the same tokens as on one device.
      None: the default device.
    write_gate: a `kvjax.model.WriteGate` (SP-KV, params with write
      gates): the prompt's attention under the gate (see
      `kvjax.compress.spkv` for the exact hard-gate flow); runs on the
      reference backend, in one call (no `prefill_chunk`).
    **extra: passed to the transform (e.g. `future_mass` for the oracle).

  Returns:
    A `PrefillOutput`: logits [B, T, V] float32 and the (compressed)
    cache.

  Raises:
    TypeError / ValueError: bad arguments (see `kvjax.checks`): tokens,
      prompt lengths, params of another config, a transform that is not a
      `KVTransform`, a capacity below T, a non-float `cache_dtype`; and a
      write that ran past the cache's capacity (checked after the call).
  """
  checks.check_config(config)
  tokens = checks.check_tokens(tokens, config)
  B, T = tokens.shape
  checks.check_params(params, config)
  checks.check_transform(transform, "prefill", extra=extra)
  prompt_lengths = checks.check_prompt_lengths(prompt_lengths, B, T)
  capacity = checks.check_capacity(capacity, T, f"the {T}-token prompt")
  if (
    isinstance(decode_steps, bool)
    or not isinstance(decode_steps, (int, np.integer))
    or not 0 <= decode_steps <= capacity - T
  ):
    raise ValueError(
      f"decode_steps must be an int in [0, capacity - T = "
      f"{capacity - T}], got {decode_steps!r}."
    )
  cache_dtype = checks.check_cache_dtype(cache_dtype)
  prefill_chunk = checks.check_prefill_chunk(prefill_chunk)
  write_gate = _check_gate_use(params, write_gate, backend, prefill_chunk)
  checks.warn_past_context(T, config, "prompt length")
  on, params, (tokens, prompt_lengths), _ = _on_mesh(
    mesh,
    params,
    config.num_kv_heads,
    (jnp.asarray(tokens, jnp.int32), prompt_lengths),
  )
  with on:
    logits, cache = _prefill(
      params,
      tokens,
      prompt_lengths,
      transform,
      extra,
      config=config,
      capacity=capacity,
      cache_dtype=cache_dtype,
      backend=resolve_backend(backend),
      prefill_chunk=prefill_chunk,
      decode_steps=decode_steps,
      write_gate=write_gate,
    )
  checks.check_no_overflow(cache, "prefill")
  return PrefillOutput(logits, cache)


@functools.partial(
  jax.jit,
  static_argnames=("transform", "config", "reserve", "backend", "live_bound"),
)
def _compress_observing(
  params,
  cache,
  observe,
  token_mask,
  observe_mask,
  transform,
  extra,
  *,
  config,
  reserve,
  backend,
  live_bound,
):
  # As in prefill: what a prefill-phase transform reads (the mass of the
  # observed queries only, not of e.g. teacher-forced answers; never the
  # [T, S] probabilities).
  capture = tuple(n for n in transform.needs if n in model_lib.PREFILL_TAPS)
  _, _, aux = model_lib.forward(
    params,
    observe,
    cache,
    config=config,
    token_mask=token_mask,
    capture=capture,
    backend=backend,
    mass_mask=observe_mask,
  )
  positions = (
    cache.length[:, None] + jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1
  )
  # The transform sees the cache as it was before `observe` ran: the
  # observed tokens are not written into the returned cache.
  return _apply_transform(
    cache,
    transform,
    extra,
    positions,
    observe_mask,
    aux,
    reserve,
    config,
    live_bound=live_bound,
    params=params,
  )


@functools.partial(
  jax.jit, static_argnames=("transform", "config", "reserve", "live_bound")
)
def _compress_cache(
  cache,
  observed,
  positions,
  mask,
  transform,
  extra,
  params=None,
  tokens=None,
  *,
  config,
  reserve,
  live_bound,
):
  return _apply_transform(
    cache,
    transform,
    extra,
    positions,
    mask,
    observed,
    reserve,
    config,
    live_bound=live_bound,
    params=params,
    tokens=tokens,
  )


def compress_cache(
  cache: KVCache,
  transform: compress_base.KVTransform,
  *,
  config: ModelConfig | AttentionGeometry,
  observed: dict[str, Array],
  positions: Array,
  mask: Array,
  reserve: int = 0,
  params: Any = None,
  tokens: Array | None = None,
  **extra,
) -> KVCache:
  """Applies a (prefill-phase) transform to a cache, from given captures.

  `prefill(transform=...)` and `compress_observing` run the model and then
  this step; calling it directly lets one forward serve many transforms
  (e.g. a sweep over methods): capture what the transforms need once,
  `forward(..., capture=("q", "q_pre_rope", "attn_mass"))`, and compress
  the same prefilled cache with each.

  Args:
    cache: the prefilled cache to compress.
    transform: the compression.
    config: the model config, or the `kvjax.AttentionGeometry` of a model
      kvjax did not build.
    observed: the captures of the observed queries that the transform needs
      (`transform.needs` among "q", "q_pre_rope" [L, B, T, N, H],
      "attn_mass" [L, B, N, S] over this cache's slots).
    positions: [B, T] positions of the observed queries.
    mask: [B, T] bool, the observed queries that count.
    reserve: free slots left after a compacting transform (a Python int).
    params: the model parameters, for a transform that reads the model
      (`"params" in transform.needs`, e.g. criticalkv); `config` must then
      be the `ModelConfig`. Ignored otherwise.
    tokens: [B, T] int token ids of the cache's entries (entry at position
      t of row b is tokens[b, t]), for a transform that reads the prompt
      (`"tokens" in transform.needs`, e.g. kvzip). Ignored otherwise.
    **extra: passed to the transform.

  Returns:
    The compressed cache.

  Raises:
    TypeError / ValueError: a transform that is not a `KVTransform`, a
      capture the transform needs is missing, a cache of another config,
      bad shapes; and a write past the cache's capacity (checked after the
      call).
  """
  checks.check_geometry(config)
  checks.check_cache(cache, config)
  checks.check_transform(
    transform, "compress_cache", required=True, extra=extra
  )
  missing = [
    n
    for n in transform.needs
    if n in model_lib.PREFILL_TAPS and n not in observed
  ]
  if missing:
    raise ValueError(
      f"observed lacks {missing}, which {transform.name} "
      f"needs; capture them with forward(capture=...)."
    )
  positions, mask = jnp.asarray(positions), jnp.asarray(mask)
  if (
    positions.shape != mask.shape
    or positions.ndim != 2
    or (positions.shape[0] != cache.batch_size)
  ):
    raise ValueError(
      f"positions {positions.shape} and mask {mask.shape} must "
      f"both be [B={cache.batch_size}, T]."
    )
  reserve = checks.check_reserve(reserve)
  observed = {k: v for k, v in observed.items() if k in model_lib.PREFILL_TAPS}
  out = _compress_cache(
    cache,
    observed,
    positions.astype(jnp.int32),
    mask.astype(bool),
    transform,
    extra,
    params if "params" in transform.needs else None,
    None
    if tokens is None or "tokens" not in transform.needs
    else jnp.asarray(tokens, jnp.int32),
    config=config if "params" in transform.needs else as_geometry(config),
    reserve=reserve,
    live_bound=_live_bound(cache),
  )
  checks.check_no_overflow(out, "compress_cache")
  return out


def compress_observing(
  params,
  cache: KVCache,
  observe: Array,
  *,
  config: ModelConfig,
  transform: compress_base.KVTransform,
  token_mask: Array | None = None,
  observe_mask: Array | None = None,
  reserve: int | None = None,
  backend: Backend | str = Backend.AUTO,
  mesh: Any = None,
  **extra,
) -> KVCache:
  """Question-aware compression of a prefilled cache (jitted).

  Runs `observe` (e.g. the question) through the model on top of `cache`
  to get its queries and attention, then compresses `cache` itself, with
  the transform's observation window made of those queries. The observed
  tokens are not written into the result: feed them (or anything else)
  next, as with a question-agnostic cache. This is the question-aware mode
  that also works when the question holds teacher-forced answers: mark the
  question proper in `observe_mask` and only those queries are observed.

  Args:
    params: model parameters.
    cache: a prefilled cache (e.g. from `prefill` without a transform).
    observe: [B, T] tokens that follow the cache's contents.
    config: the model config.
    transform: the compression to apply.
    token_mask: [B, T] bool, False at padding of `observe` (default: all).
    observe_mask: [B, T] bool, the queries the transform observes (default:
      `token_mask`); must be a subset of `token_mask`.
    reserve: free slots left after a compacting transform (a Python int;
      default T, room to feed `observe` afterwards).
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.
    mesh: a `jax.sharding.Mesh` to run on (see `prefill`); a cache not
      laid out for it is placed first (padded when a region does not
      split; warned).
    **extra: passed to the transform.

  Returns:
    The compressed cache (without the observed tokens).

  Raises:
    TypeError / ValueError: when `observe` does not fit into the cache's free
      slots or holds ids outside the vocabulary, the masks have the wrong
      shape, the transform is not a `KVTransform`, the cache or params
      belong to another config; and a write past the cache's capacity
      (checked after the call).
  """
  checks.check_config(config)
  checks.check_cache(cache, config)
  if transform is None:
    raise ValueError("compress_observing needs a transform, got None.")
  checks.check_transform(
    transform, "compress_observing", required=True, extra=extra
  )
  observe = checks.check_tokens(
    observe, config, name="observe", batch=cache.batch_size
  )
  checks.check_params(params, config)
  B, T = observe.shape
  token_mask = (
    jnp.ones((B, T), bool)
    if token_mask is None
    else jnp.asarray(token_mask, bool)
  )
  observe_mask = (
    token_mask if observe_mask is None else jnp.asarray(observe_mask, bool)
  )
  for name, m in (("token_mask", token_mask), ("observe_mask", observe_mask)):
    if m.shape != (B, T):
      raise ValueError(f"{name} must have shape {(B, T)}, got {m.shape}.")
  observe_mask = observe_mask & token_mask
  if checks.is_concrete(token_mask):
    checks.check_room(
      cache,
      host_array(token_mask).sum(1),
      "running `observe` on top of the cache",
      "Prefill with a larger `capacity`.",
    )
  reserve = T if reserve is None else checks.check_reserve(reserve)
  on, params, (observe, token_mask, observe_mask), cache = _on_mesh(
    mesh,
    params,
    config.num_kv_heads,
    (jnp.asarray(observe, jnp.int32), token_mask, observe_mask),
    cache,
  )
  with on:
    out = _compress_observing(
      params,
      cache,
      observe,
      token_mask,
      observe_mask,
      transform,
      extra,
      config=config,
      reserve=reserve,
      backend=resolve_backend(backend),
      live_bound=_live_bound(cache),
    )
  checks.check_no_overflow(out, "compress_observing")
  return out


def _decode_step_impl(
  params, token, cache, rng, *, config, temperature, top_k, backend
):
  logits, cache, _ = model_lib.forward(
    params, token[:, None], cache, config=config, backend=backend
  )
  logits = logits[:, 0]
  return StepOutput(
    sample_logits(logits, rng, temperature, top_k),
    logits,
    parallel.constrain_cache(cache),
  )


_STEP_STATIC = ("config", "temperature", "top_k", "backend")
_decode_step = jax.jit(_decode_step_impl, static_argnames=_STEP_STATIC)
# The same step writing into the caller's cache buffers (donated): no copy
# of the cache per call.
_decode_step_donating = jax.jit(
  _decode_step_impl, static_argnames=_STEP_STATIC, donate_argnames=("cache",)
)


def decode_step(
  params,
  token: Array,
  cache: KVCache,
  rng: Array,
  *,
  config: ModelConfig,
  temperature: float = 0.0,
  top_k: int | None = None,
  backend: Backend | str = Backend.AUTO,
  donate_cache: bool = False,
  mesh: Any = None,
) -> StepOutput:
  """One jitted decode step: feeds token [B], samples the next.

  Meant for a user's own decode loop, so it never waits on the device: its
  checks are static (shapes, dtypes, config agreement, sampling settings)
  plus the vocabulary range of a `token` given as host data (NumPy or
  Python); a device array, e.g. the previous step's output, is not read
  back. For the same reason it does not check capacity: a step past the
  cache's capacity is dropped, not raised. Check the overflow flag,
  `kvjax.cache.cache_overflowed(cache)`, after the loop
  (`kvjax.checks.check_no_overflow(cache, "my loop")` raises), or use
  `decode` / `generate`, which check capacity before and after.

  Args:
    params: model parameters.
    token: [B] int token per row.
    cache: the cache to extend.
    rng: a jax PRNG key (unused when greedy).
    config: the model config.
    temperature: 0 for greedy, else a finite sampling temperature > 0.
    top_k: restrict sampling to the k most likely tokens.
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.
    donate_cache: hand the cache's buffers to the step, which writes the
      new entries into them in place (no copy of the cache per call); the
      `cache` passed in is then deleted, use the returned one. False: the
      step copies the cache once per call and the input stays valid.
    mesh: a `jax.sharding.Mesh` (`kvjax.parallel.make_mesh`) to run on:
      the cache's slots split along `seq`, rows along `data`, kv heads
      along `heads`, params replicated; the same tokens as on one device.
      A cache not laid out for it is placed first. None: the
      default device.

  Returns:
    A `StepOutput`: the next token [B] int32, the step's logits [B, V]
    float32 and the cache.
  """
  checks.check_config(config)
  checks.check_cache(cache, config, read_device=False)
  token = checks.check_step_tokens(
    token, config, cache.batch_size, read_device=False
  )
  checks.check_params(params, config)
  temperature, top_k = checks.check_sampling(temperature, top_k, config)
  rng = checks.check_rng(rng)
  if not isinstance(donate_cache, bool):
    raise TypeError(f"donate_cache must be a bool, got {donate_cache!r}.")
  step = _decode_step_donating if donate_cache else _decode_step
  on, params, (token,), cache = _on_mesh(
    mesh, params, config.num_kv_heads, (jnp.asarray(token, jnp.int32),), cache
  )
  with on:
    return step(
      params,
      token,
      cache,
      rng,
      config=config,
      temperature=temperature,
      top_k=top_k,
      backend=resolve_backend(backend),
    )


@functools.partial(
  jax.jit,
  static_argnames=(
    "transform",
    "config",
    "max_new_tokens",
    "capacity",
    "temperature",
    "top_k",
    "stop_token",
    "pad_token",
    "cache_dtype",
    "backend",
    "prefill_chunk",
    "write_gate",
  ),
)
def _generate(
  params,
  prompt_tokens,
  prompt_lengths,
  rng,
  transform,
  extra,
  *,
  config,
  max_new_tokens,
  capacity,
  temperature,
  top_k,
  stop_token,
  pad_token,
  cache_dtype,
  backend,
  prefill_chunk,
  write_gate=None,
):
  B, T = prompt_tokens.shape
  mask = _prompt_mask(prompt_tokens, prompt_lengths)
  # The decode loop below runs every step through the transform: its
  # max_new_tokens - 1 writes are decode steps, not a forward reserve.
  logits, cache = _prefill_and_compress(
    params,
    prompt_tokens,
    prompt_lengths,
    transform,
    extra,
    config=config,
    capacity=capacity,
    cache_dtype=cache_dtype,
    backend=backend,
    prefill_chunk=prefill_chunk,
    decode_reserve=max_new_tokens - 1,
    write_gate=write_gate,
  )
  last = (jnp.sum(mask, axis=1) - 1).astype(jnp.int32)  # [B]
  prompt_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  rng, key = jax.random.split(rng)
  first = sample_logits(prompt_logits, key, temperature, top_k)  # [B]
  out, num, cache = _decode_loop(
    params,
    cache,
    first,
    rng,
    transform,
    extra,
    config=config,
    length=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    stop_token=stop_token,
    pad_token=pad_token,
    backend=backend,
  )
  return GenerateOutput(out, num, cache, prompt_logits)


def _decode_loop(
  params,
  cache,
  first,
  rng,
  transform,
  extra,
  *,
  config,
  length,
  temperature,
  top_k,
  stop_token,
  pad_token,
  backend,
):
  """The `lax.while_loop` decode: out[:, 0] = first; each step feeds the
  previous token and samples the next, applying a decode-time transform
  every `transform.every` steps. Returns a `DecodeOutput` of `length`
  columns (column 0 is `first`)."""
  B = first.shape[0]
  decode_transform = transform is not None and transform.every > 0
  capture = (
    tuple(n for n in transform.needs if n in model_lib.COMPRESS_TAPS)
    if decode_transform
    else ()
  )
  out = jnp.full((B, length), pad_token, jnp.int32).at[:, 0].set(first)
  stop = -1 if stop_token is None else stop_token
  done = first == stop
  num = jnp.ones((B,), jnp.int32)

  def cond(carry: DecodeState):
    return (carry.step < length) & ~jnp.all(carry.done)

  def body(carry: DecodeState) -> DecodeState:
    step, out, cache, done, num, rng = carry
    token = out[:, step - 1]
    live = ~done[:, None]
    positions = cache.length[:, None]
    logits, cache, aux = model_lib.forward(
      params,
      token[:, None],
      cache,
      config=config,
      token_mask=live,
      capture=capture,
      backend=backend,
    )
    if decode_transform:
      ctx = _context(
        "decode",
        step,
        positions,
        live,
        aux,
        0,
        config,
        transform=transform,
        params=params,
      )

      def compress(cache):
        new, state = transform.apply(
          cache, cache.state, ctx, **compress_base.extras_for(transform, extra)
        )
        return new._replace(state=state)

      cache = jax.lax.cond(
        step % transform.every == 0, compress, lambda c: c, cache
      )
    cache = parallel.constrain_cache(cache)
    rng, key = jax.random.split(rng)
    nxt = sample_logits(logits[:, 0], key, temperature, top_k)
    nxt = jnp.where(done, pad_token, nxt)
    out = out.at[:, step].set(nxt)
    num = num + (~done).astype(jnp.int32)
    done = done | (nxt == stop)
    return DecodeState(step + 1, out, cache, done, num, rng)

  carry = DecodeState(
    jnp.int32(1), out, parallel.constrain_cache(cache), done, num, rng
  )
  final = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(final.tokens, final.num_generated, final.cache)


def _decode_impl(
  params,
  cache,
  token,
  rng,
  transform,
  extra,
  *,
  config,
  max_new_tokens,
  temperature,
  top_k,
  stop_token,
  pad_token,
  backend,
):
  out, num, cache = _decode_loop(
    params,
    cache,
    token,
    rng,
    transform,
    extra,
    config=config,
    length=max_new_tokens + 1,
    temperature=temperature,
    top_k=top_k,
    stop_token=stop_token,
    pad_token=pad_token,
    backend=backend,
  )
  return DecodeOutput(out[:, 1:], num - 1, cache)


_DECODE_STATIC = (
  "transform",
  "config",
  "max_new_tokens",
  "temperature",
  "top_k",
  "stop_token",
  "pad_token",
  "backend",
)
_decode = jax.jit(_decode_impl, static_argnames=_DECODE_STATIC)
_decode_donating = jax.jit(
  _decode_impl, static_argnames=_DECODE_STATIC, donate_argnames=("cache",)
)


def decode(
  params,
  cache: KVCache,
  token: Array,
  *,
  config: ModelConfig,
  max_new_tokens: int,
  transform: compress_base.KVTransform | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  rng: Array | None = None,
  stop_token: int | None = None,
  pad_token: int = 0,
  backend: Backend | str = Backend.AUTO,
  donate_cache: bool = False,
  mesh: Any = None,
  **extra,
) -> DecodeOutput:
  """Continues decoding from a cache (e.g. one returned by `prefill`).

  Feeds `token` [B], then generates `max_new_tokens` per row in one jitted
  `lax.while_loop`; a decode-time transform (the one the cache was
  compressed with: its state lives in `cache.state`) acts every
  `transform.every` steps, counted from this call's first step.

  Args:
    params: model parameters.
    cache: the cache to continue.
    token: [B] int, the next token of each row (fed first).
    config: the model config.
    max_new_tokens: tokens to generate per row (>= 1).
    transform: the transform the cache was compressed with, when it acts
      during decode (`transform.every > 0`); None otherwise.
    temperature: 0 for greedy, else a finite sampling temperature > 0.
    top_k: restrict sampling to the k most likely tokens.
    rng: PRNG key for sampling (default `jax.random.key(0)`).
    stop_token: a row stops after emitting this token.
    pad_token: fills a row after it stops.
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.
    donate_cache: hand the cache's buffers to the call, which decodes into
      them in place; the `cache` passed in is then deleted, use the
      returned one. False: the call copies the cache once (the loop itself
      always updates its copy in place) and the input stays valid.
    mesh: a `jax.sharding.Mesh` (`kvjax.parallel.make_mesh`) to run on:
      the cache's slots split along `seq`, rows along `data`, kv heads
      along `heads`, params replicated; the same tokens as on one device.
      A cache not laid out for it is placed first (padded when
      a region does not split; warned). None: the default device.
    **extra: passed to the transform.

  Returns:
    A `DecodeOutput`: tokens [B, max_new_tokens], num_generated [B] and
    the cache.

  Raises:
    TypeError / ValueError: bad arguments (see `kvjax.checks`), or a cache
      that cannot hold the new entries: `max_new_tokens` writes or, with a
      decode-time transform, the `transform.every` writes between two of
      its actions (each action evicts down to the budget, or flushes a
      full window); and, after the call, any write that ran past the
      capacity all the same.
  """
  checks.check_config(config)
  checks.check_cache(cache, config)
  token = checks.check_step_tokens(token, config, cache.batch_size)
  checks.check_params(params, config)
  checks.check_transform(transform, "decode", extra=extra)
  if extra and not transform.every:
    raise ValueError(
      f"decode: {transform.name} acts at prefill only, so "
      f"the extra argument(s) {sorted(extra)} reach nothing."
    )
  temperature, top_k = checks.check_sampling(temperature, top_k, config)
  max_new_tokens = checks.check_max_new_tokens(max_new_tokens)
  stop_token, pad_token = checks.check_special_tokens(
    stop_token, pad_token, config
  )
  rng = checks.check_rng(rng)
  # A policy that keeps its budget acts at steps every, 2 * every, ... of
  # this call: room for `every` writes suffices. Otherwise every write must
  # fit (a flushing codec's free coded slots count as room).
  if transform is not None and transform.bounded:
    writes = min(transform.every, max_new_tokens)
    what = (
      f"decoding with {transform.name} (acting every {transform.every} "
      f"steps: {writes} writes between actions)"
    )
  else:
    writes, what = max_new_tokens, f"decoding {max_new_tokens} tokens"
  checks.check_room(
    cache,
    writes,
    what,
    "Prefill with a larger `capacity` (prompt length + "
    "new tokens) and `decode_steps`.",
    flushing=transform is not None and transform.every > 0,
  )
  if checks.is_concrete(cache.length):
    most = int(np.max(host_array(cache.length)))
    checks.warn_past_context(
      most + max_new_tokens,
      config,
      f"cache length {most} + max_new_tokens {max_new_tokens}",
    )
  if not isinstance(donate_cache, bool):
    raise TypeError(f"donate_cache must be a bool, got {donate_cache!r}.")
  run = _decode_donating if donate_cache else _decode
  on, params, (token,), cache = _on_mesh(
    mesh, params, config.num_kv_heads, (jnp.asarray(token, jnp.int32),), cache
  )
  with on:
    out, num, cache = run(
      params,
      cache,
      token,
      rng,
      transform,
      extra,
      config=config,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      stop_token=stop_token,
      pad_token=pad_token,
      backend=resolve_backend(backend),
    )
  checks.check_no_overflow(cache, "decode")
  return DecodeOutput(out, num, cache)


def generate(
  params,
  prompt_tokens: Array,
  *,
  config: ModelConfig,
  max_new_tokens: int,
  prompt_lengths: Array | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  rng: Array | None = None,
  stop_token: int | None = None,
  pad_token: int = 0,
  capacity: int | None = None,
  cache_dtype: Any = None,
  backend: Backend | str = Backend.AUTO,
  transform: compress_base.KVTransform | None = None,
  prefill_chunk: int | None = None,
  mesh: Any = None,
  write_gate: model_lib.WriteGate | None = None,
  **extra,
) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row after ragged prompts.

  Args:
    params: model parameters.
    prompt_tokens: [B, T] int prompts, right-padded to a common width T.
    config: the model config.
    max_new_tokens: tokens to generate per row (>= 1).
    prompt_lengths: [B] true prompt lengths (None: every row has T).
    temperature: 0 for greedy, else sampling temperature.
    top_k: restrict sampling to the k most likely tokens.
    rng: PRNG key for sampling (default `jax.random.key(0)`).
    stop_token: a row stops after emitting this token.
    pad_token: fills a row after it stops.
    capacity: cache slots; defaults to T + max_new_tokens - 1, the least
      that fits (the last sampled token is never fed back).
    cache_dtype: key/value dtype (default: the model dtype).
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.
    transform: a `kvjax.compress` transform applied after the prompt and,
      for decode-time methods (`transform.every > 0`), every `every` decode
      steps.
    prefill_chunk: prefill the prompt this many tokens at a time (see
      `prefill`).
    mesh: a `jax.sharding.Mesh` (`kvjax.parallel.make_mesh`) to run on:
      the cache's slots split along `seq`, rows along `data`, kv heads
      along `heads`, params replicated; the same tokens as on one device.
      None: the default device.
    write_gate: a `kvjax.model.WriteGate` on the prompt's attention (see
      `prefill`); needs a transform that gates every decode step
      (`kvjax.compress.spkv` with every=1), so the decoded tokens are those
      of one gated pass (refused otherwise). The prefill runs on the
      reference backend; decode on `backend`.
    **extra: passed to the transform.

  Returns:
    A `GenerateOutput`.

  Raises:
    ValueError / TypeError: malformed prompts (ids outside the vocabulary,
      an empty batch), params of another config, bad sampling settings
      (temperature not a finite float >= 0, stop / pad tokens outside the
      vocabulary), an rng that is not a PRNG key, a transform that is not
      a `KVTransform`, a non-float `cache_dtype`, a capacity too small for
      prompt + generation; and a write that ran past the cache's capacity
      (checked after the call).

  Warns:
    UserWarning: when prompt width + max_new_tokens exceeds
      `config.max_position_embeddings`.
  """
  checks.check_config(config)
  prompt_tokens = checks.check_tokens(
    prompt_tokens, config, name="prompt_tokens"
  )
  B, T = prompt_tokens.shape
  checks.check_params(params, config)
  checks.check_transform(transform, "generate", extra=extra)
  # Always an array, so calls with and without lengths share one compile.
  prompt_lengths = checks.check_prompt_lengths(prompt_lengths, B, T)
  temperature, top_k = checks.check_sampling(temperature, top_k, config)
  max_new_tokens = checks.check_max_new_tokens(max_new_tokens)
  stop_token, pad_token = checks.check_special_tokens(
    stop_token, pad_token, config
  )
  rng = checks.check_rng(rng)
  cache_dtype = checks.check_cache_dtype(cache_dtype)
  prefill_chunk = checks.check_prefill_chunk(prefill_chunk)
  write_gate = _check_gate_use(params, write_gate, backend, prefill_chunk)
  if write_gate is not None and not (
    transform is not None
    and "write_utility" in transform.needs
    and transform.every == 1
  ):
    # Decode steps attend ungated: only a gate transform acting every
    # step (spkv, every=1) removes each entry as it leaves the window.
    raise ValueError(
      "generate(write_gate=...) gates the prompt; its decode steps stay one "
      "gated pass only through a transform that drops gated entries every "
      "step (kvjax.compress.spkv with every=1, alone or in a chain), got "
      f"transform={getattr(transform, 'name', transform)!r}"
      + (f" acting every {transform.every} steps." if transform else ".")
    )
  capacity = checks.check_capacity(
    capacity,
    T + max_new_tokens - 1,
    f"a {T}-token prompt plus {max_new_tokens} generated tokens",
  )
  checks.warn_past_context(
    T + max_new_tokens,
    config,
    f"prompt length {T} + max_new_tokens {max_new_tokens}",
  )
  on, params, (prompt_tokens, prompt_lengths), _ = _on_mesh(
    mesh,
    params,
    config.num_kv_heads,
    (jnp.asarray(prompt_tokens, jnp.int32), prompt_lengths),
  )
  with on:
    out = _generate(
      params,
      prompt_tokens,
      prompt_lengths,
      rng,
      transform,
      extra,
      config=config,
      max_new_tokens=max_new_tokens,
      capacity=capacity,
      temperature=temperature,
      top_k=top_k,
      stop_token=stop_token,
      pad_token=pad_token,
      cache_dtype=cache_dtype,
      backend=resolve_backend(backend),
      prefill_chunk=prefill_chunk,
      write_gate=write_gate,
    )
  checks.check_no_overflow(out.cache, "generate")
  return out
