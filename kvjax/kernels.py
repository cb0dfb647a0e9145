"""The Pallas backends: one layer of a kvjax cache through the kernels of
`pallas_kernels`.

A plain cache attended by more than `DECODE_QUERIES` queries (prefill)
runs the flash attention kernel; everything else (decode steps, a question
fed after compression, any coded cache) runs the split-K decode kernel,
reading the codec's payload as stored through the codec's tile plug-in
(`Codec.tile`). A `TailedKV` (KIVI's code region and full-precision tail)
is attended one region at a time and the parts merged by log-sum-exp.

Off the matching accelerator the kernels run in interpret mode (slow: for
checking). Where a kernel cannot take a payload (a codec with no tile
functions, a capacity with no block size, a tile shape Triton cannot lower)
the call runs on the XLA engine instead and a warning says so, once per
reason.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.cache import CodedKV, TailedKV
from pallas_kernels import Unsupported, tiles
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import (
  flash_attention,
  flash_attention_mass,
)

# Platform each target runs compiled on (elsewhere: interpret mode).
_PLATFORM = {"tpu": "tpu", "gpu": "gpu"}
DECODE_QUERIES = 16
BLOCK_Q = 128
BLOCK_K = 512


_COMPILED = [False]


@contextlib.contextmanager
def compiled_kernels():
  """Inside this block the kernels are traced for compilation even off
  their platform: to compile a whole model ahead of time for a TPU (or
  lower it for CUDA) from a CPU machine (`pallas_kernels.compile_check`)."""
  _COMPILED.append(True)
  try:
    yield
  finally:
    _COMPILED.pop()


def interpret_for(target: str) -> bool:
  """Interpret mode unless this process runs on the target's platform (or
  inside `compiled_kernels`)."""
  return not _COMPILED[-1] and jax.default_backend() != _PLATFORM[target]


@functools.cache
def _warn_once(reason: str) -> None:
  warnings.warn(
    f"Pallas backend: {reason}; this attention runs on the XLA engine "
    "instead (same result).",
    stacklevel=4,
  )


class Fallback(Exception):
  """This payload runs on the XLA engine (the message says why)."""


def _region_payload(region, layer) -> tuple[dict, dict, tiles.TileCodec]:
  """(per-slot leaves, the layer's shared leaves, tile codec) of one
  storage region (an L-stacked array or CodedKV)."""
  if isinstance(region, CodedKV):
    tile = region.codec.tile
    if tile is None:
      raise Fallback(f"codec {region.codec.name} has no tile functions")
    shared = jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False),
      region.shared,
    )
    return dict(region.slots), shared, tile
  return {"x": region}, {}, tiles.Plain()


def _regions(x, capacity: int) -> list[tuple[int, int, Any]]:
  if isinstance(x, TailedKV):
    sc = x.code_slots
    return [(0, sc, x.code), (sc, capacity - sc, x.tail)]
  return [(0, capacity, x)]


def _flash_takes(view, q) -> bool:
  """Flash attention reads plain float32 / bfloat16 entries of q's dtype
  (other caches go through the decode kernel, which computes in float32)."""
  return (
    not isinstance(view.k, (CodedKV, TailedKV))
    and not isinstance(view.v, (CodedKV, TailedKV))
    and view.k.dtype == view.v.dtype == q.dtype
    and q.dtype in (jnp.float32, jnp.bfloat16)
  )


def attention(view, q, *, q_pos, scale, sliding_window, target: str):
  """Attention of q over one layer (`LayerView`) on the Pallas `target`
  ("tpu" | "gpu"): a list of (out [B, T, N, H], lse [B, N, T]) over
  disjoint slot regions, to merge; None when the XLA engine must run it
  (a warning says why)."""
  S = view.pos.shape[-1]
  interpret = interpret_for(target)
  T = q.shape[1]
  try:
    if _flash_takes(view, q) and T > DECODE_QUERIES:
      try:
        return [
          flash_attention(
            q,
            view.k,
            view.v,
            q_pos,
            view.pos,
            view.valid,
            view.layer,
            scale=scale,
            sliding_window=sliding_window,
            block_q=BLOCK_Q,
            block_k=BLOCK_K,
            target=target,
            interpret=interpret,
          )
        ]
      except Unsupported as e:  # a capacity with no block size
        raise Fallback(str(e)) from None
    kr, vr = _regions(view.k, S), _regions(view.v, S)
    if [r[:2] for r in kr] != [r[:2] for r in vr]:
      raise Fallback("keys and values are stored in different regions")
    parts = []
    for (first, count, kreg), (_, _, vreg) in zip(kr, vr):
      if count == 0:
        continue
      k_leaves, k_shared, k_tile = _region_payload(kreg, view.layer)
      v_leaves, v_shared, v_tile = _region_payload(vreg, view.layer)
      try:
        parts.append(
          decode_attention(
            # float32 in and out: regions merge before the one rounding.
            q.astype(jnp.float32),
            k_leaves,
            v_leaves,
            q_pos,
            view.pos,
            view.valid,
            view.layer,
            k_shared,
            v_shared,
            k_codec=k_tile,
            v_codec=v_tile,
            scale=scale,
            sliding_window=sliding_window,
            block_k=BLOCK_K,
            slots=(first, count),
            target=target,
            interpret=interpret,
          )
        )
      except Unsupported as e:
        raise Fallback(str(e)) from None
  except Fallback as e:
    _warn_once(str(e))
    return None
  return parts


def mass(view, q, lse, weights, *, q_pos, scale, sliding_window, target):
  """[B, N, S] attention mass by the flash mass kernel (a plain cache), or
  None where the XLA engine's second pass runs instead."""
  if not _flash_takes(view, q):
    _warn_once(
      "the mass kernel reads plain caches of the queries' float32 / "
      "bfloat16 dtype (a decode-time policy scoring a coded cache, or a "
      "cache dtype other than the queries')"
    )
    return None
  try:
    return flash_attention_mass(
      q,
      view.k,
      q_pos,
      view.pos,
      view.valid,
      view.layer,
      lse,
      weights,
      scale=scale,
      sliding_window=sliding_window,
      block_q=BLOCK_Q,
      block_k=BLOCK_K,
      target=target,
      interpret=interpret_for(target),
    )
  except Unsupported as e:
    _warn_once(str(e))
    return None
