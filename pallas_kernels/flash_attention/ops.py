"""Public entries of the flash attention kernels: input checks, layouts,
block bounds for skipping, and the choice of TPU or GPU variant.

Both functions read one layer of an L-stacked cache in place (the layer
index goes to the kernels, the [L, B, K, S, H] leaves are never sliced
here). Outside the kernels there is only O(B * K * S) integer work on the
layer's positions and liveness (the per-block bounds that drive skipping)
and O(B * T * N * H) relayout of the queries and outputs.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import Unsupported
from pallas_kernels.flash_attention import kernel

Array = jax.Array

INT32_MAX = int(jnp.iinfo(jnp.int32).max)
INT32_MIN = int(jnp.iinfo(jnp.int32).min)
_TARGETS = ("tpu", "gpu")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# ----------------------------------------------------------------------------
# Checks.


def _check_target(target: str, interpret: Any) -> None:
  if target not in _TARGETS:
    raise ValueError(f"target must be one of {_TARGETS}, got {target!r}.")
  ok = interpret is False or interpret is True
  if target == "tpu" and isinstance(interpret, pltpu.InterpretParams):
    ok = True
  if not ok:
    allowed = "False, True or pltpu.InterpretParams()"
    if target == "gpu":
      allowed = "False or True"
    raise ValueError(
      f"interpret must be {allowed} for target={target!r}, got {interpret!r}."
    )


def _check_options(
  scale: float | None,
  sliding_window: int | None,
  block_q: int,
  block_k: int,
) -> None:
  if scale is not None and not isinstance(scale, numbers.Real):
    raise ValueError(f"scale must be a float or None, got {scale!r}.")
  if sliding_window is not None and (
    not isinstance(sliding_window, int) or sliding_window < 1
  ):
    raise ValueError(
      f"sliding_window must be a positive int or None, got {sliding_window!r}."
    )
  if not isinstance(block_q, int) or block_q < 16 or block_q & (block_q - 1):
    raise ValueError(f"block_q must be a power of 2 >= 16, got {block_q!r}.")
  if not isinstance(block_k, int) or block_k < 1:
    raise ValueError(f"block_k must be a positive int, got {block_k!r}.")


def _check_cache(q, k, q_pos, k_pos, k_valid, layer, v=None) -> tuple:
  """Shapes (B, T, N, H, L, K, S) of valid inputs; ValueError otherwise."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}.")
  B, T, N, H = q.shape
  if q.dtype not in _DTYPES:
    raise ValueError(f"q must be float32 or bfloat16, got {q.dtype}.")
  if k.ndim != 5:
    raise ValueError(f"k must be [L, B, K, S, H], got shape {k.shape}.")
  L, Bk, K, S, Hk = k.shape
  if Bk != B or Hk != H:
    raise ValueError(
      f"k [L, B, K, S, H] = {k.shape} does not match q [B, T, N, H] = "
      f"{q.shape} in B or H."
    )
  if k.dtype != q.dtype:
    raise ValueError(f"k dtype {k.dtype} must equal q dtype {q.dtype}.")
  if v is not None and (v.shape != k.shape or v.dtype != k.dtype):
    raise ValueError(
      f"v must match k: got v {v.shape} {v.dtype}, k {k.shape} {k.dtype}."
    )
  if N % K:
    raise ValueError(
      f"query heads N={N} (q {q.shape}) must be a multiple of kv heads K={K} "
      f"(k {k.shape})."
    )
  if q_pos.shape != (B, T) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
    raise ValueError(
      f"q_pos must be integer [B, T] = {(B, T)}, got {q_pos.shape} "
      f"{q_pos.dtype}."
    )
  if k_pos.shape != (L, B, K, S) or not jnp.issubdtype(
    k_pos.dtype, jnp.integer
  ):
    raise ValueError(
      f"k_pos must be integer [L, B, K, S] = {(L, B, K, S)}, got "
      f"{k_pos.shape} {k_pos.dtype}."
    )
  if k_valid.shape != (L, B, K, S) or k_valid.dtype != jnp.bool_:
    raise ValueError(
      f"k_valid must be bool [L, B, K, S] = {(L, B, K, S)}, got "
      f"{k_valid.shape} {k_valid.dtype}."
    )
  if jnp.ndim(layer) != 0 or not jnp.issubdtype(
    jnp.result_type(layer), jnp.integer
  ):
    raise ValueError(f"layer must be an integer scalar, got {layer!r}.")
  if isinstance(layer, int) and not 0 <= layer < L:
    raise ValueError(f"layer={layer} is out of range for L={L} (k {k.shape}).")
  return B, T, N, H, L, K, S


