"""The definition the decode kernels are tested against: plain jnp over
decoded (dense) keys and values, materializing [T, S]."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def decode_attention_reference(
  q: Array,  # [B, T, N, H]
  k: Array,  # [B, K, S, H] float (decoded)
  v: Array,  # [B, K, S, H] float (decoded)
  q_pos: Array,  # [B, T]
  k_pos: Array,  # [B, K, S]
  k_valid: Array,  # [B, K, S]
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
) -> tuple[Array, Array]:
  """Grouped-query attention of T queries over S slots.

  Query head n reads kv head n // (N / K); a query at p sees the valid
  slots with pos <= p (and pos > p - sliding_window). Softmax in float32;
  a query that sees nothing gets a zero output and LSE -inf.

  Returns:
    (out [B, T, N, H] in q.dtype, lse [B, N, T] float32).
  """
  B, T, N, H = q.shape
  K = k.shape[1]
  G = N // K
  scale = H**-0.5 if scale is None else scale
  qg = q.astype(jnp.float32).reshape(B, T, K, G, H)
  s = jnp.einsum("btkgh,bksh->bkgts", qg, k.astype(jnp.float32)) * scale
  kp = k_pos[:, :, None, None, :]
  qp = q_pos[:, None, None, :, None]
  mask = k_valid[:, :, None, None, :] & (kp <= qp)
  if sliding_window is not None:
    mask &= kp > qp - sliding_window
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(w, axis=-1, keepdims=True)
  p = w / jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bkgts,bksh->btkgh", p, v.astype(jnp.float32))
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return (
    out.reshape(B, T, N, H).astype(q.dtype),
    lse[..., 0].reshape(B, N, T),
  )
