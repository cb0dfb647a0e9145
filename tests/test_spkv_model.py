"""SP-KV write gates in the model: the gate's params and tap, the soft and
hard logit bias, gate training, and the gated checkpoint."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import hf
from kvjax import model as model_lib
from kvjax.train import write_gate as wg

CONFIG = kvjax.get_config("tiny", num_layers=1, d_model=64, mlp_dim=128)
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
B, T, W = 2, 24, 6
TOKENS = jax.random.randint(jax.random.key(1), (B, T), 1, CONFIG.vocab_size)


def _gated(open_bias, std=0.3):
  return model_lib.add_write_gate(
    PARAMS, CONFIG, jax.random.key(2), open_bias=open_bias, std=std
  )


@functools.partial(
  jax.jit, static_argnames=("write_gate", "capture", "backend", "config")
)
def _jit_fwd(params, config=CONFIG, **kw):
  return kvjax.forward(
    params, TOKENS, kvjax.init_cache(config, B, T), config=config, **kw
  )


def _fwd(params, **kw):
  return _jit_fwd(params, **kw)


def _eager(params, **kw):  # argument checks run eagerly only
  return kvjax.forward(
    params, TOKENS, kvjax.init_cache(CONFIG, B, T), config=CONFIG, **kw
  )


def test_soft_gate_at_u_one_equals_the_ungated_model():
  plain = _fwd(PARAMS, backend="reference").logits
  wide_open = _gated(100.0)  # sigmoid(100) == 1.0 in float32: log u == 0
  out = _fwd(
    wide_open,
    write_gate=model_lib.WriteGate("soft", W),
    capture=("write_utility",),
  )
  assert out.aux["write_utility"].shape == (
    CONFIG.num_layers,
    B,
    T,
    CONFIG.num_kv_heads,
  )
  np.testing.assert_array_equal(out.aux["write_utility"], 1.0)
  np.testing.assert_allclose(out.logits, plain, rtol=0, atol=1e-6)
  # A gate that is not open changes the logits (the bias acts).
  half = _fwd(_gated(0.0), write_gate=model_lib.WriteGate("soft", W)).logits
  assert np.abs(np.asarray(half - plain)).max() > 1e-3
  # Without write_gate, gated params run exactly the plain model.
  np.testing.assert_array_equal(_fwd(_gated(0.0)).logits, _fwd(PARAMS).logits)


def test_soft_bias_is_log_u_outside_the_window_only():
  """One layer's attention with the gate's bias equals the reference
  attention with log(u_j) added where q_pos - k_pos >= W, by hand."""
  from kvjax import attention as attn

  k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
  q = jax.random.normal(k1, (1, 8, 2, 4))
  k = jax.random.normal(k2, (1, 1, 8, 4))
  v = jax.random.normal(k3, (1, 1, 8, 4))
  u = jax.nn.sigmoid(jax.random.normal(k4, (1, 1, 8)))
  pos = jnp.arange(8)[None, None]
  got = jax.jit(
    lambda q, k, v, u: (
      attn.reference_attention(
        q,
        k,
        v,
        q_pos=jnp.arange(8)[None],
        k_pos=pos,
        k_valid=jnp.ones((1, 1, 8), bool),
        key_bias=attn.KeyBias(jnp.log(u), 3),
      ).out
    )
  )(q, k, v, u)
  # By hand in numpy: [N, T, S] logits, log(u) where t - s >= 3.
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q[0], k[0, 0], v[0, 0]))
  logits = np.einsum("tnh,sh->nts", qn, kn) / 2.0  # [N, T, S]
  t, s = np.arange(8)[:, None], np.arange(8)[None, :]
  logits = logits + np.where(t - s >= 3, np.log(np.asarray(u[0, 0])), 0.0)
  logits = np.where(s <= t, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("nts,sh->tnh", p, vn)  # [T, N, H]
  np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_hard_gate_hides_exactly_the_entries_below_tau():
  """tau = 0 is the plain model, tau = 1 a sliding-window model (only the
  window visible); in between the gate hides some entries."""
  gated = _gated(0.0)
  tau = 0.5
  hard = _fwd(gated, write_gate=model_lib.WriteGate("hard", W, tau))
  # tau = 0 keeps everything: the plain model.
  np.testing.assert_allclose(
    _fwd(gated, write_gate=model_lib.WriteGate("hard", W, 0.0)).logits,
    _fwd(PARAMS, backend="reference").logits,
    atol=1e-5,
  )
  # tau = 1 keeps only the window: a sliding-window model.
  window_only = _fwd(
    PARAMS, config=CONFIG.replace(sliding_window=W), backend="reference"
  ).logits
  np.testing.assert_allclose(
    _fwd(gated, write_gate=model_lib.WriteGate("hard", W, 1.0)).logits,
    window_only,
    atol=1e-5,
  )
  # In between: different from both.
  assert np.abs(np.asarray(hard.logits - window_only)).max() > 1e-3


def test_gate_errors():
  with pytest.raises(ValueError, match="no 'write_gate'"):
    _eager(PARAMS, write_gate=model_lib.WriteGate("soft", W))
  with pytest.raises(ValueError, match="write_gate"):
    _eager(PARAMS, capture=("write_utility",))
  with pytest.raises(TypeError, match="WriteGate"):
    _eager(_gated(0.0), write_gate="soft")
  with pytest.raises(ValueError, match="mode"):
    _eager(_gated(0.0), write_gate=model_lib.WriteGate("sharp", W))
  with pytest.raises(ValueError, match="window"):
    _eager(_gated(0.0), write_gate=model_lib.WriteGate("soft", 0))
  with pytest.raises(ValueError, match="tau"):
    _eager(_gated(0.0), write_gate=model_lib.WriteGate("hard", W, 1.5))
  with pytest.raises(ValueError, match="reference backend only"):
    _eager(
      _gated(0.0), write_gate=model_lib.WriteGate("soft", W), backend="xla"
    )
  bad = dict(_gated(0.0), write_gate={"w": jnp.zeros((2, 64, 3))})
  with pytest.raises(ValueError, match="write_gate"):
    _eager(bad)
  with pytest.raises(ValueError, match="already"):
    model_lib.add_write_gate(_gated(0.0), CONFIG, jax.random.key(0))


def test_soft_gate_training_reduces_loss_and_compiles_once(count_compiles):
  """A toy problem: predict every token again (copy with offset 8, longer
  than the window), so the gates must keep the old entries open; a few
  steps of gate + model training lower the loss, one compile."""
  gate = model_lib.WriteGate("soft", 4)
  params = _gated(0.0, std=0.02)  # u ~ 0.5: a half-closed start
  rng = np.random.default_rng(0)
  first = rng.integers(1, 50, size=(4, 8))
  tokens = np.concatenate([first, first, first], axis=1).astype(np.int32)
  arrays = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.concatenate(
      [np.zeros((4, 15)), np.ones((4, 8))], axis=1
    ).astype(np.float32),
    "token_mask": np.ones((4, 23), bool),
  }
  optimizer = wg.gate_optimizer(lr=3e-3, gate_lr=5e-2)
  step = wg.make_gated_train_step(CONFIG, optimizer, gate)
  opt_state = optimizer.init(params)
  losses = []
  with count_compiles() as c:
    for _ in range(10):
      params, opt_state, m = step(params, opt_state, arrays)
      losses.append(float(m["loss"]))
  assert c["n"] == 1
  assert losses[-1] < 0.8 * losses[0], losses
  assert 0.0 <= float(m["mean_u"]) <= 1.0


def test_gated_checkpoint_round_trip_and_plain_import(tmp_path):
  params = _gated(1.5)
  wg.save_gated(str(tmp_path), params, CONFIG, {"name": "t"})
  config, back = wg.load_gated(str(tmp_path))
  for name in ("w", "b"):
    np.testing.assert_array_equal(
      back["write_gate"][name], params["write_gate"][name]
    )
  np.testing.assert_allclose(
    _fwd(back).logits,
    _fwd(params).logits,
    atol=1e-6,
  )
  # The directory is still a plain HF export: the ungated model.
  _, plain = hf.load_pretrained(str(tmp_path))
  assert "write_gate" not in plain
  np.testing.assert_allclose(_fwd(plain).logits, _fwd(PARAMS).logits, atol=1e-6)
  with pytest.raises(ValueError, match="not a gated model"):
    wg.load_gated(str(tmp_path / "nothing"))
