"""kvjax.nn: the NNX Decoder equals `kvjax.forward`, converts 1:1 to the
functional params, generates with compression under `nnx.jit`, and
`CachedAttention` serves a hand-written NNX model with a compacted cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")  # the `nn` extra
from flax import nnx  # pylint: disable=g-import-not-at-top

import kvjax  # pylint: disable=g-import-not-at-top
from kvjax import compress  # pylint: disable=g-import-not-at-top
from kvjax import nn as knn  # pylint: disable=g-import-not-at-top

# A plain Llama-style config and one with every switch (Qwen2 biases, Qwen3
# q/k norm, output bias, tied embeddings, llama3 rope scaling, a window).
LLAMA = kvjax.ModelConfig(
  vocab_size=64,
  d_model=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  name="nn-llama",
)
EVERY_SWITCH = LLAMA.replace(
  qkv_bias=True,
  qk_norm=True,
  o_bias=True,
  tie_embeddings=True,
  sliding_window=6,
  rope_scaling=kvjax.RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
  name="nn-every-switch",
)
CONFIGS = pytest.mark.parametrize(
  "config", [LLAMA, EVERY_SWITCH], ids=lambda c: c.name
)


# Inputs and params are drawn with NumPy: an eager or jitted jax draw
# compiles programs, which would dominate these small tests' time.
def _params(config, seed=0):
  """kvjax params for `config`: N(0, 0.2) matrices, norms 1 + N(0, 0.2)."""
  rng = np.random.default_rng(seed)

  def draw(path, sds):
    x = 0.2 * rng.standard_normal(sds.shape)
    if "norm" in jax.tree_util.keystr(path):
      x += 1.0
    return jnp.asarray(x.astype(sds.dtype))

  return jax.tree.map_with_path(draw, kvjax.model.param_shapes(config))


def _rngs(seed):
  """nnx.Rngs on the "rbg" PRNG: its eager draws compile faster than
  threefry's (initialization is not what these tests check)."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _tokens(config, B, T, seed=1):
  return np.random.default_rng(seed).integers(
    1, config.vocab_size, (B, T), dtype=np.int32
  )


