"""Trains a model on the synthetic task suite (kvjax-tiny by default).

The ml_collections config (experiments/configs/train.py) becomes a typed
`kvjax.train.TrainConfig` here (`train_config`), the only thing the library
sees; its dict form is written to --workdir/config.json. Checkpoints (orbax)
and metrics (JSONL) go to --workdir; rerunning the same command resumes from
the latest checkpoint. At the end the model is evaluated on held-out seeds
and, with --export, written in Hugging Face safetensors layout plus a
training.json record.

  # kvjax-tiny (the shipped checkpoint: 17,600 steps in three WSD cycles
  # on the 2-core CPU; see kvjax/assets/kvjax-tiny/training.json and the
  # README):
  python -m experiments.train --config=experiments/configs/train.py \
      --workdir=/tmp/kvjax-tiny --export=kvjax/assets/kvjax-tiny
  # a smoke run (seconds):
  python -m experiments.train --config=experiments/configs/train.py:smoke \
      --workdir=/tmp/smoke
  # AdamW vs Muon split (same 3,000 steps), then the comparison report:
  python -m experiments.train --config=experiments/configs/train.py:compare \
      --config.optimizer=adamw --config.learning_rate=3e-3 \
      --workdir=results/train/adamw
  python -m experiments.train --config=experiments/configs/train.py:compare \
      --config.optimizer=muon_split --config.learning_rate=0.02 \
      --workdir=results/train/muon_split
  python -m experiments.train --compare=results/train/adamw,results/train/muon_split
  # the 4-layer 2-hop attempt of results/train/twohop.md:
  python -m experiments.train --config=experiments/configs/train.py:twohop \
      --workdir=/tmp/kvjax-twohop --stop_after=12400 --eval_at_stop
  # more contexts for an exported model (merged into its training.json):
  python -m experiments.train --evaluate_export=kvjax/assets/kvjax-tiny \
      --config.eval_context_lens='(1024, 2048)' --config.eval_examples=64
"""

import datetime
import json
import os
import platform
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments import plotting
from kvjax import hf
from kvjax.train import evaluate, loop
from kvjax.train.config import EvalConfig, TrainConfig

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/train.py", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "/tmp/kvjax-train", "Checkpoints, metrics.jsonl, eval.json."
)
_EXPORT = flags.DEFINE_string(
  "export",
  "",
  "If set, write the trained model (HF safetensors) and "
  "training.json to this directory.",
)
_STOP_AFTER = flags.DEFINE_integer(
  "stop_after",
  None,
  "Stop after this many steps (as if killed); rerun to resume.",
)
_EVAL_AT_STOP = flags.DEFINE_bool(
  "eval_at_stop",
  False,
  "Evaluate (and export) even when --stop_after "
  "ended the run before total_steps.",
)
_EVALUATE_EXPORT = flags.DEFINE_string(
  "evaluate_export",
  "",
  "Evaluate the exported model in this directory "
  "at config.eval_context_lens (config.eval_examples rows each), merge "
  "the accuracies into its training.json and exit.",
)
_COMPARE = flags.DEFINE_string(
  "compare",
  "",
  "Comma-separated workdirs: write a comparison (PNG of "
  "loss curves + markdown table) into the first one's parent and exit.",
)


def train_config(cfg) -> TrainConfig:
  """The typed config of the ml_collections train config `cfg`.

  Raises:
    ValueError: a bad field (named in the message).
  """
  return TrainConfig.from_dict(json.loads(cfg.to_json()))


def _machine() -> str:
  return (
    f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU "
    f"cores visible, jax {jax.__version__} on "
    f"{jax.default_backend()}"
  )


def train_seconds(metrics_path: str) -> float:
  """Seconds spent in train steps, from metrics.jsonl (each logged row's
  seconds_per_step times the steps since the previous logged row); steps
  redone after a resume are counted once."""
  total, last = 0.0, 0
  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  for row in rows:
    if "seconds_per_step" in row:
      total += row["seconds_per_step"] * (row["step"] - last)
    if "loss" in row:
      last = row["step"] if "seconds_per_step" in row else last
  return total


