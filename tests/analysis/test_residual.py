"""Residual-stream diagnostics, write interventions and cache drift."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

import kvjax
from kvjax import model as model_lib
from kvjax.analysis import drift as drift_lib
from kvjax.analysis import residual as res

TINY = kvjax.get_config("tiny")
TIED = kvjax.get_config("tiny", tie_embeddings=True, qk_norm=True)
# A narrow model for exact (T*D) x (T*D) Jacobian checks.
NARROW = kvjax.get_config(
  "tiny", d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64
)
CAPS = ("attn_out", "mlp_out")


@functools.lru_cache(maxsize=None)
def _setup(config=TINY, seed=0, B=2, T=12):
  """Like `init_params(std=0.1)`, drawn with numpy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  init = lambda path, sds: jnp.asarray(
    np.ones(sds.shape)
    if "norm" in jax.tree_util.keystr(path[-1:])
    else 0.1 * rng.standard_normal(sds.shape),
    sds.dtype,
  )
  params = jax.tree.map_with_path(init, model_lib.param_shapes(config))
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, T)), jnp.int32)
  return params, tokens


@functools.partial(jax.jit, static_argnames=("config", "capture", "intervene"))
def _run(params, tokens, *, config, capture=(), intervene=None):
  B, T = tokens.shape
  return model_lib.forward(
    params,
    tokens,
    kvjax.init_cache(config, B, T),
    config=config,
    capture=capture,
    intervene=intervene,
  )[::2]  # (logits, aux)


# ----------------------------------------------------------------------------
# forward(intervene=...).


def test_identity_intervene_is_bit_identical_and_zeroing_changes_logits():
  params, tokens = _setup()
  caps = CAPS
  clean, aux = _run(params, tokens, config=TINY, capture=caps)
  same, aux_same = _run(
    params,
    tokens,
    config=TINY,
    capture=caps,
    intervene=lambda layer, name, value: value,
  )
  np.testing.assert_array_equal(same, clean)
  np.testing.assert_array_equal(aux_same["mlp_out"], aux["mlp_out"])

  def zero_attn_at_1(layer, name, value):
    if name != "attn_out":
      return value
    return jnp.where(layer == 1, jnp.zeros_like(value), value)

  hit, aux_hit = _run(
    params, tokens, config=TINY, capture=caps, intervene=zero_attn_at_1
  )
  assert float(jnp.max(jnp.abs(hit - clean))) > 1e-3
  # Captures record the intervened write; layer 0 is untouched.
  assert not np.any(np.asarray(aux_hit["attn_out"][1]))
  np.testing.assert_array_equal(aux_hit["attn_out"][0], aux["attn_out"][0])
  with pytest.raises(TypeError, match="intervene"):
    model_lib.forward(
      params,
      tokens,
      kvjax.init_cache(TINY, 2, 12),
      config=TINY,
      intervene="not callable",
    )


def test_ablating_attention_everywhere_equals_zero_output_projection():
  params, tokens = _setup()
  no_wo = dict(
    params,
    layers=dict(params["layers"], wo=jnp.zeros_like(params["layers"]["wo"])),
  )
  want, _ = _run(no_wo, tokens, config=TINY)
  got, _ = _run(
    params,
    tokens,
    config=TINY,
    intervene=res.intervene_writes("attn", None, "ablate"),
  )
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("mode", ["rotate", "scale", "noise"])
def test_intervention_modes_at_first_layer(mode):
  params, tokens = _setup()
  _, clean = _run(params, tokens, config=TINY, capture=CAPS)
  intervene = res.intervene_writes("mlp", [0], mode, scale=0.5, rng=3)
  _, aux = _run(params, tokens, config=TINY, capture=CAPS, intervene=intervene)
  w, new = np.asarray(clean["mlp_out"][0]), np.asarray(aux["mlp_out"][0])
  norm = lambda x: np.linalg.norm(x, axis=-1)
  if mode == "rotate":  # same per-token norm, different direction
    np.testing.assert_allclose(norm(new), norm(w), rtol=1e-5)
    cos = np.sum(new * w, -1) / (norm(new) * norm(w))
    assert np.max(np.abs(cos)) < 0.6
  elif mode == "scale":
    np.testing.assert_allclose(new, 0.5 * w, rtol=1e-6)
  else:  # noise of exactly 0.5 x the write's norm
    np.testing.assert_allclose(norm(new - w), 0.5 * norm(w), rtol=1e-4)


