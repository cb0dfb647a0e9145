"""The notebooks (notebooks/*.ipynb) run headless with small sizes, and each
.ipynb is its .py twin (jupytext, percent format) with outputs stripped.

One test per notebook, so pytest-xdist spreads them. Each runs in a fresh
ipykernel (nbclient) whose environment sets the notebook's KVJAX_NB_*
parameters small; the sharded notebook gets 8 simulated CPU devices, and
every kernel compiles without XLA's backend optimizations (`FAST_COMPILE`). The
executed notebooks (cell outputs included) are written to
$KVJAX_NOTEBOOK_LOGS when it is set, else to pytest's tmp_path, as
`<name>.ipynb` and a plain-text `<name>.log`.

  python -m pytest -q tests/test_notebooks.py
  KVJAX_NOTEBOOK_LOGS=/tmp/nb python -m pytest -q tests/test_notebooks.py
  jupytext --sync notebooks/*.py      # after editing a .py: rewrite .ipynb
"""

import os
import resource
import time

import jupytext
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS_DIR = os.path.join(ROOT, "notebooks")
# name -> the environment of its kernel: the small sizes CI runs.
SMALL = {
  "quickstart": {
    "KVJAX_NB_BATCH": "8",
    # The figure reuses the two generate calls before it: no new compile.
    "KVJAX_NB_METHODS": "snapkv+kivi2",
    "KVJAX_NB_RATIOS": "0,0.5",
  },
  "sweep_and_read": {
    "KVJAX_NB_METHODS": "snapkv",
    "KVJAX_NB_RATIOS": "0,0.5",
    "KVJAX_NB_TASKS": "needle",
    "KVJAX_NB_MODES": "agnostic",
    "KVJAX_NB_CONTEXT_LEN": "128",
    "KVJAX_NB_EXAMPLES": "8",
  },
  "sharded_long_context": {
    "KVJAX_NB_BATCH": "2",
    "KVJAX_NB_CONTEXT_LEN": "512",
  },
}
# The sharded notebook's kernel: 8 simulated CPU devices.
DEVICES = {"sharded_long_context": 8}
# At these sizes the notebooks spend most of their time compiling, and most
# of a compile in LLVM's optimizations: without them each notebook runs in
# about half the time (measured on the 2-core machine). Both sides of the
# sharded notebook's token comparison compile with the same flags.
FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_llvm_disable_expensive_passes=true",
)
NOTEBOOKS = tuple(SMALL)
CELL_TIMEOUT_S = 600


def _paths(name):
  base = os.path.join(NOTEBOOKS_DIR, name)
  return base + ".py", base + ".ipynb"


def _xla_flags(name):
  """The kernel's XLA_FLAGS: the inherited ones without a device count,
  `FAST_COMPILE`, and the notebook's device count if it has one."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags += FAST_COMPILE
  if name in DEVICES:
    flags.append(f"--xla_force_host_platform_device_count={DEVICES[name]}")
  return " ".join(flags)


def _children_cpu():
  """CPU seconds of this process's finished children (the kernels)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _log(nb, path):
  """The cells' sources and text outputs, one block per cell."""
  with open(path, "w") as f:
    for i, cell in enumerate(nb.cells):
      f.write(f"# ---- cell {i} ({cell.cell_type})\n{cell.source}\n")
      for out in cell.get("outputs", ()):
        if out.output_type == "stream":
          f.write(out.text)
        elif out.output_type == "error":
          f.write("\n".join(out.traceback) + "\n")
        elif "text/plain" in out.get("data", {}):
          f.write(out.data["text/plain"] + "\n")
        if "image/png" in out.get("data", {}):
          f.write("[image/png]\n")


def test_notebooks_are_listed():
  names = sorted(
    f[: -len(".ipynb")]
    for f in os.listdir(NOTEBOOKS_DIR)
    if f.endswith(".ipynb")
  )
  assert names == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_ipynb_matches_py_twin(name):
  py, ipynb = _paths(name)
  nb = nbformat.read(ipynb, as_version=4)
  with open(py) as f:
    text = f.read()
  assert jupytext.writes(nb, fmt="py:percent") == text, (
    f"{ipynb} is out of sync with {py}: run `jupytext --sync {py}`"
  )
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
        f"{ipynb}: commit it without outputs (`jupytext --sync` from a "
        "fresh .ipynb, or clear the outputs)"
      )
  first_code = next(c for c in nb.cells if c.cell_type == "code")
  assert "google.colab" in first_code.source and "KVJAX_REPO" in (
    first_code.source
  )
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", ())]
  assert len(tagged) == 1, f"{ipynb}: one cell tagged 'parameters'"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
  _, ipynb = _paths(name)
  nb = nbformat.read(ipynb, as_version=4)
  env = {k: v for k, v in os.environ.items() if not k.startswith("KVJAX_NB_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(name), **SMALL[name])
  env["KVJAX_NB_WORKDIR"] = str(tmp_path / "workdir")
  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": NOTEBOOKS_DIR}},
  )
  logs = os.environ.get("KVJAX_NOTEBOOK_LOGS") or str(tmp_path)
  os.makedirs(logs, exist_ok=True)
  start, cpu = time.perf_counter(), _children_cpu()
  try:
    client.execute(env=env)
  finally:
    seconds = time.perf_counter() - start
    nbformat.write(nb, os.path.join(logs, name + ".ipynb"))
    _log(nb, os.path.join(logs, name + ".log"))
    print(
      f"{name}: {seconds:.1f} s wall, {_children_cpu() - cpu:.1f} s CPU of "
      f"the kernel; outputs in {logs}/{name}.log"
    )
