"""Bit packing of unsigned codes of any width 1..8 into uint8.

One layout for every codec: the codes of a row form a little-endian bit
stream (code 0's bits first, LSB first), cut into bytes. Unpacking is
arithmetic after the load (shifts and masks, no bitcasts), as Pallas
interpret mode needs.
"""

from __future__ import annotations

import math

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
  weights = jnp.uint8(1) << jnp.arange(8, dtype=jnp.uint8)
  return jnp.sum(stream * weights, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: Array, bits: int, n: int) -> Array:
  """Inverse of `pack_bits`: uint8 [..., n * bits / 8] -> uint8 [..., n].

  Each code is read from the one or two bytes holding it with static
  shifts and masks (one elementwise pass XLA fuses into the consumer),
  not by expanding the stream into bits first.
  """
  if bits == 8:
    return packed
  lead = packed.shape[:-1]
  if 8 % bits == 0:  # a byte holds 8 / bits whole codes
    shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8)
    codes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return codes.reshape(lead + (-1,))[..., :n]
  # Groups of lcm(bits, 8) / 8 bytes hold whole codes; a code spans at most
  # two bytes of its group.
  group = math.lcm(bits, 8) // 8
  per_group = group * 8 // bits
  words = packed.reshape(lead + (-1, group)).astype(jnp.int32)
  codes = []
  for i in range(per_group):
    byte, shift = divmod(i * bits, 8)
    word = words[..., byte]
    if shift + bits > 8:
      word = word | (words[..., byte + 1] << 8)
    codes.append((word >> shift) & ((1 << bits) - 1))
  codes = jnp.stack(codes, axis=-1).reshape(lead + (-1,))
  return codes[..., :n].astype(jnp.uint8)
