"""Decode cost and memory of a fixed-size state against a KV cache.

  python -m benchmarks.memory_decode
  python -m benchmarks.memory_decode --contexts=512,4096 --out=/tmp/x.md

One row per context length: the time of one decoded token (median of
`--repeats` jitted calls after a warm-up, batch 1) and the bytes each model
holds for a row, for kvjax-tiny reading its KV cache, and for
`kvjax.echo` models with an Echo state and a linear-attention state of the
same bytes (2 layers, d 64, 2 heads, r 16, value width 16: the
`experiments/echo_mqar.py` models, random weights; speed does not depend
on them). kvjax-tiny has 3 layers: its time is also given per layer.
"""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
from absl import app, flags

import kvjax
from benchmarks.timing import median_time
from kvjax import echo, pretrained

flags.DEFINE_string("contexts", "512,1024,2048,4096", "Context lengths.")
flags.DEFINE_integer("repeats", 20, "Timed calls per cell.")
flags.DEFINE_string("out", "", "Also write the table here (markdown).")
FLAGS = flags.FLAGS


def _echo_models():
  base = dict(
    vocab_size=512,
    d_model=64,
    num_layers=2,
    num_heads=2,
    rank=16,
    value_dim=16,
    mlp_dim=128,
    power_iters=5,
    chunk_size=32,
  )
  cfg = echo.EchoConfig(memory="echo", **base)
  lin = echo.EchoConfig(
    memory="linear", **dict(base, rank=echo.matched_linear_rank(cfg))
  )
  return {"Echo r=16, K=2": cfg, "linear, same bytes": lin}


def _echo_cell(cfg, context_len, key):
  params = echo.init_params(cfg, key)
  tokens = jax.random.randint(key, (1, context_len), 1, cfg.vocab_size)
  _, state = echo.forward(params, tokens, echo.init_state(cfg, 1), config=cfg)
  step = jax.jit(lambda p, t, s: echo.decode(p, t, s, config=cfg))
  token = jnp.array([3], jnp.int32)
  seconds, _ = median_time(
    lambda: jax.block_until_ready(step(params, token, state)), FLAGS.repeats
  )
  return seconds, echo.state_bytes(state)


def _kv_cell(config, params, context_len, key):
  tokens = jax.random.randint(key, (1, context_len), 1, config.vocab_size)
  cache = kvjax.prefill(
    params, tokens, config=config, capacity=context_len + 1
  ).cache
  step = jax.jit(lambda p, t, c: kvjax.forward(p, t, c, config=config).logits)
  token = jnp.array([[3]], jnp.int32)
  seconds, _ = median_time(
    lambda: jax.block_until_ready(step(params, token, cache)), FLAGS.repeats
  )
  return seconds, kvjax.kv_bytes(cache)


def main(argv):
  del argv
  contexts = [int(c) for c in FLAGS.contexts.split(",") if c]
  config, params = pretrained.load("kvjax-tiny")
  models = _echo_models()
  key = jax.random.key(0)
  load = [round(x, 2) for x in os.getloadavg()]
  lines = [
    "## Decode: one token, batch 1 (ms) and memory per row (bytes)",
    "",
    f"{platform.platform()}, {jax.device_count()} CPU device(s), jax "
    f"{jax.__version__}; load average before {load}; median of "
    f"{FLAGS.repeats} calls after compilation. Command: `python -m "
    "benchmarks.memory_decode`.",
    "",
    "| context | kvjax-tiny ms (3 layers) | per layer | KV bytes | "
    + " | ".join(f"{n} ms (2 layers) | per layer | state bytes" for n in models)
    + " | KV / Echo bytes |",
    "|---|---|---|---|" + "---|---|---|" * len(models) + "---|",
  ]
  for context_len in contexts:
    kv_s, kv_b = _kv_cell(config, params, context_len, key)
    cells = [f"{1e3 * kv_s:.2f}", f"{1e3 * kv_s / 3:.2f}", f"{kv_b:,}"]
    first = None
    for cfg in models.values():
      s, b = _echo_cell(cfg, context_len, key)
      first = first or b
      cells += [f"{1e3 * s:.2f}", f"{1e3 * s / cfg.num_layers:.2f}", f"{b:,}"]
    cells.append(f"{kv_b / first:.0f}x")
    lines.append(f"| {context_len} | " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)
  table = "\n".join(lines) + "\n"
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
