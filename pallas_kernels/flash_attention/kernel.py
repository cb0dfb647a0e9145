"""Pallas kernels for flash attention over one layer of an L-stacked cache.

Algorithm. Each program owns a block of queries of one kv head (TPU: all G
query heads of the group at once; GPU: one query head) and streams the
layer's key blocks through an online softmax: a running row max m, a running
denominator l and an unnormalized output acc, rescaled by exp(m_old - m_new)
whenever the max grows. Visibility comes from the mask alone (slots need not
be contiguous or sorted): query p sees slot s iff pos[s] <= p (and
pos[s] > p - window), where invalid slots carry the position INT32_MAX
(`kpos_eff`, prepared by ops.py), so they are never visible. Logits are
float32; a query that sees nothing ends with l == 0 and gets out = 0 and
lse = -inf. The mass kernels are the second pass of flash attention's
backward: with the LSE known, p = exp(scale * q.k - lse) is exact per tile,
so a key block's mass sums its tiles over the query blocks, never holding
[T, S].

Block skipping. ops.py reduces positions to per-block bounds: kmin/kmax, the
smallest/largest position of a key block's valid slots (INT32_MAX/INT32_MIN
when it has none), and qmax/qmin, the largest query position of a query
block and the smallest non-padding one (INT32_MAX when all are padding). A
(query block, key block) pair is computed only when

  kmin <= qmax                 (some slot is not in every query's future)
  and kmax > qmin - window     (with a window: not older than every window)

which never drops a visible pair. On TPU the bounds are scalar-prefetch data
(SMEM): the kernel tests them with `pl.when`, and the index_maps clamp the
streamed block index to the first/last needed block of the row (so a dead
tail of a long cache, or keys in every query's future, cost no DMA: the
pipeline skips a copy whose block index did not change). On GPU the loop
over blocks runs only from the first to the last needed block and tests
each with `lax.cond`, so skipped blocks are never loaded.

The layer is read in place: the TPU index_maps take it from scalar
prefetch; the GPU kernels index the whole [L, B, K, S, H] ref with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Contract dim 1 of both operands: q [M, H] x k [N, H] -> [M, N].
_NT = (((1,), (1,)), ((), ()))
# Contract p [M, N] with v [N, H] -> [M, H].
_NN = (((1,), (0,)), ((), ()))


def _dot(a, b, dims, upcast):
  """float32-accumulated dot. `upcast`: interpret mode on CPU, where XLA
  cannot run bf16 x bf16 -> f32 dots. float32 inputs ask for full
  precision (no TF32 / bf16 passes), matching the float32 reference."""
  if upcast:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
    a, b, dims, precision=precision, preferred_element_type=jnp.float32
  )


def _needed(kmin, kmax, qmax, qmin, window):
  """Scalar test: may any query of the query block see the key block."""
  need = kmin <= qmax
  if window is not None:
    need = jnp.logical_and(need, kmax > qmin - window)
  return need


def _visible(qpos, kpos, window):
  """[.., tq, tk] mask from query positions [tq, 1] and slot positions
  [1, tk] (invalid slots hold INT32_MAX and fail `kpos <= qpos`)."""
  mask = kpos <= qpos
  if window is not None:
    mask = jnp.logical_and(mask, kpos > qpos - window)
  return mask


def _online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v, upcast):
  """One key block of the online softmax; returns (m, l, acc).

  s: [R, tk] float32 scaled logits; mask: [R, tk]; m_prev, l_prev: [R, 1]
  float32; acc_prev: [R, H] float32; v: [tk, H].
  """
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  # A row that has seen nothing yet keeps m = -inf; shift it by 0 so that
  # exp(-inf - m) is 0, not NaN.
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  alpha = jnp.exp(m_prev - m_safe)  # 0 while m_prev is -inf
  p = jnp.exp(s - m_safe)  # masked logits are -inf -> 0
  l = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc_prev + _dot(p.astype(v.dtype), v, _NN, upcast)
  return m, l, acc


def _finish(m, l, acc):
  """(out [R, H], lse [R, 1]) from the softmax state [R, 1], [R, 1],
  [R, H]; zeros / -inf where nothing was seen."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out = jnp.where(seen, acc / l_safe, 0.0)
  lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
  return out, lse


# ----------------------------------------------------------------------------
# TPU (Mosaic). Queries of a kv head's G query heads are interleaved into
# rows r = t * G + g, so one [R = tq * G, H] x [H, tk] matmul serves the
# group and every block is 2-D (Mosaic's (8, 128) rule holds without
# in-kernel reshapes).


