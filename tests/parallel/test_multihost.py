"""The sweep's sharded path as 2 processes with 4 CPU devices each, joined
by `jax.distributed.initialize()` against a localhost coordinator (JAX's
CPU collectives), against the same sweep in one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from experiments.configs import sweep as sweep_config
from experiments.sweeps import loop
from experiments.sweeps import store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
OVERRIDES = dict(
  methods="snapkv+int4",
  ratios="0.5",
  tasks="needle",
  modes="agnostic",
  num_examples=4,
  plots=False,
  mesh="seq:8",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (launch/test.sh)"
)
def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  multi = tmp_path / "multi"
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "device_count=8", "device_count=4"
    ),
    KVJAX_COORDINATOR=f"localhost:{port}",
    KVJAX_NUM_PROCESSES="2",
  )
  assert "device_count=4" in env["XLA_FLAGS"]
  cmd = [
    sys.executable,
    "-m",
    "experiments.sweep",
    "--config=experiments/configs/sweep.py:smoke",
    f"--config.workdir={multi}",
    *flags,
  ]
  procs = [
    subprocess.Popen(
      cmd,
      cwd=ROOT,
      env=dict(env, KVJAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  # One process, the 8 devices of this test run.
  cfg = sweep_config.get_config("smoke")
  for k, v in OVERRIDES.items():
    cfg[k] = v
  cfg.workdir = str(tmp_path / "single")
  single = {r["key"]: r for r in loop.run(cfg)}
  rows = store.read_results(str(multi / "results.jsonl"))
  # Process 0 alone wrote: each unit once.
  assert sorted(r["key"] for r in rows) == sorted(single)
  for row in rows:
    want = single[row["key"]]
    for field, value in want.items():
      if field in ("seconds", "includes_compile"):
        continue
      if isinstance(value, (float, list)):
        # Reductions may run in another order on another partitioning:
        # float metrics agree to rounding, counts and strings exactly.
        assert row[field] == pytest.approx(value, rel=1e-5, abs=1e-6), field
      else:
        assert row[field] == value, (field, row[field], value)
  print(json.dumps([{k: r.get(k) for k in ("method", "kl")} for r in rows]))
