"""Codecs as tile plug-ins of the attention kernels.

A kernel that attends over a compressed cache reads the codec's packed
payload from HBM one key block at a time; what turns a block of codes into
logits and a weighted sum of values is the codec's `TileCodec`, so adding
a codec means writing its tile functions, never a new kernel.

A `TileCodec` has three stages:

- outside the kernel, once per call: `kernel_leaves` turns the stored
  per-slot leaves into what the kernel loads (free bitcasts: float16 scales
  to uint16, float8 codes to uint8, since Mosaic loads neither), and
  `query` turns the queries into query features (a rotated query, a
  projected query, the channels of each bit plane);
- inside the kernel, per key block: `logits(qf, t)` -> [M, n] scores of the
  M query rows against the block's n entries, and `values(p, t)` -> the
  probability-weighted sum of the block's values, as value features;
- outside the kernel, once: `output(parts, shared)` turns the summed value
  features into [.., M, H] (inverse rotation, un-interleaving bit planes).

Everything the kernel does is done on whole tiles with dots, shifts and
selects, no gathers and no lane shuffles, so one body compiles for TPU
(Mosaic) and GPU (Triton):

- Packed b-bit codes are read as bit planes. A row of H codes packed LSB
  first holds channel c = C * j + i in plane i (C = codes per byte group);
  plane i is a shift and a mask of the bytes (3-bit codes first gather
  their byte planes with a 0/1 selection dot, exact in float32). The query
  is split into the same planes outside the kernel, so the logits are a
  sum of one dot per plane, and value planes are interleaved back once,
  after the kernel.
- A per-token scale and zero point fold into the logits and probabilities
  (`s * (q . c) + z * sum(q)`, `(p * s) @ c + p @ z`): M x n multiplies
  instead of dequantizing an n x H tile. Grouped scales are expanded with a
  0/1 dot and the tile dequantized in VMEM.
- Codebooks (TurboQuant) are looked up with a chain of selects over the
  2^b centroids; the query is rotated (and projected) once outside.
- float16 and float8 e4m3 are decoded from their bits with integer
  arithmetic and a bitcast.

Shapes inside the kernel: query features [M, d], tiles [n_leaf, X] (n_leaf
= n for per-slot leaves, n / granule for KIVI's per-group statistics).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import Unsupported

Array = jax.Array
_NT = (((1,), (1,)), ((), ()))  # a [M, d] x b [n, d] -> [M, n]
_NN = (((1,), (0,)), ((), ()))  # a [M, n] x b [n, d] -> [M, d]


def _dot(a: Array, b: Array, dims) -> Array:
  # float32 operands at full precision: Triton's default is TF32 and the
  # 0/1 selection dots must be exact.
  return jax.lax.dot_general(
    a.astype(jnp.float32),
    b.astype(jnp.float32),
    dims,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def dot_nt(a: Array, b: Array) -> Array:
  """a [M, d] . b [n, d]^T -> [M, n] float32."""
  return _dot(a, b, _NT)


def dot_nn(a: Array, b: Array) -> Array:
  """a [M, n] . b [n, d] -> [M, d] float32."""
  return _dot(a, b, _NN)


def _iota(shape, axis):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _div(x: Array, d: int) -> Array:
  """x // d for x >= 0 (`//` lowers through `sign`, which Mosaic lowers
  only on a machine with a TPU)."""
  return jax.lax.div(x, jnp.int32(d))


def row_of(col: Array, rows: int) -> Array:
  """A per-entry column [n, 1] as a row broadcast to [rows, n] (a dot with
  ones: a transpose Mosaic and Triton both lower)."""
  return dot_nt(jnp.ones((rows, 1), jnp.float32), col)


# ----------------------------------------------------------------------------
# Bits.


def float16_bits(u: Array) -> Array:
  """float32 values of float16 bit patterns (any int dtype, e.g. uint16)."""
  u = u.astype(jnp.int32)
  sign = (u >> 15) & 1
  exp = (u >> 10) & 31
  man = u & 1023
  f32_exp = jnp.where(exp == 31, 255, exp + 112)
  normal = jax.lax.bitcast_convert_type(
    (sign << 31) | (f32_exp << 23) | (man << 13), jnp.float32
  )
  sub = man.astype(jnp.float32) * (2.0**-24)
  sub = jnp.where(sign == 1, -sub, sub)
  return jnp.where(exp == 0, sub, normal)


def e4m3_bits(u: Array) -> Array:
  """float32 values of float8 e4m3fn bit patterns (uint8 codes)."""
  u = u.astype(jnp.int32)
  sign = (u >> 7) & 1
  exp = (u >> 3) & 15
  man = u & 7
  normal = jax.lax.bitcast_convert_type(
    (sign << 31) | ((exp + 120) << 23) | (man << 20), jnp.float32
  )
  sub = man.astype(jnp.float32) * (2.0**-9)
  sub = jnp.where(sign == 1, -sub, sub)
  return jnp.where(exp == 0, sub, normal)


def codes_per_group(bits: int) -> int:
  """C: codes in one group of whole bytes (8 for 3-bit codes)."""
  return math.lcm(bits, 8) // bits


def split_planes(x: Array, bits: int) -> tuple[Array, ...]:
  """x [..., H] -> C planes [..., H / C]: plane i holds channels C*j + i
  (outside the kernel: the query side of packed codes)."""
  C = codes_per_group(bits)
  return tuple(x[..., i::C] for i in range(C))


def merge_planes(planes) -> Array:
  """Inverse of `split_planes`: C planes [..., H / C] -> [..., H]."""
  x = jnp.stack(planes, axis=-1)
  return x.reshape(x.shape[:-2] + (-1,))


def code_planes(packed: Array, bits: int) -> list[Array]:
  """Packed codes [n, H * bits / 8] (uint8) -> C int32 planes [n, H / C]
  (inside the kernel)."""
  w = packed.astype(jnp.int32)  # upcast before shifting (Mosaic)
  mask = (1 << bits) - 1
  if 8 % bits == 0:
    return [(w >> (i * bits)) & mask for i in range(8 // bits)]
  P = bits  # bytes per group of 8 codes (lcm(bits, 8) / 8 = bits)
  groups = w.shape[-1] // P
  wf = w.astype(jnp.float32)
  word = 0
  for j in range(P):  # byte plane j: bytes P * g + j, by an exact 0/1 dot
    sel = (
      _iota((w.shape[-1], groups), 0) == P * _iota((w.shape[-1], groups), 1) + j
    ).astype(jnp.float32)
    word = word | (dot_nn(wf, sel).astype(jnp.int32) << (8 * j))
  return [(word >> (i * bits)) & mask for i in range(8)]


def _select_columns(x: Array, C: int, i: int) -> Array:
  """x [r, H] -> x[:, i::C] [r, H / C] by an exact 0/1 dot."""
  H = x.shape[-1]
  sel = (_iota((H, H // C), 0) == C * _iota((H, H // C), 1) + i).astype(
    jnp.float32
  )
  return dot_nn(x, sel)


def _repeat_rows(x: Array, times: int) -> Array:
  """x [r, d] -> [r * times, d], each row repeated, by an exact 0/1 dot."""
  r = x.shape[0]
  rep = (
    _div(_iota((r * times, r), 0), times) == _iota((r * times, r), 1)
  ).astype(jnp.float32)
  return dot_nn(rep, x)


def _repeat_columns(x: Array, times: int) -> Array:
  """x [r, g] -> [r, g * times], each column repeated, by a 0/1 dot."""
  g = x.shape[-1]
  rep = (
    _div(_iota((g, g * times), 1), times) == _iota((g, g * times), 0)
  ).astype(jnp.float32)
  return dot_nn(x, rep)


def _lookup(codes: Array, book: tuple[float, ...]) -> Array:
  """book[codes] for a small static codebook, as a chain of selects."""
  out = jnp.full(codes.shape, book[0], jnp.float32)
  for c, value in enumerate(book[1:], start=1):
    out = jnp.where(codes == c, jnp.float32(value), out)
  return out


def _as_uint16(x: Array) -> Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint16)


# ----------------------------------------------------------------------------
# The plug-in protocol.


@dataclasses.dataclass(frozen=True)
class TileCodec:
  """How the kernels read one codec's payload (static and hashable).

  Subclasses implement the stages they support: key codecs `query` and
  `logits`; value codecs `value_dims`, `values` and `output`.
  """

  def kernel_leaves(self, enc: dict) -> dict:
    """Stored per-slot leaves -> the leaves the kernel loads (outside)."""
    return dict(enc)

  def query(self, q: Array, shared: dict) -> tuple[Array, ...]:
    """q [..., M, H] float32 -> query features [..., M, d_j] (outside)."""
    raise Unsupported(f"{type(self).__name__} tiles cannot score keys")

  def logits(self, qf: tuple, t: dict) -> Array:
    """Query features [M, d_j] and one block's tiles -> [M, n] float32."""
    raise Unsupported(f"{type(self).__name__} tiles cannot score keys")

  def value_dims(self, head_dim: int) -> tuple[int, ...]:
    """Widths e_j of the value features `values` returns."""
    raise Unsupported(f"{type(self).__name__} tiles cannot read values")

  def values(self, p: Array, t: dict) -> tuple[Array, ...]:
    """p [M, n] float32 and one block's tiles -> features [M, e_j]."""
    raise Unsupported(f"{type(self).__name__} tiles cannot read values")

  def output(self, parts: tuple, shared: dict) -> Array:
    """Summed value features [..., M, e_j] -> [..., M, H] (outside)."""
    raise Unsupported(f"{type(self).__name__} tiles cannot read values")


