"""Trains a model on the synthetic task suite (kvjax-tiny by default).

Checkpoints (orbax) and metrics (JSONL) go to --workdir; rerunning the same
command resumes from the latest checkpoint. At the end the model is
evaluated on held-out seeds and, with --export, written in Hugging Face
safetensors layout plus a training.json record.

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

from absl import app
from absl import flags
from ml_collections import config_flags
import jax

from kvjax import hf
from kvjax.train import evaluate
from kvjax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/train.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/kvjax-train",
                               "Checkpoints, metrics.jsonl, eval.json.")
_EXPORT = flags.DEFINE_string(
    "export", "", "If set, write the trained model (HF safetensors) and "
    "training.json to this directory.")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "Stop after this many steps (as if killed); "
    "rerun to resume.")
_EVAL_AT_STOP = flags.DEFINE_bool(
    "eval_at_stop", False, "Evaluate (and export) even when --stop_after "
    "ended the run before total_steps.")
_EVALUATE_EXPORT = flags.DEFINE_string(
    "evaluate_export", "", "Evaluate the exported model in this directory "
    "at config.eval_context_lens (config.eval_examples rows each), merge "
    "the accuracies into its training.json and exit.")
_COMPARE = flags.DEFINE_string(
    "compare", "", "Comma-separated workdirs: write a comparison (PNG of "
    "loss curves + markdown table) into the first one's parent and exit.")


def _machine() -> str:
  return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU "
          f"cores visible, jax {jax.__version__} on "
          f"{jax.default_backend()}")


def train_seconds(metrics_path: str) -> float:
  """Seconds spent in train steps, from metrics.jsonl (each logged row's
  seconds_per_step times the steps since the previous logged row); steps
  redone after a resume are counted once."""
  total, last = 0.0, 0
  for line in open(metrics_path):
    row = json.loads(line)
    if "seconds_per_step" in row:
      total += row["seconds_per_step"] * (row["step"] - last)
    if "loss" in row:
      last = row["step"] if "seconds_per_step" in row else last
  return total


def _smooth(values, window):
  out, acc = [], []
  for v in values:
    acc.append(v)
    acc = acc[-window:]
    out.append(sum(acc) / len(acc))
  return out


def compare(workdirs):
  """Loss curves (PNG) and final accuracy per task (markdown) of runs.

  Each workdir holds metrics.jsonl, config.json and eval.json of one run;
  the outputs go to the parent directory of the first workdir as
  `comparison.png` and `comparison.md`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  out_dir = os.path.dirname(os.path.abspath(workdirs[0]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  table, tasks = [], None
  for workdir in workdirs:
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    rows = [json.loads(line) for line in open(
        os.path.join(workdir, "metrics.jsonl")) if line.strip()]
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    label = cfg["optimizer"]
    axes[0].plot(steps, _smooth([r["loss"] for r in rows], 10), label=label)
    axes[1].plot(steps, _smooth([r["accuracy"] for r in rows], 10),
                 label=label)
    scores = json.load(open(os.path.join(workdir, "eval.json")))
    seconds = train_seconds(os.path.join(workdir, "metrics.jsonl"))
    final_loss = sum(r["loss"] for r in rows[-25:]) / len(rows[-25:])
    for context, accs in scores.items():
      tasks = tasks or list(accs)
      table.append((label, context, accs, final_loss, seconds, cfg))
  axes[0].set(xlabel="step", ylabel="answer-token loss (smoothed)",
              yscale="log")
  axes[1].set(xlabel="step", ylabel="answer-token accuracy (train, smoothed)")
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "comparison.png"), dpi=120)
  lines = ["| optimizer | context | train loss (last 25 steps) | "
           "train seconds | "
           + " | ".join(tasks) + " |",
           "|---|---|---|---|" + "---|" * len(tasks)]
  for label, context, accs, loss, seconds, cfg in table:
    lines.append(f"| {label} | {context} | {loss:.4f} | {seconds:.0f} | "
                 + " | ".join(f"{accs[t]:.3f}" for t in tasks) + " |")
  cfg = table[0][5]
  header = (
      f"# AdamW vs Muon split\n\nSame model ({cfg['model']}), same data "
      f"stream (seed {cfg['seed']}), {rows[-1]['step']} steps each "
      f"(of a {cfg['total_steps']}-step schedule: warmup "
      f"{cfg['warmup_steps']}, "
      + (f"constant, cosine decay over the last {cfg['decay_steps']}"
         if cfg.get("decay_steps") else "cosine")
      + "), phases "
      f"{cfg['data']['phases']}, {cfg['data']['tokens_per_step']} tokens "
      "per step where a phase does not set its own. Accuracy: held-out seed "
      f"{cfg['eval_seed']}, {cfg['eval_examples']} rows per task; mqar with "
      f"{cfg['eval_mqar_pairs']} pairs. Learning rates: "
      + "; ".join(f"{r[0]}: lr {r[5]['learning_rate']}"
                  + (f", AdamW-half lr {r[5]['adam_learning_rate']}"
                     if r[0] == "muon_split" else "")
                  for r in table[::max(1, len(table) // len(workdirs))])
      + ". Loss curves: comparison.png.\n\n")
  with open(os.path.join(out_dir, "comparison.md"), "w") as f:
    f.write(header + "\n".join(lines) + "\n")
  print(header + "\n".join(lines))


def evaluate_export(export_dir, cfg):
  """Evaluates an exported model and merges the result into training.json."""
  config, params = hf.load_pretrained(export_dir)
  t0 = time.time()
  scores = evaluate.evaluate_suite(
      params, config, context_lens=tuple(cfg.eval_context_lens),
      num_examples=cfg.eval_examples, seed=cfg.eval_seed,
      batch_size=max(1, 16 * 512 // max(cfg.eval_context_lens)),
      mqar_pairs=cfg.eval_mqar_pairs,
      progress=lambda line: print(line, flush=True))
  path = os.path.join(export_dir, "training.json")
  record = json.load(open(path))
  ev = record["eval"]
  ev.setdefault("num_examples_by_context", {
      k: ev["num_examples"] for k in ev["accuracy"]})
  for context, accs in scores.items():
    ev["accuracy"][str(context)] = accs
    ev["num_examples_by_context"][str(context)] = cfg.eval_examples
  ev.setdefault("extra_eval_seconds", 0.0)
  ev["extra_eval_seconds"] += round(time.time() - t0, 1)
  ev.setdefault("extra_eval_commands", []).append(
      "python -m experiments.train " + " ".join(sys.argv[1:]))
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(scores, indent=2))


def main(argv):
  del argv
  if _COMPARE.value:
    compare(_COMPARE.value.split(","))
    return
  cfg = _CONFIG.value
  if _EVALUATE_EXPORT.value:
    evaluate_export(_EVALUATE_EXPORT.value, cfg)
    return
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=2))
  wall_path = os.path.join(workdir, "wall_seconds.json")
  wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {
      "train_seconds": 0.0}
  t0 = time.time()
  state = loop.train(cfg, workdir, stop_after=_STOP_AFTER.value)
  wall["train_seconds"] += time.time() - t0
  with open(wall_path, "w") as f:
    json.dump(wall, f)
  if int(state.step) < cfg.total_steps and not _EVAL_AT_STOP.value:
    print(f"stopped at step {int(state.step)}; rerun to resume.")
    return

  config = loop.model_config_from(cfg)
  t1 = time.time()
  scores = evaluate.evaluate_suite(
      state.params, config, context_lens=tuple(cfg.eval_context_lens),
      num_examples=cfg.eval_examples, seed=cfg.eval_seed,
      mqar_pairs=cfg.eval_mqar_pairs,
      progress=lambda line: print(line, flush=True))
  eval_seconds = time.time() - t1
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump({str(k): v for k, v in scores.items()}, f, indent=2)
  print(json.dumps(scores, indent=2))

  if _EXPORT.value:
    hf.save_pretrained(_EXPORT.value, state.params, config)
    record = {
        "name": config.name,
        "command": "python -m experiments.train "
                   + " ".join(sys.argv[1:]),
        "config": json.loads(cfg.to_json()),
        "steps": int(state.step),
        "train_wall_seconds": round(wall["train_seconds"], 1),
        "train_step_seconds": round(train_seconds(
            os.path.join(workdir, "metrics.jsonl")), 1),
        "eval_wall_seconds": round(eval_seconds, 1),
        "machine": _machine(),
        "finished_utc": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        "eval": {"seed": cfg.eval_seed, "num_examples": cfg.eval_examples,
                 "accuracy": {str(k): v for k, v in scores.items()}},
    }
    with open(os.path.join(_EXPORT.value, "training.json"), "w") as f:
      json.dump(record, f, indent=2)
    print(f"exported to {_EXPORT.value}")


if __name__ == "__main__":
  app.run(main)
