"""Codecs on random rotations and projections: TurboQuant and QJL.

TurboQuant (arXiv 2504.19874) and QJL (arXiv 2406.03482).

TurboQuant-MSE at b bits: store ||x|| (float16); rotate the unit vector
by a random orthogonal P (QR of a Gaussian, sign-fixed: Haar); every
coordinate of P x/||x|| then follows the law of one coordinate of a
uniform unit vector in R^d, density ~ (1 - t^2)^((d-3)/2), close to
N(0, 1/d); each coordinate is replaced by the nearest of 2^b Lloyd-Max
centroids for that law. Decoding applies P^T and rescales.

TurboQuant-prod at b bits: MSE at b - 1 bits, then the residual r of the
unit vector is stored as sign(S r) (S i.i.d. N(0, 1), d x d) and ||r||;
the estimate adds sqrt(pi/2)/d * ||r|| * S^T sign(S r), which makes <q, k>
unbiased.

QJL at m projections: sign(S k) in {+-1}^m and ||k||; <q, k> is estimated
by sqrt(pi/2)/m * ||k|| * <S q, sign(S k)> (unbiased).

In attention these codecs never decode keys: `scores` rotates (P q) and
projects (S q) the query once and works on the codes. Codes are bit-packed
(any width 1..8), norms are float16; `bits(H)` states the exact total.

Outlier split: `turboquant(..., outlier_channels=n, outlier_bits=b_o)`
sends the n channels of largest mean |x| per (layer, kv head), chosen at
prefill, to a second TurboQuant at b_o bits. The paper's "2.5-bit" setup
does not add up as written (32 channels at 3 bits + 96 at 2 is 2.25 bits);
kvjax reports what it stores: (n b_o + (H - n) b) / H plus norms.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import Codec
from kvjax.compress import base
from kvjax.compress.codecs import int_codec, quantize
from kvjax.compress.packing import pack_bits, unpack_bits
from pallas_kernels import tiles

Array = jax.Array
_NORM_DTYPE = jnp.float16
TURBO_BITS = (1, 2, 3, 4)


# ----------------------------------------------------------------------------
# Lloyd-Max codebooks for a rotated coordinate.


def _lloyd_1d(t: np.ndarray, p: np.ndarray, k: int, iters: int) -> np.ndarray:
  """1-D k-means (Lloyd-Max) of the density p (normalized weights) on the
  grid t, started from the density's quantiles; returns sorted centroids."""
  c = np.interp((np.arange(k) + 0.5) / k, np.cumsum(p), t)
  for _ in range(iters):
    cell = np.searchsorted((c[1:] + c[:-1]) / 2, t)
    mass = np.bincount(cell, p, k)
    new = np.bincount(cell, p * t, k) / np.maximum(mass, 1e-300)
    if np.max(np.abs(new - c)) < 1e-12:
      return np.sort(new)
    c = new
  return np.sort(c)


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(
  dim: int, bits: int, grid: int = 200_001, iters: int = 500
) -> np.ndarray:
  """The 2^bits Lloyd-Max centroids (sorted, float64) for one coordinate of
  a uniformly random unit vector in R^dim (1-D k-means on the density
  (1 - t^2)^((dim - 3)/2) on [-1, 1], by quadrature on a fine grid)."""
  if bits < 1 or dim < 3:
    raise ValueError(f"need bits >= 1 and dim >= 3, got {bits}, {dim}.")
  t = np.linspace(-1, 1, grid)
  logp = 0.5 * (dim - 3) * np.log(np.clip(1 - t * t, 1e-300, None))
  p = np.exp(logp - logp.max())
  return _lloyd_1d(t, p / p.sum(), 2**bits, iters)


def _nearest(y: Array, codebook: np.ndarray) -> Array:
  """Index of the nearest centroid for each element of y."""
  edges = jnp.asarray((codebook[1:] + codebook[:-1]) / 2, jnp.float32)
  return jnp.searchsorted(edges, y).astype(jnp.uint8)


def random_rotation(key: Array, dim: int) -> Array:
  """A Haar-random orthogonal [dim, dim] matrix (QR with sign fix)."""
  g = jax.random.normal(key, (dim, dim), jnp.float32)
  q, r = jnp.linalg.qr(g)
  return q * jnp.sign(jnp.diagonal(r))[None, :]


