"""The cache API for models kvjax did not build: `KVCache.from_dense` /
`to_dense`, `write` / `advance` / `append`, `init_cache` with an
`AttentionGeometry`, and `cached_attention` over a cache and a layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress

CONFIG = kvjax.get_config("tiny")
GEOMETRY = CONFIG.geometry
B = 2


def test_from_dense_to_dense_round_trip_and_forward():
  """A cache built from dense [L, B, T, K, H] arrays attends like the one
  kvjax's forward wrote; `to_dense` gives the arrays back (coded: decoded)."""
  params = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
  tokens = jax.random.randint(jax.random.key(1), (B, 12), 0, CONFIG.vocab_size)
  lengths = jnp.array([12, 7])
  mask = jnp.arange(12)[None] < lengths[:, None]
  _, ref, aux = kvjax.forward(
    params,
    tokens,
    kvjax.init_cache(CONFIG, B, 16),
    config=CONFIG,
    token_mask=mask,
    capture=("k", "v"),
  )
  cache = kvjax.KVCache.from_dense(aux["k"], aux["v"], lengths, capacity=16)
  for field in ("pos", "valid", "end", "length"):
    np.testing.assert_array_equal(getattr(cache, field), getattr(ref, field))
  dense = cache.to_dense()
  live = np.asarray(mask)[None, :, :, None, None]
  np.testing.assert_array_equal(
    np.where(live, dense.k[:, :, :12], 0), np.where(live, aux["k"], 0)
  )
  nxt = jnp.array([[3], [4]], jnp.int32)
  want = kvjax.forward(params, nxt, ref, config=CONFIG).logits
  got = kvjax.forward(params, nxt, cache, config=CONFIG).logits
  np.testing.assert_allclose(got, want, atol=1e-5)

  # Coded payloads, TailedKV included: to_dense decodes what is stored.
  coded = kvjax.compress_cache(
    cache,
    compress.kivi(2, group_size=4, residual=4),
    config=GEOMETRY,
    observed={},
    positions=jnp.zeros((B, 1), jnp.int32),
    mask=jnp.ones((B, 1), bool),
    reserve=2,
  )
  assert isinstance(coded.k, kvjax.cache.TailedKV)
  dense = coded.to_dense()
  assert dense.k.shape == (
    CONFIG.num_layers,
    B,
    coded.capacity,
    CONFIG.num_kv_heads,
    CONFIG.head_dim,
  )
  np.testing.assert_array_equal(dense.pos, np.swapaxes(coded.pos, 2, 3))
  err = np.abs(
    np.where(
      np.swapaxes(coded.valid, 2, 3)[..., None],
      dense.k - _by_position(aux["k"], dense.pos),
      0,
    )
  )
  assert 0 < err.max() < 0.5 * np.abs(aux["k"]).max()  # 2-bit, not exact


def _by_position(x, pos):
  """x [L, B, T, K, H] gathered at pos [L, B, S, K] (clipped)."""
  idx = np.clip(np.asarray(pos), 0, x.shape[2] - 1)[..., None]
  return np.take_along_axis(np.asarray(x), idx, axis=2)


def test_write_append_and_attention_bad_input():
  cache = kvjax.init_cache(GEOMETRY, B, 4, dtype="float32", num_layers=2)
  k = jnp.zeros((B, 3, CONFIG.num_kv_heads, CONFIG.head_dim))
  with pytest.raises(ValueError, match="k and v must both be"):
    kvjax.cache.write(cache, k, k[..., :4], layer=0)
  with pytest.raises(ValueError, match="capacity exceeded"):
    kvjax.cache.write(
      cache, jnp.concatenate([k, k], 1), jnp.concatenate([k, k], 1), layer=0
    )
  with pytest.raises(ValueError, match=r"B=2, K=2, H=32"):
    kvjax.cache.write(cache, k[:1], k[:1], layer=0)
  with pytest.raises(ValueError, match=r"H=32"):
    kvjax.cache.write(cache, k[..., :1], k[..., :1], layer=0)
  for layer in (2, -1):  # a missing layer is never dropped silently
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\)"):
      kvjax.cache.write(cache, k, k, layer=layer)
  with pytest.raises(ValueError, match="positions of live entries"):
    kvjax.KVCache.from_dense(
      jnp.zeros((1, B, 2, 2, 32)),
      jnp.zeros((1, B, 2, 2, 32)),
      positions=jnp.array([[0, -1], [0, 1]]),
    )
  empty = kvjax.KVCache.from_dense(
    jnp.zeros((1, B, 0, 2, 32)), jnp.zeros((1, B, 0, 2, 32)), capacity=3
  )
  assert empty.length.tolist() == [0, 0] and empty.capacity == 3
  with pytest.raises(ValueError, match="needs the layer"):
    kvjax.cached_attention(
      jnp.zeros((B, 1, 4, 32)), cache, q_pos=jnp.zeros((B, 1), jnp.int32)
    )
  with pytest.raises(ValueError, match="layer must be in"):
    kvjax.cached_attention(
      jnp.zeros((B, 1, 4, 32)), cache, 2, q_pos=jnp.zeros((B, 1), jnp.int32)
    )
  with pytest.raises(ValueError, match="init_cache with an AttentionGeometry"):
    kvjax.init_cache(GEOMETRY, B, 4)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    kvjax.AttentionGeometry(num_heads=3, num_kv_heads=2, head_dim=8)
  # append writes every layer and advances once.
  kk = jnp.ones((2, B, 3, CONFIG.num_kv_heads, CONFIG.head_dim))
  out = kvjax.cache.append(cache, kk, kk)
  assert out.end.tolist() == [3, 3] and bool(out.valid[:, :, :, :3].all())
  assert not bool(out.valid[:, :, :, 3:].any())