def compare(workdirs):
  """Loss curves (PNG) and final accuracy per task (markdown) of runs.

  Each workdir holds metrics.jsonl, config.json and eval.json of one run;
  the outputs go to the parent directory of the first workdir as
  `comparison.png` and `comparison.md`.
  """
  plt = plotting.pyplot()
  out_dir = os.path.dirname(os.path.abspath(workdirs[0]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  table, tasks = [], None
  for workdir in workdirs:
    with open(os.path.join(workdir, "config.json")) as f:
      config = TrainConfig.from_dict(json.load(f))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    label = config.optimizer.name
    axes[0].plot(
      steps, plotting.smooth([r["loss"] for r in rows], 10), label=label
    )
    axes[1].plot(
      steps, plotting.smooth([r["accuracy"] for r in rows], 10), label=label
    )
    with open(os.path.join(workdir, "eval.json")) as f:
      scores = json.load(f)
    seconds = train_seconds(os.path.join(workdir, "metrics.jsonl"))
    final_loss = sum(r["loss"] for r in rows[-25:]) / len(rows[-25:])
    for context, accs in scores.items():
      tasks = tasks or list(accs)
      table.append((label, context, accs, final_loss, seconds, config))
  axes[0].set(
    xlabel="step", ylabel="answer-token loss (smoothed)", yscale="log"
  )
  axes[1].set(xlabel="step", ylabel="answer-token accuracy (train, smoothed)")
  plotting.grid(*axes)
  plotting.save(fig, os.path.join(out_dir, "comparison.png"))
  lines = [
    "| optimizer | context | train loss (last 25 steps) | "
    "train seconds | " + " | ".join(tasks) + " |",
    "|---|---|---|---|" + "---|" * len(tasks),
  ]
  for label, context, accs, loss, seconds, _ in table:
    lines.append(
      f"| {label} | {context} | {loss:.4f} | {seconds:.0f} | "
      + " | ".join(f"{accs[t]:.3f}" for t in tasks)
      + " |"
    )
  config = table[0][5]
  opt, ev = config.optimizer, config.evaluation
  header = (
    f"# AdamW vs Muon split\n\nSame model ({config.to_dict()['model']}), "
    f"same data stream (seed {config.seed}), {rows[-1]['step']} steps each "
    f"(of a {config.total_steps}-step schedule: warmup "
    f"{opt.warmup_steps}, "
    + (
      f"constant, cosine decay over the last {opt.decay_steps}"
      if opt.decay_steps
      else "cosine"
    )
    + "), phases "
    f"{[p.to_dict() for p in config.data.phases]}, "
    f"{config.data.mixture.tokens_per_step} tokens "
    "per step where a phase does not set its own. Accuracy: held-out seed "
    f"{ev.seed}, {ev.num_examples} rows per task; mqar with "
    f"{ev.mqar_pairs} pairs. Learning rates: "
    + "; ".join(
      f"{r[0]}: lr {r[5].optimizer.learning_rate}"
      + (
        f", AdamW-half lr {r[5].optimizer.adam_learning_rate}"
        if r[0] == "muon_split"
        else ""
      )
      for r in table[:: max(1, len(table) // len(workdirs))]
    )
    + ". Loss curves: comparison.png.\n\n"
  )
  with open(os.path.join(out_dir, "comparison.md"), "w") as f:
    f.write(header + "\n".join(lines) + "\n")
  print(header + "\n".join(lines))


def evaluate_export(export_dir: str, evaluation: EvalConfig):
  """Evaluates an exported model and merges the result into training.json."""
  config, params = hf.load_pretrained(export_dir)
  t0 = time.time()
  scores = evaluate.evaluate_suite(
    params,
    config,
    context_lens=evaluation.context_lens,
    num_examples=evaluation.num_examples,
    seed=evaluation.seed,
    batch_size=max(1, 16 * 512 // max(evaluation.context_lens)),
    mqar_pairs=evaluation.mqar_pairs,
    progress=lambda line: print(line, flush=True),
  )
  path = os.path.join(export_dir, "training.json")
  with open(path) as f:
    record = json.load(f)
  ev = record["eval"]
  ev.setdefault(
    "num_examples_by_context", {k: ev["num_examples"] for k in ev["accuracy"]}
  )
  for context, accs in scores.items():
    ev["accuracy"][str(context)] = accs
    ev["num_examples_by_context"][str(context)] = evaluation.num_examples
  ev.setdefault("extra_eval_seconds", 0.0)
  ev["extra_eval_seconds"] += round(time.time() - t0, 1)
  ev.setdefault("extra_eval_commands", []).append(
    "python -m experiments.train " + " ".join(sys.argv[1:])
  )
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(scores, indent=2))


def main(argv):
  del argv
  if _COMPARE.value:
    compare(_COMPARE.value.split(","))
    return
  config = train_config(_CONFIG.value)
  if _EVALUATE_EXPORT.value:
    evaluate_export(_EVALUATE_EXPORT.value, config.evaluation)
    return
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2)
  wall_path = os.path.join(workdir, "wall_seconds.json")
  wall = {"train_seconds": 0.0}
  if os.path.exists(wall_path):
    with open(wall_path) as f:
      wall = json.load(f)
  t0 = time.time()
  state = loop.train(config, workdir, stop_after=_STOP_AFTER.value)
  wall["train_seconds"] += time.time() - t0
  with open(wall_path, "w") as f:
    json.dump(wall, f)
  if int(state.step) < config.total_steps and not _EVAL_AT_STOP.value:
    print(f"stopped at step {int(state.step)}; rerun to resume.")
    return

  ev = config.evaluation
  t1 = time.time()
  scores = evaluate.evaluate_suite(
    state.params,
    config.model,
    context_lens=ev.context_lens,
    num_examples=ev.num_examples,
    seed=ev.seed,
    mqar_pairs=ev.mqar_pairs,
    progress=lambda line: print(line, flush=True),
  )
  eval_seconds = time.time() - t1
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump({str(k): v for k, v in scores.items()}, f, indent=2)
  print(json.dumps(scores, indent=2))

  if _EXPORT.value:
    hf.save_pretrained(_EXPORT.value, state.params, config.model)
    record = {
      "name": config.model.name,
      "command": "python -m experiments.train " + " ".join(sys.argv[1:]),
      "config": config.to_dict(),
      "steps": int(state.step),
      "train_wall_seconds": round(wall["train_seconds"], 1),
      "train_step_seconds": round(
        train_seconds(os.path.join(workdir, "metrics.jsonl")), 1
      ),
      "eval_wall_seconds": round(eval_seconds, 1),
      "machine": _machine(),
      "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
      ),
      "eval": {
        "seed": ev.seed,
        "num_examples": ev.num_examples,
        "accuracy": {str(k): v for k, v in scores.items()},
      },
    }
    with open(os.path.join(_EXPORT.value, "training.json"), "w") as f:
      json.dump(record, f, indent=2)
    print(f"exported to {_EXPORT.value}")


if __name__ == "__main__":
  app.run(main)
