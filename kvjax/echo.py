"""Echo memory (Spectral Koopman Attention): a fixed-size state instead of a
KV cache, and a small decoder whose layers read it (all of them, or some of
them next to attention layers).

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

`"linear"` is the linear-attention baseline in the same model: the state is
C_v alone and y = C_v q (G = I, no transition), with the same keys, gate and
token shift; give it a wider rank to match Echo's bytes
(`matched_linear_rank`).

`"attention"` is causal softmax attention over a KV cache: N heads, queries
and keys of width r rotated by RoPE (rotate-half, theta 10,000, so the layer
can find "the previous token", which a position-free model cannot
otherwise), values of width P, scale r^-1/2. Its state is a ring of S slots
(keys after RoPE, values, the original position of each slot, -1 when
empty, and the count of tokens seen): with `attention_window = W` the ring
has S = W slots and token t attends to positions t-W+1..t only -- a context
longer than W is the window's definition, not a loss -- so its bytes are
fixed; without a window (full attention) S is the `capacity` given to
`init_state` and the bytes grow with the context one plans to hold (a write
past the capacity raises, see `forward`).

The model: embedding, then L blocks of x + wo(mixer(norm(x))) and
x + mlp(norm(x)) (SwiGLU), final norm, tied LM head; the mixer of layer l is
`config.kinds[l]`. Memory keys read the current and the previous normed
input (a width-2 token shift, as the Mamba-2 convolution around Echo layers
provides in the paper), so a memory layer's state also keeps its last normed
input. Parameters and state are grouped by kind: `params["layers"]` (norms,
MLP, wo) is stacked over all L layers, `params[kind]` and the state's
`kind` field over the layers of that kind, in layer order. A model whose
layers are all one kind runs one `lax.scan` over layers; a hybrid runs a
Python loop over layers (unrolled in the one compiled program).

Einsum letters: B batch, T tokens, C chunk tokens, L layers, N heads, R and
S rank (key feature) axes (S also the slots of an attention ring), P value
width, D model dim, F MLP dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.model import apply_rope, rms_norm

Array = jax.Array
Params = dict[str, Any]

MEMORIES = ("echo", "linear")
LAYER_KINDS = ("echo", "linear", "attention")
ROPE_THETA = 10_000.0


@dataclasses.dataclass(frozen=True)
class EchoConfig:
  """A small decoder whose layers read an Echo (or linear) memory, or attend
  over a KV cache.

  Attributes:
    vocab_size: V (512 for `kvjax.tasks.VOCAB`).
    d_model: D.
    num_layers: L.
    num_heads: N heads per layer (memory or attention).
    rank: r, the key feature width per head (Echo's rank; the query/key
      width of attention heads, even when a layer is "attention").
    value_dim: P, the value width per head.
    mlp_dim: F of the SwiGLU MLP.
    memory: "echo" or "linear" (the baseline: y = C_v q): the kind of every
      layer when `layer_memories` is None; not read otherwise.
    layer_memories: None, or one kind per layer from `LAYER_KINDS` ("echo",
      "linear", "attention"), e.g. ("attention", "echo"); a list is stored
      as a tuple.
    attention_window: None (full causal attention: its cache grows with
      the context, sized by `init_state`'s capacity) or W >= 1, a sliding
      window (each token sees itself and the W - 1 before it; a ring of W
      slots). Only with an "attention" layer.
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
  layer_memories: tuple[str, ...] | None = None
  attention_window: int | None = None
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
    kinds = self.layer_memories
    if kinds is not None:
      if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
        raise TypeError(
          "layer_memories must be None or a tuple of kinds from "
          f"{LAYER_KINDS}, one per layer, got {kinds!r}."
        )
      kinds = tuple(kinds)
      object.__setattr__(self, "layer_memories", kinds)
      bad = [k for k in kinds if k not in LAYER_KINDS]
      if bad or len(kinds) != self.num_layers:
        raise ValueError(
          f"layer_memories={kinds!r} must hold num_layers={self.num_layers} "
          f"kinds from {LAYER_KINDS}."
        )
    if self.attention_window is not None:
      _check_int("attention_window", self.attention_window, 1)
      if "attention" not in self.kinds:
        raise ValueError(
          f"attention_window={self.attention_window} needs an 'attention' "
          f"layer; layer kinds are {self.kinds}."
        )
    if "attention" in self.kinds and self.rank % 2:
      raise ValueError(
        f"rank={self.rank} must be even with an 'attention' layer (RoPE "
        "rotates pairs of the query/key width)."
      )
    for name in ("eps", "eta", "gamma", "norm_eps"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a float > 0, got {value!r}.")

  @property
  def kinds(self) -> tuple[str, ...]:
    """The mixer of each layer: `layer_memories`, or `memory` everywhere."""
    if self.layer_memories is None:
      return (self.memory,) * self.num_layers
    return self.layer_memories

  @property
  def full_attention(self) -> bool:
    """Whether a layer attends over a cache that grows with the context."""
    return "attention" in self.kinds and self.attention_window is None

  @property
  def matrix_rank(self) -> int:
    """Side of the stored L and M of `memory`: r for Echo, 0 for linear."""
    return self.rank if self.memory == "echo" else 0

  def replace(self, **changes) -> "EchoConfig":
    return dataclasses.replace(self, **changes)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def _layer_groups(config: EchoConfig) -> dict[str, tuple[int, ...]]:
  """Kind -> the layers of that kind (in order); only kinds present."""
  groups: dict[str, tuple[int, ...]] = {}
  for layer, kind in enumerate(config.kinds):
    groups[kind] = groups.get(kind, ()) + (layer,)
  return groups


# ----------------------------------------------------------------------------
# The state.


class MemoryState(NamedTuple):
  """The fixed-size memory of the Echo (or linear) layers of a model
  (leaves stacked over those Lk layers).

  Attributes:
    chol: [Lk, B, N, R, R] float32 lower Cholesky factor of G (R = r for
      Echo, 0 for linear).
    trans: [Lk, B, N, R, R] float32 M = sum b z_t z_{t-1}^T.
    values: [Lk, B, N, P, r] float32 C_v = sum b v z^T.
    last_key: [Lk, B, N, R] float32 z of the last written token (M's lag).
    last_input: [Lk, B, D] float32 last normed layer input (token shift).
  """

  chol: Array
  trans: Array
  values: Array
  last_key: Array
  last_input: Array


class AttentionState(NamedTuple):
  """The KV rings of the attention layers (leaves stacked over those La
  layers); S = attention_window, or the capacity of full attention.

  Attributes:
    keys: [La, B, S, N, r] float32 keys after RoPE; slot = position mod S.
    values: [La, B, S, N, P] float32.
    pos: [La, B, S] int32 original position of each slot, -1 when empty.
    length: [La, B] int32 tokens seen (the position of the next one).
  """

  keys: Array
  values: Array
  pos: Array
  length: Array


class EchoState(NamedTuple):
  """The whole model's state, one field per layer kind (None when the
  model has no layer of that kind)."""

  echo: MemoryState | None
  linear: MemoryState | None
  attention: AttentionState | None


def _init_memory(config: EchoConfig, kind: str, Lk: int, B: int):
  c = config
  N, r, P, D = c.num_heads, c.rank, c.value_dim, c.d_model
  R = r if kind == "echo" else 0
  eye = jnp.sqrt(jnp.float32(c.eps)) * jnp.eye(R, dtype=jnp.float32)
  return MemoryState(
    chol=jnp.broadcast_to(eye, (Lk, B, N, R, R)),
    trans=jnp.zeros((Lk, B, N, R, R), jnp.float32),
    values=jnp.zeros((Lk, B, N, P, r), jnp.float32),
    last_key=jnp.zeros((Lk, B, N, R), jnp.float32),
    last_input=jnp.zeros((Lk, B, D), jnp.float32),
  )


def _check_capacity(config: EchoConfig, capacity) -> int | None:
  if config.full_attention:
    if capacity is None:
      raise ValueError(
        "capacity is required: a full-attention layer (attention_window "
        "None) holds a KV cache of `capacity` tokens."
      )
    return _check_int("capacity", capacity, 1)
  if capacity is not None:
    raise ValueError(
      f"capacity={capacity!r} is only for full-attention layers; layer "
      f"kinds {config.kinds}, attention_window {config.attention_window}."
    )
  return None


def init_state(
  config: EchoConfig, batch_size: int, capacity: int | None = None
) -> EchoState:
  """The empty state: L = sqrt(eps) I and zeros for the memories, empty
  rings (pos -1) for the attention layers.

  Args:
    config: the model config.
    batch_size: B.
    capacity: tokens a full-attention layer's cache holds (required then,
      and only then).

  Raises:
    TypeError, ValueError: batch_size not an int >= 1; capacity missing
      for, or given without, a full-attention layer.
  """
  c = config
  B = _check_int("batch_size", batch_size, 1)
  capacity = _check_capacity(c, capacity)
  groups = _layer_groups(c)
  fields = {}
  for kind in MEMORIES:
    if kind in groups:
      fields[kind] = _init_memory(c, kind, len(groups[kind]), B)
  if "attention" in groups:
    La, N = len(groups["attention"]), c.num_heads
    S = c.attention_window or capacity
    fields["attention"] = AttentionState(
      keys=jnp.zeros((La, B, S, N, c.rank), jnp.float32),
      values=jnp.zeros((La, B, S, N, c.value_dim), jnp.float32),
      pos=jnp.full((La, B, S), -1, jnp.int32),
      length=jnp.zeros((La, B), jnp.int32),
    )
  return EchoState(**{f: fields.get(f) for f in EchoState._fields})


def state_bytes(state: EchoState) -> int:
  """Physical bytes of every leaf (the upper triangle of `chol`, an
  attention ring's empty slots, positions and counters included): fixed
  for memory and sliding-window layers, the capacity's for full attention.
  """
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def state_bytes_per_sequence(
  config: EchoConfig, capacity: int | None = None
) -> int:
  """Bytes of one sequence's state (batch 1); independent of its length
  except through a full-attention layer's `capacity`."""
  shapes = jax.eval_shape(functools.partial(init_state, config, 1, capacity))
  return int(
    sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
  )


def state_overflowed(state: EchoState, config: EchoConfig) -> bool:
  """Whether a full-attention layer was sent more tokens than its capacity
  (possible only under a caller's `jit`, where `forward` and `decode`
  cannot check on the host and drop the writes past the capacity)."""
  a = state.attention
  if a is None or not config.full_attention:
    return False
  return bool(jnp.any(a.length > a.pos.shape[-1]))


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
  state: tuple[Array, ...],  # one layer's MemoryState leaves (no L axis)
  *,
  config: EchoConfig,
  chunk_size: int | None = None,
  memory: str | None = None,
) -> tuple[Array, tuple[Array, ...]]:
  """The memory's outputs [B, T, N, P] for T tokens and its state after them.

  A scan over chunks of `chunk_size` tokens (default `config.chunk_size`;
  the last chunk is padded with zero-gate writes, which change nothing, and
  its padded outputs are dropped). The carry is the exclusive prefix sum
  (G, M, C_v) of the chunks before; each token reads carry + the inclusive
  sum of its chunk up to itself. `memory` ("echo" or "linear") defaults
  to `config.memory`.
  """
  c = config
  C = c.chunk_size if chunk_size is None else chunk_size
  chol, trans, values, last_key, last_input = state
  B, T, _ = h.shape
  h_prev = jnp.concatenate([last_input[:, None], h[:, :-1]], axis=1)
  z, q, v, b = _project(p, h, h_prev)
  echo = (c.memory if memory is None else memory) == "echo"
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
  memory: str | None = None,
) -> tuple[Array, tuple[Array, ...]]:
  """One token: rank-1 Cholesky update with sqrt(b) z, then the readout
  (`memory` as in `memory_prefill`).

  Returns:
    y [B, N, P] and the layer's new state leaves.
  """
  c = config
  chol, trans, values, last_key, last_input = state
  z, q, v, b = _project(p, h[:, None], last_input[:, None])
  z, q, v, b = z[:, 0], q[:, 0], v[:, 0], b[:, 0]  # [B, N, r] ... [B, N]
  zb = b[..., None] * z  # [B, N, r]
  values = values + jnp.einsum("bnp,bnr->bnpr", v, zb)  # [B, N, P, r]
  if (c.memory if memory is None else memory) == "echo":
    chol = cholesky_update(chol, jnp.sqrt(b)[..., None] * z)
    trans = trans + jnp.einsum("bnr,bns->bnrs", zb, last_key)  # [B, N, r, r]
    y = readout(chol, trans, values, q, **_readout_kw(c))  # [B, N, P]
    last_key = z
  else:
    y = jnp.einsum("bnpr,bnr->bnp", values, q)  # [B, N, P]
  return y, (chol, trans, values, last_key, h)