def _np_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  return (q * np.sign(np.diagonal(r))[None, :]).astype(np.float32)


# ----------------------------------------------------------------------------
# Array-level encoders (any leading dims; the last axis is d).


def mse_encode(x: Array, rotation: Array, bits: int) -> dict[str, Array]:
  """x [..., d] -> {"codes": [..., d*bits/8] uint8, "norm": [...] f16}."""
  d = x.shape[-1]
  norm = jnp.linalg.norm(x, axis=-1)
  unit = x / jnp.where(norm > 0, norm, 1.0)[..., None]
  y = unit @ jnp.swapaxes(rotation, -1, -2)  # P u
  codes = _nearest(y, lloyd_max_codebook(d, bits))
  return {"codes": pack_bits(codes, bits), "norm": norm.astype(_NORM_DTYPE)}


def _centroids(enc: dict, bits: int, d: int) -> Array:
  """Rotated-domain reconstruction c[codes] [..., d] of the unit vector."""
  book = jnp.asarray(lloyd_max_codebook(d, bits), jnp.float32)
  return book[unpack_bits(enc["codes"], bits, d).astype(jnp.int32)]


def mse_decode(enc: dict, rotation: Array, bits: int) -> Array:
  """Inverse of `mse_encode`: ||x|| P^T c[codes], float32 [..., d]."""
  d = rotation.shape[-1]
  unit = _centroids(enc, bits, d) @ rotation
  return unit * enc["norm"].astype(jnp.float32)[..., None]


def prod_encode(
  x: Array, rotation: Array, projection: Array, bits: int
) -> dict[str, Array]:
  """TurboQuant-prod: MSE at bits - 1 on the unit vector + QJL of the
  residual. Keys: codes (absent at bits = 1), signs [..., d/8], norm,
  rnorm (float16)."""
  d = x.shape[-1]
  norm = jnp.linalg.norm(x, axis=-1)
  unit = x / jnp.where(norm > 0, norm, 1.0)[..., None]
  enc = {"norm": norm.astype(_NORM_DTYPE)}
  if bits > 1:
    y = unit @ jnp.swapaxes(rotation, -1, -2)
    codes = _nearest(y, lloyd_max_codebook(d, bits - 1))
    enc["codes"] = pack_bits(codes, bits - 1)
    approx = _centroids(enc, bits - 1, d) @ rotation
  else:
    approx = jnp.zeros_like(unit)
  r = unit - approx
  enc["signs"] = pack_bits(
    (r @ jnp.swapaxes(projection, -1, -2) > 0).astype(jnp.uint8), 1
  )
  enc["rnorm"] = jnp.linalg.norm(r, axis=-1).astype(_NORM_DTYPE)
  return enc


def _signs(enc: dict, d: int) -> Array:
  return unpack_bits(enc["signs"], 1, d).astype(jnp.float32) * 2 - 1


def prod_decode(
  enc: dict, rotation: Array, projection: Array, bits: int
) -> Array:
  """The unbiased estimate of x (float32 [..., d])."""
  d = rotation.shape[-1]
  unit = _centroids(enc, bits - 1, d) @ rotation if bits > 1 else 0.0
  qjl = (
    math.sqrt(math.pi / 2)
    / d
    * enc["rnorm"].astype(jnp.float32)[..., None]
    * (_signs(enc, d) @ projection)
  )
  return (unit + qjl) * enc["norm"].astype(jnp.float32)[..., None]


def mse_scores(q: Array, enc: dict, rotation: Array, bits: int) -> Array:
  """<q, x_hat> for q [..., M, d] and codes [..., S, ...] -> [..., M, S],
  rotating the query once instead of decoding the keys."""
  d = rotation.shape[-1]
  qr = q @ jnp.swapaxes(rotation, -1, -2)  # P q
  c = _centroids(enc, bits, d)  # [..., S, d]
  return (
    jnp.einsum("...md,...sd->...ms", qr, c)
    * enc["norm"].astype(jnp.float32)[..., None, :]
  )


