"""Compute before eviction: does re-reading the context before the cache is
compressed change what survives eviction?

  python -m experiments.compute_before_eviction \\
      --config=experiments/configs/compute_before_eviction.py \\
      --config.workdir=results/memories/compute_before_eviction

Arms, all from the shipped kvjax-tiny: the model as shipped answering
after one read and after two reads (`kvjax.ingest.reread`, no training for
it), and two fine-tuned copies, trained the same number of steps on the
same rows, one answering after one read and one after two. The answer
phase of every arm reads a cache of one read's entries, compressed by the
same policy at the same ratio: only the ingestion compute differs.

Writes results.jsonl (one row per arm, policy, ratio and task; a rerun
skips rows already written by the same config), train.jsonl (loss
curves), summary.md and compute_before_eviction.png in the workdir.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

import kvjax
from kvjax import ingest, pretrained
from kvjax.compress import registry
from kvjax.tasks import generators, scoring
from kvjax.tasks.suite import SUITE
from kvjax.train import losses

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "experiments/configs/compute_before_eviction.py",
  "Experiment config.",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Overrides config.workdir.")
FLAGS = flags.FLAGS

ENTRIES = {e.name: e for e in SUITE}


def _names(text: str) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def _batch(
  task: str, rows: int, context_len: int, seed
) -> generators.TaskBatch:
  entry = ENTRIES[task]
  batch = generators.make_batch(
    entry.task, rows, seed=seed, context_len=context_len, **entry.params
  )
  if not (batch.context_end == context_len).all():
    raise ValueError(f"{task}: rows must end their context at {context_len}.")
  return batch


def _cases(cfg) -> list[tuple[str, float]]:
  """("none", 0) then every (policy, ratio > 0) of the config."""
  return [("none", 0.0)] + [
    (p, float(r))
    for p in _names(cfg.policies)
    for r in _names(cfg.ratios)
    if float(r) > 0
  ]


def _training_batch(cfg, step: int) -> generators.TaskBatch:
  tasks = _names(cfg.train_tasks)
  parts = [
    _batch(t, cfg.rows_per_task, cfg.context_len, (cfg.seed, step, i))
    for i, t in enumerate(tasks)
  ]
  return generators.concat_batches(parts)


def _question(batch: generators.TaskBatch, C: int):
  tokens = jnp.asarray(batch.tokens)
  q = tokens[:, C:]  # [B, Tq]
  mask = (C + jnp.arange(q.shape[1]))[None, :] < jnp.asarray(batch.lengths)[
    :, None
  ]
  return tokens[:, :C], q, mask


def finetune(params, config, cfg, passes: int, log_path: str):
  """`cfg.steps` AdamW steps on answer cross-entropy after `passes` reads."""
  C = cfg.context_len
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.learning_rate / 10
  )
  opt = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0),
  )

  def loss_fn(p, ctx, q, mask, weights):
    logits = ingest.reread_logits(
      p, ctx, q, mask, config=config, passes=passes
    )  # [B, Tq, V]
    loss, metrics = losses.weighted_cross_entropy(
      logits[:, :-1], q[:, 1:], weights
    )
    return loss, metrics

  @jax.jit
  def step(p, state, ctx, q, mask, weights):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      p, ctx, q, mask, weights
    )
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, metrics

  state = opt.init(params)
  start = time.time()
  with open(log_path, "w") as f:
    for i in range(cfg.steps):
      batch = _training_batch(cfg, i)
      ctx, q, mask = _question(batch, C)
      weights = jnp.asarray(batch.loss_mask[:, C + 1 :])
      params, state, metrics = step(params, state, ctx, q, mask, weights)
      if i % 20 == 0 or i == cfg.steps - 1:
        row = {
          "passes": passes,
          "step": i,
          "loss": float(metrics["loss"]),
          "accuracy": float(metrics["accuracy"]),
          "seconds": round(time.time() - start, 1),
        }
        f.write(json.dumps(row) + "\n")
        f.flush()
        logging.info("passes=%d %s", passes, row)
  return params, time.time() - start


def evaluate(params, config, cfg, passes: int, arm: str, done, out, tag):
  """Accuracy under every (policy, ratio) after `passes` reads."""
  C = cfg.context_len
  cases = _cases(cfg)
  for task_index, task in enumerate(_names(cfg.eval_tasks)):
    batch = _batch(task, cfg.eval_examples, C, (cfg.eval_seed, task_index))
    ctx, q, mask = _question(batch, C)
    for policy, ratio in cases:
      key = (arm, policy, ratio, task)
      if key in done:
        continue
      transform = None if policy == "none" else registry.build(policy, ratio)
      t0 = time.time()
      pre = ingest.reread(
        params,
        ctx,
        config=config,
        passes=passes,
        transform=transform,
        reserve=q.shape[1],
      )
      logits, cache, _ = kvjax.forward(
        params, q, pre.cache, config=config, token_mask=mask
      )
      predicted, confidence = scoring.predictions_from_logits(
        batch, np.asarray(logits), offset=C
      )
      result = scoring.score(batch, predicted, confidence=confidence)
      kept = np.asarray(pre.cache.valid).sum(-1)  # [L, B, K]
      row = {
        "tag": tag,
        "arm": arm,
        "passes": passes,
        "policy": policy,
        "ratio": ratio,
        "task": task,
        "accuracy": float(result["all"].accuracy),
        "kept_per_head": float(kept.mean()),
        "kv_bytes": int(kvjax.kv_bytes(pre.cache)),
        "rows": int(batch.batch_size),
        "seconds": round(time.time() - t0, 2),
      }
      out.write(json.dumps(row) + "\n")
      out.flush()
      logging.info("%s", row)


def _tag(cfg) -> str:
  """The config and the code this row was computed by."""
  h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
  for path in (ingest.__file__, __file__):
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:12]


def _read(path: str, tag: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r.get("tag") == tag]


def summarize(rows: list[dict], cfg, train_seconds: dict) -> str:
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  tasks = _names(cfg.eval_tasks)
  lines = [
    "# Compute before eviction: re-reading the context before compression",
    "",
    f"kvjax-tiny, context {cfg.context_len}, {cfg.eval_examples} held-out "
    f"rows per task (seed {cfg.eval_seed}), question-agnostic eviction of the "
    "last read's entries; every arm's answer phase reads the same number of "
    "entries. Accuracy per task:",
    "",
    "| arm | policy | ratio | " + " | ".join(tasks) + " | kept / head |",
    "|---|---|---|" + "---|" * len(tasks) + "---|",
  ]
  index = {(r["arm"], r["policy"], r["ratio"], r["task"]): r for r in rows}
  cases = _cases(cfg)
  for policy, ratio in cases:
    for arm in arms:
      got = [index.get((arm, policy, ratio, t)) for t in tasks]
      if not any(got):
        continue
      cells = [f"{g['accuracy']:.2f}" if g else "-" for g in got]
      kept = next(g["kept_per_head"] for g in got if g)
      lines.append(
        f"| {arm} | {policy} | {ratio:g} | "
        + " | ".join(cells)
        + f" | {kept:.0f} |"
      )
  lines += ["", "Fine-tuning wall time per arm (seconds): "]
  lines += [f"- {k}: {v:.0f}" for k, v in train_seconds.items()]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], cfg, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = _names(cfg.eval_tasks)
  policy = _names(cfg.policies)[0]
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2))
  axes = np.atleast_1d(axes)
  for ax, task in zip(axes, tasks):
    for arm in arms:
      pts = sorted(
        (r["ratio"], r["accuracy"])
        for r in rows
        if r["arm"] == arm
        and r["task"] == task
        and (r["policy"] == policy or r["policy"] == "none")
      )
      if pts:
        ax.plot(*zip(*pts), marker="o", label=arm)
    ax.set_title(task)
    ax.set_xlabel(f"{policy} ratio removed")
    ax.set_ylim(-0.02, 1.02)
  axes[0].set_ylabel("accuracy")
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  cfg = _CONFIG.value
  workdir = FLAGS.workdir or cfg.workdir
  os.makedirs(workdir, exist_ok=True)
  tag = _tag(cfg)
  results = os.path.join(workdir, "results.jsonl")
  kept_rows = _read(results, tag)
  if os.path.exists(results):  # rows of other code or configs are dropped
    with open(results, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept_rows)
  done = {(r["arm"], r["policy"], r["ratio"], r["task"]) for r in kept_rows}
  config, base_params = pretrained.load(cfg.model)
  train_seconds = {}
  with open(results, "a") as out:
    for passes in (int(p) for p in _names(cfg.passes)):
      evaluate(
        base_params,
        config,
        cfg,
        passes,
        f"shipped, {passes} read(s)",
        done,
        out,
        tag,
      )
    for passes in (int(p) for p in _names(cfg.passes)):
      arm = f"fine-tuned, {passes} read(s)"
      need = len(_cases(cfg)) * len(_names(cfg.eval_tasks))
      if sum(k[0] == arm for k in done) == need:
        continue  # finished earlier by this code and config
      params, seconds = finetune(
        base_params,
        config,
        cfg,
        passes,
        os.path.join(workdir, f"train_passes{passes}.jsonl"),
      )
      train_seconds[arm] = seconds
      evaluate(params, config, cfg, passes, arm, done, out, tag)
  rows = _read(results, tag)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(summarize(rows, cfg, train_seconds))
  plot(rows, cfg, os.path.join(workdir, "compute_before_eviction.png"))
  print(summarize(rows, cfg, train_seconds))


if __name__ == "__main__":
  app.run(main)