def test_intervention_damage_known_values():
  params, tokens = _setup()
  answers = jnp.array([[4, 9, -1], [1, 6, 11]])
  positions = res.prediction_positions(answers)
  np.testing.assert_array_equal(positions, [[3, 8, -1], [0, 5, 10]])
  clean, _ = _run(params, tokens, config=TINY)
  targets = jnp.argmax(
    jnp.take_along_axis(clean, jnp.maximum(positions, 0)[..., None], axis=1), -1
  )
  same = res.intervention_damage(
    params, TINY, tokens, lambda l, n, v: v, positions, targets
  )
  assert abs(float(same.kl)) < 1e-7 and float(same.agreement) == 1.0
  assert float(same.clean_accuracy) == float(same.intervened_accuracy) == 1.0

  ablate = res.intervene_writes("attn", None, "ablate")
  hit = res.intervention_damage(
    params, TINY, tokens, ablate, positions, targets
  )
  # Ablating every attention write = zeroing wo (tested above).
  no_wo = dict(
    params,
    layers=dict(params["layers"], wo=jnp.zeros_like(params["layers"]["wo"])),
  )
  intervened, _ = _run(no_wo, tokens, config=TINY)
  rows, cols = np.array([0, 0, 1, 1, 1]), np.array([3, 8, 0, 5, 10])
  p = jax.nn.log_softmax(np.asarray(clean, np.float64)[rows, cols])
  q = jax.nn.log_softmax(np.asarray(intervened, np.float64)[rows, cols])
  kl = np.mean(np.sum(np.exp(p) * (p - q), -1))
  np.testing.assert_allclose(float(hit.kl), kl, rtol=1e-4)
  assert float(hit.kl) > 1e-3
  acc = np.mean(np.argmax(q, -1) == np.asarray(targets)[rows, [0, 1, 0, 1, 2]])
  np.testing.assert_allclose(float(hit.intervened_accuracy), acc)


def test_intervene_writes_rejects_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    res.intervene_writes("ffn")
  with pytest.raises(ValueError, match="mode"):
    res.intervene_writes("attn", mode="shuffle")
  with pytest.raises(ValueError, match="rng"):
    res.intervene_writes("attn", mode="rotate")
  with pytest.raises(ValueError, match="layer"):
    res.intervene_writes("attn", layer=-1)


# ----------------------------------------------------------------------------
# Norms and writes on hand-built arrays.


def test_norm_growth_known_answer():
  L, B, T, D = 2, 2, 3, 4
  scale = np.array([1.0, 2.0, 6.0])  # rms of x_0, x_1, x_2 = final
  x = np.ones((L + 1, B, T, D)) * scale[:, None, None, None]
  mask = np.ones((B, T), bool)
  mask[1, 2] = False
  x[:, 1, 2] = 100.0  # padding must not count
  out = res.norm_growth(x[:L], x[L], mask)
  np.testing.assert_allclose(out.rms, scale, rtol=1e-6)
  np.testing.assert_allclose(out.growth, [2.0, 3.0], rtol=1e-6)
  with pytest.raises(ValueError, match="token_mask"):
    res.norm_growth(x[:L], x[L], mask[:, :2])


def test_write_stats_matches_numpy():
  rng = np.random.default_rng(0)
  L, B, T, D = 2, 2, 3, 5
  x, a, m = (rng.normal(size=(L, B, T, D)) for _ in range(3))
  mask = np.array([[True, True, False], [True, True, True]])
  got = res.write_stats(x, a, m, mask)
  want = {k: np.zeros(L) for k in got._fields}
  cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
  rms = lambda u: np.sqrt(np.mean(u * u))
  toks = [(b, t) for b in range(B) for t in range(T) if mask[b, t]]
  for l in range(L):
    for b, t in toks:
      xi, ai, mi = x[l, b, t], a[l, b, t], m[l, b, t]
      want["resid_rms"][l] += rms(xi) / len(toks)
      want["attn_rms"][l] += rms(ai) / len(toks)
      want["mlp_rms"][l] += rms(mi) / len(toks)
      want["attn_energy"][l] += (ai @ ai) / (xi @ xi) / len(toks)
      want["mlp_energy"][l] += (mi @ mi) / ((xi + ai) @ (xi + ai)) / len(toks)
      want["attn_cos"][l] += cos(ai, xi) / len(toks)
      want["mlp_cos"][l] += cos(mi, xi + ai) / len(toks)
  for name in got._fields:
    np.testing.assert_allclose(
      getattr(got, name), want[name], rtol=1e-5, err_msg=name
    )