def prod_scores(
  q: Array, enc: dict, rotation: Array, projection: Array, bits: int
) -> Array:
  """Unbiased <q, x> from prod codes; the query is rotated and projected
  once: <q, P^T c> = <P q, c>, <q, S^T z> = <S q, z>."""
  d = rotation.shape[-1]
  out = 0.0
  if bits > 1:
    out = jnp.einsum(
      "...md,...sd->...ms",
      q @ jnp.swapaxes(rotation, -1, -2),
      _centroids(enc, bits - 1, d),
    )
  sq = q @ jnp.swapaxes(projection, -1, -2)  # S q
  qjl = jnp.einsum("...md,...sd->...ms", sq, _signs(enc, d))
  qjl = (
    qjl
    * (math.sqrt(math.pi / 2) / d)
    * enc["rnorm"].astype(jnp.float32)[..., None, :]
  )
  return (out + qjl) * enc["norm"].astype(jnp.float32)[..., None, :]


def qjl_encode(x: Array, projection: Array) -> dict[str, Array]:
  """QJL keys: sign(S x) packed [..., m/8] and ||x|| (float16)."""
  return {
    "signs": pack_bits(
      (x @ jnp.swapaxes(projection, -1, -2) > 0).astype(jnp.uint8), 1
    ),
    "norm": jnp.linalg.norm(x, axis=-1).astype(_NORM_DTYPE),
  }


def qjl_scores(q: Array, enc: dict, projection: Array) -> Array:
  """sqrt(pi/2)/m * ||x|| * <S q, sign(S x)> -> [..., M, S]."""
  m = projection.shape[0]
  z = _signs(enc, m)
  s = jnp.einsum("...md,...sd->...ms", q @ jnp.swapaxes(projection, -1, -2), z)
  return (
    s
    * (math.sqrt(math.pi / 2) / m)
    * enc["norm"].astype(jnp.float32)[..., None, :]
  )


def qjl_decode(enc: dict, projection: Array) -> Array:
  """The unbiased estimate sqrt(pi/2)/m ||x|| S^T sign(S x)."""
  m = projection.shape[0]
  return (
    (math.sqrt(math.pi / 2) / m)
    * enc["norm"].astype(jnp.float32)[..., None]
    * (_signs(enc, m) @ projection)
  )


# ----------------------------------------------------------------------------
# Codecs and transforms.


def _check_turbo_bits(bits, name="bits"):
  if (
    isinstance(bits, bool)
    or not isinstance(bits, (int, np.integer))
    or (bits not in TURBO_BITS)
  ):
    raise ValueError(
      f"{name}={bits!r} is not supported; allowed: {TURBO_BITS}."
    )


def _outlier_init(outlier_channels: int):
  """Chooses, at prefill, the channels of largest mean |x| per (layer, kv
  head): shared["perm"] [L, K, H] lists normal channels, then outliers."""

  def init(cache, which):
    if not outlier_channels:
      return {}
    x = cache.k if which == "k" else cache.v  # [L, B, K, S, H]
    w = cache.valid[..., None].astype(jnp.float32)
    mag = jnp.sum(jnp.abs(x) * w, axis=(1, 3))  # [L, K, H]
    order = jnp.argsort(-mag, axis=-1)  # outliers first
    perm = jnp.concatenate(
      [order[..., outlier_channels:], order[..., :outlier_channels]], axis=-1
    )
    return {"perm": perm.astype(jnp.int32)}

  return init


def _split(x, shared, n_out):
  """x [..., K, S, H] -> the channel groups [normal, outliers]."""
  if not n_out:
    return [x]
  perm = shared["perm"][..., :, None, :]  # [K, 1, H] against [.., K, S, H]
  xp = jnp.take_along_axis(x, jnp.broadcast_to(perm, x.shape), axis=-1)
  return [xp[..., :-n_out], xp[..., -n_out:]]


def _merge(parts, shared, n_out):
  if not n_out:
    return parts[0]
  xp = jnp.concatenate(parts, axis=-1)
  inv = jnp.argsort(shared["perm"], axis=-1)[..., :, None, :]
  return jnp.take_along_axis(xp, jnp.broadcast_to(inv, xp.shape), axis=-1)


