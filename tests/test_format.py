"""Formatting is a tool's job: the tree is `ruff format`-clean under the
one configuration in pyproject.toml (80 columns, 2-space indent)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tree_is_ruff_formatted():
  proc = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, (
    "run `ruff format .` (pinned in the test extra):\n"
    + proc.stdout[-3000:]
    + proc.stderr[-2000:]
  )