# ----------------------------------------------------------------------------
# One attention layer: RoPE, softmax over a ring of S slots.


def _rope(x: Array, positions: Array) -> Array:
  """RoPE (rotate-half, theta `ROPE_THETA`) of x [B, T, N, r] at
  positions [B, T]."""
  r = x.shape[-1]
  inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, r, 2, dtype=np.float32) / r)
  return apply_rope(x, positions, inv_freq.astype(np.float32))


# Masked logits get a large finite value, not -inf: a padded query of the
# last chunk may see no key, and a row of -inf would be NaN (dropped, but
# NaN through `where` poisons gradients).
_MASKED = -1e30


def attend(
  q: Array,  # [B, T, N, r] after RoPE
  q_pos: Array,  # [B, T] int32
  keys: Array,  # [B, S, N, r] after RoPE
  values: Array,  # [B, S, N, P]
  k_pos: Array,  # [B, S] int32, -1 for an empty slot
  window: int | None,
) -> Array:
  """Causal softmax attention: query t sees every filled slot with
  position <= t (and > t - window with a window). Returns [B, T, N, P]."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = scale * jnp.einsum("btnr,bsnr->bnts", q, keys)  # [B, N, T, S]
  seen = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
  if window is not None:
    seen &= k_pos[:, None, :] > q_pos[:, :, None] - window  # [B, T, S]
  logits = jnp.where(seen[:, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)  # [B, N, T, S]
  return jnp.einsum("bnts,bsnp->btnp", probs, values)  # [B, T, N, P]


def _ring_write(ring, new, first, count, window):
  """Writes the first `count` tokens of `new` (positions first[b] + j) into
  the ring (keys, values, pos) of S slots. Slot s takes the newest of them
  whose position is s mod S (a window: older ones leave the window), or,
  for full attention, the one at position s (positions >= S are dropped:
  `forward` raises before that outside a caller's `jit`)."""
  keys, values, pos = ring  # [B, S, N, r], [B, S, N, P], [B, S]
  k, v = new  # [B, C, N, r], [B, C, N, P]
  B, S = pos.shape
  slots = jnp.arange(S)
  if window is not None:
    j = count - 1 - jnp.mod(first[:, None] + count - 1 - slots, S)  # [B, S]
  else:
    j = slots - first[:, None]  # [B, S]
  hit = (j >= 0) & (j < count)  # [B, S]
  jc = jnp.clip(j, 0, k.shape[1] - 1)

  def take(x):  # [B, C, ...] -> [B, S, ...]: token j of slot s
    idx = jc.reshape(B, S, *(1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)

  keys = jnp.where(hit[..., None, None], take(k), keys)
  values = jnp.where(hit[..., None, None], take(v), values)
  pos = jnp.where(hit, first[:, None] + j, pos)
  return keys, values, pos


def attention_prefill(
  p: Params,
  h: Array,  # [B, T, D] normed layer input
  state: tuple[Array, ...],  # one layer's AttentionState leaves (no L axis)
  *,
  config: EchoConfig,
  chunk_size: int | None = None,
) -> tuple[Array, tuple[Array, ...]]:
  """The attention layer's outputs [B, T, N, P] for T tokens and its ring
  after them.

  A scan over chunks of `chunk_size` tokens (default `config.chunk_size`;
  the last chunk is padded with tokens that are never written and whose
  outputs are dropped): each chunk's queries attend over the ring (the
  tokens before the chunk) and the chunk itself, then the chunk is written
  into the ring. Memory per chunk is O(B N C (S + C)). Decode is this with
  T = 1.
  """
  c = config
  C = c.chunk_size if chunk_size is None else chunk_size
  keys, values, pos, length = state
  B, T, _ = h.shape
  nc = -(-T // C)
  t = jnp.arange(nc * C)
  q_pos = length[:, None] + t  # [B, nc C] positions (padding continues)
  q = _rope(jnp.einsum("btd,dnr->btnr", h, p["wq"]), q_pos[:, :T])
  k = _rope(jnp.einsum("btd,dnr->btnr", h, p["wk"]), q_pos[:, :T])
  v = jnp.einsum("btd,dnp->btnp", h, p["wv"])  # [B, T, N, P]
  k_pos = jnp.where(t < T, q_pos, -1)  # [B, nc C]: padding is never seen

  def chunks(x):  # [B, nc C or T, ...] -> [nc, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, nc * C - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, nc, C, *x.shape[2:]), 1, 0)

  def step(ring, xs):
    q_c, k_c, v_c, qp_c, kp_c, count = xs
    y = attend(
      q_c,
      qp_c,
      jnp.concatenate([ring[0], k_c], axis=1),  # [B, S + C, N, r]
      jnp.concatenate([ring[1], v_c], axis=1),  # [B, S + C, N, P]
      jnp.concatenate([ring[2], kp_c], axis=1),  # [B, S + C]
      c.attention_window,
    )
    ring = _ring_write(ring, (k_c, v_c), qp_c[:, 0], count, c.attention_window)
    return ring, y

  counts = jnp.clip(T - C * jnp.arange(nc), 0, C)  # [nc] real tokens
  xs = tuple(map(chunks, (q, k, v, q_pos, k_pos))) + (counts,)
  (keys, values, pos), y = jax.lax.scan(step, (keys, values, pos), xs)
  y = jnp.moveaxis(y, 0, 1).reshape(B, nc * C, *y.shape[3:])[:, :T]
  return y, (keys, values, pos, length + T)


# ----------------------------------------------------------------------------
# The model.


def init_params(config: EchoConfig, rng: Array, std: float = 0.02) -> Params:
  """Random parameters: `layers` (norms, MLP, wo) stacked over all L
  layers, and per kind present the mixer's projections stacked over the
  layers of that kind. Write gates start at 0.5, the mixer and MLP output
  matrices at zero (each block starts as the identity)."""
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
  normal = lambda name, shape: (
    std
    * jax.random.normal(
      jax.random.fold_in(rng, _param_stream(name)), shape, jnp.float32
    )
  )
  params: Params = {
    "embed": normal("embed", (V, D)),
    "final_norm": jnp.ones((D,), jnp.float32),
    "layers": {
      "w_gate": normal("w_gate", (L, D, F)),
      "w_up": normal("w_up", (L, D, F)),
      "w_down": jnp.zeros((L, F, D), jnp.float32),
      "wo": jnp.zeros((L, N, P, D), jnp.float32),
      "norm": jnp.ones((L, D), jnp.float32),
      "mlp_norm": jnp.ones((L, D), jnp.float32),
    },
  }
  for kind, layers in _layer_groups(c).items():
    Lk = len(layers)
    group = {
      "wq": normal(f"{kind}/wq", (Lk, D, N, r)),
      "wk": normal(f"{kind}/wk", (Lk, D, N, r)),
      "wv": normal(f"{kind}/wv", (Lk, D, N, P)),
    }
    if kind in MEMORIES:
      group.update(
        wk_prev=normal(f"{kind}/wk_prev", (Lk, D, N, r)),
        wb=normal(f"{kind}/wb", (Lk, D, N)),
        bb=jnp.zeros((Lk, N), jnp.float32),
      )
    params[kind] = group
  return params


def _param_stream(name: str) -> int:
  """A stable 31-bit integer of a parameter name (its RNG stream)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


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
  capacity = None
  if config.full_attention and isinstance(state.attention, AttentionState):
    capacity = state.attention.pos.shape[-1]
  want = jax.eval_shape(functools.partial(init_state, config, B, capacity))
  shapes = lambda s: jax.tree.map(lambda x: tuple(x.shape), s)
  if jax.tree.structure(state) != jax.tree.structure(want) or shapes(
    state
  ) != shapes(want):
    raise ValueError(
      f"state shapes {shapes(state)} do not match config and batch {B}: "
      f"{shapes(want)}."
    )
  want_params = jax.eval_shape(
    functools.partial(init_params, config), jax.random.PRNGKey(0)
  )
  if shapes(params) != shapes(want_params):
    raise ValueError(
      f"params shapes {shapes(params)} do not match the config's "
      f"{shapes(want_params)}."
    )
  if capacity is not None:
    length = state.attention.length
    T = tokens.shape[1] if ndim == 2 else 1
    if not isinstance(length, jax.core.Tracer):
      seen = int(jnp.max(length))
      if seen + T > capacity:
        raise ValueError(
          f"the full-attention cache holds capacity={capacity} tokens; "
          f"{seen} are written and {T} more do not fit (init_state with a "
          "larger capacity, or use attention_window)."
        )
  return tokens


def _block(x, p, mix, config):
  """x + wo(mix(norm x)), then + mlp(norm x); x [B, T, D].

  `mix(h)` -> (y [B, T, N, P], the layer's new state)."""
  c = config
  h = rms_norm(x, p["norm"], c.norm_eps)  # [B, T, D]
  y, layer_state = mix(h)
  x = x + jnp.einsum("btnp,npd->btd", y, p["wo"])  # [B, T, D]
  h = rms_norm(x, p["mlp_norm"], c.norm_eps)
  gate = jnp.einsum("btd,df->btf", h, p["w_gate"])  # [B, T, F]
  up = jnp.einsum("btd,df->btf", h, p["w_up"])  # [B, T, F]
  x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
  return x, layer_state


def _layers(params, x, state, config, mixer):
  """Runs the L blocks; mixer(kind, p_kind, h, layer_state) -> (y, state).

  One kind: a `lax.scan` over layers. A hybrid: a Python loop over layers,
  each reading its kind's params and state at its index in that group."""
  groups = _layer_groups(config)
  if len(groups) == 1:
    (kind,) = groups
    group_state = getattr(state, kind)

    def layer(x, xs):
      p, pk, s = xs
      return _block(x, p, lambda h: mixer(kind, pk, h, s), config)

    xs = (params["layers"], params[kind], tuple(group_state))
    x, new = jax.lax.scan(layer, x, xs)
    return x, state._replace(**{kind: type(group_state)(*new)})
  where = {l: (k, i) for k, ls in groups.items() for i, l in enumerate(ls)}
  new = {kind: [] for kind in groups}
  for l in range(config.num_layers):
    kind, i = where[l]
    at = lambda tree, n: jax.tree.map(lambda a: a[n], tree)
    pk, s = at(params[kind], i), tuple(at(getattr(state, kind), i))
    x, s = _block(
      x, at(params["layers"], l), lambda h: mixer(kind, pk, h, s), config
    )
    new[kind].append(s)
  stacked = {
    kind: type(getattr(state, kind))(*map(jnp.stack, zip(*new[kind])))
    for kind in groups
  }
  return x, state._replace(**stacked)


def _logits(params, x, config):
  x = rms_norm(x, params["final_norm"], config.norm_eps)
  return jnp.einsum("...d,vd->...v", x, params["embed"])  # [..., V]


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def _forward(params, tokens, state, *, config, chunk_size):
  x = params["embed"][tokens]  # [B, T, D]

  def mixer(kind, p, h, layer_state):
    if kind == "attention":
      return attention_prefill(
        p, h, layer_state, config=config, chunk_size=chunk_size
      )
    return memory_prefill(
      p, h, layer_state, config=config, chunk_size=chunk_size, memory=kind
    )

  x, state = _layers(params, x, state, config, mixer)
  return _logits(params, x, config), state


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
    state: the state before these tokens (`init_state` for a new one).
    config: the model config.
    chunk_size: tokens per chunk (default `config.chunk_size`); any
      T works (a last partial chunk is padded with zero writes).

  Returns:
    logits [B, T, V] float32 and the state after the T tokens.

  Raises:
    TypeError, ValueError: bad config, state, params, tokens or
      chunk_size; and, when called eagerly, T tokens that do not fit in a
      full-attention cache. Under a caller's `jit` that check is skipped:
      the writes past the capacity are dropped and `state_overflowed`
      reports it.
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

  def mixer(kind, p, h, layer_state):  # h [B, 1, D] -> y [B, 1, N, P]
    if kind == "attention":
      return attention_prefill(p, h, layer_state, config=config, chunk_size=1)
    y, layer_state = memory_decode(
      p, h[:, 0], layer_state, config=config, memory=kind
    )
    return y[:, None], layer_state

  x, state = _layers(params, x, state, config, mixer)
  return _logits(params, x[:, 0], config), state


def decode(
  params: Params, token: Array, state: EchoState, *, config: EchoConfig
) -> tuple[Array, EchoState]:
  """One token per row: O(r^2) state update per memory layer and head,
  O(S) per attention layer.

  Args:
    params: from `init_params`.
    token: [B] int ids.
    state: the state so far.
    config: the model config.

  Returns:
    logits [B, V] float32 and the updated state.

  Raises:
    TypeError, ValueError: as `forward` (a full-attention cache already
      full raises when called eagerly).
  """
  token = _check_model_args(params, token, state, config, ndim=1)
  return _decode(params, token, state, config=config)