def turboquant_codec(
  bits: int,
  head_dim: int,
  variant: str = "mse",
  outlier_channels: int = 0,
  outlier_bits: int | None = None,
  seed: int = 0,
) -> Codec:
  """A TurboQuant codec on [..., K, S, H] entries (K at axis -3).

  The rotation P (and, for "prod", the projection S) is a constant of the
  codec drawn from `seed`, shared by every layer and head like a codebook:
  it is part of the program, not of each cache, and costs H^2 floats once.
  """
  _check_turbo_bits(bits)
  if variant not in ("mse", "prod"):
    raise ValueError(f"variant must be 'mse' or 'prod', got {variant!r}.")
  n_out = outlier_channels
  if n_out:
    _check_turbo_bits(outlier_bits, "outlier_bits")
    if (
      not 0 < n_out < head_dim
      or (n_out * outlier_bits) % 8
      or ((head_dim - n_out) * bits) % 8
    ):
      raise ValueError(
        f"outlier_channels={n_out} must be in (0, {head_dim}) "
        "with whole bytes of codes in each group."
      )
  group_bits = [bits] + ([outlier_bits] if n_out else [])
  suffix = lambda i: f"_{i}" if i else ""
  rng = np.random.default_rng(seed)
  dims = [head_dim - n_out] + ([n_out] if n_out else [])
  # numpy constants: a cached jax array made inside a trace would leak it.
  rots = [_np_rotation(rng, d) for d in dims]
  projs = [rng.standard_normal((d, d)).astype(np.float32) for d in dims]

  def encode(x, shared):
    enc = {}
    for i, (xg, b) in enumerate(zip(_split(x, shared, n_out), group_bits)):
      part = (
        mse_encode(xg, rots[i], b)
        if variant == "mse"
        else prod_encode(xg, rots[i], projs[i], b)
      )
      enc.update({k + suffix(i): v for k, v in part.items()})
    return enc

  def part(enc, i):
    s = suffix(i)
    return {
      k[: len(k) - len(s)] if s else k: v
      for k, v in enc.items()
      if (k.endswith(s) if s else "_" not in k)
    }

  def decode(enc, shared):
    parts = []
    for i, b in enumerate(group_bits):
      parts.append(
        mse_decode(part(enc, i), rots[i], b)
        if variant == "mse"
        else prod_decode(part(enc, i), rots[i], projs[i], b)
      )
    return _merge(parts, shared, n_out)

  def scores(q, enc, shared):
    qs = _split(q, shared, n_out)
    total = 0.0
    for i, b in enumerate(group_bits):
      total = total + (
        mse_scores(qs[i], part(enc, i), rots[i], b)
        if variant == "mse"
        else prod_scores(qs[i], part(enc, i), rots[i], projs[i], b)
      )
    return total

  def bits_fn(h):
    codes = (h - n_out) * bits + n_out * (outlier_bits or 0)
    norms = 16 * (1 if variant == "mse" else 2) * len(group_bits)
    return (codes + norms) / h

  name = f"turboquant-{variant}{bits}" + (
    f"+{n_out}@{outlier_bits}" if n_out else ""
  )
  return Codec(
    name,
    encode,
    decode,
    scores,
    bits_fn,
    ("turbo", bits, head_dim, variant, n_out, outlier_bits, seed),
    tiles.TurboQuant(
      bits=tuple(group_bits),
      dims=tuple(dims),
      variant=variant,
      books=tiles.books_of(
        lloyd_max_codebook(d, cb) if cb else ()
        for d, cb in zip(
          dims, [b if variant == "mse" else b - 1 for b in group_bits]
        )
      ),
      params=("turbo", bits, head_dim, variant, n_out, outlier_bits, seed),
      rotations=tuple(rots),
      projections=tuple(projs),
    ),
    shared_axes=(("perm", "k"),) if n_out else (),
  )


@base.by_value
def turboquant(
  bits: int = 3,
  variant: str = "mse",
  keys: bool = True,
  values: bool = True,
  outlier_channels: int = 0,
  outlier_bits: int | None = None,
  seed: int = 0,
) -> base.KVTransform:
  """TurboQuant keys and/or values (see the module docstring).

  Args:
    bits: 1..4 bits per coordinate (the normal channels).
    variant: "mse" or "prod" (inner-product unbiased: MSE at bits - 1 plus
      a 1-bit QJL residual). Values use "mse" whatever the key variant:
      attention needs them decoded, not in inner products.
    keys / values: which tensors.
    outlier_channels / outlier_bits: the outlier split.
    seed: for the random rotation and projection (codec constants).
  """
  _check_turbo_bits(bits)

  def make(variant_for, which):
    return lambda h: turboquant_codec(
      bits, h, variant_for, outlier_channels, outlier_bits, seed * 2 + which
    )

  return quantize(
    make(variant, 0) if keys else None,
    make("mse", 1) if values else None,
    name=f"turboquant{bits}" + ("" if variant == "mse" else "-prod"),
    shared_init=_outlier_init(outlier_channels),
  )


