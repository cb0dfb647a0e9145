"""The README's promises: the library example runs, the main job runs."""

import os
import re
import subprocess
import sys

from kvjax import kv_bytes as kvjax_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert blocks, "README has no python example"
  namespace = {}
  for block in blocks:  # later blocks continue the first one's session
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["out"].tokens.shape == (2, 16)
  assert namespace["aux"]["attn_probs"].shape[:2] == (2, 2)
  assert kvjax_bytes(namespace["small"]) < 0.15 * kvjax_bytes(
      namespace["full"])


def test_ci_calls_the_readme_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert "bash launch/test.sh" in f.read()
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert "bash launch/test.sh" in readme and "bash launch/local.sh" in readme


def test_main_job_default_runs():
  with open(os.path.join(ROOT, "launch", "local.sh")) as f:
    module = re.search(r"python -m (\S+)", f.read()).group(1)
  # The default config, made smaller only in batch so the test stays quick.
  proc = subprocess.run(
      [sys.executable, "-m", module, "--config.batch_size=2"], cwd=ROOT,
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "bytes" in proc.stdout