# ----------------------------------------------------------------------------
# Logit lens.


@pytest.mark.parametrize("config", [TINY, TIED], ids=["untied", "tied"])
def test_logit_lens_ends_at_the_model_and_starts_at_the_embedding(config):
  params, tokens = _setup(config)
  logits, aux = _run(
    params, tokens, config=config, capture=("resid", "final_hidden")
  )
  positions = jnp.array([[3, 7, -1], [0, 5, 11]])
  rows, cols = np.array([0, 0, 1, 1, 1]), np.array([3, 7, 0, 5, 11])
  final = np.asarray(logits, np.float64)[rows, cols]  # [5, V]
  targets = np.zeros((2, 3), np.int32)
  targets[rows, [0, 1, 0, 1, 2]] = np.argmax(final, -1)
  lens = res.logit_lens(
    params, config, aux["resid"], aux["final_hidden"], positions, targets
  )
  L = config.num_layers
  assert lens.accuracy.shape == (L + 1,)
  assert float(lens.accuracy[L]) == 1.0
  logp = jax.nn.log_softmax(final)
  np.testing.assert_allclose(
    lens.entropy[L], np.mean(-np.sum(np.exp(logp) * logp, -1)), rtol=1e-5
  )
  assert int(lens.predictions[L, 0, 2]) == -1
  # Row 0 reads the embeddings.
  emb = np.asarray(params["embed"], np.float64)[np.asarray(tokens)[rows, cols]]
  emb = emb / np.sqrt(np.mean(emb**2, -1, keepdims=True) + config.norm_eps)
  head = emb @ (
    np.asarray(params["embed"]).T
    if config.tie_embeddings
    else np.asarray(params["lm_head"])
  )
  np.testing.assert_array_equal(
    np.asarray(lens.predictions[0])[rows, [0, 1, 0, 1, 2]], np.argmax(head, -1)
  )


# ----------------------------------------------------------------------------
# Near-null space of the LM head.


@pytest.mark.parametrize("tied", [False, True])
def test_null_space_energy_of_built_vectors(tied):
  config = TINY.replace(tie_embeddings=tied)
  D, V, k = config.d_model, config.vocab_size, 8
  rng = np.random.default_rng(1)
  a = rng.normal(size=(V, D)) / np.sqrt(V)  # full column rank
  q2 = scipy.fft.dct(np.eye(D), norm="ortho", axis=0)  # [D, D] orthogonal
  s = np.concatenate([np.linspace(10.0, 1.0, D - k), np.zeros(k)])
  w = (a * s) @ q2.T  # [V, D] of rank D - k: null space = span(q2[:, -k:])
  g = rng.uniform(0.5, 2.0, size=D)  # final norm weight
  params = {"final_norm": jnp.asarray(g, jnp.float32)}
  params.update(
    {"embed": jnp.asarray(w, jnp.float32)}
    if tied
    else {"lm_head": jnp.asarray(w.T, jnp.float32)}
  )
  null = rng.normal(size=(2, 3, k)) @ q2[:, -k:].T  # [B, T, D]
  row = rng.normal(size=(2, 3, D - k)) @ q2[:, :-k].T
  hidden = np.stack([null, row])  # [L=2, B, T, D]
  out = res.null_space_energy(
    params, config, hidden, k=k, fold_final_norm=False
  )
  np.testing.assert_allclose(out.energy, [1.0, 0.0], atol=1e-4)
  assert out.k == k and out.baseline == k / D
  np.testing.assert_allclose(out.singular_values[-k:], 0.0, atol=1e-4)
  # Folding the norm weight: W diag(g) has null space diag(g)^-1 N and row
  # space diag(g) N^perp.
  folded = res.null_space_energy(
    params, config, np.stack([null / g, row * g]), fraction=k / D
  )
  np.testing.assert_allclose(folded.energy, [1.0, 0.0], atol=1e-4)
  with pytest.raises(ValueError, match="exactly one"):
    res.null_space_energy(params, config, hidden, k=2, fraction=0.1)