@dataclasses.dataclass(frozen=True)
class Plain(TileCodec):
  """Uncompressed float entries: leaf "x" [n, H] (float32, bfloat16, or
  float16 read as its bits, which Mosaic loads where it loads no float16)."""

  def kernel_leaves(self, enc):
    x = enc["x"]
    return {"x": _as_uint16(x) if x.dtype == jnp.float16 else x}

  def _x(self, t):
    x = t["x"]
    return float16_bits(x) if x.dtype == jnp.uint16 else x

  def query(self, q, shared):
    return (q,)

  def logits(self, qf, t):
    return dot_nt(qf[0], self._x(t))

  def value_dims(self, head_dim):
    return (head_dim,)

  def values(self, p, t):
    return (dot_nn(p, self._x(t)),)

  def output(self, parts, shared):
    return parts[0]


@dataclasses.dataclass(frozen=True)
class _IntCodes(TileCodec):
  """Integer codes packed over channels ("codes" [n, H * bits / 8] uint8)
  with float16 "zero" / "scale" statistics: the parts both layouts share."""

  bits: int
  group: int
  head_dim: int

  def kernel_leaves(self, enc):
    return {
      "codes": enc["codes"],
      "zero": _as_uint16(enc["zero"]),
      "scale": _as_uint16(enc["scale"]),
    }

  def query(self, q, shared):
    return split_planes(q, self.bits)

  def value_dims(self, head_dim):
    C = codes_per_group(self.bits)
    return (head_dim // C,) * C

  def output(self, parts, shared):
    return merge_planes(parts)


@dataclasses.dataclass(frozen=True)
class IntTokens(_IntCodes):
  """Per-token min-max integer codes (kvjax `int_codec`): "codes" [n,
  H * bits / 8] uint8 packed over channels, "zero"/"scale" [n, H / group]
  float16. With one group per token the scales fold into the logits and
  probabilities; with several, each tile is dequantized in VMEM."""

  def __post_init__(self):
    C = codes_per_group(self.bits)
    if self.group % C or self.head_dim % self.group:
      raise ValueError(
        f"group={self.group} must be a multiple of {C} dividing "
        f"head_dim={self.head_dim} for {self.bits}-bit tiles."
      )

  @property
  def _folded(self) -> bool:
    return self.group == self.head_dim

  def _dequantized(self, t):
    """Dequantized planes [n, H / C] (grouped scales)."""
    C = codes_per_group(self.bits)
    per = self.group // C  # lanes of a plane in one group
    s = _repeat_columns(float16_bits(t["scale"]), per)
    z = _repeat_columns(float16_bits(t["zero"]), per)
    return [
      c.astype(jnp.float32) * s + z for c in code_planes(t["codes"], self.bits)
    ]

  def logits(self, qf, t):
    M = qf[0].shape[0]
    if self._folded:
      planes = code_planes(t["codes"], self.bits)
      raw = sum(dot_nt(qi, ci) for qi, ci in zip(qf, planes))
      qsum = sum(jnp.sum(qi, axis=-1, keepdims=True) for qi in qf)
      s = row_of(float16_bits(t["scale"]), M)
      z = row_of(float16_bits(t["zero"]), M)
      return raw * s + qsum * z
    return sum(dot_nt(qi, ki) for qi, ki in zip(qf, self._dequantized(t)))

  def values(self, p, t):
    M = p.shape[0]
    if self._folded:
      s = row_of(float16_bits(t["scale"]), M)
      z = row_of(float16_bits(t["zero"]), M)
      pz = jnp.sum(p * z, axis=-1, keepdims=True)  # [M, 1]
      return tuple(
        dot_nn(p * s, c) + pz for c in code_planes(t["codes"], self.bits)
      )
    return tuple(dot_nn(p, v) for v in self._dequantized(t))


@dataclasses.dataclass(frozen=True)
class IntChannels(_IntCodes):
  """Per-channel integer codes (KIVI keys): "codes" [n, H * bits / 8]
  uint8 per token, "zero"/"scale" [n / group, H] float16 per (group of
  `group` tokens, channel). The statistics are expanded over tokens and
  split into bit planes with exact 0/1 dots, and the tile dequantized."""

  def _dequantized(self, t):
    C = codes_per_group(self.bits)
    s, z = float16_bits(t["scale"]), float16_bits(t["zero"])
    out = []
    for i, c in enumerate(code_planes(t["codes"], self.bits)):
      si = _repeat_rows(_select_columns(s, C, i), self.group)
      zi = _repeat_rows(_select_columns(z, C, i), self.group)
      out.append(c.astype(jnp.float32) * si + zi)
    return out

  def logits(self, qf, t):
    return sum(dot_nt(qi, ki) for qi, ki in zip(qf, self._dequantized(t)))

  def values(self, p, t):
    return tuple(dot_nn(p, v) for v in self._dequantized(t))


@dataclasses.dataclass(frozen=True)
class Fp8(TileCodec):
  """float8 e4m3 codes with a float16 scale per entry (kvjax `fp8_codec`):
  "codes" [n, H] (read as uint8), "scale" [n, 1]; the scale folds into
  the logits and probabilities."""

  def kernel_leaves(self, enc):
    return {
      "codes": jax.lax.bitcast_convert_type(enc["codes"], jnp.uint8),
      "scale": _as_uint16(enc["scale"]),
    }

  def query(self, q, shared):
    return (q,)

  def logits(self, qf, t):
    s = row_of(float16_bits(t["scale"]), qf[0].shape[0])
    return dot_nt(qf[0], e4m3_bits(t["codes"])) * s

  def value_dims(self, head_dim):
    return (head_dim,)

  def values(self, p, t):
    s = row_of(float16_bits(t["scale"]), p.shape[0])
    return (dot_nn(p * s, e4m3_bits(t["codes"])),)

  def output(self, parts, shared):
    return parts[0]


@dataclasses.dataclass(frozen=True)
class LowRank(TileCodec):
  """`rank` float16 coefficients per entry on a per-(row, kv head) basis
  (kvjax `lowrank_codec`): the query is projected onto the basis once and
  the summed coefficients lifted back once, outside the kernel."""

  rank: int

  def kernel_leaves(self, enc):
    return {"coeffs": _as_uint16(enc["coeffs"])}

  def query(self, q, shared):
    # q [B, K, M, H], basis [B, K, H, rank]
    return (jnp.einsum("bkmh,bkhr->bkmr", q, shared["basis"]),)

  def logits(self, qf, t):
    return dot_nt(qf[0], float16_bits(t["coeffs"]))

  def value_dims(self, head_dim):
    return (self.rank,)

  def values(self, p, t):
    return (dot_nn(p, float16_bits(t["coeffs"])),)

  def output(self, parts, shared):
    return jnp.einsum("bkmr,bkhr->bkmh", parts[0], shared["basis"])


@dataclasses.dataclass(frozen=True)
class TurboQuant(TileCodec):
  """TurboQuant MSE / inner-product codes (kvjax `turboquant_codec`),
  with the optional outlier split into two channel groups.

  Per group i (leaf suffix "" or "_1"): "codes" b-bit centroid indices of
  the rotated unit vector, "norm" float16; the "prod" variant codes b - 1
  bits and adds a 1-bit QJL residual ("signs", "rnorm"). The query is
  permuted, rotated (and projected) once outside the kernel; the kernel
  looks centroids up from the codes; value features stay rotated and are
  rotated back once.

  Attributes:
    bits: per group.
    dims: channels per group.
    variant: "mse" or "prod".
    books: per group, the codebook of the MSE codes (empty for 1-bit prod).
    params: hashable identity (the kvjax codec's params); rotations and
      projections are numpy constants excluded from comparison.
  """

  bits: tuple[int, ...]
  dims: tuple[int, ...]
  variant: str
  books: tuple[tuple[float, ...], ...]
  params: tuple
  rotations: tuple = dataclasses.field(compare=False, hash=False, default=())
  projections: tuple = dataclasses.field(compare=False, hash=False, default=())

  def _suffix(self, i):
    return f"_{i}" if i else ""

  def kernel_leaves(self, enc):
    out = {}
    for k, v in enc.items():
      out[k] = _as_uint16(v) if v.dtype == jnp.float16 else v
    return out

  def _split(self, x, shared):
    if len(self.dims) == 1:
      return [x]
    n_out = self.dims[1]
    perm = shared["perm"][..., :, None, :]  # [B?, K, 1, H]
    xp = jnp.take_along_axis(x, jnp.broadcast_to(perm, x.shape), axis=-1)
    return [xp[..., :-n_out], xp[..., -n_out:]]

  def _code_bits(self, i):
    return self.bits[i] if self.variant == "mse" else self.bits[i] - 1

  def query(self, q, shared):
    feats = []
    for i, qi in enumerate(self._split(q, shared)):
      rot = jnp.asarray(self.rotations[i])
      if self._code_bits(i):
        feats += split_planes(qi @ rot.T, self._code_bits(i))
      if self.variant == "prod":
        feats += split_planes(qi @ jnp.asarray(self.projections[i]).T, 1)
    return tuple(feats)

  def logits(self, qf, t):
    M = qf[0].shape[0]
    total, k = 0.0, 0
    for i, d in enumerate(self.dims):
      s = self._suffix(i)
      b = self._code_bits(i)
      part = 0.0
      if b:
        planes = code_planes(t["codes" + s], b)
        for c in planes:
          part = part + dot_nt(qf[k], _lookup(c, self.books[i]))
          k += 1
      if self.variant == "prod":
        qjl = 0.0
        for c in code_planes(t["signs" + s], 1):
          qjl = qjl + dot_nt(qf[k], c.astype(jnp.float32) * 2 - 1)
          k += 1
        rnorm = row_of(float16_bits(t["rnorm" + s]), M)
        part = part + qjl * (math.sqrt(math.pi / 2) / d) * rnorm
      total = total + part * row_of(float16_bits(t["norm" + s]), M)
    return total

  def value_dims(self, head_dim):
    if self.variant != "mse":
      raise Unsupported("TurboQuant-prod tiles read keys only")
    out = ()
    for i, d in enumerate(self.dims):
      C = codes_per_group(self.bits[i])
      out += (d // C,) * C
    return out

  def values(self, p, t):
    out = []
    for i in range(len(self.dims)):
      s = self._suffix(i)
      pn = p * row_of(float16_bits(t["norm" + s]), p.shape[0])
      for c in code_planes(t["codes" + s], self.bits[i]):
        out.append(dot_nn(pn, _lookup(c, self.books[i])))
    return tuple(out)

  def output(self, parts, shared):
    groups, k = [], 0
    for i in range(len(self.dims)):
      C = codes_per_group(self.bits[i])
      y = merge_planes(parts[k : k + C])  # rotated: P x / ||x|| * ||x||
      k += C
      groups.append(y @ jnp.asarray(self.rotations[i]))
    if len(groups) == 1:
      return groups[0]
    xp = jnp.concatenate(groups, axis=-1)
    inv = jnp.argsort(shared["perm"], axis=-1)[..., :, None, :]
    return jnp.take_along_axis(xp, jnp.broadcast_to(inv, xp.shape), axis=-1)


@dataclasses.dataclass(frozen=True)
class Qjl(TileCodec):
  """QJL keys (kvjax `qjl_codec`): "signs" [n, m / 8] of S k, "norm"
  float16; the query is projected once outside the kernel."""

  projections: int
  params: tuple
  projection: Any = dataclasses.field(compare=False, hash=False, default=None)

  def kernel_leaves(self, enc):
    return {"signs": enc["signs"], "norm": _as_uint16(enc["norm"])}

  def query(self, q, shared):
    return split_planes(q @ jnp.asarray(self.projection).T, 1)

  def logits(self, qf, t):
    M = qf[0].shape[0]
    s = sum(
      dot_nt(qi, c.astype(jnp.float32) * 2 - 1)
      for qi, c in zip(qf, code_planes(t["signs"], 1))
    )
    norm = row_of(float16_bits(t["norm"]), M)
    return s * (math.sqrt(math.pi / 2) / self.projections) * norm


@dataclasses.dataclass(frozen=True)
class Decoded(Plain):
  """Any codec without tile functions of its own: the kernel decodes each
  tile with the codec's jnp `decode` (its per-slot leaves only; no shared
  leaves) and attends as over plain entries. Correct wherever the decode's
  ops lower (interpret mode always); gathers, uint8 arithmetic and float16
  loads do not compile for Mosaic or Triton.

  Attributes:
    decode: (enc dict of [n, X] tiles, None) -> [n, H] float32.
    params: hashable identity of the codec.
  """

  params: tuple
  decode: Callable = dataclasses.field(compare=False, hash=False, default=None)

  def kernel_leaves(self, enc):
    return dict(enc)

  def _x(self, t):
    return self.decode({k: v[None, None] for k, v in t.items()}, None)[0, 0]


def books_of(books) -> tuple[tuple[float, ...], ...]:
  """Codebooks as static tuples of Python floats."""
  return tuple(tuple(float(x) for x in np.asarray(b)) for b in books)