def _tpu_fwd_kernel(
  # Scalar prefetch (SMEM).
  layer_ref,  # [1] int32
  kmin_ref,  # [B * K * nk] int32
  kmax_ref,  # [B * K * nk] int32
  qmax_ref,  # [B * nq] int32
  qmin_ref,  # [B * nq] int32
  first_ref,  # [B * K * nq] int32 (index_maps only)
  last_ref,  # [B * K * nq] int32 (index_maps only)
  # Blocks (VMEM).
  qpos_ref,  # [R, 1] int32
  q_ref,  # [R, H]
  kpos_ref,  # [1, tk] int32
  k_ref,  # [tk, H]
  v_ref,  # [tk, H]
  out_ref,  # [R, H]
  lse_ref,  # [R, 1] float32
  # Scratch (VMEM).
  m_ref,  # [R, 1] float32
  l_ref,  # [R, 1] float32
  acc_ref,  # [R, H] float32
  *,
  scale,
  window,
  num_kv_heads,
  nq,
  nk,
  upcast,
):
  del layer_ref, first_ref, last_ref
  b, h, i, j = (pl.program_id(a) for a in range(4))

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  kb = (b * num_kv_heads + h) * nk + j
  qb = b * nq + i
  need = _needed(kmin_ref[kb], kmax_ref[kb], qmax_ref[qb], qmin_ref[qb], window)

  @pl.when(need)
  def _compute():
    s = _dot(q_ref[...], k_ref[...], _NT, upcast) * scale  # [R, tk]
    mask = _visible(qpos_ref[...], kpos_ref[...], window)  # [R, tk]
    m, l, acc = _online_softmax_step(
      s, mask, m_ref[...], l_ref[...], acc_ref[...], v_ref[...], upcast
    )
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc

  @pl.when(j == nk - 1)
  def _store():
    out, lse = _finish(m_ref[...], l_ref[...], acc_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def tpu_forward(
  layer,  # [1] int32
  kmin,  # [B * K * nk] int32
  kmax,  # [B * K * nk] int32
  qmax,  # [B * nq] int32
  qmin,  # [B * nq] int32
  first,  # [B * K * nq] int32
  last,  # [B * K * nq] int32
  qpos_rows,  # [B, Tp * G, 1] int32
  q_rows,  # [B, K, Tp * G, H]
  kpos,  # [B, K, 1, S] int32
  k,  # [L, B, K, S, H]
  v,  # [L, B, K, S, H]
  *,
  group,
  block_q,
  block_k,
  scale,
  window,
  interpret,
):
  """TPU forward: (out rows [B, K, Tp * G, H], lse rows [B, K, Tp * G, 1])."""
  B, K, TG, H = q_rows.shape
  S = k.shape[3]
  R = block_q * group
  nq, nk = TG // R, S // block_k
  upcast = interpret is not False

  def kv_map(b, h, i, j, layer, kmin, kmax, qmax, qmin, first, last):
    row = (b * K + h) * nq + i
    jj = jnp.minimum(jnp.maximum(j, first[row]), last[row])
    return layer[0], b, h, jj, 0

  def kpos_map(b, h, i, j, *prefetch):
    _, b, h, jj, _ = kv_map(b, h, i, j, *prefetch)
    return b, h, 0, jj

  def rows_map(b, h, i, j, *_):
    return b, h, i, 0

  def qpos_map(b, h, i, j, *_):
    return b, i, 0

  kernel = functools.partial(
    _tpu_fwd_kernel,
    scale=scale,
    window=window,
    num_kv_heads=K,
    nq=nq,
    nk=nk,
    upcast=upcast,
  )
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=7,
    grid=(B, K, nq, nk),
    in_specs=[
      pl.BlockSpec((None, R, 1), qpos_map),
      pl.BlockSpec((None, None, R, H), rows_map),
      pl.BlockSpec((None, None, 1, block_k), kpos_map),
      pl.BlockSpec((None, None, None, block_k, H), kv_map),
      pl.BlockSpec((None, None, None, block_k, H), kv_map),
    ],
    out_specs=[
      pl.BlockSpec((None, None, R, H), rows_map),
      pl.BlockSpec((None, None, R, 1), rows_map),
    ],
    scratch_shapes=[
      pltpu.VMEM((R, 1), jnp.float32),
      pltpu.VMEM((R, 1), jnp.float32),
      pltpu.VMEM((R, H), jnp.float32),
    ],
  )
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((B, K, TG, H), q_rows.dtype),
      jax.ShapeDtypeStruct((B, K, TG, 1), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=interpret,
    name="flash_attention_fwd",
  )(layer, kmin, kmax, qmax, qmin, first, last, qpos_rows, q_rows, kpos, k, v)


