"""Split-K decode attention over a plain or coded cache layer.

One program owns one (row, kv head, split): the M = G * T query rows of a
kv head's group (a decode step's G queries, or a question chunk) against
the key blocks of its split of the slots, with an online softmax. It writes
its normalized partial output and log-sum-exp; `ops.py` merges the splits
by log-sum-exp (so results of disjoint key sets merge, and sharding can
merge across devices the same way).

The keys and values are read as the codec stores them: the kernel loads
each block's per-slot leaves (codes, scales, norms) and hands them to the
key codec's `logits` and the value codec's `values` tile functions
(`pallas_kernels.tiles`); the kernel itself knows no codec.

Masks come from one int32 row per block: the slot's original position, or
INT32_MAX where the slot holds nothing (so `pos <= q_pos` is false), and a
query row at position -1 (padding) sees nothing. Blocks after the last
live slot of a (row, kv head) are skipped: on TPU their index is clamped to
the last live block, so the pipeline issues no new DMA, and the body does
not run.

Query rows come in blocks of at most `block_m` (one program each), so a
long question's scores stay small.

TPU (Mosaic): grid (B, K, row blocks, splits, blocks per split), the last
axis a sequential reduction with the running max, sum and output in VMEM scratch;
the layer index and the last live block are scalar-prefetched.

GPU (Triton): grid (B, K, splits x row blocks), each program looping over its blocks;
the refs are whole arrays indexed by the layer and block. Triton needs
power-of-2 tiles: blocks are a power of 2 and the last may run past the
capacity, read with masked loads.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.tiles import TileCodec

Array = jax.Array
NO_POS = jnp.iinfo(jnp.int32).max  # position of an empty slot


def _visible(kpos: Array, qpos: Array, window: int | None) -> Array:
  """[M, n] mask from kpos [1, n] and qpos [M, 1]."""
  mask = kpos <= qpos
  if window is not None:
    mask &= kpos > qpos - window
  return mask


def _online_update(s, mask, m, l, accs, values_fn):
  """One block of the online softmax: s [M, n] logits, m/l [M, 1],
  accs [M, e_j] -> updated (m, l, accs)."""
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
  p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
  alpha = jnp.exp(m - m_safe)  # 0 where m = -inf
  l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  parts = values_fn(p)
  return m_new, l_new, [alpha * a + pv for a, pv in zip(accs, parts)]


def _finish(m, l, accs):
  """Normalized outputs and the LSE [M, 1] (-inf for an empty row)."""
  seen = l > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
  return [a * inv for a in accs], lse


def make_tpu_kernel(
  k_codec: TileCodec,
  v_codec: TileCodec,
  k_names: Sequence[str],
  v_names: Sequence[str],
  n_qf: int,
  n_out: int,
  num_kv_heads: int,
  blocks_per_split: int,
  window: int | None,
):
  """The Mosaic TPU kernel for one codec pair (closed over statically)."""

  def kernel(layer_ref, last_ref, *refs):
    # layer_ref: [1] int32 (scalar prefetch); last_ref: [B * K] int32, the
    #   last block holding a live slot of each (row, kv head), -1 if none.
    qf_refs = refs[:n_qf]  # each [rows, d_j] float32 query features
    i = n_qf
    qpos_ref = refs[i]  # [rows, 1] int32 query positions (-1: padding)
    kpos_ref = refs[i + 1]  # [1, n] int32 slot positions (NO_POS: empty)
    i += 2
    k_refs = refs[i : i + len(k_names)]  # each [n_leaf, X] a key leaf tile
    i += len(k_names)
    v_refs = refs[i : i + len(v_names)]  # each [n_leaf, X] a value leaf
    i += len(v_names)
    out_refs = refs[i : i + n_out]  # each [rows, e_j] float32 features
    lse_ref = refs[i + n_out]  # [rows, 1] float32
    m_ref, l_ref = refs[i + n_out + 1 : i + n_out + 3]  # [rows, 1] scratch
    acc_refs = refs[i + n_out + 3 :]  # each [rows, e_j] float32 scratch
    del layer_ref

    # program_id(2) is the block of query rows.
    b, h = pl.program_id(0), pl.program_id(1)
    split, j = pl.program_id(3), pl.program_id(4)
    block = split * blocks_per_split + j

    @pl.when(j == 0)
    def _init():
      m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
      for a in acc_refs:
        a[...] = jnp.zeros(a.shape, jnp.float32)

    @pl.when(block <= last_ref[b * num_kv_heads + h])
    def _block():
      qf = tuple(r[...] for r in qf_refs)
      kt = {n: r[...] for n, r in zip(k_names, k_refs)}
      vt = {n: r[...] for n, r in zip(v_names, v_refs)}
      s = k_codec.logits(qf, kt)  # [M, n]
      mask = _visible(kpos_ref[...], qpos_ref[...], window)
      m, l, accs = _online_update(
        s,
        mask,
        m_ref[...],
        l_ref[...],
        [a[...] for a in acc_refs],
        lambda p: v_codec.values(p, vt),
      )
      m_ref[...], l_ref[...] = m, l
      for a, x in zip(acc_refs, accs):
        a[...] = x

    @pl.when(j == blocks_per_split - 1)
    def _write():
      outs, lse = _finish(m_ref[...], l_ref[...], [a[...] for a in acc_refs])
      for o, x in zip(out_refs, outs):
        o[...] = x
      lse_ref[...] = lse

  return kernel


def make_gpu_kernel(
  k_codec: TileCodec,
  v_codec: TileCodec,
  k_names: Sequence[str],
  v_names: Sequence[str],
  k_granules: Sequence[int],
  v_granules: Sequence[int],
  n_qf: int,
  n_out: int,
  num_kv_heads: int,
  block: int,
  blocks_per_split: int,
  rows: int,
  row_blocks: int,
  window: int | None,
):
  """The Triton GPU kernel for one codec pair: whole-array refs, a loop
  over the program's blocks."""

  def kernel(layer_ref, last_ref, *refs):
    # layer_ref: [1] int32; last_ref: [B * K] int32 (as the TPU kernel).
    qf_refs = refs[:n_qf]  # each [B, K, M, d_j] float32
    i = n_qf
    qpos_ref = refs[i]  # [B, M, 1] int32
    kpos_ref = refs[i + 1]  # [B, K, 1, blocks * block] int32 (NO_POS pad)
    i += 2
    k_refs = refs[i : i + len(k_names)]  # each [L, B, K, S_leaf, X]
    i += len(k_names)
    v_refs = refs[i : i + len(v_names)]  # each [L, B, K, S_leaf, X]
    i += len(v_names)
    out_refs = refs[i : i + n_out]  # each [B, K, splits, M, e_j] float32
    lse_ref = refs[i + n_out]  # [B, K, splits, M, 1] float32

    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    split = jax.lax.div(i, row_blocks)
    mi = jax.lax.rem(i, row_blocks)  # this program's block of query rows
    mrows = pl.ds(mi * rows, rows)
    layer = layer_ref[0]
    last = last_ref[b * num_kv_heads + h]
    qf = tuple(r[b, h, mrows, :] for r in qf_refs)  # [rows, d_j]
    qpos = qpos_ref[b, mrows, :]  # [rows, 1]
    M = rows

    def leaf_tiles(names, grans, leaf_refs, start):
      # The last block may run past the capacity: masked loads (zeros).
      tiles = {}
      for n, g, r in zip(names, grans, leaf_refs):
        rows, width = block // g, r.shape[-1]
        idx = start // g + jax.lax.broadcasted_iota(jnp.int32, (rows, width), 0)
        tiles[n] = pltriton.load(
          r.at[layer, b, h, pl.ds(start // g, rows), :],
          mask=idx < r.shape[3],
          other=0,
        )
      return tiles

    def body(j, carry):
      blk = split * blocks_per_split + j

      def update(carry):
        m, l, accs = carry
        start = blk * block
        kt = leaf_tiles(k_names, k_granules, k_refs, start)
        vt = leaf_tiles(v_names, v_granules, v_refs, start)
        s = k_codec.logits(qf, kt)
        kpos = kpos_ref[b, h, :, pl.ds(start, block)]  # [1, n]
        mask = _visible(kpos, qpos, window)
        m, l, accs = _online_update(
          s, mask, m, l, list(accs), lambda p: v_codec.values(p, vt)
        )
        return m, l, tuple(accs)

      return jax.lax.cond(blk <= last, update, lambda c: c, carry)

    init = (
      jnp.full((M, 1), -jnp.inf, jnp.float32),
      jnp.zeros((M, 1), jnp.float32),
      tuple(jnp.zeros((M, r.shape[-1]), jnp.float32) for r in out_refs),
    )
    m, l, accs = jax.lax.fori_loop(0, blocks_per_split, body, init)
    outs, lse = _finish(m, l, list(accs))
    for o, x in zip(out_refs, outs):
      o[b, h, split, mrows, :] = x
    lse_ref[b, h, split, mrows, :] = lse

  return kernel
