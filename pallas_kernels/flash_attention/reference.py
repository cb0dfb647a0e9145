"""Plain-jnp definitions of `flash_attention` and `flash_attention_mass`.

They materialize the [T, S] logits of every (batch row, query head) and
are the definitions the kernels are tested against (the same function as
`kvjax.attention.reference_attention` on one layer of the cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _layer(x: Array, layer) -> Array:
  return jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)


def _logits_and_mask(q, k, q_pos, k_pos, k_valid, layer, scale, window):
  """Scaled float32 logits and visibility, both [B, K, G, T, S]."""
  B, T, N, H = q.shape
  K = k.shape[2]
  scale = H**-0.5 if scale is None else scale
  qg = q.reshape(B, T, K, N // K, H).astype(jnp.float32)
  kl = _layer(k, layer).astype(jnp.float32)  # [B, K, S, H]
  logits = jnp.einsum("btkgh,bksh->bkgts", qg, kl) * scale
  pos = _layer(k_pos, layer)[:, :, None, None, :]  # [B, K, 1, 1, S]
  p = q_pos[:, None, None, :, None]  # [B, 1, 1, T, 1]
  mask = _layer(k_valid, layer)[:, :, None, None, :] & (pos <= p)
  if window is not None:
    mask &= pos > p - window
  return logits, mask


def flash_attention(
  q, k, v, q_pos, k_pos, k_valid, layer, *, scale=None, sliding_window=None
):
  """(out [B, T, N, H] in q's dtype, lse [B, N, T] float32); see
  `pallas_kernels.flash_attention.flash_attention`."""
  B, T, N, H = q.shape
  logits, mask = _logits_and_mask(
    q, k, q_pos, k_pos, k_valid, layer, scale, sliding_window
  )
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows that see nothing
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  l = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(l > 0, l, 1.0)  # [B, K, G, T, S]
  vl = _layer(v, layer)
  # Probabilities are rounded to v's dtype before the product, as the
  # kernels (and kvjax's reference) do.
  out = jnp.einsum(
    "bkgts,bksh->btkgh",
    probs.astype(vl.dtype).astype(jnp.float32),
    vl.astype(jnp.float32),
  )
  out = out.reshape(B, T, N, H).astype(q.dtype)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return out, lse[..., 0].reshape(B, N, T)


def flash_attention_mass(
  q,
  k,
  q_pos,
  k_pos,
  k_valid,
  layer,
  lse,
  weights,
  *,
  scale=None,
  sliding_window=None,
):
  """mass [B, N, S] float32: sum_t weights[b, t] * exp(logit - lse) over
  visible slots; see `pallas_kernels.flash_attention.flash_attention_mass`."""
  B, T, N, _ = q.shape
  K = k.shape[2]
  logits, mask = _logits_and_mask(
    q, k, q_pos, k_pos, k_valid, layer, scale, sliding_window
  )
  lse = lse.reshape(B, K, N // K, T, 1)
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  p = jnp.where(mask, jnp.exp(logits - lse), 0.0)  # [B, K, G, T, S]
  mass = jnp.einsum("bkgts,bt->bkgs", p, weights.astype(jnp.float32))
  return mass.reshape(B, N, -1)