def qjl_codec(projections: int, head_dim: int, seed: int = 0) -> Codec:
  """QJL key codec: m sign bits + a float16 norm per key. The projection S
  [m, H] is a constant of the codec drawn from `seed`."""
  if projections % 8:
    raise ValueError(f"projections must be a multiple of 8, got {projections}.")
  proj = (
    np.random.default_rng(seed)
    .standard_normal((projections, head_dim))
    .astype(np.float32)
  )

  def encode(x, shared):
    del shared
    return qjl_encode(x, proj)

  def decode(enc, shared):
    del shared
    return qjl_decode(enc, proj)

  def scores(q, enc, shared):
    del shared
    return qjl_scores(q, enc, proj)

  return Codec(
    f"qjl{projections}",
    encode,
    decode,
    scores,
    lambda h: (projections + 16) / h,
    ("qjl", projections, head_dim, seed),
    tiles.Qjl(projections, ("qjl", projections, head_dim, seed), proj),
  )


@base.by_value
def qjl(
  projections: int = 256,
  value_bits: int = 2,
  value_group: int = 32,
  seed: int = 0,
) -> base.KVTransform:
  """QJL: keys as `projections` sign bits + norm; values per-token
  `value_bits` integers (QJL keeps values at 2 bits per token). QJL's
  full-precision window of the newest 128 tokens is not applied here."""
  if not isinstance(projections, int) or projections < 8:
    raise ValueError(f"projections must be an int >= 8, got {projections!r}.")
  qjl_codec(projections, 8, seed)  # validates the argument early
  return quantize(
    lambda h: qjl_codec(projections, h, seed),
    lambda h: int_codec(value_bits, min(value_group, h), h),
    name="qjl" if projections == 256 else f"qjl{projections}",
  )


# ----------------------------------------------------------------------------
# PolarQuant (arXiv 2502.02617).


@functools.lru_cache(maxsize=None)
def polar_codebook(
  level: int, bits: int, grid: int = 100_001, iters: int = 500
) -> np.ndarray:
  """Lloyd-Max centroids for the level-`level` angles of a rotated vector.

  Level 1: atan2 over coordinate pairs, uniform on [0, 2 pi): the optimal
  quantizer is uniform (cell midpoints). Level l >= 2: theta = atan(r2 / r1)
  of two norms of 2^(l-1) Gaussian coordinates each, density ~ (sin theta
  cos theta)^(2^(l-1) - 1) on [0, pi/2]; solved by 1-D k-means.
  """
  k = 2**bits
  if level == 1:
    return (np.arange(k) + 0.5) * (2 * np.pi / k)
  m = 2 ** (level - 1)
  t = np.linspace(0, np.pi / 2, grid)
  logp = (m - 1) * np.log(np.clip(np.sin(t) * np.cos(t), 1e-300, None))
  p = np.exp(logp - logp.max())
  return _lloyd_1d(t, p / p.sum(), k, iters)


def _padded_count(n: int, bits: int) -> int:
  """The least count >= n whose codes fill whole bytes."""
  while (n * bits) % 8:
    n += 1
  return n


def _pack_level(codes: Array, bits: int) -> Array:
  """Packs one level's codes, zero-padded to whole bytes (a small head dim
  leaves a deep level with fewer than 8 bits of codes; d = 32 at level 4:
  2 codes of 2 bits, stored in one byte)."""
  n = codes.shape[-1]
  pad = _padded_count(n, bits) - n
  if pad:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  return pack_bits(codes, bits)


def _unpack_level(packed: Array, bits: int, n: int) -> Array:
  return unpack_bits(packed, bits, _padded_count(n, bits))[..., :n]


def _quantize_angle(theta, book, periodic):
  if periodic:  # uniform cells on the circle
    k = book.shape[0]
    return (jnp.floor(theta / (2 * np.pi) * k).astype(jnp.int32) % k).astype(
      jnp.uint8
    )
  return _nearest(theta, book)


