"""The public entry of the split-K decode attention kernels."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import Unsupported
from pallas_kernels.decode_attention import kernel as _kernel
from pallas_kernels.tiles import TileCodec

Array = jax.Array
TARGETS = ("tpu", "gpu")
LANES = 128  # TPU lane width: blocks of slots are multiples of it
MAX_BLOCK = 2048


def block_size(capacity: int, block_k: int) -> int:
  """Slots per key block: the whole capacity when it fits in one block,
  else the largest multiple of 128 (TPU lanes) <= block_k dividing it.

  Raises:
    ValueError: when no such block exists (a capacity above block_k that
      is not a multiple of 128).
  """
  if capacity <= block_k:
    return capacity
  for n in range(block_k - block_k % LANES, 0, -LANES):
    if capacity % n == 0:
      return n
  raise Unsupported(
    f"capacity S={capacity} exceeds block_k={block_k} and has no divisor "
    f"that is a multiple of {LANES}: give the cache a capacity that is a "
    f"multiple of {LANES} for the Pallas backends."
  )


def _granules(leaves: dict, capacity: int, name: str) -> list[int]:
  out = []
  for leaf_name, leaf in leaves.items():
    if leaf.ndim != 5 or capacity % leaf.shape[3]:
      raise ValueError(
        f"{name}[{leaf_name!r}] must be [L, B, K, S_leaf, X] with S_leaf "
        f"dividing S={capacity}, got {tuple(leaf.shape)}."
      )
    out.append(capacity // leaf.shape[3])
  return out


def _check(q, k, v, q_pos, k_pos, k_valid, target):
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
  if getattr(q, "ndim", None) != 4:
    raise ValueError(f"q must be [B, T, N, H], got {getattr(q, 'shape', q)}.")
  B, T, N, H = q.shape
  if k_pos.ndim != 4 or k_pos.shape[1] != B or k_valid.shape != k_pos.shape:
    raise ValueError(
      f"k_pos and k_valid must be [L, B={B}, K, S], got "
      f"{tuple(k_pos.shape)} and {tuple(k_valid.shape)}."
    )
  K = k_pos.shape[2]
  if N % K:
    raise ValueError(f"q has N={N} heads, not a multiple of K={K} kv heads.")
  if tuple(q_pos.shape) != (B, T):
    raise ValueError(f"q_pos must be [B={B}, T={T}], got {q_pos.shape}.")
  for name, leaves in (("k", k), ("v", v)):
    if not isinstance(leaves, dict) or not leaves:
      raise TypeError(f"{name} must be a non-empty dict of per-slot leaves.")
    for leaf_name, leaf in leaves.items():
      if tuple(leaf.shape[:3]) != tuple(k_pos.shape[:3]):
        raise ValueError(
          f"{name}[{leaf_name!r}] must start with [L, B, K] = "
          f"{tuple(k_pos.shape[:3])}, got {tuple(leaf.shape)}."
        )


def _check_triton_shapes(dims, k_codec, v_codec):
  bad = sorted({d for d in dims if d & (d - 1)})
  if bad:
    raise Unsupported(
      f"the Triton kernel needs power-of-2 tile dims; {type(k_codec).__name__}"
      f" keys / {type(v_codec).__name__} values have tiles of {bad}."
    )


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _prev_pow2(x: int) -> int:
  return 1 << max(0, x.bit_length() - 1)


@functools.partial(
  jax.jit,
  static_argnames=(
    "k_codec",
    "v_codec",
    "scale",
    "sliding_window",
    "block_k",
    "num_splits",
    "block_m",
    "slots",
    "target",
    "interpret",
  ),
)
def decode_attention(
  q: Array,  # [B, T, N, H]
  k: dict[str, Array],  # per-slot key leaves, each [L, B, K, S_leaf, X]
  v: dict[str, Array],  # per-slot value leaves
  q_pos: Array,  # [B, T]
  k_pos: Array,  # [L, B, K, S]
  k_valid: Array,  # [L, B, K, S]
  layer: Array | int = 0,
  k_shared: dict | None = None,
  v_shared: dict | None = None,
  *,
  k_codec: TileCodec,
  v_codec: TileCodec,
  scale: float | None = None,
  sliding_window: int | None = None,
  block_k: int = 512,
  num_splits: int = 8,
  block_m: int = 128,
  slots: tuple[int, int] | None = None,
  target: str = "tpu",
  interpret: Any = False,
) -> tuple[Array, Array]:
  """Attention of T queries over one layer of a (coded) cache, read in
  place from the codec's payload.

  Args:
    q: [B, T, N, H] queries (RoPE applied); query head n reads kv head
      n // (N / K).
    k, v: the layer-stacked per-slot leaves as stored ({"x": [L, B, K, S,
      H]} for a plain cache; codes, scales, norms for a coded one: leaves
      of S / granule entries, e.g. KIVI's per-group statistics).
    q_pos: [B, T] int32 query positions (-1: a padding query).
    k_pos: [L, B, K, S] int32 positions of the slots' entries.
    k_valid: [L, B, K, S] bool liveness.
    layer: the layer to read (int or [] int32, may be traced).
    k_shared, v_shared: the layer's shared codec leaves (rotations, bases),
      used outside the kernel only.
    k_codec, v_codec: the `TileCodec`s of the key and value payloads.
    scale: logit scale (default 1/sqrt(H)).
    sliding_window: optional window length.
    block_k: at most this many slots per key block (see `block_size`).
    num_splits: split the blocks into at most this many parallel programs
      per (row, kv head), merged by log-sum-exp.
    block_m: query rows per program (rows = G * T per kv head; more rows
      take more programs, so a long question's scores fit in VMEM).
    slots: (first, count): the leaves hold slots [first, first + count) of
      k_pos / k_valid (one storage region of a cache, e.g. the code region
      or the full-precision tail of KIVI's layout); None: all of them.
    target: "tpu" (Mosaic) or "gpu" (Triton: compiler params given, so it
      takes the Triton path of jax 0.10.2 rather than Mosaic GPU, whose
      `pallas_call` path is deprecated there and whose interpreter runs one
      block only; Triton lowers from a CPU machine and interprets).
    interpret: False, True, or (TPU) a `pltpu.InterpretParams()`.

  Returns:
    (out [B, T, N, H] in q.dtype, lse [B, N, T] float32; -inf for a query
    that sees no slot).

  Raises:
    ValueError / TypeError: on mis-shaped inputs or an unknown target.
  """
  _check(q, k, v, q_pos, k_pos, k_valid, target)
  # Per-slot scalars (norms) [L, B, K, S] load as [n, 1] tiles.
  k = {name: x[..., None] if x.ndim == 4 else x for name, x in k.items()}
  v = {name: x[..., None] if x.ndim == 4 else x for name, x in v.items()}
  B, T, N, H = q.shape
  L, _, K, S_all = k_pos.shape
  first, S = (0, S_all) if slots is None else slots
  if not 0 <= first < first + S <= S_all:
    raise ValueError(f"slots={slots} must lie inside [0, S={S_all}).")
  G = N // K
  scale = H**-0.5 if scale is None else scale
  k_gran = _granules(k, S, "k")
  v_gran = _granules(v, S, "v")
  if target == "tpu":
    n = block_size(S, block_k)
  else:  # Triton: a power of 2 (the last block masked), whole groups
    n = max(16, min(_next_pow2(S), _prev_pow2(block_k)), *k_gran, *v_gran)
  for g in k_gran + v_gran:
    if n % g:
      raise Unsupported(
        f"a block of {n} slots is not a whole number of {g}-slot groups."
      )
  nblk = -(-S // n)
  splits = max(1, min(num_splits, nblk))
  bps = -(-nblk // splits)
  # A traced layer is clamped (a concrete one is checked by the caller).
  layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1).reshape(1)

  # Query rows of each kv head: row g * T + t is query head h * G + g at
  # step t. Gpu programs pad the rows to a power of two >= 16 (Triton dots).
  M = G * T
  if target == "tpu":  # row blocks: all rows, or block_m (a multiple of 8)
    mb = M if M <= block_m else -(-block_m // 8) * 8
  else:  # Triton: a power of 2 >= 16
    mb = max(16, _next_pow2(min(M, block_m)))
  Mp = -(-M // mb) * mb
  nmb = Mp // mb
  qg = q.astype(jnp.float32).reshape(B, T, K, G, H) * scale
  qg = jnp.moveaxis(qg, 1, 3).reshape(B, K, M, H)
  rows_pos = jnp.tile(q_pos.astype(jnp.int32), (1, G))  # [B, M]
  if Mp > M:
    qg = jnp.pad(qg, [(0, 0), (0, 0), (0, Mp - M), (0, 0)])
    rows_pos = jnp.pad(rows_pos, [(0, 0), (0, Mp - M)], constant_values=-1)
  qf = tuple(f.astype(jnp.float32) for f in k_codec.query(qg, k_shared or {}))
  e_dims = v_codec.value_dims(H)

  # Slot positions of the layer (NO_POS where empty) and the last live
  # block of each (row, kv head): one pass over the layer's bookkeeping.
  pos_l = jax.lax.dynamic_slice_in_dim(
    jax.lax.dynamic_index_in_dim(k_pos, layer[0], 0, keepdims=False),
    first,
    S,
    axis=-1,
  )
  valid_l = jax.lax.dynamic_slice_in_dim(
    jax.lax.dynamic_index_in_dim(k_valid, layer[0], 0, keepdims=False),
    first,
    S,
    axis=-1,
  )
  kpos = jnp.where(valid_l, pos_l.astype(jnp.int32), _kernel.NO_POS)
  last_slot = jnp.max(jnp.where(valid_l, jnp.arange(S), -1), axis=-1)
  last = jnp.where(last_slot >= 0, last_slot // n, -1).astype(jnp.int32)
  last = last.reshape(B * K)
  kpos = kpos[:, :, None, :]  # [B, K, 1, S]
  if nblk * n > S:  # GPU blocks past the capacity see nothing
    kpos = jnp.pad(
      kpos,
      [(0, 0), (0, 0), (0, 0), (0, nblk * n - S)],
      constant_values=_kernel.NO_POS,
    )
  qpos = rows_pos[..., None]  # [B, M, 1]

  # Named after the codecs: in compiler errors and profiles.
  name = f"decode_attention_{type(k_codec).__name__}_{type(v_codec).__name__}"
  k_leaves = k_codec.kernel_leaves(k)
  v_leaves = v_codec.kernel_leaves(v)
  k_names, v_names = list(k_leaves), list(v_leaves)
  if target == "gpu":
    _check_triton_shapes(
      [f.shape[-1] for f in qf]
      + list(e_dims)
      + [x.shape[-1] for x in (*k_leaves.values(), *v_leaves.values())]
      + [n // g for g in k_gran + v_gran],
      k_codec,
      v_codec,
    )
  inputs = (*qf, qpos, kpos, *k_leaves.values(), *v_leaves.values())
  out_shape = [
    jax.ShapeDtypeStruct((B, K, splits, Mp, e), jnp.float32) for e in e_dims
  ] + [jax.ShapeDtypeStruct((B, K, splits, Mp, 1), jnp.float32)]

  if target == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    def blk(b, h, s, j, layer_ref, last_ref):
      # Past the last live block: the same block again (no new DMA).
      del layer_ref
      return jnp.maximum(jnp.minimum(s * bps + j, last_ref[b * K + h]), 0)

    def leaf_spec(leaf, g):
      return pl.BlockSpec(
        (None, None, None, n // g, leaf.shape[-1]),
        lambda b, h, m, s, j, lr, la: (lr[0], b, h, blk(b, h, s, j, lr, la), 0),
      )

    in_specs = [
      pl.BlockSpec(
        (None, None, mb, f.shape[-1]), lambda b, h, m, s, j, *_: (b, h, m, 0)
      )
      for f in qf
    ]
    in_specs += [
      pl.BlockSpec((None, mb, 1), lambda b, h, m, s, j, *_: (b, m, 0)),
      pl.BlockSpec(
        (None, None, 1, n),
        lambda b, h, m, s, j, lr, la: (b, h, 0, blk(b, h, s, j, lr, la)),
      ),
    ]
    in_specs += [leaf_spec(x, g) for x, g in zip(k_leaves.values(), k_gran)]
    in_specs += [leaf_spec(x, g) for x, g in zip(v_leaves.values(), v_gran)]
    out_specs = [
      pl.BlockSpec(
        (None, None, None, mb, o.shape[-1]),
        lambda b, h, m, s, j, *_: (b, h, s, m, 0),
      )
      for o in out_shape
    ]
    scratch = [pltpu.VMEM((mb, 1), jnp.float32)] * 2
    scratch += [pltpu.VMEM((mb, e), jnp.float32) for e in e_dims]
    kern = _kernel.make_tpu_kernel(
      k_codec,
      v_codec,
      k_names,
      v_names,
      len(qf),
      len(e_dims),
      K,
      bps,
      sliding_window,
    )
    res = pl.pallas_call(
      kern,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K, nmb, splits, bps),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
      ),
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel",) * 4 + ("arbitrary",)
      ),
      interpret=interpret,
      name=name,
    )(layer, last, *inputs)
  else:
    from jax.experimental.pallas import triton as pltriton

    kern = _kernel.make_gpu_kernel(
      k_codec,
      v_codec,
      k_names,
      v_names,
      k_gran,
      v_gran,
      len(qf),
      len(e_dims),
      K,
      n,
      bps,
      mb,
      nmb,
      sliding_window,
    )
    res = pl.pallas_call(
      kern,
      out_shape=out_shape,
      grid=(B, K, splits * nmb),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name=name,
    )(layer, last, *inputs)

  *parts, lse = res  # [B, K, splits, Mp, e_j], [B, K, splits, Mp, 1]
  lse = lse[..., 0]
  total = jax.nn.logsumexp(lse, axis=2)  # [B, K, Mp]; -inf: nothing seen
  safe = jnp.where(jnp.isfinite(total), total, 0.0)
  w = jnp.exp(lse - safe[:, :, None])[..., None]  # [B, K, splits, Mp, 1]
  parts = tuple(jnp.sum(w * p, axis=2)[:, :, :M] for p in parts)
  out = v_codec.output(parts, v_shared or {})  # [B, K, M, H]
  out = jnp.moveaxis(out.reshape(B, K, G, T, H), 3, 1).reshape(B, T, N, H)
  lse = total[:, :, :M].reshape(B, K, G, T).reshape(B, N, T)
  return out.astype(q.dtype), lse
