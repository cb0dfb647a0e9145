"""Codecs: how each kept key/value entry is stored.

A codec is a static `kvjax.cache.Codec` (encode / decode / optional scores /
bits). The `quantize` transform re-encodes a cache's float entries with a
key codec and a value codec at the end of prefill; afterwards every new
entry is encoded as it is written, so the cache stays coded through decode.

Optionally the newest `residual` entries stay in full precision (KIVI's
residual window): the cache then has a code region of slots and a
full-precision tail of `residual` slots; when the tail fills during decode
it is flushed into the code region in one block. Per-channel key
quantization (KIVI) needs whole blocks of tokens to share statistics, so it
is only possible with a residual window: keys are quantized a block of
`residual` tokens at a time, in groups of `group_size` tokens.

Bits are exact: `bits(H)` counts codes plus the stated overhead (scales,
zero points, norms: float16 unless a codec says otherwise), and the packed
payload's physical bytes match it.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kvjax import parallel
from kvjax.cache import Codec, CodedKV, KVCache, TailedKV, is_coded
from kvjax.compress import base
from kvjax.compress.packing import pack_bits, unpack_bits
from pallas_kernels import tiles

Array = jax.Array
INT_BITS = (2, 4, 8)
_SCALE_DTYPE = jnp.float16  # scales / zero points / norms


def _check_group(head_dim: int, group_size: int | None) -> int:
  g = head_dim if group_size is None else group_size
  if not isinstance(g, int) or g < 1 or head_dim % g:
    raise ValueError(
      f"group_size must divide head_dim={head_dim}, got {group_size!r}."
    )
  return g


def _check_bits(bits, allowed=INT_BITS, name="bits"):
  if (
    isinstance(bits, bool)
    or not isinstance(bits, (int, np.integer))
    or (bits not in allowed)
  ):
    raise ValueError(f"{name}={bits!r} is not supported; allowed: {allowed}.")


# ----------------------------------------------------------------------------
# Codecs.


def fp8_codec() -> Codec:
  """float8 e4m3 with a float16 absmax scale per entry (8 + 16/H bits).

  The scale maps each vector's absmax to 448 (e4m3's largest finite value),
  so no entry overflows. The float16 scale is at least float16's smallest
  normal (6.1e-5): a vector with absmax below 448 * 6.1e-5 = 0.027 uses
  fewer of e4m3's levels (down to its subnormals, 2^-9), never a zero
  scale (which would decode to inf/NaN); codes are clipped to +-448, since
  rounding the scale to float16 may shrink it.
  """
  e4m3 = jnp.float8_e4m3fn
  fmax = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
  tiny = float(np.finfo(np.float16).tiny)

  def encode(x, shared):
    del shared
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / fmax
    scale = jnp.maximum(scale.astype(_SCALE_DTYPE), tiny)
    codes = jnp.clip(x / scale.astype(jnp.float32), -fmax, fmax)
    return {"codes": codes.astype(e4m3), "scale": scale}

  def decode(enc, shared):
    del shared
    return enc["codes"].astype(jnp.float32) * enc["scale"].astype(jnp.float32)

  return Codec(
    "fp8_e4m3",
    encode,
    decode,
    None,
    lambda h: 8 + 16 / h,
    ("fp8",),
    tiles.Fp8(),
  )


def int_codec(
  bits: int, group_size: int | None = 32, head_dim: int = 128
) -> Codec:
  """Asymmetric uniform min-max integer codec, per token.

  Each entry's channels are split in groups of `group_size`; each group
  stores float16 min and scale and `bits`-bit codes round((x - min) /
  scale), packed along the channel axis. Bits per element: bits + 32 /
  group_size.

  Args:
    bits: 2, 4 or 8.
    group_size: channels per group (None: the whole head).
    head_dim: H.
  """
  _check_bits(bits)
  g = _check_group(head_dim, group_size)
  levels = 2**bits - 1

  def encode(x, shared):
    del shared
    xs = x.reshape(x.shape[:-1] + (head_dim // g, g))  # [..., H/g, g]
    lo = jnp.min(xs, axis=-1, keepdims=True)
    scale = (jnp.max(xs, axis=-1, keepdims=True) - lo) / levels
    lo16, scale16 = lo.astype(_SCALE_DTYPE), scale.astype(_SCALE_DTYPE)
    s = jnp.where(scale16 > 0, scale16, 1).astype(jnp.float32)
    codes = (
      jnp.clip(jnp.round((xs - lo16.astype(jnp.float32)) / s), 0, levels)
      .astype(jnp.uint8)
      .reshape(x.shape)
    )
    return {
      "codes": pack_bits(codes, bits),
      "zero": lo16[..., 0],
      "scale": scale16[..., 0],
    }

  def decode(enc, shared):
    del shared
    codes = unpack_bits(enc["codes"], bits, head_dim)
    codes = codes.reshape(codes.shape[:-1] + (head_dim // g, g))
    out = codes.astype(jnp.float32) * enc["scale"][..., None].astype(
      jnp.float32
    ) + enc["zero"][..., None].astype(jnp.float32)
    return out.reshape(out.shape[:-2] + (head_dim,))

  return Codec(
    f"int{bits}/g{g}",
    encode,
    decode,
    None,
    lambda h: bits + 32 / g,
    ("int", bits, g, head_dim),
    # Bit planes need whole groups of codes per scale group.
    tiles.IntTokens(bits, g, head_dim)
    if g % tiles.codes_per_group(bits) == 0
    else None,
  )


def quantize_channels(x: Array, bits: int, group_size: int) -> dict:
  """Per-channel min-max quantization of a block of tokens (KIVI keys).

  Args:
    x: [..., R, H] a block of R tokens, R a multiple of group_size.

  Returns:
    {"codes": [..., R, ceil(H*bits/8)] uint8 packed over channels,
     "zero"/"scale": [..., R/group_size, H] float16 per (token group,
     channel)}.
  """
  *lead, R, H = x.shape
  levels = 2**bits - 1
  xs = x.reshape(*lead, R // group_size, group_size, H)
  lo = jnp.min(xs, axis=-2, keepdims=True).astype(_SCALE_DTYPE)
  scale = (
    (jnp.max(xs, axis=-2, keepdims=True) - lo.astype(jnp.float32)) / levels
  ).astype(_SCALE_DTYPE)
  s = jnp.where(scale > 0, scale, 1).astype(jnp.float32)
  codes = jnp.clip(jnp.round((xs - lo.astype(jnp.float32)) / s), 0, levels)
  codes = codes.astype(jnp.uint8).reshape(*lead, R, H)
  return {
    "codes": pack_bits(codes, bits),
    "zero": lo[..., 0, :],
    "scale": scale[..., 0, :],
  }


def dequantize_channels(
  enc: dict, bits: int, group_size: int, head_dim: int
) -> Array:
  """Inverse of `quantize_channels`: [..., R, H] float32."""
  codes = unpack_bits(enc["codes"], bits, head_dim)
  *lead, R, H = codes.shape
  codes = codes.reshape(*lead, R // group_size, group_size, H)
  out = codes.astype(jnp.float32) * enc["scale"][..., None, :].astype(
    jnp.float32
  ) + enc["zero"][..., None, :].astype(jnp.float32)
  return out.reshape(*lead, R, H)


# ----------------------------------------------------------------------------
# The transform.


def _to_coded(x, codec: Codec, shared: dict) -> CodedKV:
  if is_coded(x):
    raise ValueError(
      f"entries are already coded ({x.codec.name}); apply one codec per tensor."
    )
  if not isinstance(x, jax.Array) or x.ndim != 5:
    raise ValueError(
      "a codec applies to float entries [L, B, K, S, H], got "
      f"{getattr(x, 'shape', type(x).__name__)}."
    )
  if codec.encode is None:
    raise ValueError(
      f"codec {codec.name} cannot encode entries one at a "
      "time; use it through kivi(...) (residual window)."
    )
  # One layer at a time, as in attention: x [B, K, S, H], shared without L.
  enc = jax.vmap(codec.encode)(x.astype(jnp.float32), shared)
  return CodedKV(enc, shared, codec)


@base.by_value
def quantize(
  key_codec: Any,
  value_codec: Any,
  name: str | None = None,
  shared_init: Any = None,
) -> base.KVTransform:
  """Stores keys and values with entry-wise codecs from prefill on.

  At prefill the float entries are encoded (the float arrays are dropped:
  the cache is physically smaller); every entry written afterwards is
  encoded as it is written. A codec keeps the slots it is given, unless
  they lack room for `ctx.reserve` (compressing a full cache): it then
  grows the cache to the live bound plus the reserve and decode steps.

  Args:
    key_codec: (head_dim) -> Codec for keys (None: keep keys in full
      precision). A function of H so that one transform fits any model.
    value_codec: (head_dim) -> Codec for values (None: full precision).
    name: label.
    shared_init: optional (cache, which) -> dict of shared leaves (leading
      L) for codecs that need them (rotations, projections); `which` is
      "k" or "v".
  """
  if key_codec is None and value_codec is None:
    raise ValueError("quantize needs a key_codec or a value_codec.")

  def apply(cache, state, ctx):
    if ctx.phase != "prefill":  # new entries are encoded as they are written
      return cache, state
    from kvjax.compress import rewrite  # pylint: disable=g-import-not-at-top

    pruned = rewrite.is_channel_pruned(cache.k)  # think's keys
    if (is_coded(cache.k) and not pruned) or is_coded(cache.v):
      raise ValueError(
        "the cache is already coded; apply one codec per "
        "tensor (evict first, then quantize once)."
      )
    if pruned and key_codec is not None and shared_init is not None:
      raise ValueError(
        f"{name or 'quantize'}: keys pruned by think take a per-entry codec "
        "without shared leaves (uniform, fp8); this one builds shared "
        "leaves for full head_dim keys."
      )
    live = base.live_bound(cache, ctx)
    if cache.capacity - live < ctx.reserve:  # grow to honour the reserve
      cache, _ = base.compact(
        cache, cache.valid, live + ctx.reserve + ctx.decode_reserve
      )
    k, v = cache.k, cache.v
    head_dim = cache.v.shape[-1]
    if key_codec is not None and pruned:
      k = rewrite.recode_channels(k, key_codec)
    elif key_codec is not None:
      shared = shared_init(cache, "k") if shared_init else {}
      k = _to_coded(k, key_codec(head_dim), shared)
    if value_codec is not None:
      shared = shared_init(cache, "v") if shared_init else {}
      v = _to_coded(v, value_codec(head_dim), shared)
    return cache._replace(k=k, v=v), state

  def bits(head_dim):
    """(key bits, value bits) per element; None = full precision."""
    return tuple(
      c(head_dim).bits(head_dim) if c else None
      for c in (key_codec, value_codec)
    )

  label = name or "quantize"
  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: live,
    bits=bits,
    name=label,
  )


@base.by_value
def uniform(
  bits: int,
  group_size: int | None = 32,
  keys: bool = True,
  values: bool = True,
  axis: str = "token",
  residual: int = 0,
) -> base.KVTransform:
  """Asymmetric min-max integer quantization of keys and/or values.

  Args:
    bits: 2, 4 or 8.
    group_size: per token: channels per (min, scale) group (must divide
      head_dim); per channel: tokens per group.
    keys / values: which tensors to quantize (per token only; the residual
      form quantizes both).
    axis: "token" (each entry on its own) or "channel" (statistics over
      groups of tokens: needs a full-precision residual window, as KIVI).
    residual: R > 0 keeps the newest R entries in full precision and
      quantizes blocks of R (`windowed_quantize`).
  """
  _check_bits(bits)
  if axis not in AXES:
    raise ValueError(f"axis={axis!r}; allowed: {AXES}.")
  if axis == "channel" or residual:
    if not residual:
      raise ValueError(
        "per-channel quantization needs residual > 0 (a "
        "block of tokens shares each channel's statistics)."
      )
    if not (keys and values):
      raise ValueError("the residual form quantizes keys and values both.")
    return windowed_quantize(bits, group_size or 32, residual, axis, axis)
  make = lambda h: int_codec(bits, group_size, h)
  return quantize(
    make if keys else None,
    make if values else None,
    name=f"int{bits}"
    if group_size == 32
    else f"int{bits}_g{group_size or 'all'}",
  )


@base.by_value
def fp8(keys: bool = True, values: bool = True) -> base.KVTransform:
  """float8 e4m3 keys and/or values with a per-entry float16 scale."""
  make = lambda h: fp8_codec()
  return quantize(make if keys else None, make if values else None, name="fp8")


# ----------------------------------------------------------------------------
# KIVI: per-channel keys, per-token values, full-precision residual window.


def channel_codec(bits: int, group_size: int, head_dim: int) -> Codec:
  """Per-channel codec (KIVI keys): statistics shared by `group_size`
  consecutive slots, so entries cannot be encoded one at a time (`encode`
  is None); `kivi` writes them a block at a time. Bits per element:
  bits + 32 / group_size."""
  _check_bits(bits)

  def decode(enc, shared):
    del shared
    return dequantize_channels(enc, bits, group_size, head_dim)

  return Codec(
    f"int{bits}/channel/g{group_size}",
    None,
    decode,
    None,
    lambda h: bits + 32 / group_size,
    ("channel", bits, group_size, head_dim),
    tiles.IntChannels(bits, group_size, head_dim),
  )


def _rows_window(x: Array, start: Array, width: int) -> Array:
  """x [L, B, K, S, ...] -> [L, B, K, width, ...] from slot start[b] on
  (indices past S are clamped; callers mask them)."""
  S = x.shape[3]
  idx = jnp.minimum(start[:, None] + jnp.arange(width), S - 1)  # [B, width]
  idx = jnp.broadcast_to(idx[None, :, None, :], x.shape[:3] + (width,))
  return jnp.take_along_axis(
    x, idx.reshape(idx.shape + (1,) * (x.ndim - 4)), axis=3
  )


def _scatter_rows(
  leaf: Array, start: Array, block: Array, active: Array, per: int = 1
) -> Array:
  """Writes block [L, B, K, W, ...] into leaf [L, B, K, S, ...] at slots
  start[b] // per + arange(W) for rows where active[b]; others untouched."""
  L, B, K, W = block.shape[:4]
  S = leaf.shape[3]
  idx = jnp.where(active[:, None], start[:, None] // per + jnp.arange(W), S)
  rows = jnp.arange(B)[:, None]
  upd = jnp.moveaxis(jnp.moveaxis(block, 1, 0), 3, 1)  # [B, W, L, K, ...]
  return leaf.at[:, rows, :, idx].set(upd.astype(leaf.dtype), mode="drop")


class KIVIState(NamedTuple):
  """State of `kivi`.

  Attributes:
    code_end: [B] int32 first free slot of each row's code region (the
      next block flushed from the window lands there).
  """

  code_end: jax.Array


@base.by_value
def kivi(
  bits: int = 2, group_size: int = 32, residual: int = 128
) -> base.KVTransform:
  """KIVI (arXiv 2402.02750): asymmetric min-max quantization of keys per
  channel (statistics over groups of `group_size` tokens) and values per
  token (groups of `group_size` channels, or the whole head if smaller),
  with the newest entries in a full-precision residual window.

  Layout: [code region | full-precision tail of `residual` + reserve
  slots]. At prefill, each row's first floor(n / residual) * residual
  entries are quantized and the rest go to the tail; new entries go to the
  tail, and in the decode phase a tail holding `residual` or more is
  flushed, its oldest `residual` entries quantized as one block into the
  code region (as in KIVI, keys a block of `residual` tokens at a time).
  `forward` alone never flushes, so the tail has room for the reserve on
  top of a window (the reserve contract); the code region has room for
  every block the reserve and the decode steps can fill. Apply after any
  eviction (entries are assumed contiguous from slot 0, as compaction
  leaves them); a decode-time eviction policy cannot precede it.

  Refused (`Degenerate`) when nothing could ever be quantized: the live
  entries plus the decode steps run through the transform stay below
  `residual` (entries `forward` writes into the reserve are quantized only
  by a later decode step), so the cache would only grow. A prompt shorter
  than `residual` with decode steps to come warns that nothing is
  quantized at prefill.

  Args:
    bits: 2, 4 or 8.
    group_size: G, tokens per key statistic and channels per value
      statistic (KIVI: 32).
    residual: R, a multiple of G (KIVI: 128).

  Raises:
    ValueError: unsupported bits, or R not a positive multiple of G.
  """
  return windowed_quantize(
    bits, group_size, residual, "channel", "token", name=f"kivi{bits}"
  )


AXES = ("token", "channel")


@base.by_value
def windowed_quantize(
  bits: int,
  group_size: int,
  residual: int,
  key_axis: str,
  value_axis: str,
  name: str | None = None,
) -> base.KVTransform:
  """Integer quantization with a full-precision residual window (the
  machinery of `kivi`), each tensor per token or per channel.

  Args:
    bits: 2, 4 or 8.
    group_size: G: tokens per statistic ("channel") or channels per
      statistic ("token", capped at the head dim).
    residual: R, a positive multiple of G.
    key_axis / value_axis: "token" or "channel".
  """
  _check_bits(bits)
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be an int >= 1, got {group_size!r}.")
  if (
    not isinstance(residual, int)
    or residual < group_size
    or (residual % group_size)
  ):
    raise ValueError(
      f"residual must be a positive multiple of group_size="
      f"{group_size}, got {residual!r}."
    )
  for arg, axis in (("key_axis", key_axis), ("value_axis", value_axis)):
    if axis not in AXES:
      raise ValueError(f"{arg}={axis!r}; allowed: {AXES}.")
  R, G = residual, group_size
  label = name or f"int{bits}/{key_axis[0]}{value_axis[0]}/r{R}"

  def codec(axis, head_dim):
    if axis == "channel":
      return channel_codec(bits, G, head_dim)
    return int_codec(bits, min(G, head_dim), head_dim)

  def encode(axis, x):
    if axis == "channel":
      return quantize_channels(x.astype(jnp.float32), bits, G)
    return codec(axis, x.shape[-1]).encode(x.astype(jnp.float32), {})

  def per(axis, leaf):  # slots per row of a leaf: G for channel statistics
    return G if axis == "channel" and leaf != "codes" else 1

  def prefill(cache, ctx):
    k, v = cache.k, cache.v
    if is_coded(k) or is_coded(v) or k.ndim != 5:
      raise ValueError(
        "windowed quantization (kivi) applies to float "
        "entries [L, B, K, S, H]; it cannot follow another "
        "codec."
      )
    H = k.shape[-1]
    live = base.live_bound(cache, ctx)
    total = live + ctx.reserve + ctx.decode_reserve
    # Entries written by `forward` (the reserve) are quantized only by a
    # later decode step through this transform: what this call can ever
    # quantize is the live entries and its own decode steps.
    if live + ctx.decode_reserve < R:
      raise base.Degenerate(
        f"{label}: {live} live entries + {ctx.decode_reserve} decode "
        f"steps never fill one residual block of {R}, so nothing would be "
        "quantized and the cache would only grow; use a smaller residual, "
        "a longer context, or decode through the transform "
        "(prefill(decode_steps=...), generate)."
      )
    if live < R:
      warnings.warn(
        f"{label}: the {live}-entry prompt is shorter than the "
        f"residual window {R}; nothing is quantized until "
        "decoding fills a block.",
        stacklevel=2,
      )
    sc = (total // R) * R  # code slots: every block that can be flushed
    tail = R + ctx.reserve  # a window + what forward may write unflushed
    # Under a mesh that splits the slots each region splits evenly (whole
    # statistic groups per shard): empty slots round both up.
    shards = parallel.seq_shards()
    sc = parallel.mesh.round_up(sc, shards * G)
    tail = parallel.mesh.round_up(tail, shards)
    end = cache.end  # [B] entries per row, contiguous from slot 0
    q = (end // R) * R  # [B] quantized per row
    pad = max(0, sc - cache.capacity)
    grow = lambda x: jnp.pad(
      x, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4)
    )[:, :, :, :sc]
    code_valid = grow(cache.valid) & (jnp.arange(sc) < q[None, :, None, None])
    code_pos = jnp.where(code_valid, grow(cache.pos), -1)
    tail_live = (jnp.arange(tail) < (end - q)[:, None])[None, :, None, :]
    tail_valid = _rows_window(cache.valid, q, tail) & tail_live
    tail_pos = jnp.where(tail_valid, _rows_window(cache.pos, q, tail), -1)

    def coded(x, axis):
      t = jnp.where(tail_valid[..., None], _rows_window(x, q, tail), 0)
      return TailedKV(
        CodedKV(encode(axis, grow(x)), {}, codec(axis, H)), t.astype(x.dtype)
      )

    # More entries than the live bound (a `slots` that under-counted)
    # would fall between the regions: flagged past the capacity instead.
    new_end = jnp.where(end > live, sc + tail + 1, sc + end - q)
    cache = cache._replace(
      k=coded(k, key_axis),
      v=coded(v, value_axis),
      pos=jnp.concatenate([code_pos, tail_pos], -1),
      valid=jnp.concatenate([code_valid, tail_valid], -1),
      end=new_end.astype(jnp.int32),
    )
    return cache, KIVIState(q.astype(jnp.int32))

  def flush(cache, state):
    """Quantizes the oldest R tail entries of rows whose tail holds R or
    more into the code region, and shifts the rest of their tail down."""
    qend = state.code_end
    sc = cache.k.code_slots
    # A full block moves only where the code region has room for it; else
    # the window keeps filling, and a write past it is an overflow that
    # `forward` reports (nothing is flushed into the void).
    full = (cache.end >= sc + R) & (qend + R <= sc)  # [B]
    shift = lambda x: jnp.where(
      full.reshape((1, -1) + (1,) * (x.ndim - 2)),
      jnp.concatenate([x[:, :, :, R:], jnp.zeros_like(x[:, :, :, :R])], axis=3),
      x,
    )

    def flushed(x, axis):
      enc = encode(axis, x.tail[:, :, :, :R])
      slots = {
        n: _scatter_rows(x.code.slots[n], qend, enc[n], full, per=per(axis, n))
        for n in x.code.slots
      }
      return TailedKV(CodedKV(slots, {}, x.code.codec), shift(x.tail))

    tail_pos, tail_valid = cache.pos[..., sc:], cache.valid[..., sc:]
    pos = _scatter_rows(cache.pos[..., :sc], qend, tail_pos[..., :R], full)
    valid = _scatter_rows(
      cache.valid[..., :sc], qend, tail_valid[..., :R], full
    )
    tail_pos = jnp.where(
      full[None, :, None, None],
      jnp.concatenate(
        [tail_pos[..., R:], jnp.full_like(tail_pos[..., :R], -1)], -1
      ),
      tail_pos,
    )
    end = jnp.where(full, cache.end - R, cache.end)
    cache = cache._replace(
      k=flushed(cache.k, key_axis),
      v=flushed(cache.v, value_axis),
      pos=jnp.concatenate([pos, tail_pos], -1),
      valid=jnp.concatenate([valid, shift(tail_valid)], -1),
      end=end.astype(jnp.int32),
    )
    return cache, KIVIState(jnp.where(full, qend + R, qend).astype(jnp.int32))

  def apply(cache, state, ctx):
    if ctx.phase == "prefill":
      return prefill(cache, ctx)
    return flush(cache, state)

  return base.KVTransform(
    init=lambda cache: KIVIState(jnp.zeros(cache.pos.shape[1:2], jnp.int32)),
    apply=apply,
    keeps=lambda live: live,
    every=1,
    bits=lambda h: (codec(key_axis, h).bits(h), codec(value_axis, h).bits(h)),
    name=label,
  )


# ----------------------------------------------------------------------------
# Low-rank projection.


def lowrank_codec(rank: int, head_dim: int) -> Codec:
  """Entries as `rank` float16 coefficients on a per-(row, kv head) basis
  `shared["basis"]` [B, K, H, rank] (orthonormal columns). q.k is computed
  in the subspace: the query is projected once. Bits per element:
  16 rank / H, plus the basis (H x rank floats per row and head, stated
  separately: it does not grow with the cache)."""
  if not isinstance(rank, int) or not 0 < rank <= head_dim:
    raise ValueError(f"rank must be an int in [1, {head_dim}], got {rank!r}.")

  def encode(x, shared):
    c = jnp.einsum("bksh,bkhr->bksr", x, shared["basis"])
    return {"coeffs": c.astype(jnp.float16)}

  def decode(enc, shared):
    return jnp.einsum(
      "bksr,bkhr->bksh", enc["coeffs"].astype(jnp.float32), shared["basis"]
    )

  def scores(q, enc, shared):
    qp = jnp.einsum("bkmh,bkhr->bkmr", q, shared["basis"])
    return jnp.einsum("bkmr,bksr->bkms", qp, enc["coeffs"].astype(jnp.float32))

  return Codec(
    f"lowrank{rank}",
    encode,
    decode,
    scores,
    lambda h: 16 * rank / h,
    ("lowrank", rank, head_dim),
    tiles.LowRank(rank),
    shared_axes=(("basis", "bk"),),
  )


def _svd_basis(rank: int):
  """shared_init: top-`rank` right singular vectors of each (layer, row,
  head)'s live entries at prefill."""

  def init(cache, which):
    x = (cache.k if which == "k" else cache.v).astype(jnp.float32)
    x = jnp.where(cache.valid[..., None], x, 0.0)  # [L, B, K, S, H]
    vt = _right_singular_vectors(x)  # [L, B, K, H, H]
    return {"basis": jnp.swapaxes(vt[..., :rank, :], -1, -2)}

  return init


def _right_singular_vectors(x: Array) -> Array:
  """V^T of each matrix of a batch [..., S, H] (reduced SVD)."""
  from kvjax import parallel

  if parallel.context_mesh() is not None and jax.default_backend() == "cpu":
    # jaxlib's CPU LAPACK kernels split a batch over the intra-op thread
    # pool, which the simulated devices' executors occupy too: with every
    # device inside one batched SVD at once, each waits for pool threads
    # the others hold, forever (8 CPU devices, jaxlib 0.10.2). One matrix
    # per call runs inline; the results are the same matrices.
    flat = x.reshape(-1, *x.shape[-2:])
    vt = jax.lax.map(lambda m: jnp.linalg.svd(m, full_matrices=False)[2], flat)
    return vt.reshape(*x.shape[:-2], *vt.shape[-2:])
  return jnp.linalg.svd(x, full_matrices=False)[2]


@base.by_value
def lowrank(
  rank: int, keys: bool = True, values: bool = True
) -> base.KVTransform:
  """Projects keys and/or values onto their top-`rank` principal
  directions at prefill (per layer, row and kv head; SVD of the live
  entries, not centered). Post-RoPE keys are less low-rank than pre-RoPE
  ones; this codec stores what the cache holds (post-RoPE)."""
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be an int >= 1, got {rank!r}.")

  def shared_init(cache, which):
    h = cache.k.shape[-1]
    if rank > h:
      raise ValueError(f"rank={rank} exceeds head_dim={h}.")
    return _svd_basis(rank)(cache, which)

  make = lambda h: lowrank_codec(rank, h)
  return quantize(
    make if keys else None,
    make if values else None,
    name=f"lowrank{rank}",
    shared_init=shared_init,
  )