def _tpu_mass_kernel(
  # Scalar prefetch (SMEM).
  layer_ref,  # [1] int32
  kmin_ref,  # [B * K * nk] int32
  kmax_ref,  # [B * K * nk] int32
  qmax_ref,  # [B * nq] int32
  qmin_ref,  # [B * nq] int32
  first_ref,  # [B * K * nk] int32 (index_maps only)
  last_ref,  # [B * K * nk] int32 (index_maps only)
  kfetch_ref,  # [B * K * nk] int32 (index_maps only)
  # Blocks (VMEM).
  qpos_ref,  # [tq, 1] int32
  w_ref,  # [tq, 1] float32
  q_ref,  # [G, tq, H]
  lse_ref,  # [G, tq, 1] float32
  kpos_ref,  # [1, tk] int32
  k_ref,  # [tk, H]
  mass_ref,  # [G, tk] float32 (resident across the query axis)
  *,
  scale,
  window,
  num_kv_heads,
  nq,
  nk,
  upcast,
):
  del layer_ref, first_ref, last_ref, kfetch_ref
  b, h, j, i = (pl.program_id(a) for a in range(4))

  @pl.when(i == 0)
  def _init():
    mass_ref[...] = jnp.zeros(mass_ref.shape, jnp.float32)

  kb = (b * num_kv_heads + h) * nk + j
  qb = b * nq + i
  need = _needed(kmin_ref[kb], kmax_ref[kb], qmax_ref[qb], qmin_ref[qb], window)

  @pl.when(need)
  def _accumulate():
    k = k_ref[...]  # [tk, H]
    mask = _visible(qpos_ref[...], kpos_ref[...], window)  # [tq, tk]
    w = w_ref[...]  # [tq, 1]
    # One [tq, H] x [H, tk] matmul per query head of the group: the sum
    # over queries is then a plain sublane reduction per head.
    for g in range(mass_ref.shape[0]):
      s = _dot(q_ref[g], k, _NT, upcast) * scale  # [tq, tk]
      lse = lse_ref[g]  # [tq, 1]
      lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # such rows see nothing
      p = jnp.where(mask, jnp.exp(s - lse), 0.0) * w
      mass_ref[g : g + 1, :] += jnp.sum(p, axis=0, keepdims=True)


def tpu_mass(
  layer,  # [1] int32
  kmin,  # [B * K * nk] int32
  kmax,  # [B * K * nk] int32
  qmax,  # [B * nq] int32
  qmin,  # [B * nq] int32
  first,  # [B * K * nk] int32: first needed query block per key block
  last,  # [B * K * nk] int32: last needed query block per key block
  kfetch,  # [B * K * nk] int32: key block to hold in VMEM at each step
  qpos,  # [B, Tp, 1] int32
  w,  # [B, Tp, 1] float32
  q_groups,  # [B, K, G, Tp, H]
  lse_groups,  # [B, K, G, Tp, 1] float32
  kpos,  # [B, K, 1, S] int32
  k,  # [L, B, K, S, H]
  *,
  block_q,
  block_k,
  scale,
  window,
  interpret,
):
  """TPU mass: [B, K, G, S] float32."""
  B, K, G, Tp, H = q_groups.shape
  S = k.shape[3]
  nq, nk = Tp // block_q, S // block_k
  upcast = interpret is not False

  def _row(b, h, j):
    return (b * K + h) * nk + j

  def q_block(b, h, j, i, first, last):
    row = _row(b, h, j)
    return jnp.minimum(jnp.maximum(i, first[row]), last[row])

  def groups_map(b, h, j, i, layer, kmin, kmax, qmax, qmin, first, last, kf):
    return b, h, 0, q_block(b, h, j, i, first, last), 0

  def qpos_map(b, h, j, i, layer, kmin, kmax, qmax, qmin, first, last, kf):
    return b, q_block(b, h, j, i, first, last), 0

  def kpos_map(b, h, j, i, layer, kmin, kmax, qmax, qmin, first, last, kf):
    return b, h, 0, kf[_row(b, h, j)]

  def k_map(b, h, j, i, layer, kmin, kmax, qmax, qmin, first, last, kf):
    return layer[0], b, h, kf[_row(b, h, j)], 0

  def mass_map(b, h, j, i, *_):
    return b, h, 0, j

  kernel = functools.partial(
    _tpu_mass_kernel,
    scale=scale,
    window=window,
    num_kv_heads=K,
    nq=nq,
    nk=nk,
    upcast=upcast,
  )
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=8,
    grid=(B, K, nk, nq),
    in_specs=[
      pl.BlockSpec((None, block_q, 1), qpos_map),
      pl.BlockSpec((None, block_q, 1), qpos_map),
      pl.BlockSpec((None, None, G, block_q, H), groups_map),
      pl.BlockSpec((None, None, G, block_q, 1), groups_map),
      pl.BlockSpec((None, None, 1, block_k), kpos_map),
      pl.BlockSpec((None, None, None, block_k, H), k_map),
    ],
    out_specs=pl.BlockSpec((None, None, G, block_k), mass_map),
  )
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=jax.ShapeDtypeStruct((B, K, G, S), jnp.float32),
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=interpret,
    name="flash_attention_mass",
  )(
    layer,
    kmin,
    kmax,
    qmax,
    qmin,
    first,
    last,
    kfetch,
    qpos,
    w,
    q_groups,
    lse_groups,
    kpos,
    k,
  )


