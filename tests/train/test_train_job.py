"""experiments/train.py: its presets are valid and its smoke run works end
to end (train, evaluate, export, comparison report), each output reporting
what the run did: a loss that fell, the exported model's accuracy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvjax import hf
from kvjax.train import evaluate
from kvjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from experiments.configs import train as train_configs  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("preset", train_configs.PRESETS)
def test_presets_build_and_their_phases_cover_the_run(preset):
  cfg = train_configs.get_config(preset)
  loop.optimizer_from(cfg.to_dict())  # schedule arguments are consistent
  untils = [int(p.until) for p in cfg.data.phases]
  assert untils == sorted(untils) and len(set(untils)) == len(untils)
  assert untils[-1] >= cfg.total_steps
  if preset == "tiny":
    # WSD: the decay sits inside the last phase, so lengthening the run
    # or its last phase leaves every earlier step's rate unchanged; each
    # cycle starts with a phase, the last cycle with the last phase.
    assert 0 < cfg.decay_steps and cfg.total_steps - cfg.decay_steps >= (
        untils[-2])
    assert set(cfg.lr_restarts) <= set(untils[:-1])
    assert cfg.lr_restarts[-1] == untils[-2]


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="preset="):
    train_configs.get_config("huge")


def _run(*args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       f"--config={ROOT}/experiments/configs/train.py:smoke", *args],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _loss_rows(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [r for r in rows if "loss" in r]


def _cells(lines, start):
  """The cells of the markdown table row starting with `start`."""
  line = next(line for line in lines if line.startswith(start))
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_smoke_run_trains_evaluates_exports_and_compares(tmp_path):
  cfg = train_configs.get_config("smoke")
  (context,) = cfg.eval_context_lens
  suite_names = [name for name, _, _ in evaluate.SUITE]
  runs, scores = {}, {}
  for optimizer in ("adamw", "muon_split"):
    workdir = tmp_path / optimizer
    args = [f"--workdir={workdir}", f"--config.optimizer={optimizer}"]
    if optimizer == "adamw":
      args.append(f"--export={tmp_path / 'export'}")
    _run(*args, cwd=ROOT)
    runs[optimizer] = workdir
    # metrics.jsonl: one row per step run, on the smoke phase's batches.
    rows = _loss_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    (phase,) = cfg.data.phases
    assert {(r["context_len"], r["batch_size"]) for r in rows} == {
        (L, cfg.data.tokens_per_step // L) for L in phase.context_lens}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # Every step draws a new batch, so compare means of five: both
    # optimizers take the loss from ln 512 = 6.24 down by 0.2-0.35 in 20
    # steps; without updates it stays within batch noise (~0.05).
    loss = [r["loss"] for r in rows]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.1, (optimizer, loss)
    scores[optimizer] = json.load(open(workdir / "eval.json"))
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
  suite = [e for e in evaluate.SUITE if e[0] == "abstention"]
  recomputed = evaluate.evaluate_suite(
      params, config, context_lens=(context,), num_examples=cfg.eval_examples,
      seed=cfg.eval_seed, mqar_pairs=cfg.eval_mqar_pairs, suite=suite)
  assert recomputed[context] == {
      name: scores["adamw"][str(context)][name] for name, _, _ in suite}
  record = json.load(open(tmp_path / "export" / "training.json"))
  assert record["steps"] == cfg.total_steps
  assert record["eval"]["accuracy"] == scores["adamw"]
  assert record["eval"]["seed"] == cfg.eval_seed
  assert record["eval"]["num_examples"] == cfg.eval_examples

  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, "-m", "experiments.train",
                  f"--compare={runs['adamw']},{runs['muon_split']}"],
                 cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  # comparison.md: one row per run with its last-25-step loss and eval.json.
  lines = open(tmp_path / "comparison.md").read().splitlines()
  header = _cells(lines, "| optimizer |")
  assert header[4:] == suite_names
  for optimizer, workdir in runs.items():
    row = _cells(lines, f"| {optimizer} |")
    loss = [r["loss"] for r in _loss_rows(workdir)][-25:]
    assert row[:3] == [optimizer, str(context),
                       f"{sum(loss) / len(loss):.4f}"], row
    assert row[4:] == [f"{scores[optimizer][str(context)][name]:.3f}"
                       for name in suite_names], row
  assert os.path.getsize(tmp_path / "comparison.png") > 0
