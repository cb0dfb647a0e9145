"""TurboQuant and QJL: the paper's figures, unbiasedness, code-space scores,
packing, and exact bytes in a cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax.cache import CodedKV, payload_bytes
from kvjax.compress import packing
from kvjax.compress import rotated

D = 128


def _unit(key, n, d=D):
  x = jax.random.normal(key, (n, d))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_any_width_round_trip(bits):
  codes = jax.random.randint(jax.random.key(bits), (3, 64), 0, 2**bits)
  packed = packing.pack_bits(codes, bits)
  assert packed.shape == (3, 8 * bits)
  np.testing.assert_array_equal(packing.unpack_bits(packed, bits, 64), codes)


def test_lloyd_max_codebooks_match_the_paper():
  c1 = rotated.lloyd_max_codebook(D, 1) * math.sqrt(D)
  np.testing.assert_allclose(np.abs(c1), math.sqrt(2 / math.pi), rtol=0.01)
  c2 = rotated.lloyd_max_codebook(D, 2) * math.sqrt(D)
  np.testing.assert_allclose(np.abs(c2), [1.51, 0.453, 0.453, 1.51], rtol=0.01)


@pytest.mark.parametrize(
  "bits,paper", [(1, 0.361), (2, 0.116), (3, 0.034), (4, 0.0093)]
)
def test_mse_distortion_matches_the_paper(bits, paper):
  x = _unit(jax.random.key(0), 4000)
  rot = rotated.random_rotation(jax.random.key(1), D)
  xh = rotated.mse_decode(rotated.mse_encode(x, rot, bits), rot, bits)
  dist = float(jnp.mean(jnp.sum((x - xh) ** 2, -1)))
  assert dist == pytest.approx(paper, rel=0.10)


def _prod_errors(bits, draws=24, pairs=128, seed=0):
  """Errors of <q, k> estimates over random unit pairs, with `draws`
  independent rotations and projections (`pairs` pairs each)."""

  def one(key):
    kq, kk, kr, ks = jax.random.split(key, 4)
    q, k = _unit(kq, pairs), _unit(kk, pairs)
    rot = rotated.random_rotation(kr, D)
    proj = jax.random.normal(ks, (D, D))
    enc = rotated.prod_encode(k, rot, proj, bits)
    est = (
      jnp.einsum("nm,nm->n", q @ rot.T, rotated._centroids(enc, bits - 1, D))
      if bits > 1
      else 0.0
    )
    sq = q @ proj.T
    est = est + jnp.einsum("nd,nd->n", sq, rotated._signs(enc, D)) * (
      math.sqrt(math.pi / 2) / D
    ) * enc["rnorm"].astype(jnp.float32)
    return est * enc["norm"].astype(jnp.float32) - jnp.sum(q * k, -1)

  keys = jax.random.split(jax.random.key(seed), draws)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64).ravel()


@pytest.mark.parametrize(
  "bits,paper", [(1, 1.54), (2, 0.56), (3, 0.18), (4, 0.055)]
)
def test_prod_is_unbiased_with_the_papers_variance(bits, paper):
  err = _prod_errors(bits)
  se = err.std() / math.sqrt(err.size)
  assert abs(err.mean()) < 4 * se  # indistinguishable from 0
  assert err.var() * D == pytest.approx(paper, rel=0.15)


def test_scores_equal_inner_products_with_the_decoded_keys():
  q = jax.random.normal(jax.random.key(0), (2, 3, 5, D))  # [B, K, M, H]
  k = jax.random.normal(jax.random.key(1), (2, 3, 7, D))  # [B, K, S, H]
  rot = rotated.random_rotation(jax.random.key(2), D)
  proj = jax.random.normal(jax.random.key(3), (D, D))
  for bits in (1, 3):
    enc = rotated.mse_encode(k, rot, bits)
    np.testing.assert_allclose(
      rotated.mse_scores(q, enc, rot, bits),
      jnp.einsum("bkmh,bksh->bkms", q, rotated.mse_decode(enc, rot, bits)),
      rtol=1e-4,
      atol=1e-4,
    )
    enc = rotated.prod_encode(k, rot, proj, bits)
    np.testing.assert_allclose(
      rotated.prod_scores(q, enc, rot, proj, bits),
      jnp.einsum(
        "bkmh,bksh->bkms", q, rotated.prod_decode(enc, rot, proj, bits)
      ),
      rtol=1e-4,
      atol=1e-4,
    )
  proj = jax.random.normal(jax.random.key(4), (256, D))
  enc = rotated.qjl_encode(k, proj)
  np.testing.assert_allclose(
    rotated.qjl_scores(q, enc, proj),
    jnp.einsum("bkmh,bksh->bkms", q, rotated.qjl_decode(enc, proj)),
    rtol=1e-4,
    atol=1e-4,
  )


def test_qjl_is_unbiased():
  n, m = 3000, 256
  q, k = _unit(jax.random.key(5), n), _unit(jax.random.key(6), n)

  def one(key, qi, ki):
    proj = jax.random.normal(key, (m, D))
    return (
      rotated.qjl_scores(qi[None], rotated.qjl_encode(ki[None], proj), proj)[
        0, 0
      ]
      - qi @ ki
    )

  err = np.asarray(
    jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), n), q, k),
    np.float64,
  )
  assert abs(err.mean()) < 4 * err.std() / math.sqrt(n)
  # Var = (pi/2 - <q,k>^2 ...) / m at most pi/(2m) for unit vectors.
  assert err.var() < math.pi / (2 * m)


CONFIG = kvjax.get_config("tiny", head_dim=128)


@pytest.fixture(scope="module")
def model():
  return kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)


@pytest.mark.parametrize(
  "make,key_bits",
  [
    (lambda: compress.turboquant(3), 3 + 16 / 128),
    (lambda: compress.turboquant(3, "prod"), 3 + 32 / 128),
    (
      lambda: compress.turboquant(2, outlier_channels=32, outlier_bits=3),
      (96 * 2 + 32 * 3 + 32) / 128,
    ),
    (lambda: compress.qjl(256), (256 + 16) / 128),
  ],
)
def test_cache_bytes_match_nominal_bits(model, make, key_bits):
  transform = make()
  tokens = jax.random.randint(jax.random.key(1), (1, 1024), 1, 512)
  _, full = kvjax.prefill(model, tokens, config=CONFIG)
  _, cache = kvjax.prefill(model, tokens, config=CONFIG, transform=transform)
  assert isinstance(cache.k, CodedKV) and cache.k.codec.scores is not None
  kb, vb = transform.bits(128)
  assert kb == pytest.approx(key_bits)
  slots = CONFIG.num_layers * CONFIG.num_kv_heads * 1024 * 128
  nominal = slots * (kb + vb) / 8
  shared = sum(
    x.nbytes for x in jax.tree.leaves((cache.k.shared, cache.v.shared))
  )
  assert payload_bytes(cache) - shared == nominal  # codes + norms, exactly
  assert payload_bytes(cache) == pytest.approx(nominal, rel=0.10)
  assert payload_bytes(cache) < payload_bytes(full) * (kb + vb) / 64 * 1.1


@pytest.mark.parametrize(
  "make",
  [
    lambda: compress.turboquant(3, "prod"),
    lambda: compress.turboquant(2),
    lambda: compress.qjl(64),
  ],
)
def test_attention_uses_code_space_scores(model, make):
  """Attention on a coded layer (scores from codes) equals attention over
  the decoded keys."""
  tokens = jax.random.randint(jax.random.key(2), (2, 64), 1, 512)
  _, cache = kvjax.prefill(model, tokens, config=CONFIG, transform=make())
  layer = jax.tree.map(lambda x: x[1], cache)  # one layer, no L axis
  q = jax.random.normal(jax.random.key(3), (2, 3, CONFIG.num_heads, 128))
  kw = dict(q_pos=jnp.full((2, 3), 63), k_pos=layer.pos, k_valid=layer.valid)
  out, _, probs = kvjax.reference_attention(q, layer.k, layer.v, **kw)
  ref, _, ref_probs = kvjax.reference_attention(
    q, layer.k.decode(), layer.v.decode(), **kw
  )
  np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: compress.turboquant(5), "bits=5 is not supported"),
    (lambda: compress.turboquant(0), "bits=0 is not supported"),
    (lambda: compress.qjl(4), "projections"),
  ],
)
def test_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_variant_and_split(model):
  tokens = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="variant"):
    kvjax.prefill(
      model, tokens, config=CONFIG, transform=compress.turboquant(3, "fast")
    )
  with pytest.raises(ValueError, match="outlier_channels"):
    kvjax.prefill(
      model,
      tokens,
      config=CONFIG,
      transform=compress.turboquant(3, outlier_channels=128, outlier_bits=4),
    )


def test_polarquant_bits_and_distortion():
  codec = rotated.polarquant_codec(D)
  assert codec.bits(D) == 3.875  # the paper's 4 levels, 4 + 2 + 2 + 2 bits
  x = _unit(jax.random.key(0), 2000)[:, None, None, :]  # [B, K, S, H] layout
  xh = codec.decode(codec.encode(x, {}), {})
  dist = float(jnp.mean(jnp.sum((x - xh) ** 2, -1)))
  # Between TurboQuant at 3 and 4 bits per coordinate (3.875 bits here).
  assert 0.0093 < dist < 0.034, dist
  fine = rotated.polarquant_codec(D, (8, 8, 8, 8))
  xf = fine.decode(fine.encode(x, {}), {})
  assert float(jnp.max(jnp.abs(x - xf))) < 0.02  # the transform inverts
  with pytest.raises(ValueError, match="divisible"):
    rotated.polarquant_codec(24)


def test_polarquant_in_a_cache(model):
  tokens = jax.random.randint(jax.random.key(1), (1, 256), 1, 512)
  transform = compress.polarquant()
  _, cache = kvjax.prefill(model, tokens, config=CONFIG, transform=transform)
  slots = CONFIG.num_layers * CONFIG.num_kv_heads * 256 * 128
  assert payload_bytes(cache) == slots * 2 * 3.875 / 8
  out = kvjax.generate(
    model, tokens, config=CONFIG, max_new_tokens=4, transform=transform
  )
  assert np.isfinite(np.asarray(out.prompt_logits)).all()
