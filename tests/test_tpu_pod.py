"""launch/tpu_pod.sh: --dry-run prints the exact commands and runs nothing;
the experiment's arguments survive both shells; bad arguments get the
usage. No gcloud needed: a fake one on PATH records any call."""

import json
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.sh")
NAME, ZONE = "my-v5e-256", "us-west4-a"
EXCLUDES = [
  "--exclude=./.git",
  "--exclude=./.venv",
  "--exclude=./runs",
  "--exclude=./build",
  "--exclude=./dist",
  "--exclude=./.whl",
  "--exclude=__pycache__",
  "--exclude=*.egg-info",
  "--exclude=.pytest_cache",
  "--exclude=.ruff_cache",
]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME]
WHERE = [f"--zone={ZONE}", "--worker=all"]
PYTHON_311 = (
  "set -eu; if ! command -v python3.11 >/dev/null 2>&1; then sudo apt-get "
  "update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
  "python3.11 python3.11-venv; fi; "
)
INSTALL = (
  "cd kvjax && PYTHON=python3.11 KVJAX_EXTRAS=tpu,plot bash launch/env.sh"
)
RUN = (
  "cd kvjax && PYTHONUNBUFFERED=1 exec .venv/bin/python -m experiments.sweep "
  "--config=experiments/configs/sweep.py:long"
)
# Extra arguments a shell would mangle if they were not quoted.
ODD = ["--config.context_len=65536", "--config.workdir=/tmp/a b'c", "$HOME;x"]


def _run(tmp_path, *args, **env):
  """Runs the script with fake gcloud and tar that record each call and
  fail; returns (process, the recorded calls)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / "calls"
  for tool in ("gcloud", "tar"):
    fake = bin_dir / tool
    fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 97\n')
    fake.chmod(0o755)
  (tmp_path / "tmp").mkdir(exist_ok=True)
  base = {k: v for k, v in os.environ.items() if not k.startswith("KVJAX_")}
  proc = subprocess.run(
    ["bash", SCRIPT, *args],
    env={
      **base,
      "PATH": f"{bin_dir}:{os.environ['PATH']}",
      "TMPDIR": str(tmp_path / "tmp"),
      **env,
    },
    capture_output=True,
    text=True,
    timeout=10,
    check=False,
  )
  return proc, calls.read_text() if calls.exists() else ""


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
  proc, calls = _run(tmp_path, NAME, ZONE, "--dry-run", *ODD)
  assert proc.returncode == 0, proc.stderr
  assert calls == "" and proc.stderr == ""
  assert os.listdir(tmp_path / "tmp") == []  # no archive either
  archive = f"{tmp_path}/tmp/kvjax-pod-{NAME}.tgz"
  lines = proc.stdout.splitlines()
  assert [shlex.split(line) for line in lines] == [
    ["tar", "-czf", archive, "-C", ROOT, *EXCLUDES, "."],
    ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive]
    + [f"{NAME}:kvjax-pod.tgz", *WHERE],
    SSH
    + WHERE
    + [
      "--command="
      + PYTHON_311
      + "mkdir -p kvjax && tar -xzf kvjax-pod.tgz -C kvjax && "
      + INSTALL
    ],
    SSH
    + WHERE
    + [
      "--command=" + RUN + " --config.context_len=65536 "
      "'--config.workdir=/tmp/a b'\\''c' '$HOME;x'"
    ],
  ]
  # The exact text of a line (what is pasted).
  assert lines[1] == (
    f"gcloud compute tpus tpu-vm scp {archive} {NAME}:kvjax-pod.tgz "
    f"--zone={ZONE} --worker=all"
  )


def _argv_printer(path):
  """An executable at `path` that prints its arguments as JSON."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
    "#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n"
  )
  path.chmod(0o755)


def test_pasted_lines_reach_the_worker_unchanged(tmp_path):
  # Paste the printed ssh line into bash (gcloud: prints its arguments),
  # then run its --command in a shell as a worker would (python: prints
  # its arguments): the experiment gets exactly the extra arguments.
  proc, _ = _run(tmp_path, NAME, ZONE, "--dry-run", *ODD)
  _argv_printer(tmp_path / "paste" / "gcloud")
  pasted = subprocess.run(
    ["bash", "-c", proc.stdout.splitlines()[-1]],
    env={**os.environ, "PATH": f"{tmp_path / 'paste'}:{os.environ['PATH']}"},
    capture_output=True,
    text=True,
    timeout=10,
    check=True,
  )
  argv = json.loads(pasted.stdout)
  assert argv[:-1] == SSH[1:] + WHERE
  home = tmp_path / "home"
  _argv_printer(home / "kvjax" / ".venv" / "bin" / "python")
  worker = subprocess.run(
    ["bash", "-c", argv[-1].removeprefix("--command=")],
    cwd=home,
    capture_output=True,
    text=True,
    timeout=10,
    check=True,
  )
  assert json.loads(worker.stdout) == [
    "-m",
    "experiments.sweep",
    "--config=experiments/configs/sweep.py:long",
    *ODD,
  ]


def test_dry_run_from_a_repository(tmp_path):
  proc, calls = _run(
    tmp_path,
    NAME,
    ZONE,
    "--dry-run",
    KVJAX_REPO="https://example.com/kvjax.git",
    KVJAX_REF="v0.1",
  )
  assert proc.returncode == 0 and calls == ""
  install, run = (shlex.split(line) for line in proc.stdout.splitlines())
  assert install == SSH + WHERE + [
    "--command="
    + PYTHON_311
    + "if [ ! -d kvjax/.git ]; then git clone --quiet "
    "https://example.com/kvjax.git kvjax; fi && git -C kvjax fetch --quiet "
    "origin v0.1 && git -C kvjax checkout --quiet --detach FETCH_HEAD && "
    + INSTALL
  ]
  assert run == SSH + WHERE + ["--command=" + RUN]


def test_without_dry_run_it_calls_the_tools(tmp_path):
  proc, calls = _run(tmp_path, NAME, ZONE, "--config.seed=1")
  assert proc.returncode == 97  # the fake tar fails: set -e stops there
  assert calls.startswith("tar -czf") and "gcloud" not in calls


@pytest.mark.parametrize(
  "args,message",
  [
    ((), "NAME and ZONE are required"),
    ((NAME,), "NAME and ZONE are required"),
    ((NAME, "--dry-run"), "ZONE=--dry-run is not a TPU ZONE"),
    (("My_TPU", ZONE), "NAME=My_TPU is not a TPU NAME"),
  ],
)
def test_bad_arguments_print_the_usage(tmp_path, args, message):
  proc, calls = _run(tmp_path, *args)
  assert proc.returncode == 2 and calls == "" and proc.stdout == ""
  assert message in proc.stderr
  assert "Usage: bash launch/tpu_pod.sh NAME ZONE [--dry-run]" in proc.stderr


def test_help(tmp_path):
  proc, calls = _run(tmp_path, "--help")
  assert proc.returncode == 0 and calls == ""
  assert proc.stdout.startswith("Usage: bash launch/tpu_pod.sh NAME ZONE")