# ----------------------------------------------------------------------------
# DCT compressibility.


def _dct_basis(n, j):
  return scipy.fft.idct(np.eye(n)[j], norm="ortho")


def test_dct_compressibility_of_basis_vectors():
  T, D = 16, 8
  mix = 3 * _dct_basis(D, 2) + 4 * _dct_basis(D, 5)  # energies 9 and 16
  hidden = np.broadcast_to(mix, (2, T, D)) * np.arange(1, T + 1)[:, None]
  feats = res.dct_compressibility(hidden, "features", (1 / D, 2 / D, 1.0))
  np.testing.assert_array_equal(feats.kept, [1, 2, D])
  np.testing.assert_allclose(feats.energy, [16 / 25, 1.0, 1.0], rtol=1e-5)

  one = np.outer(_dct_basis(T, 3), np.arange(1.0, D + 1))  # [T, D]
  toks = res.dct_compressibility(one[None], "tokens", 1 / T)
  np.testing.assert_allclose(toks.energy, [1.0], rtol=1e-5)
  both = res.dct_compressibility(
    np.outer(_dct_basis(T, 3), _dct_basis(D, 6))[None], "both", 1 / (T * D)
  )
  np.testing.assert_allclose(both.energy, [1.0], rtol=1e-5)


def test_dct_compressibility_matches_scipy_per_layer():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 2, 10, 6)).cumsum(axis=2)  # [L, B, T, D]
  out = res.dct_compressibility(x, "tokens", (0.2, 0.5))
  c = scipy.fft.dct(x, axis=2, norm="ortho") ** 2  # [L, B, T, D]
  top = -np.sort(-c, axis=2)
  want = np.stack(
    [top[:, :, :k].sum((1, 2, 3)) / c.sum((1, 2, 3)) for k in (2, 5)], -1
  )
  assert out.energy.shape == (3, 2)
  np.testing.assert_allclose(out.energy, want, rtol=1e-5)
  with pytest.raises(ValueError, match="axis"):
    res.dct_compressibility(x, "channels")


# ----------------------------------------------------------------------------
# Layer Jacobians.


def test_jacobian_of_a_zeroed_layer_is_the_identity():
  params, tokens = _setup(NARROW, T=4)
  zeroed = dict(params, layers=jax.tree.map(jnp.zeros_like, params["layers"]))
  out = res.layer_jacobians(zeroed, NARROW, tokens[:1])
  M = 4 * NARROW.d_model
  np.testing.assert_array_equal(
    out.jacobians, np.broadcast_to(np.eye(M), (2, M, M))
  )
  np.testing.assert_allclose(out.eigenvalues, 1.0)
  np.testing.assert_allclose(out.spectral_radius, 1.0)
  np.testing.assert_allclose(out.henrici, 0.0, atol=1e-7)
  np.testing.assert_allclose(out.effective_rank, M)
  np.testing.assert_allclose(out.product_effective_rank, M)