def _query_block(T: int, block_q: int) -> int:
  """Queries per block: block_q, or fewer (a power of 2 >= 16) for short T."""
  return min(block_q, max(16, 1 << (T - 1).bit_length()))


def _key_block(S: int, block_k: int, target: str, H: int) -> int:
  """Slots per block: S when it fits, else the largest multiple of 128 <=
  block_k dividing S."""
  if S <= block_k:
    tk = S
  else:
    tk = next(
      (c for c in range(block_k - block_k % 128, 0, -128) if S % c == 0), 0
    )
    if not tk:
      raise Unsupported(
        f"cache capacity S={S} must be a multiple of 128 (no multiple of "
        f"128 <= block_k={block_k} divides it)."
      )
  if target == "gpu":
    # Triton tiles are powers of 2, and its dots need dims >= 16.
    if tk < 16 or tk & (tk - 1):
      raise Unsupported(
        f"target='gpu' needs a key block that is a power of 2 >= 16; cache "
        f"capacity S={S} with block_k={block_k} gives {tk}."
      )
    if H < 16 or H & (H - 1):
      raise Unsupported(
        f"target='gpu' needs head dim H a power of 2 >= 16, got H={H}."
      )
  return tk


# ----------------------------------------------------------------------------
# Block bounds.


class _Bounds(NamedTuple):
  kpos: Array  # [B, K, S] int32 positions, INT32_MAX at invalid slots
  kmin: Array  # [B, K, nk] int32
  kmax: Array  # [B, K, nk] int32
  qmax: Array  # [B, nq] int32
  qmin: Array  # [B, nq] int32 (non-padding queries only)
  need: Array  # [B, K, nq, nk] bool: may the pair hold a visible entry


