"""The README's promises: the library example runs, the main job runs."""

import os
import re
import subprocess
import sys

from kvjax import kv_bytes as kvjax_bytes

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


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
  assert kvjax_bytes(namespace["small"]) < 0.15 * kvjax_bytes(namespace["full"])
  sharded, single = namespace["sharded"], namespace["single"]
  assert (sharded.tokens == single.tokens).all()
  assert len(namespace["parallel"].device_bytes(sharded.cache)) == len(
    namespace["jax"].devices()
  )


def test_ci_calls_the_readme_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert "bash launch/test.sh" in f.read()
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert "bash launch/test.sh" in readme and "bash launch/local.sh" in readme


def test_main_job_default_runs(tmp_path):
  with open(os.path.join(ROOT, "launch", "local.sh")) as f:
    module = re.search(r"python -m (\S+)", f.read()).group(1)
  assert module == "experiments.sweep"
  # The default config (kvjax-tiny) on fewer methods, ratios, tasks and
  # rows, so the test stays quick; the full default is what the README shows.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      module,
      "--config.methods=snapkv,kivi2",
      "--config.ratios=0,0.9",
      "--config.tasks=needle",
      "--config.num_examples=4",
      "--config.context_len=128",
      f"--config.workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| agnostic | snapkv | 0.9 |" in proc.stdout
  for name in (
    "results.jsonl",
    "summary.md",
    "accuracy_vs_ratio.png",
    "ger_vs_hallucination.png",
    "active_support.png",
    "bytes_per_token.png",
  ):
    assert (tmp_path / name).exists(), name
