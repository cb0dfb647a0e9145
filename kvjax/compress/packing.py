"""Bit packing of unsigned codes of any width 1..8 into uint8.

One layout for every codec: the codes of a row form a little-endian bit
stream (code 0's bits first, LSB first), cut into bytes. Unpacking is
arithmetic after the load (shifts and masks, no bitcasts), as Pallas
interpret mode needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pack_bits(codes: Array, bits: int) -> Array:
  """Packs codes [..., n] (< 2**bits, n * bits % 8 == 0) into uint8
  [..., n * bits / 8]: the bit stream of code 0 (LSB first), code 1, ..."""
  n = codes.shape[-1]
  if (n * bits) % 8:
    raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes.")
  if bits == 8:  # the stream of 8-bit codes is the codes themselves
    return codes.astype(jnp.uint8)
  c = codes.astype(jnp.uint8)
  bit_planes = (c[..., None] >> jnp.arange(bits, dtype=jnp.uint8)) & 1
  stream = bit_planes.reshape(codes.shape[:-1] + (n * bits // 8, 8))
  weights = (jnp.uint8(1) << jnp.arange(8, dtype=jnp.uint8))
  return jnp.sum(stream * weights, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: Array, bits: int, n: int) -> Array:
  """Inverse of `pack_bits`: uint8 [..., n * bits / 8] -> uint8 [..., n]."""
  if bits == 8:
    return packed
  stream = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
  planes = stream.reshape(packed.shape[:-1] + (n, bits))
  weights = (jnp.uint8(1) << jnp.arange(bits, dtype=jnp.uint8))
  return jnp.sum(planes * weights, axis=-1, dtype=jnp.uint8)
