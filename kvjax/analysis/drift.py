"""Cache vs recompute drift: cached decode vs full recompute, per dtype.

`cache_drift` computes the logits of one token sequence twice:

* recompute: one `forward` over all T tokens on an empty cache;
* cached: `forward` over the first `prefill_len` tokens (prefill), then one
  `forward` per remaining token with T = 1 on the growing cache (what
  `kvjax.generate` does in decode),

with the parameters cast to `dtype` and the cache stored in `cache_dtype`
(default `dtype`), and compares the logits at the decoded positions
t = prefill_len .. T-1 (the positions the two paths compute differently):

* max_abs_logit_diff = max |logit_recompute - logit_cached|;
* mean_kl = mean over (row, position) of KL(recompute || cached) in nats;
* argmax_agreement = share of (row, position) with the same argmax;
* max_abs_error_vs_f32 = max |logit_cached - logit_reference|, the reference
  being a float32 recompute with a float32 cache: the total error of cached
  low-precision decode, of which the drift is the path-dependent part.

KL and the maxima are computed in float64 on the host from the float32
logits that `forward` returns.

In exact arithmetic the two are equal. In floating point they differ because:

* summation order: the recompute runs every matmul with T query rows and the
  cached path with one; XLA tiles, vectorizes and (on accelerators) splits
  the reductions differently for different shapes, so the same dot products
  are summed in a different order and round differently. The softmax over
  cache slots likewise reduces over a differently shaped, differently masked
  score block;
* rounding compounds: every layer's output is rounded to the activation
  dtype and the next layer amplifies the difference, so the drift grows with
  depth and with the dtype's unit roundoff (2^-24 for float32, 2^-8 for
  bfloat16);
* cache dtype: keys and values are stored in `cache_dtype`. kvjax writes new
  keys/values to the cache *before* attention in both paths, so this rounding
  is shared here; with `cache_dtype` lower than `dtype` it still changes the
  logits (see `max_abs_error_vs_f32`) and amplifies the order effects above.
  Implementations whose prefill attends to unrounded keys drift more.

The drift is platform dependent. On XLA:CPU, bfloat16 matmuls are computed
by loops whose reduction order does not depend on the number of query rows,
so bfloat16 cached decode and recompute can agree bit for bit while float32
(vectorized, shape-dependent kernels) drifts by ~1e-6; on GPU/TPU the
bfloat16 drift is typically far larger than float32's.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import model as model_lib
from kvjax.attention import Backend, resolve_backend
from kvjax.cache import init_cache
from kvjax.config import ModelConfig

Array = jax.Array


class CacheDrift(NamedTuple):
  """Cached decode vs full recompute, at the decoded positions.

  Attributes:
    max_abs_logit_diff: max |Δ logit|.
    mean_kl: mean KL(recompute || cached), nats.
    argmax_agreement: share of positions whose argmax agrees.
    max_abs_error_vs_f32: max |Δ logit| of the cached logits vs a float32
      recompute with a float32 cache.
    dtype: the parameter / activation dtype name.
    cache_dtype: the key/value dtype name.
  """

  max_abs_logit_diff: float
  mean_kl: float
  argmax_agreement: float
  max_abs_error_vs_f32: float
  dtype: str
  cache_dtype: str


def cast_params(params, dtype) -> Any:
  """Casts every floating leaf of a parameter pytree to `dtype`."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
    params,
  )


@functools.partial(
  jax.jit, static_argnames=("config", "cache_dtype", "backend")
)
def _recompute_logits(params, tokens, *, config, cache_dtype, backend):
  """[B, T, V] float32 logits of one forward over all tokens."""
  B, T = tokens.shape
  logits, _, _ = model_lib.forward(
    params,
    tokens,
    init_cache(config, B, T, dtype=cache_dtype),
    config=config,
    backend=backend,
  )
  return logits


@functools.partial(
  jax.jit, static_argnames=("config", "prefill_len", "cache_dtype", "backend")
)
def _cached_logits(
  params, tokens, *, config, prefill_len, cache_dtype, backend
):
  """[B, T, V] float32 logits of prefill + one-token decode steps."""
  B, T = tokens.shape
  cache = init_cache(config, B, T, dtype=cache_dtype)
  first, cache, _ = model_lib.forward(
    params, tokens[:, :prefill_len], cache, config=config, backend=backend
  )

  def step(cache, token):  # token [B]
    logits, cache, _ = model_lib.forward(
      params, token[:, None], cache, config=config, backend=backend
    )
    return cache, logits[:, 0]

  _, rest = jax.lax.scan(step, cache, tokens[:, prefill_len:].T)  # [T', B, V]
  return jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cache_drift(
  params,
  config: ModelConfig,
  tokens: Array,
  dtype: Any = "float32",
  *,
  prefill_len: int = 1,
  cache_dtype: Any = None,
  backend: Backend | str = Backend.AUTO,
) -> CacheDrift:
  """Logit drift between cached token-by-token decode and full recompute.

  Args:
    params: model parameters (any dtype; floating leaves are cast).
    config: the model config (its dtype is replaced by `dtype`).
    tokens: [B, T] int tokens, T >= 2.
    dtype: parameter and activation dtype: "float32", "bfloat16" or
      "float16".
    prefill_len: tokens fed in the prefill call, 1 <= prefill_len < T.
    cache_dtype: key/value dtype (default: `dtype`).
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.

  Returns:
    A `CacheDrift` of Python floats over the T - prefill_len decoded
    positions of every row.

  Raises:
    ValueError: for bad tokens, dtype or prefill_len.
  """
  tokens = jnp.asarray(tokens)
  if (
    tokens.ndim != 2
    or tokens.shape[1] < 2
    or not jnp.issubdtype(tokens.dtype, jnp.integer)
  ):
    raise ValueError(
      f"tokens must be an int array [B, T] with T >= 2, got "
      f"{tokens.dtype}{tuple(tokens.shape)}."
    )
  T = tokens.shape[1]
  if not isinstance(prefill_len, int) or not 1 <= prefill_len < T:
    raise ValueError(
      f"prefill_len must be an int in [1, {T}), got {prefill_len!r}."
    )
  dtype = jnp.dtype(dtype).name
  cache_dtype = dtype if cache_dtype is None else jnp.dtype(cache_dtype).name
  cfg = config.replace(dtype=dtype)  # validates the dtype name
  cast = cast_params(params, dtype)
  kw = dict(cache_dtype=cache_dtype, backend=resolve_backend(backend))
  full = _recompute_logits(cast, tokens, config=cfg, **kw)
  cached = _cached_logits(
    cast, tokens, config=cfg, prefill_len=prefill_len, **kw
  )
  if dtype == cache_dtype == "float32":
    ref = full
  else:
    ref = _recompute_logits(
      cast_params(params, "float32"),
      tokens,
      config=config.replace(dtype="float32"),
      cache_dtype="float32",
      backend=kw["backend"],
    )
  # [B, T', V] float64 at the decoded positions.
  full, cached, ref = (
    np.asarray(x[:, prefill_len:], np.float64) for x in (full, cached, ref)
  )
  logp, logq = _log_softmax64(full), _log_softmax64(cached)
  kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)  # [B, T']
  agree = np.argmax(full, axis=-1) == np.argmax(cached, axis=-1)
  return CacheDrift(
    max_abs_logit_diff=float(np.max(np.abs(full - cached))),
    mean_kl=float(np.mean(kl)),
    argmax_agreement=float(np.mean(agree)),
    max_abs_error_vs_f32=float(np.max(np.abs(cached - ref))),
    dtype=dtype,
    cache_dtype=cache_dtype,
  )