def test_jacobian_matches_finite_differences_on_tiny():
  config, T = TINY, 2
  params, tokens = _setup(config, B=1, T=T)
  out = res.layer_jacobians(params, config, tokens, block="full")
  resid = res._residuals(params, tokens, config=config)  # [L, 1, T, D]
  positions = jnp.arange(T)[None]
  empty = kvjax.init_cache(config, 1, T)

  @jax.jit
  def layer(l, x):  # [1, T, D] -> [1, T, D]
    p = jax.tree.map(lambda a: a[l], params["layers"])
    c = (empty.k, empty.v, empty.pos, empty.valid)
    return model_lib.decoder_layer(
      x,
      p,
      c,
      positions=positions,
      slots=positions,
      config=config,
      inv_freq=model_lib.rope_inv_freq(config),
      backend="xla",
      capture=(),
      layer=l,
    )[0]

  two = lambda x: layer(1, layer(0, x))
  eps, rng = 1e-2, np.random.default_rng(3)
  v = rng.normal(size=resid.shape[1:]).astype(np.float32)
  v /= np.linalg.norm(v)
  for l, f, j in (
    (0, functools.partial(layer, 0), out.jacobians[0]),
    (1, functools.partial(layer, 1), out.jacobians[1]),
    (0, two, out.jacobians[1] @ out.jacobians[0]),
  ):
    x = resid[l]
    fd = (f(x + eps * v) - f(x - eps * v)).reshape(-1) / (2 * eps)
    jv = j @ v.reshape(-1)
    assert np.linalg.norm(fd - jv) < 1e-2 * np.linalg.norm(jv)
  # Not the identity: the test would catch a Jacobian of the skip path only.
  assert np.abs(out.jacobians[0] - np.eye(T * config.d_model)).max() > 1e-2
  # Causal attention: block lower triangular (so the eigenvalues are those
  # of the diagonal blocks); the "last" block is the last diagonal block.
  D = config.d_model
  assert not np.any(out.jacobians[:, :D, D:])
  last = res.layer_jacobians(params, config, tokens, layers=[1], block="last")
  np.testing.assert_allclose(
    last.jacobians[0], out.jacobians[1][-D:, -D:], atol=1e-5
  )
  assert 0 < out.henrici[0] < 1 and np.all(out.effective_rank > 1)


def test_block_triangular_eigvals_and_henrici_known_answers():
  rng = np.random.default_rng(4)
  j = np.kron(np.tril(np.ones((3, 3))), np.ones((4, 4))) * rng.normal(
    size=(12, 12)
  )  # block lower triangular, 4 x 4 blocks
  want = np.sort_complex(np.linalg.eigvals(j))
  np.testing.assert_allclose(
    np.sort_complex(res.block_triangular_eigvals(j, 4)), want, atol=1e-10
  )
  j[0, -1] = 1.0  # no longer block triangular: whole-matrix fallback
  np.testing.assert_allclose(
    np.sort_complex(res.block_triangular_eigvals(j, 4)),
    np.sort_complex(np.linalg.eigvals(j)),
    atol=1e-10,
  )
  # Henrici: 0 for a normal (symmetric) matrix, 1 for a nilpotent one.
  assert res.henrici_departure(j + j.T) < 1e-7
  assert res.henrici_departure(np.triu(np.ones((5, 5)), 1)) == 1.0
  np.testing.assert_allclose(res.effective_rank([2.0, 2.0, 0.0]), 2.0)


def test_layer_jacobians_rejects_bad_arguments():
  params, tokens = _setup(NARROW, T=4)
  with pytest.raises(ValueError, match="layers"):
    res.layer_jacobians(params, NARROW, tokens[:1], layers=[1, 0])
  with pytest.raises(ValueError, match="tokens"):
    res.layer_jacobians(params, NARROW, tokens)
  with pytest.raises(ValueError, match="block"):
    res.layer_jacobians(params, NARROW, tokens[:1], block="first")


# ----------------------------------------------------------------------------
# Cache vs recompute drift.


def test_cache_drift_float32_small_and_bfloat16_error_larger():
  params, tokens = _setup(B=2, T=12)
  f32 = drift_lib.cache_drift(params, TINY, tokens, "float32")
  assert f32.max_abs_logit_diff < 1e-4 and f32.mean_kl < 1e-9
  assert f32.argmax_agreement == 1.0 and f32.dtype == "float32"
  assert f32.max_abs_error_vs_f32 == f32.max_abs_logit_diff
  bf16 = drift_lib.cache_drift(
    params, TINY, tokens, jnp.bfloat16, prefill_len=4
  )
  assert bf16.dtype == bf16.cache_dtype == "bfloat16"
  # On XLA:CPU the bf16 paths may agree bit for bit (see drift.py); the
  # drift is bounded and bf16's total error dwarfs the float32 drift.
  assert bf16.max_abs_logit_diff < 0.5 and bf16.argmax_agreement >= 0.9
  assert bf16.max_abs_error_vs_f32 > max(10 * f32.max_abs_logit_diff, 1e-3)
  with pytest.raises(ValueError, match="prefill_len"):
    drift_lib.cache_drift(params, TINY, tokens, prefill_len=12)
