"""Reference attention over a KV cache, and the backend switch.

`reference_attention` is the definition every kernel is tested against:
plain jnp, softmax in float32, grouped-query attention by reshaping the
queries into [K, G] groups, and masks built only from the cache's `valid`
bits and original positions (so it is correct for any compacted or
evicted cache, not only for a contiguous one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache import CodedKV, is_coded

Array = jax.Array

BACKENDS = ("xla",)


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
) -> tuple[Array, Array]:
  """Causal grouped-query attention of T queries over S cache slots.

  A query with no visible slot (e.g. a padding query of an empty row) gets
  all-zero probabilities and a zero output, never NaN.

  Args:
    q: [B, T, N, H] queries (RoPE applied).
    k: [B, K, S, H] keys (RoPE applied), or a `CodedKV` layer payload (its
      codec's `scores` are used when it has them, else it is decoded);
      N must be a multiple of K.
    v: [B, K, S, H] values, or a `CodedKV` layer payload (decoded).
    q_pos: [B, T] positions of the queries.
    k_pos: [B, K, S] positions of the keys held in each slot.
    k_valid: [B, K, S] whether each slot holds a live entry.
    scale: logit scale; defaults to 1/sqrt(H).
    sliding_window: optional window length (keys with q_pos - k_pos >=
      window are masked).

  Returns:
    out: [B, T, N, H] in q's dtype.
    probs: [B, N, T, S] float32 attention probabilities.
  """
  B, T, N, H = q.shape
  K = k_valid.shape[1]
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}.")
  G = N // K
  scale = H**-0.5 if scale is None else scale
  qg = q.reshape(B, T, K, G, H)
  if isinstance(k, CodedKV) and k.codec.scores is not None:
    # q.k from the codes: the codec transforms the query once instead of
    # decoding every key.
    q_bk = jnp.moveaxis(qg, 1, 3).astype(jnp.float32)  # [B, K, G, T, H]
    logits = k.codec.scores(q_bk.reshape(B, K, G * T, H), k.slots,
                            k.shared).reshape(B, K, G, T, -1) * scale
  else:
    logits = einsum_f32("btkgh,bksh->bkgts", qg, _entries(k)) * scale
  mask = attention_mask(q_pos, k_pos, k_valid, sliding_window)  # [B,K,1,T,S]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, T, S]
  v = _entries(v)
  out = einsum_f32("bkgts,bksh->btkgh", probs.astype(v.dtype), v)
  out = out.reshape(B, T, N, H).astype(q.dtype)
  return out, probs.reshape(B, N, T, -1)


def attention(q, k, v, *, q_pos, k_pos, k_valid, scale=None,
              sliding_window=None, backend: str = "xla"):
  """Dispatches to an attention implementation; same contract as reference.

  Args:
    backend: "xla" (the jnp reference, compiled by XLA). Pallas backends
      register here as they land in `pallas_kernels/`.

  Raises:
    ValueError: for a backend that is not available.
  """
  if backend not in BACKENDS:
    raise ValueError(f"attention backend {backend!r} is not available; "
                     f"allowed: {BACKENDS}.")
  return reference_attention(q, k, v, q_pos=q_pos, k_pos=k_pos,
                             k_valid=k_valid, scale=scale,
                             sliding_window=sliding_window)
