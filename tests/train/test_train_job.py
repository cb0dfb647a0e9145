"""experiments/train.py: its presets are valid and its smoke run works end
to end (train, evaluate, export, comparison report)."""

import json
import os
import subprocess
import sys

import pytest

from kvjax import hf
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


def test_smoke_run_trains_evaluates_exports_and_compares(tmp_path):
  runs = {}
  for optimizer in ("adamw", "muon_split"):
    workdir = tmp_path / optimizer
    args = [f"--workdir={workdir}", f"--config.optimizer={optimizer}"]
    if optimizer == "adamw":
      args.append(f"--export={tmp_path / 'export'}")
    _run(*args, cwd=ROOT)
    runs[optimizer] = workdir
    assert json.load(open(workdir / "eval.json"))["64"]["mqar"] >= 0.0
  record = json.load(open(tmp_path / "export" / "training.json"))
  assert record["steps"] == 20 and "64" in record["eval"]["accuracy"]
  config, _ = hf.load_pretrained(str(tmp_path / "export"))
  assert config.d_model == 64 and config.num_layers == 2
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, "-m", "experiments.train",
                  f"--compare={runs['adamw']},{runs['muon_split']}"],
                 cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  table = open(tmp_path / "comparison.md").read()
  assert "| adamw | 64 |" in table and "| muon_split | 64 |" in table
  assert os.path.getsize(tmp_path / "comparison.png") > 0
