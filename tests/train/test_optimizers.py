"""Optimizers: the Muon split labels, dimension numbers and schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import kvjax
from kvjax.train import optimizers

CONFIG = kvjax.ModelConfig(
  vocab_size=64,
  d_model=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=48,
  qkv_bias=True,
  o_bias=True,
)
MUON_LEAVES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _params():
  return kvjax.init_params(CONFIG, jax.random.key(0))


def test_labels_split_hidden_matrices_from_the_rest():
  labels = optimizers.param_labels(_params())
  for name, label in labels["layers"].items():
    assert label == ("muon" if name in MUON_LEAVES else "adamw"), name
  for name in ("embed", "lm_head", "final_norm"):
    assert labels[name] == "adamw"
  # Biases and norms of the layers are AdamW.
  for name in ("bq", "bk", "bv", "bo", "attn_norm", "mlp_norm"):
    assert labels["layers"][name] == "adamw"


def test_dimension_numbers_make_each_layer_a_dxout_matrix():
  params = _params()
  specs = optimizers.muon_dimension_numbers(params)
  D, N, K, H, F = 32, 4, 2, 8, 48
  expected = {
    "wq": (D, N * H),
    "wk": (D, K * H),
    "wv": (D, K * H),
    "wo": (N * H, D),
    "w_gate": (D, F),
    "w_up": (D, F),
    "w_down": (F, D),
  }
  for name, (fan_in, fan_out) in expected.items():
    spec = specs["layers"][name]
    assert isinstance(spec, MuonDimensionNumbers)
    shape = params["layers"][name].shape
    red = np.atleast_1d(spec.reduction_axis)
    out = np.atleast_1d(spec.output_axis)
    assert 0 not in red and 0 not in out  # L is a batch axis
    assert np.prod([shape[a] for a in red]) == fan_in, name
    assert np.prod([shape[a] for a in out]) == fan_out, name
  assert specs["embed"] is None and specs["layers"]["attn_norm"] is None


def test_muon_update_is_orthogonal_per_layer():
  """The Muon half's update of each layer's matrix has flat singular values
  (Newton-Schulz), while AdamW leaves are updated elementwise."""
  params = _params()
  opt = optimizers.make_optimizer(
    "muon_split",
    learning_rate=1.0,
    total_steps=10,
    warmup_steps=0,
    grad_clip=None,
    final_lr_fraction=1.0,
  )
  grads = jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(1), x.shape), params
  )
  updates, _ = opt.update(grads, opt.init(params), params)
  wo = np.asarray(updates["layers"]["wo"][0]).reshape(4 * 8, 32)
  s = np.linalg.svd(wo, compute_uv=False)
  g = np.asarray(grads["layers"]["wo"][0]).reshape(4 * 8, 32)
  sg = np.linalg.svd(g, compute_uv=False)
  # Five Newton-Schulz steps flatten the spectrum (not exactly: the
  # smallest singular values of a square Gaussian stay below the rest).
  assert np.median(s) > 0.5 and s.max() < 1.5
  assert s.max() / s.min() < (sg.max() / sg.min()) / 3


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_optimizer_reduces_a_quadratic(name):
  params = _params()
  target = jax.tree.map(jnp.zeros_like, params)
  loss = lambda p: sum(
    jnp.sum((a - b) ** 2)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )
  opt = optimizers.make_optimizer(
    name, learning_rate=0.01, total_steps=50, warmup_steps=5
  )
  state = opt.init(params)
  first = float(loss(params))

  @jax.jit
  def step(p, s):
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  for _ in range(50):
    params, state = step(params, state)
  assert float(loss(params)) < first


def test_schedule_warmup_then_cosine():
  sched = optimizers.warmup_cosine(
    1.0, total_steps=100, warmup_steps=10, final_fraction=0.1
  )
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 0.1, rtol=1e-5)
  assert float(sched(50)) < 1.0


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="optimizer="):
    optimizers.make_optimizer(
      "sgd", learning_rate=1.0, total_steps=10, warmup_steps=1
    )
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizers.warmup_cosine(1.0, total_steps=10, warmup_steps=10)


def _wsd(total_steps, restarts=()):
  """Peak 1, warmup 10, decay over the last 20 steps of each cycle to 0.1."""
  return optimizers.warmup_stable_decay(
    1.0,
    total_steps=total_steps,
    warmup_steps=10,
    decay_steps=20,
    final_fraction=0.1,
    restarts=restarts,
  )


def test_schedule_warmup_stable_decay():
  sched = _wsd(100)
  longer = _wsd(500)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  for step in (10, 50, 80):  # flat between warmup and decay
    np.testing.assert_allclose(float(sched(step)), 1.0, rtol=1e-6)
  # Before the decay the rate does not depend on total_steps.
  for step in range(0, 81, 7):
    assert float(sched(step)) == float(longer(step))
  assert 0.1 < float(sched(90)) < 1.0
  np.testing.assert_allclose(float(sched(100)), 0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="decay_steps"):
    optimizers.warmup_stable_decay(
      1.0, total_steps=20, warmup_steps=10, decay_steps=11
    )
  with pytest.raises(ValueError, match="decay_steps"):
    optimizers.warmup_stable_decay(
      1.0, total_steps=20, warmup_steps=1, decay_steps=0
    )


def test_schedule_restarts_continue_a_finished_run():
  first = _wsd(100)
  both = _wsd(180, restarts=(100,))
  # The first cycle is the run as it was; no earlier rate changes.
  for step in range(0, 100, 3):
    assert float(both(step)) == float(first(step))
  # The second warms up from the decayed rate 0.1 back to the peak ...
  np.testing.assert_allclose(float(both(100)), 0.1, rtol=1e-5)
  np.testing.assert_allclose(float(both(105)), 0.55, rtol=1e-5)
  for step in (110, 130, 160):
    np.testing.assert_allclose(float(both(step)), 1.0, rtol=1e-6)
  # ... and decays over its own last 20 steps.
  assert 0.1 < float(both(170)) < 1.0
  np.testing.assert_allclose(float(both(180)), 0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="restarts"):
    optimizers.warmup_stable_decay(
      1.0, total_steps=100, warmup_steps=1, decay_steps=5, restarts=(100,)
    )
  with pytest.raises(ValueError, match="restarts"):
    optimizers.warmup_stable_decay(
      1.0, total_steps=100, warmup_steps=1, decay_steps=5, restarts=(50, 40)
    )
  with pytest.raises(ValueError, match="cycle"):  # a cycle too short
    _wsd(100, restarts=(90,))
  with pytest.raises(ValueError, match="lr_restarts"):
    optimizers.make_optimizer(
      "adamw",
      learning_rate=1.0,
      total_steps=100,
      warmup_steps=1,
      restarts=(50,),
    )


def test_make_optimizer_with_decay_steps_uses_wsd():
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.ones((3,))}
  opt = optimizers.make_optimizer(
    "adamw",
    learning_rate=1.0,
    total_steps=100,
    warmup_steps=1,
    decay_steps=10,
    grad_clip=None,
  )
  state = opt.init(params)
  sizes = []
  for _ in range(60):
    updates, state = opt.update(grads, state, params)
    sizes.append(float(jnp.abs(updates["w"][0])))
  # Constant gradient: Adam's step is ~lr, flat at steps 1..59 (no decay).
  np.testing.assert_allclose(sizes[5:], sizes[5], rtol=1e-4)
