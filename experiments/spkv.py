"""SP-KV write gates on kvjax-tiny: fine-tune, evaluate, ship.

  # Fine-tune (next-token loss only), evaluate, write the tables:
  python -m experiments.spkv --config=experiments/configs/spkv.py \\
      --workdir=/tmp/spkv_run --export=kvjax/assets/kvjax-tiny-spkv
  # With the optional sparsity penalty (documented deviation):
  python -m experiments.spkv --config=experiments/configs/spkv.py \\
      --config.sparsity=0.02 --workdir=/tmp/spkv_pen
  # Evaluate a finished workdir again, without training:
  python -m experiments.spkv --config=experiments/configs/spkv.py \\
      --workdir=/tmp/spkv_run --evaluate_only
  # The report (markdown + PNG) of finished workdirs:
  python -m experiments.spkv --report=results/memories/spkv_kvjax_tiny.md \\
      --runs="next-token only=/tmp/spkv_run,sparsity 0.02=/tmp/spkv_pen"

The workdir gets `metrics.jsonl` (one row per logged step), the gated model
(`model/`, see `kvjax.train.write_gate.save_gated`) and `eval.json`. The
evaluation runs the held-out task suite at `context_len` with the ungated
base model, the gated model without the hard gate, and the hard gate at
`tau` (`kvjax.train.write_gate.evaluate_gated`), and reports the keep
fraction per layer.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kvjax import model as model_lib
from kvjax import pretrained
from kvjax.train import write_gate as wg
from kvjax.train.config import DataConfig

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/spkv.py", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/spkv_run", "Output directory.")
_EXPORT = flags.DEFINE_string(
  "export", "", "Also ship the gated model to this directory."
)
_EVALUATE_ONLY = flags.DEFINE_bool(
  "evaluate_only", False, "Skip training; evaluate workdir/model."
)
_REPORT = flags.DEFINE_string(
  "report",
  "",
  "Only write the markdown report (and a PNG next to it) of the runs in "
  "--runs to this path.",
)
_RUNS = flags.DEFINE_list(
  "runs", [], "label=workdir pairs for --report (finished workdirs)."
)


def _read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_report(path: str, runs: dict[str, str]) -> None:
  """Markdown tables (accuracy, keep fraction, bytes) and a PNG of the
  training keep fraction for finished workdirs `runs` (label -> dir)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  evals = {}
  metrics = {}
  for label, workdir in runs.items():
    with open(os.path.join(workdir, "eval.json")) as f:
      evals[label] = json.load(f)
    metrics[label] = _read_rows(os.path.join(workdir, "metrics.jsonl"))
  first = next(iter(evals.values()))
  names = list(first["accuracy"]["base"])
  lines = [
    "# SP-KV write gates on kvjax-tiny",
    "",
    f"Context {first['context_len']}, window {first['window']}, tau "
    f"{first['tau']}, {first['num_examples']} held-out rows per entry "
    f"(seed {first['seed']}). Produced by `python -m experiments.spkv "
    "--report=... --runs=...` from the workdirs of the commands in "
    "`experiments/spkv.py`.",
    "",
    "## Training",
    "",
    "| run | steps | wall min | final ce | final mean u | final keep (u >= tau) |",
    "|---|---|---|---|---|---|",
  ]
  for label, rows in metrics.items():
    last = rows[-1]
    lines.append(
      f"| {label} | {last['step']} | {last['seconds'] / 60:.1f} | "
      f"{last['ce']:.4f} | {last['mean_u']:.4f} | {last['keep']:.4f} |"
    )
  lines += [
    "",
    "## Accuracy: ungated kvjax-tiny vs the gated model (all entries kept) "
    "vs the hard gate",
    "",
    "| entry | base | "
    + " | ".join(f"{r} open | {r} hard" for r in evals)
    + " |",
    "|---|---|" + "---|---|" * len(evals),
  ]
  for name in names:
    cells = [f"{first['accuracy']['base'][name]:.3f}"]
    for ev in evals.values():
      cells.append(f"{ev['accuracy']['gated_open'][name]:.3f}")
      cells.append(f"{ev['accuracy']['hard'][name]:.3f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  L = len(next(iter(first["keep_fraction"].values())))
  lines += [
    "",
    "## Keep fraction at tau, per layer (all entries / entries outside the "
    "window), mean over the entries",
    "",
    "| run | "
    + " | ".join(f"layer {i}" for i in range(L))
    + " | "
    + " | ".join(f"layer {i} old" for i in range(L))
    + " |",
    "|---|" + "---|" * (2 * L),
  ]
  for label, ev in evals.items():
    keep = np.mean(list(ev["keep_fraction"].values()), axis=0)
    old = np.mean(list(ev["keep_fraction_outside_window"].values()), axis=0)
    lines.append(
      f"| {label} | "
      + " | ".join(f"{x:.3f}" for x in keep)
      + " | "
      + " | ".join(f"{x:.3f}" for x in old)
      + " |"
    )
  lines += [
    "",
    "## KV bytes over the whole evaluation (all entries)",
    "",
    "| run | full cache (logical) | hard gate logical | hard gate physical "
    "(padded to the largest head, + reserve, + state) | logical ratio |",
    "|---|---|---|---|---|",
  ]
  for label, ev in evals.items():
    tot = {
      k: sum(b[k] for b in ev["bytes"].values())
      for k in ("full_bytes", "logical_bytes", "kv_bytes")
    }
    lines.append(
      f"| {label} | {tot['full_bytes']} | {tot['logical_bytes']} | "
      f"{tot['kv_bytes']} | {tot['logical_bytes'] / tot['full_bytes']:.3f} |"
    )
  png = os.path.splitext(path)[0] + ".png"
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, rows in metrics.items():
    ax.plot([r["step"] for r in rows], [r["keep"] for r in rows], label=label)
  ax.set_xlabel("fine-tune step")
  ax.set_ylabel("share of entries with u >= tau")
  ax.set_ylim(-0.02, 1.02)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  lines += [
    "",
    f"![keep fraction during training]({os.path.basename(png)})",
    "",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def data_config(base_model: str, context_len: int, tokens_per_step: int):
  """The base model's last training phase as a one-phase stream at
  `context_len` (so the fine-tune sees the tasks it was trained on)."""
  d = dict(pretrained.training_record(base_model)["config"]["data"])
  last = dict(d["phases"][-1], until=10**9, context_lens=[context_len])
  last["tokens_per_step"] = tokens_per_step
  return DataConfig.from_dict(dict(d, phases=[last]))


def main(argv):
  del argv
  if _REPORT.value:
    runs = dict(item.split("=", 1) for item in _RUNS.value)
    write_report(_REPORT.value, runs)
    print(f"wrote {_REPORT.value}")
    return
  c = _CONFIG.value
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  model_dir = os.path.join(workdir, "model")
  gate = model_lib.WriteGate("soft", int(c.window), float(c.tau))
  config, base = pretrained.load(c.base_model)
  train_seconds, rows = None, []
  if not _EVALUATE_ONLY.value:
    params = model_lib.add_write_gate(
      base, config, jax.random.key(c.seed), open_bias=c.open_bias
    )
    data = data_config(c.base_model, c.context_len, c.tokens_per_step)
    path = os.path.join(workdir, "metrics.jsonl")
    log = open(path, "w")

    def write(row):
      log.write(json.dumps(row) + "\n")
      log.flush()
      print(json.dumps(row), flush=True)

    t0 = time.time()
    params, rows = wg.finetune(
      params,
      config,
      data,
      steps=int(c.steps),
      seed=int(c.seed),
      write_gate=gate,
      sparsity=float(c.sparsity),
      lr=float(c.lr),
      gate_lr=float(c.gate_lr),
      log_every=int(c.log_every),
      log=write,
      max_seconds=60.0 * float(c.max_minutes),
    )
    train_seconds = time.time() - t0
    log.close()
    wg.save_gated(
      model_dir, params, config.replace(name=c.base_model + "-spkv")
    )
  else:  # the record of the finished training
    rows = _read_rows(os.path.join(workdir, "metrics.jsonl"))
    train_seconds = rows[-1]["seconds"] if rows else None
  config, params = wg.load_gated(model_dir)
  t1 = time.time()
  result = wg.evaluate_gated(
    params,
    base,
    config,
    context_len=int(c.context_len),
    tau=float(c.tau),
    window=int(c.window),
    num_examples=int(c.eval_examples),
    seed=int(c.eval_seed),
    batch_size=int(c.eval_batch),
    progress=lambda line: print(line, flush=True),
  )
  eval_seconds = time.time() - t1
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  if _EXPORT.value:
    record = {
      "name": c.base_model + "-spkv",
      "command": "python -m experiments.spkv " + " ".join(sys.argv[1:]),
      "note": "evaluate_only: the training ran earlier in this workdir "
      "with the same config; steps and train_wall_seconds are from its "
      "metrics.jsonl"
      if _EVALUATE_ONLY.value
      else "",
      "base_model": c.base_model,
      "config": c.to_dict(),
      "steps": rows[-1]["step"] if rows else None,
      "train_wall_seconds": None
      if train_seconds is None
      else round(train_seconds, 1),
      "eval_wall_seconds": round(eval_seconds, 1),
      "machine": f"{platform.machine()} {platform.system()}, "
      f"{os.cpu_count()} CPU cores visible, jax {jax.__version__} on "
      f"{jax.default_backend()}",
      "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
      ),
      "last_train_row": rows[-1] if rows else None,
      "eval": result,
    }
    wg.save_gated(_EXPORT.value, params, config, record)
    print(f"exported to {_EXPORT.value}")


if __name__ == "__main__":
  app.run(main)