def polar_encode(
  x: Array, rotation: Array, level_bits: tuple[int, ...]
) -> dict[str, Array]:
  """Rotates x [..., d], then applies len(level_bits) polar levels.

  Returns packed angle codes per level ("a1", "a2", ...) and the final
  radii ("radii", float16, d / 2^levels of them).
  """
  y = x @ jnp.swapaxes(rotation, -1, -2)
  enc = {}
  pairs = y.reshape(y.shape[:-1] + (-1, 2))
  theta = jnp.mod(jnp.arctan2(pairs[..., 1], pairs[..., 0]), 2 * np.pi)
  r = jnp.linalg.norm(pairs, axis=-1)
  enc["a1"] = _pack_level(
    _quantize_angle(theta, polar_codebook(1, level_bits[0]), True),
    level_bits[0],
  )
  for lvl, b in enumerate(level_bits[1:], start=2):
    rp = r.reshape(r.shape[:-1] + (-1, 2))
    theta = jnp.arctan2(rp[..., 1], rp[..., 0])  # in [0, pi/2]
    r = jnp.linalg.norm(rp, axis=-1)
    enc[f"a{lvl}"] = _pack_level(_nearest(theta, polar_codebook(lvl, b)), b)
  enc["radii"] = r.astype(_NORM_DTYPE)
  return enc


def polar_decode(
  enc: dict, rotation: Array, level_bits: tuple[int, ...]
) -> Array:
  """Inverse of `polar_encode` (float32 [..., d])."""
  d = rotation.shape[-1]
  levels = len(level_bits)
  r = enc["radii"].astype(jnp.float32)
  for lvl in range(levels, 1, -1):
    b = level_bits[lvl - 1]
    n = d >> lvl
    book = jnp.asarray(polar_codebook(lvl, b), jnp.float32)
    theta = book[_unpack_level(enc[f"a{lvl}"], b, n).astype(jnp.int32)]
    r = jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], -1)
    r = r.reshape(r.shape[:-2] + (-1,))
  b = level_bits[0]
  book = jnp.asarray(polar_codebook(1, b), jnp.float32)
  theta = book[_unpack_level(enc["a1"], b, d // 2).astype(jnp.int32)]
  y = jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], -1)
  return y.reshape(y.shape[:-2] + (d,)) @ rotation


def polarquant_codec(
  head_dim: int, level_bits: tuple[int, ...] = (4, 2, 2, 2), seed: int = 0
) -> Codec:
  """PolarQuant: 4 levels, 4 bits at level 1 and 2 after (3.875 bits per
  coordinate at d = 128 with float16 final radii). The rotation is a codec
  constant drawn from `seed`."""
  levels = len(level_bits)
  if head_dim % (2**levels):
    raise ValueError(
      f"head_dim={head_dim} must be divisible by 2^levels={2**levels}."
    )
  for b in level_bits:
    if b not in range(1, 9):
      raise ValueError(f"level bits must be in 1..8, got {level_bits}.")
  rot = _np_rotation(np.random.default_rng(seed), head_dim)

  def encode(x, shared):
    del shared
    return polar_encode(x, rot, level_bits)

  def decode(enc, shared):
    del shared
    return polar_decode(enc, rot, level_bits)

  def bits_fn(h):  # stored bits: each level padded to whole bytes
    angle_bits = sum(
      b * _padded_count(h >> (lvl + 1), b) for lvl, b in enumerate(level_bits)
    )
    return (angle_bits + 16 * (h >> levels)) / h

  return Codec(
    "polarquant" + "".join(map(str, level_bits)),
    encode,
    decode,
    None,
    bits_fn,
    ("polar", head_dim, level_bits, seed),
  )


@base.by_value
def polarquant(
  level_bits: tuple[int, ...] = (4, 2, 2, 2),
  keys: bool = True,
  values: bool = True,
  seed: int = 0,
) -> base.KVTransform:
  """PolarQuant keys and/or values (see `polarquant_codec`)."""
  level_bits = tuple(level_bits)
  make = lambda which: (
    lambda h: polarquant_codec(h, level_bits, seed * 2 + which)
  )
  return quantize(
    make(0) if keys else None, make(1) if values else None, name="polarquant"
  )