# ----------------------------------------------------------------------------
# GPU (Triton). One program per (batch row, query head, block): whole-array
# refs for everything indexed by the layer or by a loop counter.

# Triton launch parameters (untuned: no GPU was at hand to measure them).
_NUM_WARPS = 4
_NUM_STAGES = 2


def _gpu_fwd_kernel(
  layer_ref,  # [1] int32
  kmin_ref,  # [B, K, nk] int32
  kmax_ref,  # [B, K, nk] int32
  qmax_ref,  # [B, nq] int32
  qmin_ref,  # [B, nq] int32
  first_ref,  # [B, K, nq] int32
  last_ref,  # [B, K, nq] int32
  qpos_ref,  # [tq] int32
  q_ref,  # [tq, H]
  kpos_ref,  # [B, K, S] int32
  k_ref,  # [L, B, K, S, H]
  v_ref,  # [L, B, K, S, H]
  out_ref,  # [tq, H]
  lse_ref,  # [tq] float32
  *,
  scale,
  window,
  group,
  block_k,
  upcast,
):
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  h = n // group
  layer = layer_ref[0]
  qmax, qmin = qmax_ref[b, i], qmin_ref[b, i]
  q = q_ref[...]  # [tq, H]
  qpos = qpos_ref[...][:, None]  # [tq, 1]
  tq, H = q.shape

  def visit(j, carry):
    def compute(carry):
      m, l, acc = carry
      keys = pl.ds(j * block_k, block_k)
      k = k_ref[layer, b, h, keys, :]  # [tk, H]
      s = _dot(q, k, _NT, upcast) * scale  # [tq, tk]
      mask = _visible(qpos, kpos_ref[b, h, keys][None, :], window)
      return _online_softmax_step(
        s, mask, m, l, acc, v_ref[layer, b, h, keys, :], upcast
      )

    need = _needed(kmin_ref[b, h, j], kmax_ref[b, h, j], qmax, qmin, window)
    return lax.cond(need, compute, lambda c: c, carry)

  init = (
    jnp.full((tq, 1), -jnp.inf, jnp.float32),
    jnp.zeros((tq, 1), jnp.float32),
    jnp.zeros((tq, H), jnp.float32),
  )
  # Only blocks between the first and last needed ones are visited (the
  # bounds are 0 / -1 when none is needed, so the loop is empty).
  m, l, acc = lax.fori_loop(
    first_ref[b, h, i], last_ref[b, h, i] + 1, visit, init
  )
  out, lse = _finish(m, l, acc)
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse.reshape(tq)


