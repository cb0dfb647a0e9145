"""Bring your own model: a transformer written by hand (not `kvjax.model`)
runs prefill, compression, the question and decode on kvjax's cache,
transforms and attention, and matches `kvjax.forward` on the same weights.

The hand-written model uses only the public cache API: `init_cache` with an
`AttentionGeometry`, `kvjax.cache.write` / `advance`, `cached_attention`
over the cache and `compress_cache` with the geometry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress

CONFIG = kvjax.get_config("tiny")
GEOMETRY = kvjax.AttentionGeometry(
  num_heads=CONFIG.num_heads,
  num_kv_heads=CONFIG.num_kv_heads,
  head_dim=CONFIG.head_dim,
  rope_theta=CONFIG.rope_theta,
)
B, T, CAPACITY = 2, 40, 48


def _rms(x, w, eps=CONFIG.norm_eps):
  return w * (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps))


def _rope(x, pos):
  """Rotate-half RoPE, x [B, T, heads, H], pos [B, T]."""
  H = x.shape[-1]
  inv = 1.0 / GEOMETRY.rope_theta ** (np.arange(0, H, 2) / H)
  ang = pos[..., None, None].astype(jnp.float32) * inv  # [B, T, 1, H/2]
  x1, x2 = x[..., : H // 2], x[..., H // 2 :]
  return jnp.concatenate(
    [
      x1 * jnp.cos(ang) - x2 * jnp.sin(ang),
      x2 * jnp.cos(ang) + x1 * jnp.sin(ang),
    ],
    -1,
  )


def own_forward(params, tokens, cache, mask):
  """A Llama block stack written from scratch, storing its keys and values
  in a kvjax cache. Returns (logits, cache, observed captures)."""
  positions = kvjax.cache.next_entries(cache, mask).positions  # [B, T]
  x = params["embed"][tokens]
  qs, qs_pre = [], []
  for layer in range(CONFIG.num_layers):
    p = jax.tree.map(lambda a, i=layer: a[i], params["layers"])
    h = _rms(x, p["attn_norm"])
    q = jnp.einsum("btd,dnh->btnh", h, p["wq"])
    k = jnp.einsum("btd,dkh->btkh", h, p["wk"])
    v = jnp.einsum("btd,dkh->btkh", h, p["wv"])
    qs_pre.append(q)
    q, k = _rope(q, positions), _rope(k, positions)
    qs.append(q)
    cache = kvjax.cache.write(cache, k, v, layer=layer, token_mask=mask)
    out = kvjax.cached_attention(q, cache, layer, q_pos=positions).out
    x = x + jnp.einsum("btnh,nhd->btd", out, p["wo"])
    h = _rms(x, p["mlp_norm"])
    x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
  cache = kvjax.cache.advance(cache, mask)
  logits = _rms(x, params["final_norm"]) @ params["lm_head"]
  return logits, cache, {"q": jnp.stack(qs), "q_pre_rope": jnp.stack(qs_pre)}


TRANSFORMS = {
  "snapkv": lambda: compress.snapkv(ratio=0.5, window_size=8),
  "expected_attention+int4": lambda: compress.chain(
    compress.expected_attention(ratio=0.5, n_future_positions=16),
    compress.uniform(4),
  ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_own_model_matches_kvjax_through_compress_question_decode(name):
  transform = TRANSFORMS[name]()
  params = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)
  lengths = jnp.array([T, 29])
  mask = jnp.arange(T)[None] < lengths[:, None]
  question = jnp.array([[11, 12, 13], [21, 22, 23]], jnp.int32)

  # kvjax's own path.
  _, want_cache = kvjax.prefill(
    params,
    tokens,
    config=CONFIG,
    transform=transform,
    capacity=CAPACITY,
    prompt_lengths=lengths,
  )
  want_q, want_cache, _ = kvjax.forward(
    params, question, want_cache, config=CONFIG
  )

  # The hand-written model on kvjax's cache and transform.
  cache = kvjax.init_cache(
    GEOMETRY, B, CAPACITY, dtype="float32", num_layers=CONFIG.num_layers
  )
  _, cache, observed = own_forward(params, tokens, cache, mask)
  positions = jnp.cumsum(mask, axis=1) - 1
  cache = kvjax.compress_cache(
    cache,
    transform,
    config=GEOMETRY,
    observed=observed,
    positions=positions,
    mask=mask,
    reserve=CAPACITY - T,
  )
  got_q, cache, _ = own_forward(
    params, question, cache, jnp.ones(question.shape, bool)
  )

  assert cache.capacity == want_cache.capacity < CAPACITY  # compacted
  np.testing.assert_array_equal(cache.pos, want_cache.pos)
  np.testing.assert_allclose(got_q, want_q, atol=2e-5)
  token = jnp.argmax(got_q[:, -1], -1)
  for _ in range(3):  # greedy decode, one token at a time
    got, cache, _ = own_forward(
      params, token[:, None], cache, jnp.ones((B, 1), bool)
    )
    want, want_cache, _ = kvjax.forward(
      params, token[:, None], want_cache, config=CONFIG
    )
    np.testing.assert_allclose(got, want, atol=2e-5)
    token = jnp.argmax(got[:, -1], -1)
  assert not kvjax.cache.cache_overflowed(cache)