def _bounds(qpos, k_pos, k_valid, layer, tq, tk, window) -> _Bounds:
  """Per-block position bounds (see kernel.py's module docstring)."""
  B, Tp = qpos.shape
  _, _, K, S = k_pos.shape
  pos = jax.lax.dynamic_index_in_dim(k_pos, layer, 0, keepdims=False)
  valid = jax.lax.dynamic_index_in_dim(k_valid, layer, 0, keepdims=False)
  pos = pos.astype(jnp.int32)
  kpos = jnp.where(valid, pos, INT32_MAX)
  kmin = kpos.reshape(B, K, S // tk, tk).min(-1)
  kmax = jnp.where(valid, pos, INT32_MIN).reshape(B, K, S // tk, tk).max(-1)
  qb = qpos.reshape(B, Tp // tq, tq)
  qmax = qb.max(-1)
  # Padding queries (negative positions) see nothing: they do not widen the
  # window bound.
  qmin = jnp.where(qb >= 0, qb, INT32_MAX).min(-1)
  need = kmin[:, :, None, :] <= qmax[:, None, :, None]
  if window is not None:
    need &= kmax[:, :, None, :] > qmin[:, None, :, None] - window
  return _Bounds(kpos, kmin, kmax, qmax, qmin, need)


def _first_last(need: Array, axis: int) -> tuple[Array, Array]:
  """First and last True index along `axis` (0 and -1 where none)."""
  n = need.shape[axis]
  first = jnp.argmax(need, axis=axis)
  last = n - 1 - jnp.argmax(jnp.flip(need, axis=axis), axis=axis)
  any_ = need.any(axis=axis)
  first = jnp.where(any_, first, 0).astype(jnp.int32)
  last = jnp.where(any_, last, -1).astype(jnp.int32)
  return first, last


def _pad_queries(x: Array, Tp: int, value, axis: int = 1) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, Tp - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _prepare(q, k, q_pos, k_pos, k_valid, layer, scale, window, bq, bk, target):
  B, T, N, H, L, K, S = _check_cache(q, k, q_pos, k_pos, k_valid, layer)
  tq = _query_block(T, bq)
  tk = _key_block(S, bk, target, H)
  Tp = -(-T // tq) * tq
  scale = float(H**-0.5 if scale is None else scale)
  # A traced layer cannot be checked: clamp it like dynamic indexing does.
  layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1)
  qpos = _pad_queries(q_pos.astype(jnp.int32), Tp, -1)  # [B, Tp]
  bounds = _bounds(qpos, k_pos, k_valid, layer, tq, tk, window)
  return (B, T, N, H, K, S, tq, tk, Tp), scale, layer, qpos, bounds


# ----------------------------------------------------------------------------
# Forward.

_STATIC = (
  "scale",
  "sliding_window",
  "block_q",
  "block_k",
  "target",
  "interpret",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _flash_attention(
  q,
  k,
  v,
  q_pos,
  k_pos,
  k_valid,
  layer,
  *,
  scale,
  sliding_window,
  block_q,
  block_k,
  target,
  interpret,
):
  dims, scale, layer, qpos, bd = _prepare(
    q,
    k,
    q_pos,
    k_pos,
    k_valid,
    layer,
    scale,
    sliding_window,
    block_q,
    block_k,
    target,
  )
  B, T, N, H, K, _, tq, tk, Tp = dims
  G = N // K
  first, last = _first_last(bd.need, axis=3)  # [B, K, nq]
  qp = _pad_queries(q, Tp, 0)  # [B, Tp, N, H]
  opts = {"block_k": tk, "scale": scale, "window": sliding_window}
  if target == "gpu":
    out, lse = kernel.gpu_forward(
      layer[None],
      bd.kmin,
      bd.kmax,
      bd.qmax,
      bd.qmin,
      first,
      last,
      qpos,
      qp,
      bd.kpos,
      k,
      v,
      block_q=tq,
      interpret=interpret,
      **opts,
    )
    return out[:, :T], lse[:, :, :T]
  # Rows r = t * G + g of kv head h hold query head h * G + g at time t.
  q_rows = qp.reshape(B, Tp, K, G, H).transpose(0, 2, 1, 3, 4)
  q_rows = q_rows.reshape(B, K, Tp * G, H)
  qpos_rows = jnp.repeat(qpos, G, axis=1)[..., None]  # [B, Tp * G, 1]
  out, lse = kernel.tpu_forward(
    layer[None],
    bd.kmin.reshape(-1),
    bd.kmax.reshape(-1),
    bd.qmax.reshape(-1),
    bd.qmin.reshape(-1),
    first.reshape(-1),
    jnp.maximum(last, first).reshape(-1),  # a row with no block holds 0
    qpos_rows,
    q_rows,
    bd.kpos[:, :, None, :],
    k,
    v,
    group=G,
    block_q=tq,
    interpret=interpret,
    **opts,
  )
  out = out.reshape(B, K, Tp, G, H).transpose(0, 2, 1, 3, 4)
  out = out.reshape(B, Tp, N, H)[:, :T]
  lse = lse.reshape(B, K, Tp, G).transpose(0, 1, 3, 2).reshape(B, N, Tp)
  return out, lse[:, :, :T]


def flash_attention(
  q: Array,
  k: Array,
  v: Array,
  q_pos: Array,
  k_pos: Array,
  k_valid: Array,
  layer: int | Array,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  block_q: int = 128,
  block_k: int = 128,
  target: str = "tpu",
  interpret: Any = False,
) -> tuple[Array, Array]:
  """Causal grouped-query attention of T queries over one cache layer.

  Computes kvjax's reference attention with Pallas kernels: a query at
  position p sees slot s of its kv head iff k_valid[s], k_pos[s] <= p and
  (with a window) k_pos[s] > p - sliding_window; softmax in float32.
  Slots need not be contiguous or sorted. Key blocks no query of a query
  block can see are skipped.

  target="tpu" runs a Mosaic kernel (grid (B, K, query blocks, key blocks),
  the G query heads of a kv head in one matmul). target="gpu" runs a Triton
  kernel (grid (B, N, query blocks), a loop over key blocks): Triton rather
  than Mosaic GPU because on jax 0.10.2 Mosaic GPU's pallas_call path is
  deprecated and its interpreter runs a single block only, while the
  Triton path lowers from a CPU host and runs in interpret mode. The GPU
  variant needs H and the key block to be powers of 2 >= 16, and float32
  dots run at full (IEEE) precision there, not TF32.

  Args:
    q: [B, T, N, H] float32 or bfloat16 queries (RoPE applied).
    k: [L, B, K, S, H] keys of every layer, q's dtype; N % K == 0 (query
      head n reads kv head n // (N // K)).
    v: [L, B, K, S, H] values, like k.
    q_pos: [B, T] integer query positions (-1: padding, sees nothing).
    k_pos: [L, B, K, S] integer original position of each slot's entry.
    k_valid: [L, B, K, S] bool liveness of each slot.
    layer: the layer to read, a Python int or an int32 scalar (may be
      traced; a traced out-of-range index is clamped).
    scale: logit scale; defaults to H ** -0.5.
    sliding_window: optional window length W (keys with p - pos >= W are
      masked).
    block_q: queries per block, a power of 2 >= 16 (fewer for short T; T is
      padded to a multiple of the block).
    block_k: slots per block: S when S <= block_k, else the largest
      multiple of 128 <= block_k that divides S.
    target: "tpu" or "gpu".
    interpret: False; True to run in interpret mode (any host); or, for
      target="tpu", a `pltpu.InterpretParams()` (stricter checks).

  Returns:
    (out [B, T, N, H] in q's dtype, lse [B, N, T] float32). A query that
    sees no slot gets out = 0 and lse = -inf.

  Raises:
    ValueError: for inputs of the wrong rank, shape or dtype (the message
      names the argument), N % K != 0, an unusable block size or cache
      capacity, or an unknown target / interpret value.
  """
  _check_target(target, interpret)
  _check_options(scale, sliding_window, block_q, block_k)
  _check_cache(q, k, q_pos, k_pos, k_valid, layer, v)
  return _flash_attention(
    q,
    k,
    v,
    q_pos,
    k_pos,
    k_valid,
    layer,
    scale=scale,
    sliding_window=sliding_window,
    block_q=block_q,
    block_k=block_k,
    target=target,
    interpret=interpret,
  )


# ----------------------------------------------------------------------------
# Mass.


@functools.partial(jax.jit, static_argnames=_STATIC)
def _flash_attention_mass(
  q,
  k,
  q_pos,
  k_pos,
  k_valid,
  layer,
  lse,
  weights,
  *,
  scale,
  sliding_window,
  block_q,
  block_k,
  target,
  interpret,
):
  dims, scale, layer, qpos, bd = _prepare(
    q,
    k,
    q_pos,
    k_pos,
    k_valid,
    layer,
    scale,
    sliding_window,
    block_q,
    block_k,
    target,
  )
  B, _, N, H, K, S, tq, tk, Tp = dims
  G = N // K
  first, last = _first_last(bd.need, axis=2)  # [B, K, nk] over query blocks
  qp = _pad_queries(q, Tp, 0)  # [B, Tp, N, H]
  lse_p = _pad_queries(lse.astype(jnp.float32), Tp, -jnp.inf, axis=2)
  w = _pad_queries(weights.astype(jnp.float32), Tp, 0.0)  # [B, Tp]
  opts = {
    "block_q": tq,
    "block_k": tk,
    "scale": scale,
    "window": sliding_window,
  }
  if target == "gpu":
    return kernel.gpu_mass(
      layer[None],
      bd.kmin,
      bd.kmax,
      bd.qmax,
      bd.qmin,
      first,
      last,
      qpos,
      w,
      qp,
      lse_p,
      bd.kpos,
      k,
      interpret=interpret,
      **opts,
    )
  # A key block no query needs holds the last needed one (or the first) in
  # VMEM instead of being fetched.
  nk = S // tk
  used = bd.need.any(axis=2)  # [B, K, nk]
  idx = jnp.where(used, jnp.arange(nk, dtype=jnp.int32), -1)
  kfetch = jax.lax.cummax(idx, axis=2)
  kfetch = jnp.where(kfetch < 0, jnp.argmax(used, axis=2)[..., None], kfetch)
  mass = kernel.tpu_mass(
    layer[None],
    bd.kmin.reshape(-1),
    bd.kmax.reshape(-1),
    bd.qmax.reshape(-1),
    bd.qmin.reshape(-1),
    first.reshape(-1),
    jnp.maximum(last, first).reshape(-1),
    kfetch.astype(jnp.int32).reshape(-1),
    qpos[..., None],
    w[..., None],
    qp.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4),  # [B, K, G, Tp, H]
    lse_p.reshape(B, K, G, Tp, 1),
    bd.kpos[:, :, None, :],
    k,
    interpret=interpret,
    **opts,
  )
  return mass.reshape(B, N, S)


def flash_attention_mass(
  q: Array,
  k: Array,
  q_pos: Array,
  k_pos: Array,
  k_valid: Array,
  layer: int | Array,
  lse: Array,
  weights: Array,
  *,
  scale: float | None = None,
  sliding_window: int | None = None,
  block_q: int = 128,
  block_k: int = 128,
  target: str = "tpu",
  interpret: Any = False,
) -> Array:
  """Per-slot attention mass, a second pass against the forward's LSE.

  mass[b, n, s] = sum_t weights[b, t] * p[b, n, t, s] with
  p = exp(scale * q.k - lse) on visible slots and 0 elsewhere, as flash
  attention's backward recomputes it: no [T, S] array reaches HBM.
  target="tpu": grid (B, K, key blocks, query blocks), accumulating over
  query blocks. target="gpu": Triton (see `flash_attention` for why), grid
  (B, N, key blocks) with a loop over the query blocks.

  Args:
    q, k, q_pos, k_pos, k_valid, layer: as for `flash_attention` (no v).
    lse: [B, N, T] float32 log-sum-exp from `flash_attention` on the same
      inputs.
    weights: [B, T] float per-query weight (0 for padding queries).
    scale, sliding_window, block_q, block_k, target, interpret: as for
      `flash_attention`.

  Returns:
    mass [B, N, S] float32.

  Raises:
    ValueError: as for `flash_attention`, and for lse or weights of the
      wrong shape.
  """
  _check_target(target, interpret)
  _check_options(scale, sliding_window, block_q, block_k)
  B, T, N, *_ = _check_cache(q, k, q_pos, k_pos, k_valid, layer)
  if lse.shape != (B, N, T):
    raise ValueError(f"lse must be [B, N, T] = {(B, N, T)}, got {lse.shape}.")
  if weights.shape != (B, T):
    raise ValueError(f"weights must be [B, T] = {(B, T)}, got {weights.shape}.")
  return _flash_attention_mass(
    q,
    k,
    q_pos,
    k_pos,
    k_valid,
    layer,
    lse,
    weights,
    scale=scale,
    sliding_window=sliding_window,
    block_q=block_q,
    block_k=block_k,
    target=target,
    interpret=interpret,
  )
