"""Coded payloads of every kvjax codec for the kernel tests: (name, key
codec, value codec, key leaves, value leaves, shared leaves, decoded keys,
decoded values), built with kvjax's own encoders so the kernels are checked
against kvjax's decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compress import codecs, rotated
from pallas_kernels import tiles


def _plain(x):
  return tiles.Plain(), {"x": x}, {}, x.astype(jnp.float32)


def _codec(codec, x, shared=None):
  shared = shared or {}
  enc = codec.encode(x, shared)
  tile = codec.tile or tiles.Decoded(codec.params, codec.decode)
  return tile, enc, shared, codec.decode(enc, shared)


def _decoded(codec, x):
  enc = codec.encode(x, {})
  return (
    tiles.Decoded(codec.params, codec.decode),
    enc,
    {},
    codec.decode(enc, {}),
  )


def _kivi(x, bits, group):
  enc = codecs.quantize_channels(x, bits, group)
  H = x.shape[-1]
  dec = codecs.dequantize_channels(enc, bits, group, H)
  return tiles.IntChannels(bits, group, H), enc, {}, dec


def _lowrank(x, rank, seed):
  B, K, S, H = x.shape
  g = np.random.default_rng(seed).standard_normal((B, K, H, rank))
  basis = jnp.asarray(np.linalg.qr(g)[0], jnp.float32)
  return _codec(codecs.lowrank_codec(rank, H), x, {"basis": basis})


def _outlier_perm(K, H, n_out, seed):
  rng = np.random.default_rng(seed)
  return {"perm": jnp.asarray(np.stack([rng.permutation(H) for _ in range(K)]))}


# name -> (key maker, value maker); each maker (x [B, K, S, H]) ->
# (tile codec, leaves, shared, decoded [B, K, S, H]).
CASES = {
  "f32": (_plain, _plain),
  "bf16": (
    lambda x: _plain(x.astype(jnp.bfloat16)),
    lambda x: _plain(x.astype(jnp.bfloat16)),
  ),
  "f16": (
    lambda x: _plain(x.astype(jnp.float16)),
    lambda x: _plain(x.astype(jnp.float16)),
  ),
  "int8": (
    lambda x: _codec(codecs.int_codec(8, None, x.shape[-1]), x),
    lambda x: _codec(codecs.int_codec(8, None, x.shape[-1]), x),
  ),
  "int4": (
    lambda x: _codec(codecs.int_codec(4, None, x.shape[-1]), x),
    lambda x: _codec(codecs.int_codec(4, None, x.shape[-1]), x),
  ),
  "int4_g16": (
    lambda x: _codec(codecs.int_codec(4, 16, x.shape[-1]), x),
    lambda x: _codec(codecs.int_codec(4, 16, x.shape[-1]), x),
  ),
  "int2": (
    lambda x: _codec(codecs.int_codec(2, None, x.shape[-1]), x),
    lambda x: _codec(codecs.int_codec(2, 16, x.shape[-1]), x),
  ),
  "fp8": (
    lambda x: _codec(codecs.fp8_codec(), x),
    lambda x: _codec(codecs.fp8_codec(), x),
  ),
  "kivi2": (
    lambda x: _kivi(x, 2, 32),
    lambda x: _codec(codecs.int_codec(2, 32, x.shape[-1]), x),
  ),
  "kivi4": (
    lambda x: _kivi(x, 4, 32),
    lambda x: _codec(codecs.int_codec(4, 32, x.shape[-1]), x),
  ),
  "turbo3": (
    lambda x: _codec(rotated.turboquant_codec(3, x.shape[-1]), x),
    lambda x: _codec(rotated.turboquant_codec(3, x.shape[-1], seed=1), x),
  ),
  "turbo2_outliers": (
    lambda x: _codec(
      rotated.turboquant_codec(2, x.shape[-1], "mse", 8, 4),
      x,
      _outlier_perm(x.shape[1], x.shape[-1], 8, 0),
    ),
    lambda x: _codec(
      rotated.turboquant_codec(2, x.shape[-1], "mse", 8, 4, seed=1),
      x,
      _outlier_perm(x.shape[1], x.shape[-1], 8, 1),
    ),
  ),
  "turbo_prod3": (
    lambda x: _codec(rotated.turboquant_codec(3, x.shape[-1], "prod"), x),
    lambda x: _codec(rotated.turboquant_codec(3, x.shape[-1], seed=1), x),
  ),
  "qjl": (
    lambda x: _codec(rotated.qjl_codec(64, x.shape[-1]), x),
    lambda x: _codec(codecs.int_codec(2, 32, x.shape[-1]), x),
  ),
  "lowrank": (lambda x: _lowrank(x, 8, 0), lambda x: _lowrank(x, 8, 1)),
  # The generic plug-in: a tile decoded by the codec's own jnp decode.
  "decoded_int4": (
    lambda x: _decoded(codecs.int_codec(4, None, x.shape[-1]), x),
    lambda x: _decoded(codecs.int_codec(4, 16, x.shape[-1]), x),
  ),
}


def stack_layers(per_layer: list[dict]) -> dict:
  """Per-layer leaf dicts [B, K, S', X] -> L-stacked [L, B, K, S', X]."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


def payload(name: str, k: jax.Array, v: jax.Array, layer: int):
  """Coded payloads of k, v [L, B, K, S, H] for case `name`: (k_codec,
  v_codec, k leaves, v leaves, k shared (of `layer`), v shared, decoded k
  and v of `layer` [B, K, S, H])."""
  km, vm = CASES[name]
  ks = [km(k[i]) for i in range(k.shape[0])]
  vs = [vm(v[i]) for i in range(v.shape[0])]
  return (
    ks[0][0],
    vs[0][0],
    stack_layers([c[1] for c in ks]),
    stack_layers([c[1] for c in vs]),
    ks[layer][2],
    vs[layer][2],
    ks[layer][3],
    vs[layer][3],
  )
