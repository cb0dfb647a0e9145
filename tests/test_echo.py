"""Tests of kvjax.echo: the Cholesky update, chunked prefill vs decode vs a
naive recurrence, ridge recall, constant state bytes and argument checks;
for hybrids (an attention layer under an Echo layer), prefill + decode vs
one chunked pass, the sliding window vs a naive masked softmax, exact and
constant state bytes, the full-attention capacity and bad layer configs.

Tolerances are float32: rank-1 updates and from-scratch factorisations of
the same G agree to 1e-4 relative (measured ~1e-6); the readout solves with
G, so logits (O(5) with the perturbed test weights) are compared at atol
2e-4 between decode and the chunked pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import echo

# Small shapes: r = 8, P = 8, 2 heads, 2 layers, 16 ids.
CONFIG = echo.EchoConfig(
  vocab_size=16,
  d_model=16,
  num_layers=2,
  num_heads=2,
  rank=8,
  value_dim=8,
  mlp_dim=32,
  power_iters=10,
)


def _params(config, seed=0):
  """init_params with every leaf perturbed, so zero-initialised output
  matrices do not hide the memory."""
  p = echo.init_params(config, jax.random.PRNGKey(seed))
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [
    x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]
  return jax.tree.unflatten(treedef, leaves)


def _tokens(B, T, seed=3, vocab=16):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab)


def test_cholesky_update_equals_refactorisation():
  # Several rank-1 updates of a batch of factors against cholesky(G + sum).
  r, steps = 8, 6
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, r, r)).astype(np.float32)
  gram = a @ np.swapaxes(a, -1, -2) / r + 1e-3 * np.eye(r, dtype=np.float32)
  chol = jnp.linalg.cholesky(jnp.asarray(gram))
  update = jax.jit(echo.cholesky_update)
  for _ in range(steps):
    x = rng.normal(size=(3, r)).astype(np.float32)
    chol = update(chol, jnp.asarray(x))
    gram = gram + x[:, :, None] * x[:, None, :]
    want = np.linalg.cholesky(gram.astype(np.float64))
    # float32: relative error of the factor below 1e-4.
    err = np.abs(np.asarray(chol) - want).max() / np.abs(want).max()
    assert err < 1e-4, err
  assert np.allclose(np.triu(np.asarray(chol), 1), 0.0)


@pytest.mark.parametrize(
  # 5 divides neither T0 = 12 nor T = 16 (a chunk size that divides them
  # runs in the hybrid test below, whose full pass uses 4 and 5).
  "memory, chunk_size",
  [("echo", 5), ("linear", 5)],
)
def test_prefill_then_decode_equals_one_chunked_pass(memory, chunk_size):
  c = CONFIG.replace(memory=memory)
  params = _params(c)
  B, T0, T = 2, 12, 16
  tokens = _tokens(B, T)
  state0 = echo.init_state(c, B)
  full_logits, full_state = echo.forward(
    params, tokens, state0, config=c, chunk_size=chunk_size
  )
  logits, state = echo.forward(
    params, tokens[:, :T0], state0, config=c, chunk_size=chunk_size
  )
  steps = [logits]
  for t in range(T0, T):
    step_logits, state = echo.decode(params, tokens[:, t], state, config=c)
    steps.append(step_logits[:, None])
  got = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(got, full_logits, atol=2e-4, rtol=1e-4)
  _assert_states_close(state, full_state)


def _assert_states_close(a, b):
  paths = jax.tree_util.tree_leaves_with_path(a)
  for (path, x), y in zip(paths, jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4, err_msg=name)


def _naive_memory(p, h, config):
  """Per-token recurrence in numpy float64, G kept as a matrix: outputs
  [B, T, N, P] of one memory layer from an empty state."""
  c = config
  h = np.asarray(h, np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  B, T, _ = h.shape
  N, r, P = c.num_heads, c.rank, c.value_dim
  l2 = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-12)
  out = np.zeros((B, T, N, P))
  for bi in range(B):
    for n in range(N):
      gram = c.eps * np.eye(r)
      m, cv = np.zeros((r, r)), np.zeros((P, r))
      z_prev, h_prev = np.zeros(r), np.zeros(h.shape[-1])
      for t in range(T):
        x = h[bi, t]
        z = l2(x @ p["wk"][:, n] + h_prev @ p["wk_prev"][:, n])
        q = l2(x @ p["wq"][:, n])
        v = x @ p["wv"][:, n]
        b = 1 / (1 + np.exp(-(x @ p["wb"][:, n] + p["bb"][n])))
        gram += b * np.outer(z, z)
        m += b * np.outer(z, z_prev)
        cv += b * np.outer(v, z)
        if c.power_k == 0:  # ridge recall, directly.
          y = cv @ np.linalg.solve(gram, q)
        else:
          chol = np.linalg.cholesky(gram)
          w = np.linalg.solve(chol, np.linalg.solve(chol, m).T).T
          sigma = np.linalg.svd(w, compute_uv=False)[0]
          u = np.linalg.solve(chol, q)
          for _ in range(c.power_k):
            u = c.gamma / max(sigma, 1.0) * (w @ u)
          y = cv @ np.linalg.solve(chol.T, u)
        out[bi, t, n] = c.eta * y
        z_prev, h_prev = z, x
  return out


@pytest.mark.parametrize("power_k", [0, 2])
def test_chunked_prefill_equals_naive_recurrence(power_k):
  # K = 0 checks ridge recall eta C_v G^-1 q with G solved directly; K = 2
  # the whitened transition with an exact SVD for sigma_max (power
  # iteration converged: 50 steps).
  c = CONFIG.replace(power_k=power_k, power_iters=50)
  p = jax.tree.map(lambda x: x[0], _params(c)["echo"])
  B, T = 2, 11
  h = jax.random.normal(jax.random.PRNGKey(5), (B, T, c.d_model))
  state = jax.tree.map(lambda x: x[0], tuple(echo.init_state(c, B).echo))
  y, _ = jax.jit(
    lambda p, h, s: echo.memory_prefill(p, h, s, config=c, chunk_size=4)
  )(p, h, state)
  want = _naive_memory(p, h, c)
  np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-3)


def test_ridge_readout_equals_direct_solve():
  r, P = 8, 5
  rng = np.random.default_rng(1)
  z = rng.normal(size=(20, r))
  gram = z.T @ z + 1e-3 * np.eye(r)
  cv = rng.normal(size=(P, r))
  q = rng.normal(size=(r,))
  y = echo.readout(
    jnp.linalg.cholesky(jnp.asarray(gram, jnp.float32)),
    jnp.zeros((r, r)),
    jnp.asarray(cv, jnp.float32),
    jnp.asarray(q, jnp.float32),
    power_k=0,
    eta=1.5,
    gamma=0.7,
    power_iters=1,
  )
  np.testing.assert_allclose(y, 1.5 * cv @ np.linalg.solve(gram, q), rtol=1e-4)


def test_state_bytes_constant_in_context_length():
  # The shapes of test_prefill_then_decode (B = 2, T0 = 12, chunk 4), so
  # the compiled prefill and decode are reused.
  c = CONFIG
  params, tokens = _params(c), _tokens(2, 16)
  _, state = echo.forward(
    params, tokens[:, :12], echo.init_state(c, 2), config=c, chunk_size=4
  )
  sizes = [echo.state_bytes(echo.init_state(c, 2)), echo.state_bytes(state)]
  for t in range(12, 16):
    _, state = echo.decode(params, tokens[:, t], state, config=c)
    sizes.append(echo.state_bytes(state))
  # L=2, N=2, r=8, P=8, D=16: per layer 2 * (64 + 64 + 64 + 8) + 16 floats.
  per_row = 2 * (2 * (64 + 64 + 64 + 8) + 16) * 4
  assert per_row == 3328 == echo.state_bytes_per_sequence(c)
  assert sizes == [2 * per_row] * 6  # after 0, 12, 13, ..., 16 tokens
  linear = c.replace(memory="linear", rank=echo.matched_linear_rank(c))
  assert linear.rank == 25  # (2 * 64 + 64 + 8) // 8
  assert echo.state_bytes_per_sequence(linear) <= per_row


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="memory"):
    echo.EchoConfig(memory="kv")
  with pytest.raises(ValueError, match="rank"):
    echo.EchoConfig(rank=0)
  with pytest.raises(ValueError, match="eps"):
    echo.EchoConfig(eps=0.0)
  with pytest.raises(TypeError, match="power_k"):
    echo.EchoConfig(power_k=1.5)
  with pytest.raises(ValueError, match="batch_size"):
    echo.init_state(CONFIG, 0)
  params, state = _params(CONFIG), echo.init_state(CONFIG, 2)
  with pytest.raises(ValueError, match="chunk_size"):
    echo.forward(params, _tokens(2, 4), state, config=CONFIG, chunk_size=0)
  with pytest.raises(ValueError, match="tokens"):
    echo.forward(params, _tokens(2, 4)[0], state, config=CONFIG)
  with pytest.raises(ValueError, match="state"):
    echo.forward(params, _tokens(3, 4), state, config=CONFIG)
  with pytest.raises(ValueError, match="tokens"):
    echo.decode(params, _tokens(2, 4), state, config=CONFIG)


# A hybrid: a sliding-window attention layer (W = 4) under an Echo layer.
HYBRID = CONFIG.replace(
  layer_memories=("attention", "echo"), attention_window=4
)


def test_hybrid_prefill_then_decode_equals_one_chunked_pass():
  # Prefill 12 tokens in chunks of 5 (not dividing 12; the ring of 4 slots
  # wraps inside a chunk), decode 4; one pass over 16 in chunks of 4
  # (dividing 16) and of 5 (not) gives the same logits and state.
  c = HYBRID
  params, tokens = _params(c), _tokens(2, 16)
  state0 = echo.init_state(c, 2)
  logits, state = echo.forward(
    params, tokens[:, :12], state0, config=c, chunk_size=5
  )
  steps = [logits]
  for t in range(12, 16):
    step_logits, state = echo.decode(params, tokens[:, t], state, config=c)
    steps.append(step_logits[:, None])
  got = jnp.concatenate(steps, axis=1)
  for chunk_size in (4, 5):
    want, want_state = echo.forward(
      params, tokens, state0, config=c, chunk_size=chunk_size
    )
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    _assert_states_close(state, want_state)
  assert state.attention.pos[0, 0].tolist() == [12, 13, 14, 15]
  assert state.attention.length.tolist() == [[16, 16]]


def _naive_window_attention(p, h, window):
  """Per query t, softmax over the keys of positions max(0, t-W+1)..t, in
  numpy float64 with RoPE written out: [B, T, N, P]."""
  h = np.asarray(h, np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  q = np.einsum("btd,dnr->btnr", h, p["wq"])
  k = np.einsum("btd,dnr->btnr", h, p["wk"])
  v = np.einsum("btd,dnp->btnp", h, p["wv"])
  T, r = h.shape[1], q.shape[-1]
  angle = np.arange(T)[:, None] / 10_000.0 ** (np.arange(0, r, 2) / r)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]  # [T, 1, r/2]

  def rope(x):
    x1, x2 = x[..., : r // 2], x[..., r // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  q, k = rope(q), rope(k)
  out = np.zeros(v.shape)
  for t in range(T):
    lo = max(0, t - window + 1)
    logits = np.einsum("bnr,bsnr->bns", q[:, t], k[:, lo : t + 1])
    logits = logits / np.sqrt(r)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out[:, t] = np.einsum("bns,bsnp->bnp", w, v[:, lo : t + 1])
  return out


def test_window_attention_equals_naive_masked_softmax():
  # 7 tokens in chunks of 3, then 6 more in one chunk of 8 (> W, padded)
  # continuing from the ring: every output equals a softmax over the last
  # W = 4 positions.
  c = HYBRID
  p = jax.tree.map(lambda x: 5 * x[0], _params(c)["attention"])
  h = jax.random.normal(jax.random.PRNGKey(7), (2, 13, c.d_model))
  state = jax.tree.map(lambda x: x[0], tuple(echo.init_state(c, 2).attention))
  run = jax.jit(
    echo.attention_prefill, static_argnames=("config", "chunk_size")
  )
  y1, state = run(p, h[:, :7], state, config=c, chunk_size=3)
  y2, state = run(p, h[:, 7:], state, config=c, chunk_size=8)
  want = _naive_window_attention(p, h, c.attention_window)
  np.testing.assert_allclose(
    jnp.concatenate([y1, y2], axis=1), want, atol=1e-4, rtol=1e-4
  )
  assert sorted(state[2][0].tolist()) == [9, 10, 11, 12]


def test_hybrid_state_bytes_exact_and_constant():
  # The shapes of the hybrid test above (B = 2, prefill 12 in chunks of
  # 5), so the compiled prefill and decode are reused.
  c = HYBRID
  params, tokens = _params(c), _tokens(2, 16)
  state = echo.init_state(c, 2)
  sizes = [echo.state_bytes(state)]
  _, state = echo.forward(params, tokens[:, :12], state, config=c, chunk_size=5)
  sizes.append(echo.state_bytes(state))
  for t in range(12, 16):
    _, state = echo.decode(params, tokens[:, t], state, config=c)
    sizes.append(echo.state_bytes(state))
  leaves = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  # Echo layer: 2 heads x (64 + 64 + 64 + 8) + 16 floats per row; the
  # window: 4 slots x 2 heads x (8 + 8) floats + 4 positions + 1 length.
  per_row = (2 * (64 + 64 + 64 + 8) + 16) * 4 + (4 * 2 * 16 + 4 + 1) * 4
  assert per_row == 2196 == echo.state_bytes_per_sequence(c)
  assert sizes == [2 * per_row] * 6 == [leaves] * 6
  # Full attention: the cache's bytes are its capacity's.
  full = c.replace(attention_window=None)
  grow = [echo.state_bytes_per_sequence(full, n) for n in (16, 32)]
  assert grow[1] - grow[0] == 16 * (2 * 16 + 1) * 4


def test_full_attention_capacity_raises_before_overflow():
  c = HYBRID.replace(attention_window=None)
  params, tokens = _params(c), _tokens(2, 6)
  state = echo.init_state(c, 2, capacity=5)
  with pytest.raises(ValueError, match="capacity=5"):
    echo.forward(params, tokens, state, config=c)
  with pytest.raises(ValueError, match="capacity is required"):
    echo.init_state(c, 2)
  with pytest.raises(ValueError, match="capacity"):
    echo.init_state(HYBRID, 2, capacity=8)
  assert not echo.state_overflowed(state, c)


def test_bad_layer_memories_raise():
  with pytest.raises(ValueError, match="layer_memories"):
    CONFIG.replace(layer_memories=("attention", "kv"))
  with pytest.raises(ValueError, match="num_layers=2"):
    CONFIG.replace(layer_memories=("echo",))
  with pytest.raises(TypeError, match="layer_memories"):
    CONFIG.replace(layer_memories="echo")
  with pytest.raises(ValueError, match="attention_window"):
    CONFIG.replace(attention_window=4)  # no attention layer
  with pytest.raises(ValueError, match="attention_window"):
    HYBRID.replace(attention_window=0)
  with pytest.raises(TypeError, match="attention_window"):
    HYBRID.replace(attention_window=2.0)
  with pytest.raises(ValueError, match="rank"):
    HYBRID.replace(rank=7)
  assert CONFIG.replace(layer_memories=["echo", "linear"]).kinds == (
    "echo",
    "linear",
  )
  with pytest.raises(ValueError, match="params"):
    echo.forward(
      _params(CONFIG), _tokens(2, 4), echo.init_state(HYBRID, 2), config=HYBRID
    )
