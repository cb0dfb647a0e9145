"""Codecs: packing, error bounds, KIVI's residual window, exact bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax.cache import CodedKV, TailedKV, payload_bytes
from kvjax.compress import codecs

CONFIG = kvjax.get_config("tiny")  # H = 32, float32
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
TOKENS = jax.random.randint(jax.random.key(1), (2, 200), 1, CONFIG.vocab_size)
LENGTHS = jnp.array([200, 150])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
  codes = jax.random.randint(jax.random.key(bits), (3, 5, 64), 0, 2**bits)
  codes = codes.astype(jnp.uint8)
  packed = codecs.pack_bits(codes, bits)
  assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(codecs.unpack_bits(packed, bits, 64), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [8, 32])
def test_int_codec_error_is_within_half_a_step(bits, group):
  x = jax.random.normal(jax.random.key(0), (4, 7, 32)) * 3
  codec = codecs.int_codec(bits, group, 32)
  enc = codec.encode(x, {})
  err = np.abs(np.asarray(codec.decode(enc, {}) - x))
  step = np.repeat(np.asarray(enc["scale"], np.float32), group, -1)
  # Half a step, plus float16 rounding of the zero point and scale.
  assert (err <= step / 2 + 2e-3 * np.abs(np.asarray(x)) + 2e-3).all()
  assert codec.bits(32) == bits + 32 / group


def test_fp8_codec_relative_error():
  x = jax.random.normal(jax.random.key(0), (64, 32)) * 100
  codec = codecs.fp8_codec()
  xh = codec.decode(codec.encode(x, {}), {})
  rel = np.abs(np.asarray(xh - x)) / np.abs(np.asarray(x)).max(
    -1, keepdims=True
  )
  assert rel.max() < 2**-4  # e4m3: 3 mantissa bits
  assert np.isfinite(np.asarray(xh)).all()


@pytest.mark.parametrize(
  "make", [lambda: compress.uniform(4), lambda: compress.fp8()]
)
def test_coded_cache_runs_decode_and_encodes_new_entries(make):
  transform = make()
  ref = kvjax.generate(
    PARAMS, TOKENS, config=CONFIG, max_new_tokens=6, prompt_lengths=LENGTHS
  )
  out = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=6,
    prompt_lengths=LENGTHS,
    transform=transform,
  )
  assert isinstance(out.cache.k, CodedKV) and isinstance(out.cache.v, CodedKV)
  # Greedy tokens at 4-8 bits mostly agree with the uncompressed run.
  assert (np.asarray(out.tokens) == np.asarray(ref.tokens)).mean() >= 0.5
  assert np.isfinite(np.asarray(out.prompt_logits)).all()


def test_kivi_layout_after_prefill():
  R, G = 64, 16
  _, full = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS)
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=compress.kivi(2, G, R),
  )
  assert isinstance(cache.k, TailedKV)
  sc = cache.k.code_slots
  assert sc == (200 // R) * R and cache.capacity == sc + R
  for b, n in enumerate([200, 150]):
    q = (n // R) * R
    assert int(cache.end[b]) == sc + n - q
    valid = np.asarray(cache.valid[0, b, 0])
    pos = np.asarray(cache.pos[0, b, 0])
    assert sorted(pos[valid].tolist()) == list(range(n))
    # The tail holds the newest n - q entries exactly.
    tail = np.asarray(cache.k.tail[:, b])
    np.testing.assert_array_equal(
      tail[:, :, : n - q], np.asarray(full.k[:, b, :, q:n])
    )
    # The code region is KIVI's per-channel quantization of the first q.
    want = codecs.dequantize_channels(
      codecs.quantize_channels(full.k[:, b : b + 1, :, :sc], 2, G), 2, G, 32
    )
    got = cache.k.code.decode_layers()[:, b : b + 1]
    np.testing.assert_allclose(got[:, :, :, :q], want[:, :, :, :q], atol=1e-6)


def test_kivi_flushes_the_tail_during_decode():
  R = 32
  transform = compress.kivi(4, 16, R)
  out = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=70,
    prompt_lengths=LENGTHS,
    transform=transform,
  )
  cache = out.cache
  sc = cache.k.code_slots
  for b, n in enumerate([200, 150]):
    total = n + 69  # entries written: prompt + fed-back tokens
    valid = np.asarray(cache.valid[:, b])
    pos = np.asarray(cache.pos[:, b])
    for l in range(CONFIG.num_layers):
      for h in range(CONFIG.num_kv_heads):
        assert sorted(pos[l, h][valid[l, h]].tolist()) == list(range(total))
    in_tail = valid[:, :, sc:].sum(-1)
    assert (in_tail == total % R).all() and (in_tail < R).all()
  # Layer-0 keys depend on tokens and positions only, so they can be
  # recomputed in float: every flushed block must be exactly KIVI's
  # per-channel quantization of those keys.
  decoded = np.asarray(cache.k.code.decode_layers()[0])  # [B, K, sc, H]
  for b, n in enumerate([200, 150]):
    seq = jnp.concatenate([TOKENS[b, :n], out.tokens[b, :69]])[None]
    _, _, aux = kvjax.forward(
      PARAMS,
      seq,
      kvjax.init_cache(CONFIG, 1, n + 69),
      config=CONFIG,
      capture=("k",),
    )
    k0 = jnp.moveaxis(aux["k"][0], 1, 2)  # [1, K, n + 69, H]
    q_end = ((n + 69) // R) * R
    want = codecs.dequantize_channels(
      codecs.quantize_channels(k0[:, :, :q_end], 4, 16), 4, 16, 32
    )[0]
    order = np.asarray(cache.pos[0, b])  # slot -> position
    for h in range(CONFIG.num_kv_heads):
      slots = np.nonzero((order[h, :sc] >= 0))[0]
      np.testing.assert_allclose(
        decoded[b, h, slots], np.asarray(want[h])[order[h, slots]], atol=2e-5
      )


def test_kivi_bytes_match_nominal_bits():
  """Payload = codes + float16 statistics + full-precision tail, exactly."""
  tokens = jax.random.randint(jax.random.key(2), (1, 1024), 1, 512)
  H, L, K = 32, CONFIG.num_layers, CONFIG.num_kv_heads
  for bits, G, R in [(2, 32, 128), (4, 32, 128), (2, 16, 64)]:
    transform = compress.kivi(bits, G, R)
    _, cache = kvjax.prefill(PARAMS, tokens, config=CONFIG, transform=transform)
    sc = cache.k.code_slots
    key_bits, value_bits = transform.bits(H)
    assert key_bits == value_bits == bits + 32 / G
    nominal = L * K * (sc * H * (key_bits + value_bits) / 8 + 2 * R * H * 4)
    assert payload_bytes(cache) == pytest.approx(nominal, rel=0.10)
    assert payload_bytes(cache) == nominal  # and in fact exactly


def test_eviction_then_quantization_multiplies_savings():
  tokens = jax.random.randint(jax.random.key(3), (2, 1024), 1, 512)
  run = lambda t: kvjax.prefill(PARAMS, tokens, config=CONFIG, transform=t)[1]
  full = payload_bytes(run(None))
  snap = payload_bytes(run(compress.snapkv(0.5)))
  int4 = payload_bytes(run(compress.uniform(4)))
  both = payload_bytes(
    run(compress.chain(compress.snapkv(0.5), compress.uniform(4)))
  )
  assert snap / full == pytest.approx(0.5)
  assert both / full == pytest.approx((snap / full) * (int4 / full))
  kivi_cache = run(compress.kivi(2))
  kivi = payload_bytes(kivi_cache)
  snap_kivi = payload_bytes(
    run(compress.chain(compress.snapkv(0.5), compress.kivi(2)))
  )
  # KIVI's full-precision residual window is a fixed R = 128 slots, not a
  # fraction: eviction halves the quantized region, the window stays.
  tail = 2 * kivi_cache.k.tail.size * kivi_cache.k.tail.dtype.itemsize
  assert snap_kivi - tail == (snap / full) * (kivi - tail)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: compress.uniform(3), "bits=3 is not supported"),
    (lambda: compress.kivi(bits=5), "bits=5 is not supported"),
    (lambda: compress.kivi(2, group_size=32, residual=48), "multiple"),
  ],
)
def test_bad_codec_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_codec_misuse_raises():
  with pytest.raises(ValueError, match="group_size must divide"):
    kvjax.prefill(
      PARAMS, TOKENS, config=CONFIG, transform=compress.uniform(4, group_size=5)
    )
  with pytest.raises(ValueError, match="already coded"):
    kvjax.prefill(
      PARAMS,
      TOKENS,
      config=CONFIG,
      transform=compress.chain(compress.uniform(4), compress.fp8()),
    )
  with pytest.raises(ValueError, match="float keys"):
    kvjax.prefill(
      PARAMS,
      TOKENS,
      config=CONFIG,
      transform=compress.chain(compress.uniform(4), compress.knorm(0.5)),
    )
  with pytest.raises(ValueError, match="evict before quantizing"):
    kvjax.prefill(
      PARAMS,
      TOKENS,
      config=CONFIG,
      transform=compress.chain(compress.kivi(2, 32, 32), compress.random(0.5)),
    )
  with pytest.raises(ValueError, match="float entries"):
    codecs._to_coded(jnp.zeros((2, 3)), codecs.fp8_codec(), {})


def test_lowrank_is_exact_at_full_rank_and_scores_in_the_subspace():
  _, full = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS)
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=compress.lowrank(32),
  )
  valid = np.asarray(full.valid)
  np.testing.assert_allclose(
    np.asarray(cache.k.decode_layers())[valid],
    np.asarray(full.k)[valid],
    atol=2e-2,
  )
  _, low = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=compress.lowrank(8),
  )
  assert payload_bytes(low) < payload_bytes(cache) / 3
  layer = jax.tree.map(lambda x: x[0], low)
  q = jax.random.normal(jax.random.key(0), (2, 2, CONFIG.num_heads, 32))
  kw = dict(q_pos=jnp.full((2, 2), 300), k_pos=layer.pos, k_valid=layer.valid)
  out = kvjax.reference_attention(q, layer.k, layer.v, **kw).out
  ref = kvjax.reference_attention(
    q, layer.k.decode(), layer.v.decode(), **kw
  ).out
  np.testing.assert_allclose(out, ref, atol=1e-4)
  with pytest.raises(ValueError, match="rank"):
    compress.lowrank(0)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_uniform_with_a_residual_window_per_token_or_channel(axis):
  transform = compress.uniform(4, group_size=16, axis=axis, residual=32)
  _, full = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS)
  _, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS, transform=transform
  )
  sc = cache.v.code_slots
  got = np.asarray(cache.v.code.decode_layers())[:, 0, :, :192]
  if axis == "channel":
    want = codecs.dequantize_channels(
      codecs.quantize_channels(full.v[:, :1, :, :192], 4, 16), 4, 16, 32
    )[:, 0]
  else:
    c = codecs.int_codec(4, 16, 32)
    want = c.decode(c.encode(full.v[:, 0, :, :192], {}), {})
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert sc == 192 and transform.bits(32) == (4 + 2, 4 + 2)
  out = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=40,
    prompt_lengths=LENGTHS,
    transform=transform,
  )
  assert np.isfinite(np.asarray(out.prompt_logits)).all()
  with pytest.raises(ValueError, match="needs residual"):
    compress.uniform(4, axis="channel")