def gpu_forward(
  layer,  # [1] int32
  kmin,  # [B, K, nk] int32
  kmax,  # [B, K, nk] int32
  qmax,  # [B, nq] int32
  qmin,  # [B, nq] int32
  first,  # [B, K, nq] int32
  last,  # [B, K, nq] int32
  qpos,  # [B, Tp] int32
  q,  # [B, Tp, N, H]
  kpos,  # [B, K, S] int32
  k,  # [L, B, K, S, H]
  v,  # [L, B, K, S, H]
  *,
  block_q,
  block_k,
  scale,
  window,
  interpret,
):
  """GPU forward: (out [B, Tp, N, H], lse [B, N, Tp] float32)."""
  B, Tp, N, H = q.shape
  K = k.shape[2]
  nq = Tp // block_q
  whole = pl.BlockSpec()  # the full array, indexed inside the kernel
  kernel = functools.partial(
    _gpu_fwd_kernel,
    scale=scale,
    window=window,
    group=N // K,
    block_k=block_k,
    upcast=interpret is not False,
  )
  return pl.pallas_call(
    kernel,
    grid=(B, N, nq),
    in_specs=[
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)),
      pl.BlockSpec((None, block_q, None, H), lambda b, n, i: (b, i, n, 0)),
      whole,
      whole,
      whole,
    ],
    out_specs=[
      pl.BlockSpec((None, block_q, None, H), lambda b, n, i: (b, i, n, 0)),
      pl.BlockSpec((None, None, block_q), lambda b, n, i: (b, n, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((B, Tp, N, H), q.dtype),
      jax.ShapeDtypeStruct((B, N, Tp), jnp.float32),
    ],
    compiler_params=pltriton.CompilerParams(
      num_warps=_NUM_WARPS, num_stages=_NUM_STAGES
    ),
    interpret=interpret,
    name="flash_attention_fwd",
  )(layer, kmin, kmax, qmax, qmin, first, last, qpos, q, kpos, k, v)


def _gpu_mass_kernel(
  layer_ref,  # [1] int32
  kmin_ref,  # [B, K, nk] int32
  kmax_ref,  # [B, K, nk] int32
  qmax_ref,  # [B, nq] int32
  qmin_ref,  # [B, nq] int32
  first_ref,  # [B, K, nk] int32: first needed query block
  last_ref,  # [B, K, nk] int32: last needed query block
  qpos_ref,  # [B, Tp] int32
  w_ref,  # [B, Tp] float32
  q_ref,  # [B, Tp, N, H]
  lse_ref,  # [B, N, Tp] float32
  kpos_ref,  # [tk] int32
  k_ref,  # [L, B, K, S, H]
  mass_ref,  # [tk] float32
  *,
  scale,
  window,
  group,
  block_q,
  block_k,
  upcast,
):
  b, n, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  h = n // group
  kmin, kmax = kmin_ref[b, h, j], kmax_ref[b, h, j]
  kpos = kpos_ref[...][None, :]  # [1, tk]

  def visit(i, mass):
    def accumulate(mass):
      queries = pl.ds(i * block_q, block_q)
      k = k_ref[layer_ref[0], b, h, pl.ds(j * block_k, block_k), :]
      s = _dot(q_ref[b, queries, n, :], k, _NT, upcast) * scale  # [tq, tk]
      lse = lse_ref[b, n, queries]  # [tq]
      lse = jnp.where(lse == -jnp.inf, 0.0, lse)[:, None]
      mask = _visible(qpos_ref[b, queries][:, None], kpos, window)
      p = jnp.where(mask, jnp.exp(s - lse), 0.0) * w_ref[b, queries][:, None]
      return mass + jnp.sum(p, axis=0)

    need = _needed(kmin, kmax, qmax_ref[b, i], qmin_ref[b, i], window)
    return lax.cond(need, accumulate, lambda m: m, mass)

  init = jnp.zeros(mass_ref.shape, jnp.float32)
  mass_ref[...] = lax.fori_loop(
    first_ref[b, h, j], last_ref[b, h, j] + 1, visit, init
  )


def gpu_mass(
  layer,  # [1] int32
  kmin,  # [B, K, nk] int32
  kmax,  # [B, K, nk] int32
  qmax,  # [B, nq] int32
  qmin,  # [B, nq] int32
  first,  # [B, K, nk] int32
  last,  # [B, K, nk] int32
  qpos,  # [B, Tp] int32
  w,  # [B, Tp] float32
  q,  # [B, Tp, N, H]
  lse,  # [B, N, Tp] float32
  kpos,  # [B, K, S] int32
  k,  # [L, B, K, S, H]
  *,
  block_q,
  block_k,
  scale,
  window,
  interpret,
):
  """GPU mass: [B, N, S] float32."""
  B, _, N, _ = q.shape
  K, S = k.shape[2], k.shape[3]
  nk = S // block_k
  whole = pl.BlockSpec()
  kernel = functools.partial(
    _gpu_mass_kernel,
    scale=scale,
    window=window,
    group=N // K,
    block_q=block_q,
    block_k=block_k,
    upcast=interpret is not False,
  )
  return pl.pallas_call(
    kernel,
    grid=(B, N, nk),
    in_specs=[
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      whole,
      pl.BlockSpec(
        (None, None, block_k), lambda b, n, j: (b, n // (N // K), j)
      ),
      whole,
    ],
    out_specs=pl.BlockSpec((None, None, block_k), lambda b, n, j: (b, n, j)),
    out_shape=jax.ShapeDtypeStruct((B, N, S), jnp.float32),
    compiler_params=pltriton.CompilerParams(
      num_warps=_NUM_WARPS, num_stages=_NUM_STAGES
    ),
    interpret=interpret,
    name="flash_attention_mass",
  )(layer, kmin, kmax, qmax, qmin, first, last, qpos, w, q, lse, kpos, k)
