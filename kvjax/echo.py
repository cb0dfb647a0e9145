"""Echo memory (Spectral Koopman Attention): a fixed-size state instead of a
KV cache, and a small decoder whose layers read it.

Per layer and head, with rank r and value width P, the state holds the
sufficient statistics of everything written so far:

  G   = sum_t b_t z_t z_t^T + eps I        (stored as its Cholesky factor L)
  M   = sum_t b_t z_t z_{t-1}^T            (the one-step transition)
  C_v = sum_t b_t v_t z_t^T

with z_t the per-token L2-normalised key, v_t the value and b_t = sigmoid(.)
a learned write gate. The readout of a query q (L2-normalised) is

  y = eta * C_v L^-T (a W)^K L^-1 q,   W = L^-1 M L^-T,
  a = gamma / max(sigma_max(W), 1)     (power iteration, no gradient),

which is eta * C_v (G^-1 M)^K G^-1 q up to the spectral scaling; K = 0 is
ridge-regression recall eta * C_v G^-1 q (arXiv 2605.06997; reference code
github.com/anusridh97/Koopman_Mamba `archive/reference/echo_jax.py`).

Semantics: the output at token t reads the state *after* token t is written
(as the reference's decode step does), so a chunked pass over T tokens, a
prefill followed by token-by-token decode and a naive per-token recurrence
all compute the same function. Decode is a rank-1 Cholesky update of L with
sqrt(b_t) z_t (O(r^2)) plus the readout (whitening M is O(r^3), as in the
reference). Prefill is chunk-causal: a `lax.scan` over chunks carries the
exclusive prefix sums of the chunks before, and within a chunk the
statistics of each token are the carry plus an inclusive cumulative sum; the
readout factorises each token's G from scratch. Memory per chunk is
O(B C N r^2), whatever T.

`memory="linear"` is the linear-attention baseline in the same model: the
state is C_v alone and y = C_v q (G = I, no transition), with the same keys,
gate and token shift; give it a wider rank to match Echo's bytes
(`matched_linear_rank`).

The model: embedding, then L blocks of x + wo(memory(norm(x))) and
x + mlp(norm(x)) (SwiGLU), final norm, tied LM head. Keys read the current
and the previous normed input (a width-2 token shift, as the Mamba-2
convolution around Echo layers provides in the paper), so the state also
keeps each layer's last normed input. Every layer is a memory layer.

Einsum letters: B batch, T tokens, C chunk tokens, L layers, N heads, R and
S rank (key feature) axes, P value width, D model dim, F MLP dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.model import rms_norm

Array = jax.Array
Params = dict[str, Any]

MEMORIES = ("echo", "linear")


@dataclasses.dataclass(frozen=True)
class EchoConfig:
  """A small decoder whose layers read an Echo (or linear) memory.

  Attributes:
    vocab_size: V (512 for `kvjax.tasks.VOCAB`).
    d_model: D.
    num_layers: L (every layer is a memory layer).
    num_heads: N memory heads per layer.
    rank: r, the key feature width per head (Echo's rank).
    value_dim: P, the value width per head.
    mlp_dim: F of the SwiGLU MLP.
    memory: "echo" or "linear" (the baseline: y = C_v q).
    power_k: K, powers of the transition in the readout (0: ridge recall).
    eps: ridge added to G.
    eta: output scale of the readout.
    gamma: gain of the spectrally normalised transition.
    power_iters: power-iteration steps for sigma_max(W).
    chunk_size: tokens per chunk of the chunked prefill.
    norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 512
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 2
  rank: int = 48
  value_dim: int = 32
  mlp_dim: int = 128
  memory: str = "echo"
  power_k: int = 2
  eps: float = 1e-3
  eta: float = 1.5
  gamma: float = 0.7
  power_iters: int = 20
  chunk_size: int = 64
  norm_eps: float = 1e-6

  def __post_init__(self):
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "rank",
      "value_dim",
      "mlp_dim",
      "power_iters",
      "chunk_size",
    ):
      _check_int(name, getattr(self, name), 1)
    _check_int("power_k", self.power_k, 0)
    if self.memory not in MEMORIES:
      raise ValueError(f"memory={self.memory!r}; allowed: {MEMORIES}.")
    for name in ("eps", "eta", "gamma", "norm_eps"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a float > 0, got {value!r}.")

  @property
  def matrix_rank(self) -> int:
    """Side of the stored L and M: r for Echo, 0 for linear (no G, M)."""
    return self.rank if self.memory == "echo" else 0

  def replace(self, **changes) -> "EchoConfig":
    return dataclasses.replace(self, **changes)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


# ----------------------------------------------------------------------------
# The state.


class EchoState(NamedTuple):
  """The fixed-size memory of a whole model (leaves stacked over layers).

  Attributes:
    chol: [L, B, N, R, R] float32 lower Cholesky factor of G (R = r for
      Echo, 0 for linear).
    trans: [L, B, N, R, R] float32 M = sum b z_t z_{t-1}^T.
    values: [L, B, N, P, r] float32 C_v = sum b v z^T.
    last_key: [L, B, N, R] float32 z of the last written token (M's lag).
    last_input: [L, B, D] float32 last normed layer input (token shift).
  """

  chol: Array
  trans: Array
  values: Array
  last_key: Array
  last_input: Array


def init_state(config: EchoConfig, batch_size: int) -> EchoState:
  """The empty memory: L = sqrt(eps) I, everything else zero.

  Raises:
    TypeError, ValueError: batch_size not an int >= 1.
  """
  c = config
  B = _check_int("batch_size", batch_size, 1)
  L, N, r, R, P, D = (
    c.num_layers,
    c.num_heads,
    c.rank,
    c.matrix_rank,
    c.value_dim,
    c.d_model,
  )
  eye = jnp.sqrt(jnp.float32(c.eps)) * jnp.eye(R, dtype=jnp.float32)
  return EchoState(
    chol=jnp.broadcast_to(eye, (L, B, N, R, R)),
    trans=jnp.zeros((L, B, N, R, R), jnp.float32),
    values=jnp.zeros((L, B, N, P, r), jnp.float32),
    last_key=jnp.zeros((L, B, N, R), jnp.float32),
    last_input=jnp.zeros((L, B, D), jnp.float32),
  )


def state_bytes(state: EchoState) -> int:
  """Physical bytes of every leaf (the upper triangle of `chol` included)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def state_bytes_per_sequence(config: EchoConfig) -> int:
  """Bytes of one sequence's state (batch 1); independent of its length."""
  shapes = jax.eval_shape(functools.partial(init_state, config, 1))
  return int(
    sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
  )


def matched_linear_rank(config: EchoConfig) -> int:
  """The linear-memory rank r' whose state bytes are closest to, and not
  above, those of `config` (its C_v [P, r'] takes Echo's L, M, C_v and lag).
  """
  c = config
  floats = c.num_heads * (2 * c.matrix_rank**2 + c.value_dim * c.rank)
  floats += c.num_heads * c.matrix_rank
  return max(1, floats // (c.num_heads * c.value_dim))


# ----------------------------------------------------------------------------
# Linear algebra of one memory (any leading batch axes).


# The factorisation and the triangular solves are written as r-step loops
# of plain XLA ops rather than `jnp.linalg.cholesky` and
# `lax.linalg.triangular_solve`: with jaxlib 0.10.2 on CPU, the LAPACK
# kernels behind those split their batch over the intra-op thread pool and
# wait for it, and two of them running concurrently (independent thunks of
# one program, as in the backward pass here) deadlock when the pool's
# threads are all waiting (seen under gdb: every thread idle, two
# `lapack_strsm_ffi` calls in `BlockingCounter::Wait`). r is small (16-64).


def cholesky(gram: Array) -> Array:
  """Lower Cholesky factor of gram [..., R, R] (symmetric positive
  definite), column by column."""
  R = gram.shape[-1]
  rows = jnp.arange(R)

  def column(j, chol):
    # Columns >= j of chol are still zero, so the sum runs over k < j.
    v = gram[..., :, j] - jnp.einsum("...ik,...k->...i", chol, chol[..., j, :])
    d = jnp.sqrt(v[..., j])[..., None]  # [..., 1]
    col = jnp.where(rows > j, v / d, 0.0)
    col = jnp.where(rows == j, d, col)  # [..., R]
    return chol.at[..., :, j].set(col)

  return jax.lax.fori_loop(0, R, column, jnp.zeros_like(gram))


def _lower_solve(chol: Array, x: Array, transpose: bool = False) -> Array:
  """L^-1 x (or L^-T x) for chol [..., R, R] and x [..., R, S]:
  forward (or back) substitution, one row per step."""
  R = chol.shape[-1]
  chol_t = jnp.swapaxes(chol, -1, -2) if transpose else chol
  x = jnp.broadcast_to(x, chol.shape[:-2] + x.shape[-2:])

  def row(step, out):
    i = R - 1 - step if transpose else step
    # Rows of out not yet solved are zero, so the sum runs over solved ones.
    acc = jnp.einsum("...k,...ks->...s", chol_t[..., i, :], out)  # [..., S]
    new = (x[..., i, :] - acc) / chol_t[..., i, i][..., None]
    return out.at[..., i, :].set(new)

  return jax.lax.fori_loop(0, R, row, jnp.zeros_like(x))


def cholesky_update(chol: Array, x: Array) -> Array:
  """The factor of L L^T + x x^T: a rank-1 Cholesky update, O(r^2).

  Args:
    chol: [..., R, R] lower-triangular with a positive diagonal.
    x: [..., R] the update vector.

  Returns:
    [..., R, R] the lower factor of the updated matrix.
  """
  R = chol.shape[-1]
  rows = jnp.arange(R)

  def column(i, carry):
    chol, x = carry
    diag = chol[..., i, i]  # [...]
    xi = x[..., i]
    radius = jnp.sqrt(diag * diag + xi * xi)
    cos = (radius / diag)[..., None]
    sin = (xi / diag)[..., None]
    col = chol[..., :, i]  # [..., R]
    below = rows > i
    new = jnp.where(below, (col + sin * x) / cos, col)
    new = jnp.where(rows == i, radius[..., None], new)
    x = jnp.where(below, cos * x - sin * new, x)
    return chol.at[..., :, i].set(new), x

  chol, _ = jax.lax.fori_loop(0, R, column, (chol, x))
  return chol


def spectral_scale(w: Array, gamma: float, iters: int) -> Array:
  """gamma / max(sigma_max(W), 1) by power iteration on W^T W, no gradient.

  Args:
    w: [..., R, R].
    gamma: the gain.
    iters: power-iteration steps (from the all-ones vector).

  Returns:
    [...] the scale a of (a W)^K.
  """
  w = jax.lax.stop_gradient(w)
  R = w.shape[-1]
  v = jnp.full(w.shape[:-1], 1.0 / np.sqrt(R), w.dtype)  # [..., R]

  def step(_, v):
    u = jnp.einsum("...rs,...s->...r", w, v)  # W v
    u = u / (jnp.linalg.norm(u, axis=-1, keepdims=True) + 1e-8)
    v = jnp.einsum("...sr,...s->...r", w, u)  # W^T u
    return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-8)

  v = jax.lax.fori_loop(0, iters, step, v)
  sigma = jnp.linalg.norm(jnp.einsum("...rs,...s->...r", w, v), axis=-1)
  return gamma / jnp.maximum(sigma, 1.0)


def readout(
  chol: Array,  # [..., R, R]
  trans: Array,  # [..., R, R]
  values: Array,  # [..., P, R]
  query: Array,  # [..., R]
  *,
  power_k: int,
  eta: float,
  gamma: float,
  power_iters: int,
) -> Array:
  """y = eta * C_v L^-T (a W)^K L^-1 q with W = L^-1 M L^-T: [..., P]."""
  u = _lower_solve(chol, query[..., None])  # L^-1 q: [..., R, 1]
  if power_k > 0:
    a_m = _lower_solve(chol, trans)  # L^-1 M: [..., R, R]
    # W = (L^-1 (L^-1 M)^T)^T = L^-1 M L^-T: [..., R, R]
    w = jnp.swapaxes(_lower_solve(chol, jnp.swapaxes(a_m, -1, -2)), -1, -2)
    scale = spectral_scale(w, gamma, power_iters)[..., None, None]
    for _ in range(power_k):
      u = scale * (w @ u)  # [..., R, 1]
  x = _lower_solve(chol, u, transpose=True)[..., 0]  # L^-T u: [..., R]
  return eta * jnp.einsum("...pr,...r->...p", values, x)


def _l2(x: Array) -> Array:
  """Per-token L2 normalisation over the last axis (causal)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


# ----------------------------------------------------------------------------
# One memory layer: projections, chunked prefill, one-token decode.


def _project(p: Params, h: Array, h_prev: Array):
  """Keys, queries, values and gates of normed inputs h, h_prev [B, T, D]."""
  k = jnp.einsum("btd,dnr->btnr", h, p["wk"])  # [B, T, N, r]
  k = k + jnp.einsum("btd,dnr->btnr", h_prev, p["wk_prev"])
  z = _l2(k)
  q = _l2(jnp.einsum("btd,dnr->btnr", h, p["wq"]))  # [B, T, N, r]
  v = jnp.einsum("btd,dnp->btnp", h, p["wv"])  # [B, T, N, P]
  b = jax.nn.sigmoid(jnp.einsum("btd,dn->btn", h, p["wb"]) + p["bb"])  # [B,T,N]
  return z, q, v, b


def _readout_kw(c: EchoConfig) -> dict[str, Any]:
  return dict(
    power_k=c.power_k, eta=c.eta, gamma=c.gamma, power_iters=c.power_iters
  )


def memory_prefill(
  p: Params,
  h: Array,  # [B, T, D] normed layer input
  state: tuple[Array, ...],  # one layer's EchoState leaves (no L axis)
  *,
  config: EchoConfig,
  chunk_size: int | None = None,
) -> tuple[Array, tuple[Array, ...]]:
  """The memory's outputs [B, T, N, P] for T tokens and its state after them.

  A scan over chunks of `chunk_size` tokens (default `config.chunk_size`;
  the last chunk is padded with zero-gate writes, which change nothing, and
  its padded outputs are dropped). The carry is the exclusive prefix sum
  (G, M, C_v) of the chunks before; each token reads carry + the inclusive
  sum of its chunk up to itself.
  """
  c = config
  C = c.chunk_size if chunk_size is None else chunk_size
  chol, trans, values, last_key, last_input = state
  B, T, _ = h.shape
  h_prev = jnp.concatenate([last_input[:, None], h[:, :-1]], axis=1)
  z, q, v, b = _project(p, h, h_prev)
  echo = c.memory == "echo"
  nc = -(-T // C)
  pad = nc * C - T

  def chunks(x):  # [B, T, ...] -> [nc, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, nc, C, *x.shape[2:])  # [B, nc, C, ...]
    return jnp.moveaxis(x, 1, 0)

  zb = b[..., None] * z  # [B, T, N, r] gated keys (0 on padding)
  dv = jnp.einsum("btnp,btnr->btnpr", v, zb)  # [B, T, N, P, r]
  if echo:
    z_lag = jnp.concatenate([last_key[:, None], z[:, :-1]], axis=1)
    gram0 = chol @ jnp.swapaxes(chol, -1, -2)  # G = L L^T: [B, N, r, r]
  else:
    gram0 = trans  # [B, N, 0, 0], unused
    z_lag = z[..., :0]

  # Inclusive prefix sums within a chunk as a matmul with a lower-triangular
  # mask (XLA's CPU cumsum and its gradient are far slower).
  tril = jnp.tril(jnp.ones((C, C), jnp.float32))  # [C(t), C(s)]
  incl = lambda x: jnp.einsum("ts,bs...->bt...", tril, x)

  def step(carry, xs):
    gram, m, cv = carry
    zb_c, z_c, z_lag_c, q_c, dv_c = xs
    cv_t = cv[:, None] + incl(dv_c)  # [B, C, N, P, r]
    if echo:
      dg = jnp.einsum("bcnr,bcns->bcnrs", zb_c, z_c)  # [B, C, N, r, r]
      dm = jnp.einsum("bcnr,bcns->bcnrs", zb_c, z_lag_c)  # [B, C, N, r, r]
      gram_t = gram[:, None] + incl(dg)  # [B, C, N, r, r]
      m_t = m[:, None] + incl(dm)
      chol_t = cholesky(gram_t)  # [B, C, N, r, r]
      y = readout(chol_t, m_t, cv_t, q_c, **_readout_kw(c))  # [B, C, N, P]
      carry = (gram_t[:, -1], m_t[:, -1], cv_t[:, -1])
    else:
      y = jnp.einsum("bcnpr,bcnr->bcnp", cv_t, q_c)  # [B, C, N, P]
      carry = (gram, m, cv_t[:, -1])
    return carry, y

  xs = tuple(map(chunks, (zb, z, z_lag, q, dv)))
  (gram, m, cv), y = jax.lax.scan(step, (gram0, trans, values), xs)
  y = jnp.moveaxis(y, 0, 1).reshape(B, nc * C, *y.shape[3:])[:, :T]
  if echo:
    chol = cholesky(gram)  # from scratch, once per prefill
    last_key = z[:, -1]
  return y, (chol, m, cv, last_key, h[:, -1])


def memory_decode(
  p: Params,
  h: Array,  # [B, D] normed layer input of one token
  state: tuple[Array, ...],
  *,
  config: EchoConfig,
) -> tuple[Array, tuple[Array, ...]]:
  """One token: rank-1 Cholesky update with sqrt(b) z, then the readout.

  Returns:
    y [B, N, P] and the layer's new state leaves.
  """
  c = config
  chol, trans, values, last_key, last_input = state
  z, q, v, b = _project(p, h[:, None], last_input[:, None])
  z, q, v, b = z[:, 0], q[:, 0], v[:, 0], b[:, 0]  # [B, N, r] ... [B, N]
  zb = b[..., None] * z  # [B, N, r]
  values = values + jnp.einsum("bnp,bnr->bnpr", v, zb)  # [B, N, P, r]
  if c.memory == "echo":
    chol = cholesky_update(chol, jnp.sqrt(b)[..., None] * z)
    trans = trans + jnp.einsum("bnr,bns->bnrs", zb, last_key)  # [B, N, r, r]
    y = readout(chol, trans, values, q, **_readout_kw(c))  # [B, N, P]
    last_key = z
  else:
    y = jnp.einsum("bnpr,bnr->bnp", values, q)  # [B, N, P]
  return y, (chol, trans, values, last_key, h)


# ----------------------------------------------------------------------------
# The model.


def init_params(config: EchoConfig, rng: Array, std: float = 0.02) -> Params:
  """Random parameters (layers stacked on L); write gates start at 0.5,
  the memory and MLP output matrices at zero (each block starts as the
  identity)."""
  c = config
  L, D, N, r, P, F, V = (
    c.num_layers,
    c.d_model,
    c.num_heads,
    c.rank,
    c.value_dim,
    c.mlp_dim,
    c.vocab_size,
  )
  shapes = {
    "wk": (L, D, N, r),
    "wk_prev": (L, D, N, r),
    "wq": (L, D, N, r),
    "wv": (L, D, N, P),
    "wb": (L, D, N),
    "w_gate": (L, D, F),
    "w_up": (L, D, F),
  }
  keys = jax.random.split(rng, len(shapes) + 1)
  layers = {
    name: std * jax.random.normal(key, shape, jnp.float32)
    for (name, shape), key in zip(shapes.items(), keys[1:])
  }
  layers.update(
    bb=jnp.zeros((L, N), jnp.float32),
    wo=jnp.zeros((L, N, P, D), jnp.float32),
    w_down=jnp.zeros((L, F, D), jnp.float32),
    norm=jnp.ones((L, D), jnp.float32),
    mlp_norm=jnp.ones((L, D), jnp.float32),
  )
  return {
    "embed": std * jax.random.normal(keys[0], (V, D), jnp.float32),
    "layers": layers,
    "final_norm": jnp.ones((D,), jnp.float32),
  }


def _check_model_args(params, tokens, state, config, *, ndim):
  if not isinstance(config, EchoConfig):
    raise TypeError(f"config must be an EchoConfig, got {type(config)}.")
  if not isinstance(state, EchoState):
    raise TypeError(f"state must be an EchoState, got {type(state)}.")
  tokens = jnp.asarray(tokens)
  if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
      f"tokens must be an int array of {ndim} dims ([B, T] for forward, "
      f"[B] for decode), got {tokens.dtype}{list(tokens.shape)}."
    )
  B = tokens.shape[0]
  want = jax.eval_shape(functools.partial(init_state, config, B))
  got = jax.tree.map(lambda x: tuple(x.shape), state)
  if got != jax.tree.map(lambda x: tuple(x.shape), want):
    raise ValueError(
      f"state shapes {got} do not match config and batch {B}: "
      f"{jax.tree.map(lambda x: tuple(x.shape), want)}."
    )
  if params["embed"].shape != (config.vocab_size, config.d_model):
    raise ValueError(
      f"params['embed'] has shape {params['embed'].shape}, config wants "
      f"{(config.vocab_size, config.d_model)}."
    )
  return tokens


def _block(x, p, layer_state, memory_fn, config):
  """x + wo(memory(norm x)), then + mlp(norm x); x [B, T, D]."""
  c = config
  h = rms_norm(x, p["norm"], c.norm_eps)  # [B, T, D]
  y, layer_state = memory_fn(p, h, layer_state)  # y [B, T, N, P]
  x = x + jnp.einsum("btnp,npd->btd", y, p["wo"])  # [B, T, D]
  h = rms_norm(x, p["mlp_norm"], c.norm_eps)
  gate = jnp.einsum("btd,df->btf", h, p["w_gate"])  # [B, T, F]
  up = jnp.einsum("btd,df->btf", h, p["w_up"])  # [B, T, F]
  x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
  return x, layer_state


def _logits(params, x, config):
  x = rms_norm(x, params["final_norm"], config.norm_eps)
  return jnp.einsum("...d,vd->...v", x, params["embed"])  # [..., V]


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def _forward(params, tokens, state, *, config, chunk_size):
  x = params["embed"][tokens]  # [B, T, D]
  memory_fn = functools.partial(
    memory_prefill, config=config, chunk_size=chunk_size
  )

  def layer(x, xs):
    p, layer_state = xs
    return _block(x, p, layer_state, memory_fn, config)

  x, state = jax.lax.scan(layer, x, (params["layers"], tuple(state)))
  return _logits(params, x, config), EchoState(*state)


def forward(
  params: Params,
  tokens: Array,
  state: EchoState,
  *,
  config: EchoConfig,
  chunk_size: int | None = None,
) -> tuple[Array, EchoState]:
  """Chunked causal pass (prefill or training) over T tokens.

  Every token of every row is written into the state (there is no token
  mask): rows must be unpadded, or a padded row's state holds its padding
  too (outputs at real positions are causal and unaffected, but a decode
  after a padded prefill would read it). `experiments/echo_mqar.py`
  prefills unpadded contexts; a row's padding comes after its answers.

  Args:
    params: from `init_params`.
    tokens: [B, T] int ids.
    state: the memory before these tokens (`init_state` for a new one).
    config: the model config.
    chunk_size: tokens per chunk (default `config.chunk_size`); any
      T works (a last partial chunk is padded with zero writes).

  Returns:
    logits [B, T, V] float32 and the state after the T tokens.

  Raises:
    TypeError, ValueError: bad config, state, tokens or chunk_size.
  """
  tokens = _check_model_args(params, tokens, state, config, ndim=2)
  if tokens.shape[1] < 1:
    raise ValueError("tokens must hold at least one token (T >= 1).")
  if chunk_size is not None:
    _check_int("chunk_size", chunk_size, 1)
  return _forward(params, tokens, state, config=config, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(params, token, state, *, config):
  x = params["embed"][token][:, None]  # [B, 1, D]

  def memory_fn(p, h, layer_state):  # h [B, 1, D] -> y [B, 1, N, P]
    y, layer_state = memory_decode(p, h[:, 0], layer_state, config=config)
    return y[:, None], layer_state

  def layer(x, xs):
    p, layer_state = xs
    return _block(x, p, layer_state, memory_fn, config)

  x, state = jax.lax.scan(layer, x, (params["layers"], tuple(state)))
  return _logits(params, x[:, 0], config), EchoState(*state)


def decode(
  params: Params, token: Array, state: EchoState, *, config: EchoConfig
) -> tuple[Array, EchoState]:
  """One token per row: O(r^2) state update per layer and head.

  Args:
    params: from `init_params`.
    token: [B] int ids.
    state: the memory so far.
    config: the model config.

  Returns:
    logits [B, V] float32 and the updated state.
  """
  token = _check_model_args(params, token, state, config, ndim=1)
  return _decode(params, token, state, config=config)
