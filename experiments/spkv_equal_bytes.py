"""SP-KV's hard gate against SnapKV, Expected Attention and H2O at equal
KV bytes, on the same rows of the same model.

  python -m experiments.spkv_equal_bytes \\
      --out=results/memories/spkv_equal_bytes.md

The model is the shipped kvjax-tiny-spkv. SP-KV answers with its hard gate
(`kvjax.train.write_gate.hard_gate_batch`: gated prefill, the cache
compacted to the admitted entries, gated question with the cached
entries' utility: exactly one gated pass; `spkv_one_pass` recomputes that
pass without a cache as a check). The heuristics answer
on the same weights without the gate (every entry written, then evicted,
question-agnostic), each at the ratio that keeps the same share of
entries as the gate kept on that task's rows (so equal logical bytes per
token; physical bytes are in the table too: SP-KV pads every head to the
largest head budget of the batch).
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kvjax
from kvjax import model as model_lib
from kvjax import pretrained
from kvjax.cache import kv_bytes, logical_bytes
from kvjax.compress import registry
from kvjax.tasks import generators, scoring
from kvjax.tasks.suite import SUITE
from kvjax.train import write_gate

flags.DEFINE_string("model", "kvjax-tiny-spkv", "A shipped gated model.")
flags.DEFINE_integer("context_len", 512, "Context positions.")
flags.DEFINE_integer("num_examples", 64, "Rows per task (one batch).")
flags.DEFINE_integer("seed", 12345, "Held-out rows' seed.")
flags.DEFINE_float("tau", 0.5, "Hard-gate threshold.")
flags.DEFINE_integer("window", 128, "Local window always kept.")
flags.DEFINE_string(
  "policies", "snapkv,expected_attention,h2o", "Heuristics to compare."
)
flags.DEFINE_string("tasks", "", "Suite entries (default: all that fit).")
flags.DEFINE_string("out", "", "Markdown table path (and .jsonl beside it).")
FLAGS = flags.FLAGS


@functools.partial(jax.jit, static_argnames=("config", "gate"))
def _one_pass_logits(params, tokens, mask, *, config, gate):
  B, T = tokens.shape
  logits, _, _ = model_lib.forward(
    params,
    tokens,
    kvjax.init_cache(config, B, T),
    config=config,
    token_mask=mask,
    write_gate=gate,
  )
  return logits


def _exact_gate(params, config, batch):
  """SP-KV's hard gate as defined: one gated pass over context + question
  (an entry below tau is invisible to every query outside its window)."""
  tokens = jnp.asarray(batch.tokens)
  mask = (
    jnp.arange(tokens.shape[1])[None, :] < jnp.asarray(batch.lengths)[:, None]
  )
  gate = model_lib.WriteGate("hard", FLAGS.window, FLAGS.tau)
  logits = _one_pass_logits(params, tokens, mask, config=config, gate=gate)
  predicted, confidence = scoring.predictions_from_logits(
    batch, np.asarray(logits), offset=0
  )
  return scoring.score(batch, predicted, confidence=confidence)["all"].accuracy


def _heuristic(params, config, batch, policy: str, ratio: float):
  C = int(batch.context_end[0])
  tokens = jnp.asarray(batch.tokens)
  Tq = tokens.shape[1] - C
  pre = kvjax.prefill(
    params,
    tokens[:, :C],
    config=config,
    transform=registry.build(policy, ratio=ratio),
    capacity=C + Tq,
  )
  mask = (C + jnp.arange(Tq))[None, :] < jnp.asarray(batch.lengths)[:, None]
  logits, _, _ = kvjax.forward(
    params, tokens[:, C:], pre.cache, config=config, token_mask=mask
  )
  predicted, confidence = scoring.predictions_from_logits(
    batch, np.asarray(logits), offset=C
  )
  score = scoring.score(batch, predicted, confidence=confidence)["all"]
  return score.accuracy, logical_bytes(pre.cache), kv_bytes(pre.cache)


def main(argv):
  del argv
  config, params = pretrained.load(FLAGS.model)
  plain = {k: v for k, v in params.items() if k != "write_gate"}
  names = [t for t in FLAGS.tasks.split(",") if t] or [e.name for e in SUITE]
  policies = [p for p in FLAGS.policies.split(",") if p]
  C = FLAGS.context_len
  rows = []
  for entry in SUITE:
    if entry.name not in names:
      continue
    if C < generators.min_context_len(entry.task, **entry.params):
      continue
    batch = generators.make_batch(
      entry.task,
      FLAGS.num_examples,
      seed=(FLAGS.seed, 0),
      context_len=C,
      **entry.params,
    )
    t0 = time.time()
    scores, stats = write_gate.hard_gate_batch(
      params, config, batch, tau=FLAGS.tau, window=FLAGS.window
    )
    keep = float(np.sum(stats["kept"]) / (stats["entries"] * config.num_layers))
    row = {
      "task": entry.name,
      "method": "spkv",
      "keep": keep,
      "accuracy": float(scores["all"].accuracy),
      "logical_bytes": int(stats["logical_bytes"]),
      "kv_bytes": int(stats["kv_bytes"]),
      "seconds": round(time.time() - t0, 1),
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    # The definition (no cache): what the compressed run above computes.
    rows.append(
      dict(
        row,
        method="spkv_one_pass",
        accuracy=float(_exact_gate(params, config, batch)),
      )
    )
    print(json.dumps(rows[-1]), flush=True)
    # The ratio whose kept count per head, max(1, int(C (1 - ratio))),
    # is the gate's mean kept count.
    ratio = min(max(1.0 - keep, 0.0), 0.99)
    for policy in policies:
      t0 = time.time()
      acc, logical, physical = _heuristic(plain, config, batch, policy, ratio)
      row = {
        "task": entry.name,
        "method": policy,
        "keep": 1.0 - ratio,
        "accuracy": float(acc),
        "logical_bytes": int(logical),
        "kv_bytes": int(physical),
        "seconds": round(time.time() - t0, 1),
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  if FLAGS.out:
    with open(FLAGS.out.replace(".md", ".jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    methods = ["spkv", "spkv_one_pass"] + policies
    lines = [
      "# SP-KV's hard gate vs heuristics at equal KV bytes",
      "",
      f"`{FLAGS.model}`, context {C}, {FLAGS.num_examples} held-out rows "
      f"per task (seed {FLAGS.seed}), tau {FLAGS.tau}, window "
      f"{FLAGS.window}. spkv: gated prefill, the cache compressed by "
      "`kvjax.compress.spkv`, gated question with each cached entry's "
      "utility (`forward(cache_utility=)`: the same computation as one "
      "gated pass); spkv_one_pass: that definition recomputed, one gated "
      "pass over context + question (no cache), a check. Each heuristic "
      "keeps, per head, the share of "
      "entries the gate kept on that task's rows (question-agnostic "
      "eviction, on the same weights without the gate). Command: "
      "`python -m experiments.spkv_equal_bytes "
      f"--out={FLAGS.out}`.",
      "",
      "| task | keep | "
      + " | ".join(methods)
      + " | SP-KV physical / logical bytes |",
      "|---|---|" + "---|" * len(methods) + "---|",
    ]
    for name in dict.fromkeys(r["task"] for r in rows):
      got = {r["method"]: r for r in rows if r["task"] == name}
      s = got["spkv"]
      lines.append(
        f"| {name} | {s['keep']:.3f} | "
        + " | ".join(f"{got[m]['accuracy']:.3f}" for m in methods)
        + f" | {s['kv_bytes'] / s['logical_bytes']:.2f} |"
      )
    with open(FLAGS.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
