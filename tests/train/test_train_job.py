"""experiments/train.py: its presets are valid and its smoke run works end
to end (train, evaluate, export, comparison report), each output reporting
what the run did: a loss that fell, the exported model's accuracy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import train as train_job
from experiments.configs import train as train_configs
from kvjax import hf, pretrained
from kvjax.tasks.suite import SUITE
from kvjax.train import evaluate
from kvjax.train.config import TrainConfig

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


@pytest.mark.parametrize("preset", train_configs.PRESETS)
def test_presets_build_and_their_phases_cover_the_run(preset):
  cfg = train_configs.get_config(preset)
  # The typed config checks every field, the schedule against total_steps
  # and that every phase's rows fit its contexts; its dict form reads back.
  config = train_job.train_config(cfg)
  assert (
    TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  )
  untils = [int(p.until) for p in cfg.data.phases]
  assert untils == sorted(untils) and len(set(untils)) == len(untils)
  assert untils[-1] >= cfg.total_steps
  if preset == "tiny":
    # WSD: the decay sits inside the last phase, so lengthening the run
    # or its last phase leaves every earlier step's rate unchanged; each
    # cycle starts with a phase, the last cycle with the last phase.
    assert (
      0 < cfg.decay_steps and cfg.total_steps - cfg.decay_steps >= (untils[-2])
    )
    assert set(cfg.lr_restarts) <= set(untils[:-1])
    assert cfg.lr_restarts[-1] == untils[-2]


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="preset="):
    train_configs.get_config("huge")


def test_the_shipped_record_is_the_tiny_preset():
  """kvjax-tiny's training.json still reads as a TrainConfig: the preset
  that reproduces it."""
  record = pretrained.training_record("kvjax-tiny")
  assert TrainConfig.from_dict(record["config"]) == train_job.train_config(
    train_configs.get_config("tiny")
  )


def test_a_bad_override_names_the_field():
  cfg = train_configs.get_config("smoke")
  cfg.data.copy_fraction = 1.5
  with pytest.raises(ValueError, match=r"Mixture\.copy_fraction=1\.5"):
    train_job.train_config(cfg)


def _run(*args):
  """`python -m experiments.train` from the repository root."""
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config=experiments/configs/train.py:smoke",
      *args,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _json(path):
  with open(path) as f:
    return json.load(f)


def _loss_rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if "loss" in r]


def _cells(lines, start):
  """The cells of the markdown table row starting with `start`."""
  line = next(line for line in lines if line.startswith(start))
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_smoke_run_trains_evaluates_exports_and_compares(tmp_path):
  cfg = train_configs.get_config("smoke")
  (context,) = cfg.eval_context_lens
  suite_names = [name for name, _, _ in SUITE]
  runs, scores = {}, {}
  for optimizer in ("adamw", "muon_split"):
    workdir = tmp_path / optimizer
    args = [f"--workdir={workdir}", f"--config.optimizer={optimizer}"]
    if optimizer == "adamw":
      args.append(f"--export={tmp_path / 'export'}")
    _run(*args)
    runs[optimizer] = workdir
    # metrics.jsonl: one row per step run, on the smoke phase's batches.
    rows = _loss_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    (phase,) = cfg.data.phases
    assert {(r["context_len"], r["batch_size"]) for r in rows} == {
      (c, cfg.data.tokens_per_step // c) for c in phase.context_lens
    }
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # Every step draws a new batch, so compare means of five: both
    # optimizers take the loss from ln 512 = 6.24 down by 0.2-0.35 in 20
    # steps; without updates it stays within batch noise (~0.05).
    loss = [r["loss"] for r in rows]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.1, (optimizer, loss)
    scores[optimizer] = _json(workdir / "eval.json")
    assert list(scores[optimizer]) == [str(context)]
    accuracy = scores[optimizer][str(context)]
    assert list(accuracy) == suite_names
    assert all(0.0 <= a <= 1.0 for a in accuracy.values()), accuracy

  # The export is the evaluated model: its accuracy on the held-out seed,
  # recomputed here, is what eval.json reports. The smoke model answers
  # UNKNOWN to everything: abstention 1.0 where its initialization scores
  # 0.0, and 0.0 on the other entries, so abstention alone tells them apart.
  config, params = hf.load_pretrained(str(tmp_path / "export"))
  assert config.d_model == 64 and config.num_layers == 2
  suite = [e for e in SUITE if e.name == "abstention"]
  recomputed = evaluate.evaluate_suite(
    params,
    config,
    context_lens=(context,),
    num_examples=cfg.eval_examples,
    seed=cfg.eval_seed,
    mqar_pairs=cfg.eval_mqar_pairs,
    suite=suite,
  )
  assert recomputed[context] == {
    name: scores["adamw"][str(context)][name] for name, _, _ in suite
  }
  record = _json(tmp_path / "export" / "training.json")
  assert TrainConfig.from_dict(record["config"]) == train_job.train_config(
    cfg
  )  # the smoke preset runs adamw
  assert record["steps"] == cfg.total_steps
  assert record["eval"]["accuracy"] == scores["adamw"]
  assert record["eval"]["seed"] == cfg.eval_seed
  assert record["eval"]["num_examples"] == cfg.eval_examples

  subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      f"--compare={runs['adamw']},{runs['muon_split']}",
    ],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=600,
  )
  # comparison.md: one row per run with its last-25-step loss and eval.json.
  lines = (tmp_path / "comparison.md").read_text().splitlines()
  header = _cells(lines, "| optimizer |")
  assert header[4:] == suite_names
  for optimizer, workdir in runs.items():
    row = _cells(lines, f"| {optimizer} |")
    loss = [r["loss"] for r in _loss_rows(workdir)][-25:]
    assert row[:3] == [
      optimizer,
      str(context),
      f"{sum(loss) / len(loss):.4f}",
    ], row
    assert row[4:] == [
      f"{scores[optimizer][str(context)][name]:.3f}" for name in suite_names
    ], row
  assert os.path.getsize(tmp_path / "comparison.png") > 0