def _mask(lengths, T):
  return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def _assert_trees_equal(a, b):
  """Same tree structure and every leaf bit-equal (values and dtype)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@nnx.jit(static_argnames=("capture",))
def _decoder_step(decoder, tokens, cache, token_mask, capture=()):
  return decoder(tokens, cache, token_mask=token_mask, capture=capture)


@jax.jit(static_argnames=("config", "capture"))
def _forward_step(params, tokens, cache, token_mask, config, capture=()):
  return kvjax.forward(
    params, tokens, cache, config=config, token_mask=token_mask, capture=capture
  )


# ----------------------------------------------------------------------------
# Decoder == kvjax.forward.


@CONFIGS
def test_decoder_logits_equal_forward_prefill_and_decode(config):
  params = _params(config)
  decoder = knn.Decoder.from_params(params, config)
  B, T = 3, 9
  tokens = _tokens(config, B, T)
  lengths = np.array([9, 5, 7])
  mask = _mask(lengths, T)  # ragged, right padded
  cache = kvjax.init_cache(config, B, 16)
  # The decoder captures every tap forward does.
  assert set(knn.DECODER_TAPS) == set(kvjax.model.CAPTURE_NAMES)
  capture = ("q", "attn_mass", "resid", "final_norm")
  want = _forward_step(params, tokens, cache, mask, config, capture)
  got = _decoder_step(decoder, tokens, cache, mask, capture)
  live = mask[..., None]
  np.testing.assert_allclose(
    np.where(live, got.logits, 0),
    np.where(live, want.logits, 0),
    rtol=1e-6,
    atol=1e-6,
  )
  assert set(got.aux) == set(capture)
  for name in capture:
    np.testing.assert_allclose(
      got.aux[name], want.aux[name], rtol=1e-6, atol=1e-6, err_msg=name
    )
  np.testing.assert_array_equal(got.cache.pos, want.cache.pos)
  np.testing.assert_array_equal(got.cache.end, lengths)
  np.testing.assert_allclose(got.cache.k, want.cache.k, rtol=1e-6, atol=1e-6)

  # A decode step from each one's own cache; row 1 is padding this step.
  step = _tokens(config, B, 1, seed=2)
  step_mask = np.array([[True], [False], [True]])
  want = _forward_step(params, step, want.cache, step_mask, config)
  got = _decoder_step(decoder, step, got.cache, step_mask)
  np.testing.assert_allclose(
    got.logits[step_mask[:, 0]],
    want.logits[step_mask[:, 0]],
    rtol=1e-6,
    atol=1e-6,
  )
  np.testing.assert_array_equal(got.cache.end, [10, 5, 8])
  np.testing.assert_array_equal(got.cache.length, want.cache.length)


# ----------------------------------------------------------------------------
# 1:1 conversion.


@CONFIGS
def test_params_to_nnx_to_params_is_exact(config):
  params = _params(config, seed=3)
  back = knn.Decoder.from_params(params, config).to_params()
  _assert_trees_equal(back, params)
  # No copy: the decoder wraps the very arrays.
  assert all(
    x is y
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True)
  )


@CONFIGS
def test_nnx_to_params_to_nnx_is_exact(config):
  decoder = knn.Decoder(config, rngs=_rngs(4))
  params = decoder.to_params()
  checks_ok = kvjax.model.param_shapes(config)
  assert jax.tree.structure(params) == jax.tree.structure(checks_ok)
  again = knn.Decoder.from_params(params, config)
  graph_a, state_a = nnx.split(decoder)
  graph_b, state_b = nnx.split(again)
  assert graph_a == graph_b
  _assert_trees_equal(nnx.to_pure_dict(state_b), nnx.to_pure_dict(state_a))


# ----------------------------------------------------------------------------
# Generation with compression.


@nnx.jit(static_argnames=("transform", "max_new_tokens"))
def _nnx_generate(decoder, tokens, lengths, transform, max_new_tokens):
  return knn.generate(
    decoder,
    tokens,
    prompt_lengths=lengths,
    transform=transform,
    max_new_tokens=max_new_tokens,
  )


def _snapkv_kivi():
  """Evict half (SnapKV), then quantize to 2 bits (KIVI, small blocks)."""
  return compress.chain(
    compress.snapkv(ratio=0.5, window_size=4),
    compress.kivi(bits=2, group_size=4, residual=8),
  )


def test_nnx_jit_generate_with_transform_matches_and_compiles_once(
  count_compiles,
):
  config = LLAMA
  params = _params(config)
  decoder = knn.Decoder.from_params(params, config)
  tokens, lengths = _tokens(config, 2, 40), np.array([40, 33])
  want = kvjax.generate(
    params,
    tokens,
    config=config,
    max_new_tokens=6,
    prompt_lengths=lengths,
    transform=_snapkv_kivi(),
  )
  got = _nnx_generate(decoder, tokens, lengths, _snapkv_kivi(), 6)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.num_generated, want.num_generated)
  assert got.cache.capacity < 40  # compacted
  with count_compiles() as c:
    again = _nnx_generate(
      decoder,
      _tokens(config, 2, 40, seed=5),
      np.array([31, 40]),
      _snapkv_kivi(),
      6,
    )
    eager = knn.generate(
      decoder,
      tokens,
      prompt_lengths=lengths,
      transform=_snapkv_kivi(),
      max_new_tokens=6,
    )
  assert c["n"] == 0, f"a freshly built equal transform compiled {c['n']}"
  assert again.tokens.shape == (2, 6)
  np.testing.assert_array_equal(eager.tokens, want.tokens)


def test_decoder_captures_drive_compress_cache_like_prefill():
  """The Decoder's own prompt pass + captures, compressed by
  `compress_cache`, is `prefill(transform=...)`; both decode the same."""
  config = LLAMA
  params = _params(config)
  decoder = knn.Decoder.from_params(params, config)
  tokens, lengths = _tokens(config, 2, 32), np.array([32, 27])
  t = _snapkv_kivi()
  want = knn.prefill(
    decoder, tokens, prompt_lengths=lengths, transform=t, capacity=34
  )
  mask = _mask(lengths, 32)
  _, cache, aux = _decoder_step(
    decoder, tokens, kvjax.init_cache(config, 2, 34), mask, ("q", "attn_mass")
  )
  got = kvjax.compress_cache(
    cache,
    t,
    config=config,
    observed=aux,
    positions=np.cumsum(mask, axis=1) - 1,
    mask=mask,
    reserve=2,
  )
  np.testing.assert_array_equal(got.pos, want.cache.pos)
  np.testing.assert_array_equal(got.valid, want.cache.valid)
  # The Decoder reads the compacted, coded cache as forward does.
  step, ones = _tokens(config, 2, 1, seed=6), np.ones((2, 1), bool)
  a = _decoder_step(decoder, step, got, ones)
  b = _forward_step(params, step, want.cache, ones, config)
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
  # And kvjax's decode loop continues it from the decoder's weights.
  nn_out = knn.decode(decoder, want.cache, step[:, 0], max_new_tokens=2)
  ref = kvjax.decode(
    params, want.cache, step[:, 0], config=config, max_new_tokens=2
  )
  np.testing.assert_array_equal(nn_out.tokens, ref.tokens)


# ----------------------------------------------------------------------------
# CachedAttention in someone else's model.


class _Block(nnx.Module):
  def __init__(self, d, geometry, *, rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = knn.CachedAttention(d, geometry, qkv_bias=True, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)


class _TinyLM(nnx.Module):
  """A GELU/LayerNorm model kvjax did not build, a list of blocks."""

  def __init__(self, vocab, d, geometry, num_layers, *, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List(
      [_Block(d, geometry, rngs=rngs) for _ in range(num_layers)]
    )
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens, cache, token_mask, capture=()):
    x, aux = self.embed(tokens), []
    for i, block in enumerate(self.blocks):
      y, cache, a = block.attn(
        block.norm1(x), cache, layer=i, token_mask=token_mask, capture=capture
      )
      x = x + y
      x = x + block.down(nnx.gelu(block.up(block.norm2(x))))
      aux.append(a)
    cache = kvjax.cache.advance(cache, token_mask)
    return (
      self.head(x),
      cache,
      {n: jnp.stack([a[n] for a in aux]) for n in capture},
    )


@nnx.jit(static_argnames=("capture",))
def _lm_step(model, tokens, cache, token_mask, capture=()):
  return model(tokens, cache, token_mask, capture)


def test_cached_attention_in_a_handwritten_model_with_a_compacted_cache():
  geometry = kvjax.AttentionGeometry(num_heads=4, num_kv_heads=2, head_dim=8)
  V, D, L, B, T = 48, 32, 2, 2, 24
  model = _TinyLM(V, D, geometry, L, rngs=_rngs(0))
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, V, (B, T), dtype=np.int32)
  mask = _mask([24, 19], T)
  full = kvjax.init_cache(geometry, B, T + 2, num_layers=L, dtype="float32")
  _, full, aux = _lm_step(model, tokens, full, mask, ("q", "attn_mass"))
  assert aux["q"].shape == (L, B, T, 4, 8)
  # compress_cache checks the cache against a ModelConfig: this model's
  # attention geometry and depth (the other fields are not read).
  shape = kvjax.ModelConfig(
    vocab_size=V,
    d_model=D,
    num_layers=L,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=2 * D,
  )
  small = kvjax.compress_cache(
    full,
    compress.snapkv(ratio=0.5, window_size=4),
    config=shape,
    observed=aux,
    positions=np.cumsum(mask, axis=1) - 1,
    mask=mask,
    reserve=2,
  )
  assert small.capacity < full.capacity
  kept_counts = np.asarray(small.valid).sum(-1)  # [L, B, K]
  assert (kept_counts < np.array([24, 19])[None, :, None]).all()

  # Reference: the full cache with the evicted entries marked invalid.
  kept = np.zeros(np.shape(full.valid), bool)
  pos_f, pos_s = np.asarray(full.pos), np.asarray(small.pos)
  valid_s = np.asarray(small.valid)
  for idx in np.ndindex(kept.shape[:3]):
    kept[idx] = np.isin(pos_f[idx], pos_s[idx][valid_s[idx]])
  masked = full._replace(valid=full.valid & jnp.asarray(kept))
  ones = np.ones((B, 1), bool)
  for _ in range(2):  # two steps into the compacted cache's reserve
    step = rng.integers(0, V, (B, 1), dtype=np.int32)
    got, small, _ = _lm_step(model, step, small, ones)
    want, masked, _ = _lm_step(model, step, masked, ones)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(small.length, [26, 21])
  assert not kvjax.cache.cache_overflowed(small)


# ----------------------------------------------------------------------------
# Bad inputs.


def _attn_and_cache():
  geometry = kvjax.AttentionGeometry(num_heads=4, num_kv_heads=2, head_dim=8)
  # Abstract parameters suffice: the checks run before any compute.
  attn = nnx.eval_shape(
    lambda: knn.CachedAttention(16, geometry, rngs=nnx.Rngs(0))
  )
  cache = kvjax.init_cache(geometry, 2, 8, num_layers=2, dtype="float32")
  return attn, cache, np.ones((2, 3, 16), np.float32)


def test_cached_attention_rejects_bad_arguments():
  geometry = kvjax.AttentionGeometry(num_heads=4, num_kv_heads=2, head_dim=8)
  with pytest.raises(ValueError, match="d_model"):
    knn.CachedAttention(0, geometry, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="AttentionGeometry"):
    knn.CachedAttention(16, {"num_heads": 4}, rngs=nnx.Rngs(0))
  attn, cache, x = _attn_and_cache()
  with pytest.raises(TypeError, match="cache must be a kvjax KVCache"):
    attn(x, cache.k, layer=0)
  with pytest.raises(ValueError, match=r"x must be \[B, T, D=16\]"):
    attn(np.ones((2, 3, 12), np.float32), cache, layer=0)
  with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
    attn(x, cache, layer=2)
  with pytest.raises(ValueError, match="token_mask must be"):
    attn(x, cache, layer=0, token_mask=np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="capture must be"):
    attn(x, cache, layer=0, capture=("attn_out",))
  other = kvjax.init_cache(
    kvjax.AttentionGeometry(4, 1, 8), 2, 8, num_layers=2, dtype="float32"
  )
  with pytest.raises(ValueError, match="kv heads"):
    attn(x, other, layer=0)
  with pytest.raises(ValueError, match="capacity exceeded"):
    attn(np.ones((2, 9, 16), np.float32), cache, layer=0)


def test_decoder_and_generate_reject_bad_arguments():
  params = _params(LLAMA)
  with pytest.raises(TypeError, match="config must be a kvjax ModelConfig"):
    knn.Decoder.from_params(params, "tiny")
  with pytest.raises(TypeError, match="params must be"):
    knn.Decoder.from_params([params], LLAMA)
  with pytest.raises(
    ValueError, match=r"params\['layers'\]\['\w+'\] has shape"
  ):
    knn.Decoder.from_params(params, LLAMA.replace(head_dim=4))
  decoder = knn.Decoder.from_params(params, LLAMA)
  tokens = _tokens(LLAMA, 2, 4)
  with pytest.raises(ValueError, match="cache has 1 layers"):
    decoder(tokens, kvjax.init_cache(LLAMA.replace(num_layers=1), 2, 8))
  cache = kvjax.init_cache(LLAMA, 2, 8)
  with pytest.raises(ValueError, match="capture must be"):
    decoder(tokens, cache, capture=("nope",))
  with pytest.raises(ValueError, match="token_mask must have shape"):
    decoder(tokens, cache, token_mask=np.ones((2, 5), bool))
  with pytest.raises(TypeError, match="decoder must be a kvjax.nn.Decoder"):
    knn.generate(params, tokens, max_new_tokens=2)
  with pytest.raises(TypeError, match="config comes from the decoder"):
    knn.prefill(decoder, tokens, config=LLAMA)
