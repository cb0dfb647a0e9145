"""Decode attention from compressed bytes: the Pallas decode kernel per
codec, at long context and batch 1-64, on whatever accelerator is present.

  python -m benchmarks.kernel_bench                       # the accelerator
  python -m benchmarks.kernel_bench --contexts=8192,32768 --batches=1,8
  python -m benchmarks.kernel_bench --quick               # CPU: checks only

One decode step of one layer: B rows, N = 32 query heads on K = 8 kv heads
of head_dim 128 (Llama-3-8B's attention), every slot live, one query per
row. The cache holds random keys and values (seed 0) encoded by kvjax's own
codecs; the kernel reads the stored payload and nothing else.

Columns:
  bytes/step: the physical bytes of the layer's stored payload (codes,
    scales, norms of K and V, and the int32 positions and bool liveness the
    kernel's mask pass reads): what a step must move from HBM at least.
  ms: median of --repeats timed calls after a warm-up (compile), each
    blocked on.
  GB/s: bytes/step / time; % peak: of the device's HBM bandwidth (table
    below, or --peak_gbps).
  tok/s: B / time: decode tokens per second of this one layer's attention.
  xla ms: kvjax's blockwise XLA engine on the same payload (--compare_xla),
    and the kernel's speed-up over it.

Without an accelerator the kernels only run in interpret mode, which says
nothing about speed: the benchmark then measures nothing unless --quick
(tiny shapes, to check that the script runs).
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks.timing import median_time
from kvjax import attention as attention_lib
from kvjax.cache import CodedKV
from kvjax.compress import codecs, rotated
from pallas_kernels import Unsupported, tiles
from pallas_kernels.decode_attention import decode_attention

_CONTEXTS = flags.DEFINE_list(
  "contexts", ["8192", "32768", "131072"], "Cache lengths S (all live)."
)
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes B.")
_CODECS = flags.DEFINE_list(
  "codecs",
  ["bf16", "int8", "int4", "int2", "fp8", "kivi2", "turbo3", "turbo_prod3"],
  "Codecs (names of CODECS).",
)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats (median).")
_SPLITS = flags.DEFINE_integer("num_splits", 8, "Split-K programs per head.")
_BLOCK = flags.DEFINE_integer("block_k", 512, "Slots per key block.")
_MAX_GB = flags.DEFINE_float(
  "max_gb", 40.0, "Skip a row whose float keys+values exceed this (GB)."
)
_PEAK = flags.DEFINE_float(
  "peak_gbps", 0.0, "HBM bandwidth of the device (0: from the table)."
)
_XLA = flags.DEFINE_bool("compare_xla", True, "Also time the XLA engine.")
_QUICK = flags.DEFINE_bool(
  "quick", False, "Tiny shapes in interpret mode on CPU (checks the script)."
)
_OUT = flags.DEFINE_string(
  "out", "", "Write kernel_bench.{md,jsonl} to this directory."
)

N, K, H = 32, 8, 128
# HBM bandwidth by device kind (GB/s), from the vendors' data sheets.
PEAK_GBPS = {
  "NVIDIA H200": 4800,
  "NVIDIA H100 80GB HBM3": 3350,
  "NVIDIA A100-SXM4-80GB": 2039,
  "TPU v4": 1200,
  "TPU v5 lite": 819,
  "TPU v5": 2765,
  "TPU v6 lite": 1640,
}


def _int(bits, group=None):
  return lambda x: _coded(codecs.int_codec(bits, group, H), x)


def _coded(codec, x, shared=None):
  return CodedKV(codec.encode(x, shared or {}), shared or {}, codec)


def _kivi(bits, group=32):
  def make(x):
    enc = codecs.quantize_channels(x, bits, group)
    return CodedKV(enc, {}, codecs.channel_codec(bits, group, H))

  return make


# name -> (keys maker, values maker); makers take x [B, K, S, H] float32.
CODECS = {
  "bf16": (lambda x: x.astype(jnp.bfloat16),) * 2,
  "int8": (_int(8), _int(8)),
  "int4": (_int(4), _int(4)),
  "int2": (_int(2), _int(2, 32)),
  "fp8": (lambda x: _coded(codecs.fp8_codec(), x),) * 2,
  "kivi2": (_kivi(2), _int(2, 32)),
  "kivi4": (_kivi(4), _int(4, 32)),
  "turbo3": (
    lambda x: _coded(rotated.turboquant_codec(3, H), x),
    lambda x: _coded(rotated.turboquant_codec(3, H, seed=1), x),
  ),
  "turbo_prod3": (
    lambda x: _coded(rotated.turboquant_codec(3, H, "prod"), x),
    lambda x: _coded(rotated.turboquant_codec(3, H, seed=1), x),
  ),
}


def _payload(name, B, S, seed=0):
  km, vm = CODECS[name]
  kx, vx = jax.random.split(jax.random.key(seed))
  make = lambda key, m: jax.jit(
    lambda key: m(jax.random.normal(key, (B, K, S, H), jnp.float32))
  )(key)
  return make(kx, km), make(vx, vm)


def _leaves(x):
  """(per-slot leaves [1, B, K, S', X], shared of the layer, tile codec)."""
  if isinstance(x, CodedKV):
    return (
      jax.tree.map(lambda a: a[None], x.slots),
      x.shared,
      x.codec.tile,
    )
  return {"x": x[None]}, {}, tiles.Plain()


def _nbytes(tree) -> int:
  return sum(a.nbytes for a in jax.tree.leaves(tree))


def _row(name, B, S, target, interpret, peak):
  k, v = _payload(name, B, S)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (1, B, K, S))
  valid = jnp.ones((1, B, K, S), bool)
  q = jax.random.normal(jax.random.key(1), (B, 1, N, H), jnp.bfloat16)
  q_pos = jnp.full((B, 1), S - 1, jnp.int32)
  (kl, ksh, kt), (vl, vsh, vt) = _leaves(k), _leaves(v)
  step = functools.partial(
    decode_attention,
    k_codec=kt,
    v_codec=vt,
    block_k=min(_BLOCK.value, S),
    num_splits=_SPLITS.value,
    target=target,
    interpret=interpret,
  )
  fn = lambda: jax.block_until_ready(
    step(q, kl, vl, q_pos, pos, valid, 0, ksh, vsh)
  )
  seconds, _ = median_time(fn, _REPEATS.value)
  moved = _nbytes((kl, vl)) + pos.nbytes + valid.nbytes
  row = dict(
    codec=name,
    B=B,
    S=S,
    bytes_per_step=moved,
    ms=seconds * 1e3,
    gbps=moved / seconds / 1e9,
    peak_share=(moved / seconds / 1e9 / peak) if peak else None,
    tokens_per_s=B / seconds,
  )
  if _XLA.value:
    xla = jax.jit(
      lambda q, k, v: (
        attention_lib.attention(
          q,
          k,
          v,
          q_pos=q_pos,
          k_pos=pos[0],
          k_valid=valid[0],
          backend="xla",
        ).out
      )
    )
    xs, _ = median_time(
      lambda: jax.block_until_ready(xla(q, k, v)), _REPEATS.value
    )
    row["xla_ms"] = xs * 1e3
  return row


def _table(rows, device, peak) -> str:
  head = (
    f"Decode attention, one layer (N={N}, K={K}, H={H}), on {device}"
    + (f" (peak {peak:.0f} GB/s)" if peak else "")
    + "\n\n| codec | B | S | MB/step | ms | GB/s | % peak | tok/s | xla ms "
    "| kernel speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = []
  for r in rows:
    if "skipped" in r:
      lines.append(
        f"| {r['codec']} | {r['B']} | {r['S']} | - | - | - | - | - | - | "
        f"{r['skipped']} |"
      )
      continue
    share = f"{100 * r['peak_share']:.0f}%" if r["peak_share"] else "-"
    xla = r.get("xla_ms")
    lines.append(
      f"| {r['codec']} | {r['B']} | {r['S']} | "
      f"{r['bytes_per_step'] / 1e6:.1f} | {r['ms']:.3f} | {r['gbps']:.0f} | "
      f"{share} | {r['tokens_per_s']:.0f} | "
      + (f"{xla:.3f} | {xla / r['ms']:.2f}x |" if xla else "- | - |")
    )
  return head + "\n".join(lines) + "\n"


def main(argv):
  del argv
  platform = jax.default_backend()
  device = jax.devices()[0].device_kind
  target = {"tpu": "tpu", "gpu": "gpu"}.get(platform)
  contexts = [int(c) for c in _CONTEXTS.value]
  batches = [int(b) for b in _BATCHES.value]
  names = _CODECS.value
  unknown = sorted(set(names) - set(CODECS))
  if unknown:
    raise app.UsageError(f"unknown codecs {unknown}; allowed: {list(CODECS)}")
  interpret = False
  if target is None:
    if not _QUICK.value:
      print(
        f"No accelerator ({platform}: {device}): the kernels would run in "
        "interpret mode, which measures nothing. Nothing was measured; run "
        "on a GPU or TPU, or pass --quick to check the script."
      )
      return
    target, interpret = "tpu", True
    contexts, batches, names = [256], [2], names[:3]
  peak = _PEAK.value or PEAK_GBPS.get(device, 0.0)
  rows = []
  for name in names:
    for S in contexts:
      for B in batches:
        gb = 2 * B * K * S * H * 4 / 1e9
        if gb > _MAX_GB.value:
          rows.append(
            dict(codec=name, B=B, S=S, skipped=f"> {_MAX_GB.value} GB")
          )
          continue
        try:
          rows.append(_row(name, B, S, target, interpret, peak))
        except Unsupported as e:
          rows.append(dict(codec=name, B=B, S=S, skipped=f"unsupported: {e}"))
        print(json.dumps(rows[-1]), flush=True)
  table = _table(
    rows, device + (" (interpret mode)" if interpret else ""), peak
  )
  print(table)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "kernel_bench.md"), "w") as f:
      f.write(f"{time.strftime('%Y-%m-%d %H:%M')}\n\n{table}")
    with open(os.path.join(_OUT.value, "kernel_bench.jsonl"), "w") as f:
      for r in rows:
        f.write(json.dumps(dict(r, device=device)) + "\n")


if __name__ == "__main__":
  app.run(main)
