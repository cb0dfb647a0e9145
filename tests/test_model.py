"""forward: prefill/decode consistency, ragged batches, capture, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import model as model_lib
from kvjax.attention import reference_attention
from kvjax.cache import cache_overflowed

CONFIGS = {
  "llama": kvjax.get_config("tiny"),
  "qwen3_window": kvjax.get_config(
    "tiny",
    qk_norm=True,
    qkv_bias=True,
    o_bias=True,
    tie_embeddings=True,
    sliding_window=7,
  ),
  "mha_llama3_rope": kvjax.get_config(
    "tiny",
    num_kv_heads=4,
    rope_scaling=kvjax.RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
  ),
}


def _setup(name, seed=0, B=2, T=24):
  config = CONFIGS[name]
  params = kvjax.init_params(config, jax.random.key(seed), std=0.1)
  tokens = jax.random.randint(
    jax.random.key(seed + 1), (B, T), 0, config.vocab_size
  )
  return config, params, tokens


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_single_forward(name):
  config, params, tokens = _setup(name)
  B, T = tokens.shape
  full, _, _ = kvjax.forward(
    params, tokens, kvjax.init_cache(config, B, T), config=config
  )
  cache = kvjax.init_cache(config, B, T)
  logits, cache, _ = kvjax.forward(params, tokens[:, :10], cache, config=config)
  step = jax.jit(kvjax.forward, static_argnames="config")
  pieces = [logits]
  for t in range(10, T):
    logits, cache, _ = step(params, tokens[:, t : t + 1], cache, config=config)
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5)
  assert cache.end.tolist() == [T] * B and cache.length.tolist() == [T] * B


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_batch_rows_equal_rows_alone(name):
  config, params, tokens = _setup(name, B=3)
  lengths = [24, 9, 17]
  mask = jnp.arange(24)[None, :] < jnp.asarray(lengths)[:, None]
  padded = jnp.where(mask, tokens, 0)
  logits, cache, _ = kvjax.forward(
    params,
    padded,
    kvjax.init_cache(config, 3, 30),
    config=config,
    token_mask=mask,
  )
  # Two decode steps for the whole batch.
  nxt = jnp.array([[5], [6], [7]], jnp.int32)
  dec1, cache, _ = kvjax.forward(params, nxt, cache, config=config)
  dec2, cache, _ = kvjax.forward(params, nxt + 1, cache, config=config)
  for b, n in enumerate(lengths):
    alone = jnp.concatenate(
      [tokens[b : b + 1, :n], nxt[b : b + 1], nxt[b : b + 1] + 1], axis=1
    )
    ref, _, _ = kvjax.forward(
      params, alone, kvjax.init_cache(config, 1, n + 2), config=config
    )
    np.testing.assert_allclose(logits[b, :n], ref[0, :n], atol=2e-5)
    np.testing.assert_allclose(dec1[b, 0], ref[0, n], atol=2e-5)
    np.testing.assert_allclose(dec2[b, 0], ref[0, n + 1], atol=2e-5)
  assert cache.end.tolist() == [n + 2 for n in lengths]
  # Padding never entered the cache.
  assert int(cache.valid[0].sum(axis=-1)[:, 0].tolist()[1]) == 11


def test_left_padding_equals_right_padding():
  config, params, tokens = _setup("llama", B=1)
  n = 15
  right = jnp.concatenate([tokens[:, :n], jnp.zeros((1, 9), jnp.int32)], 1)
  left = jnp.concatenate([jnp.zeros((1, 9), jnp.int32), tokens[:, :n]], 1)
  rmask = jnp.arange(24)[None] < n
  lr, _, _ = kvjax.forward(
    params,
    right,
    kvjax.init_cache(config, 1, 24),
    config=config,
    token_mask=rmask,
  )
  ll, _, _ = kvjax.forward(
    params,
    left,
    kvjax.init_cache(config, 1, 24),
    config=config,
    token_mask=rmask[:, ::-1],
  )
  np.testing.assert_allclose(lr[:, :n], ll[:, 9:], atol=2e-5)


def test_padding_queries_are_finite_even_for_an_empty_row():
  config, params, tokens = _setup("llama")
  mask = jnp.array([[True] * 24, [False] * 24])
  logits, cache, _ = kvjax.forward(
    params,
    tokens,
    kvjax.init_cache(config, 2, 24),
    config=config,
    token_mask=mask,
  )
  assert np.isfinite(np.asarray(logits)).all()
  assert cache.end.tolist() == [24, 0]


def test_capture_shapes_and_residual_identity():
  config, params, tokens = _setup("qwen3_window")
  B, T = tokens.shape
  L, N, K, H, D = (
    config.num_layers,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
    config.d_model,
  )
  logits, _, aux = kvjax.forward(
    params,
    tokens,
    kvjax.init_cache(config, B, 32),
    config=config,
    capture=model_lib.CAPTURE_NAMES,
  )
  assert aux["resid"].shape == (L, B, T, D)
  assert aux["attn_out"].shape == aux["mlp_out"].shape == (L, B, T, D)
  assert aux["attn_probs"].shape == (L, B, N, T, 32)
  assert aux["q"].shape == aux["q_pre_rope"].shape == (L, B, T, N, H)
  assert aux["k"].shape == aux["v"].shape == (L, B, T, K, H)
  assert aux["final_norm"].shape == (B, T, D)
  # The residual stream is the sum of the writes into it.
  resid = aux["resid"]
  np.testing.assert_allclose(
    resid[1], resid[0] + aux["attn_out"][0] + aux["mlp_out"][0], atol=1e-5
  )
  np.testing.assert_allclose(
    aux["final_hidden"],
    resid[-1] + aux["attn_out"][-1] + aux["mlp_out"][-1],
    atol=1e-5,
  )
  # Probabilities: rows sum to one, nothing past the causal frontier or
  # outside the sliding window.
  probs = np.asarray(aux["attn_probs"])
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  t, s = np.meshgrid(np.arange(T), np.arange(32), indexing="ij")
  allowed = (s <= t) & (s > t - config.sliding_window)
  assert probs[..., ~allowed].max() == 0.0
  # Logits are the LM head applied to the captured final norm.
  np.testing.assert_allclose(
    logits,
    jnp.einsum("btd,vd->btv", aux["final_norm"], params["embed"]),
    atol=1e-5,
  )


def test_shapes_via_eval_shape_and_bf16_runs():
  config = kvjax.get_config("tiny", dtype="bfloat16")
  params = jax.eval_shape(lambda: kvjax.init_params(config, jax.random.key(0)))
  assert params["layers"]["wq"].dtype == jnp.bfloat16
  cache = jax.eval_shape(lambda: kvjax.init_cache(config, 2, 16))
  out = jax.eval_shape(
    lambda p, c: kvjax.forward(
      p, jnp.zeros((2, 4), jnp.int32), c, config=config
    ),
    params,
    cache,
  )
  logits, new_cache, _ = out
  assert logits.shape == (2, 4, config.vocab_size)
  assert logits.dtype == jnp.float32
  assert jax.tree.structure(new_cache) == jax.tree.structure(cache)
  real = kvjax.init_params(config, jax.random.key(0))
  lg, _, _ = kvjax.forward(
    real,
    jnp.zeros((2, 4), jnp.int32),
    kvjax.init_cache(config, 2, 16),
    config=config,
  )
  assert np.isfinite(np.asarray(lg)).all()


def test_bf16_close_to_f32():
  config, params, tokens = _setup("llama")
  f32, _, _ = kvjax.forward(
    params, tokens, kvjax.init_cache(config, 2, 24), config=config
  )
  c16 = config.replace(dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  b16, _, _ = kvjax.forward(
    p16, tokens, kvjax.init_cache(c16, 2, 24), config=c16
  )
  err = np.abs(np.asarray(b16) - np.asarray(f32)).max()
  assert err < 0.1 * np.abs(np.asarray(f32)).max()


def test_attention_on_a_scrambled_cache_matches_contiguous():
  """Masks come from pos/valid only: slot order must not matter."""
  key = jax.random.key(0)
  B, T, N, K, S, H = 2, 3, 4, 2, 10, 8
  q = jax.random.normal(key, (B, T, N, H))
  k = jax.random.normal(jax.random.key(1), (B, K, S, H))
  v = jax.random.normal(jax.random.key(2), (B, K, S, H))
  pos = jnp.broadcast_to(jnp.arange(S), (B, K, S))
  valid = jnp.ones((B, K, S), bool).at[:, :, 8:].set(False)
  q_pos = jnp.broadcast_to(jnp.arange(5, 8), (B, T))
  out = reference_attention(q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid).out
  perm = jax.random.permutation(jax.random.key(3), S)
  out2 = reference_attention(
    q,
    k[:, :, perm],
    v[:, :, perm],
    q_pos=q_pos,
    k_pos=pos[:, :, perm],
    k_valid=valid[:, :, perm],
  ).out
  np.testing.assert_allclose(out, out2, atol=1e-6)
  # And a direct softmax over the visible keys of query 0, head 0.
  vis = np.arange(S) <= 5
  logit = np.asarray(k[0, 0, vis] @ q[0, 0, 0]) / np.sqrt(H)
  p = np.exp(logit - logit.max())
  p /= p.sum()
  np.testing.assert_allclose(
    out[0, 0, 0], p @ np.asarray(v[0, 0, vis]), atol=1e-5
  )


# ---------------------------------------------------------------------------
# Bad input.


def test_bad_tokens_raise():
  config, params, tokens = _setup("llama")
  cache = kvjax.init_cache(config, 2, 32)
  with pytest.raises(TypeError, match="tokens must be an integer"):
    kvjax.forward(params, tokens.astype(jnp.float32), cache, config=config)
  with pytest.raises(ValueError, match=r"tokens must have shape \[B, T\]"):
    kvjax.forward(params, tokens[0], cache, config=config)
  with pytest.raises(ValueError, match="token ids must be in"):
    kvjax.forward(
      params, tokens.at[0, 0].set(config.vocab_size), cache, config=config
    )
  with pytest.raises(ValueError, match="batch"):
    kvjax.forward(params, tokens[:1], cache, config=config)
  with pytest.raises(ValueError, match="capture"):
    kvjax.forward(params, tokens, cache, config=config, capture=("nope",))
  with pytest.raises(ValueError, match="token_mask"):
    kvjax.forward(
      params, tokens, cache, config=config, token_mask=jnp.ones((2, 3), bool)
    )


def test_capacity_exceeded_during_decode_raises():
  config, params, tokens = _setup("llama")
  cache = kvjax.init_cache(config, 2, 26)
  _, cache, _ = kvjax.forward(params, tokens, cache, config=config)
  for _ in range(2):
    _, cache, _ = kvjax.forward(params, tokens[:, :1], cache, config=config)
  with pytest.raises(ValueError, match="cache capacity exceeded"):
    kvjax.forward(params, tokens[:, :1], cache, config=config)
  # Under jit the write is dropped, never wrapped around, and it is visible.
  step = jax.jit(kvjax.forward, static_argnames="config")
  _, over, _ = step(params, tokens[:, :1], cache, config=config)
  assert cache_overflowed(over) and not cache_overflowed(cache)
  np.testing.assert_array_equal(over.k, cache.k)


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    kvjax.get_config("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    kvjax.get_config("tiny", dtype="int8")
  with pytest.raises(ValueError, match="Unknown preset"):
    kvjax.get_config("gpt-9")
  with pytest.raises(ValueError, match="rope_type"):
    kvjax.RopeScaling("yarn")
  with pytest.raises(ValueError, match="capacity"):
    kvjax.init_cache(kvjax.get_config("tiny"), 2, 0)


def test_init_out_std_sets_only_the_residual_output_matrices():
  cfg = kvjax.ModelConfig(
    vocab_size=64,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=32,
  )
  key = jax.random.key(0)
  base = model_lib.init_params(cfg, key, std=0.02)
  zero = model_lib.init_params(cfg, key, std=0.02, out_std=0.0)
  small = model_lib.init_params(cfg, key, std=0.02, out_std=0.001)
  for name, value in zero["layers"].items():
    if name in model_lib.RESIDUAL_OUTPUTS:
      assert float(jnp.abs(value).max()) == 0.0
      np.testing.assert_allclose(
        small["layers"][name], base["layers"][name] * 0.05, rtol=1e-5
      )
    else:
      np.testing.assert_array_equal(value, base["layers"][name])
  np.testing.assert_array_equal(zero["embed"], base["embed"])
  # Zeroed outputs: every block is the identity, the residual is the
  # embedding, so the logits are the LM head of the normed embedding.
  tokens = jnp.array([[3, 5, 7]])
  logits, _, _ = model_lib.forward(
    zero, tokens, kvjax.init_cache(cfg, 1, 3), config=cfg
  )
  x = model_lib.rms_norm(
    zero["embed"][tokens], zero["final_norm"], cfg.norm_eps
  )
  np.testing.assert_allclose(logits, x @ zero["lm_head"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="out_std"):
    model_lib.init_params(cfg, key, out_std=-1.0)


def test_one_tap_list_serves_capture_intervention_and_compression():
  """Every replaceable tap of `TAPS` can be replaced by `intervene`, the
  capture shows the replacement, and the compression context is derived
  from the same list."""
  config, params, tokens = _setup("llama", T=6)
  names = tuple(t.name for t in model_lib.TAPS)
  assert names == model_lib.CAPTURE_NAMES and len(set(names)) == len(names)
  fields = kvjax.compress.CompressContext._fields
  assert set(model_lib.COMPRESS_TAPS) <= set(fields)
  cache = kvjax.init_cache(config, 2, 6)
  plain = kvjax.forward(params, tokens, cache, config=config)
  for name in model_lib.INTERVENE_NAMES:

    def fill(layer, tap, value, name=name):
      return jnp.full_like(value, 0.5) if tap == name else value

    out = kvjax.forward(
      params, tokens, cache, config=config, capture=(name,), intervene=fill
    )
    np.testing.assert_array_equal(out.aux[name], 0.5)
    assert not np.allclose(out.logits, plain.logits), name
    if name == "k":  # replaced before the write: the cache stores it
      np.testing.assert_array_equal(out.cache.k, 0.5)
  with pytest.raises(ValueError, match="shape and dtype: v is"):
    kvjax.forward(
      params,
      tokens,
      kvjax.init_cache(config, 2, 6),
      config=config,
      intervene=lambda l, n, v: v[:, :, :1] if n == "v" else v,
    )
