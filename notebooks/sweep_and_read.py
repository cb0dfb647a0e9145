# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Run a small compression sweep, then read its rows
#
# [Open in Colab](https://colab.research.google.com/github/kvjax/kvjax/blob/main/notebooks/sweep_and_read.ipynb)
# (the link assumes the placeholder repository URL of the next cell).
#
# kvjax's main job is the compression sweep (`python -m experiments.sweep`):
# methods x eviction ratios x tasks x question modes, one JSON row per
# finished unit in `<workdir>/results.jsonl`. This notebook runs a small
# sweep with the same library functions the main calls
# (`experiments.sweeps.loop.run` on a config of
# `experiments/configs/sweep.py`) into a temporary workdir, reads its rows
# back into a table, shows one of the figures the sweep writes, and then
# reads the committed results of the default sweep
# (`results/sweep/results.jsonl`).
#
# `experiments/` is not part of the pip package: the notebook runs from a
# checkout of the repository (on Colab the next cell clones it).

# %%
# On Colab: clone the repository and install it (skipped anywhere else).
import os
import subprocess
import sys

# PLACEHOLDER: the URL of the kvjax repository; change it for a fork.
KVJAX_REPO = "https://github.com/kvjax/kvjax"

if "google.colab" in sys.modules:
  checkout = "/content/kvjax"
  if not os.path.exists(checkout):
    subprocess.run(
      ["git", "clone", "--depth", "1", KVJAX_REPO, checkout], check=True
    )
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "-e", checkout + "[plot]"],
    check=True,
  )
  os.chdir(checkout)
  print(
    "Installed kvjax. If pip replaced numpy or jax, restart the session "
    "(Runtime > Restart session) and run the notebook again."
  )

# %% tags=["parameters"]
# The sweep's size. CI (tests/test_notebooks.py) runs it small through the
# KVJAX_NB_* environment variables; papermill can also override this cell.
# Lists are comma-separated, as on the sweep's command line.
METHODS = os.environ.get("KVJAX_NB_METHODS", "snapkv,streaming_llm,kivi2")
RATIOS = os.environ.get("KVJAX_NB_RATIOS", "0,0.5,0.75")
TASKS = os.environ.get("KVJAX_NB_TASKS", "needle,overwrite")
MODES = os.environ.get("KVJAX_NB_MODES", "agnostic,aware")
CONTEXT_LEN = int(os.environ.get("KVJAX_NB_CONTEXT_LEN", "256"))
EXAMPLES = int(os.environ.get("KVJAX_NB_EXAMPLES", "16"))  # rows per task
WORKDIR = os.environ.get("KVJAX_NB_WORKDIR", "")  # "": a new temp dir

# %%
import json
import tempfile


def find_checkout(start="."):
  """The kvjax checkout above `start` (the folder holding experiments/)."""
  here = os.path.abspath(start)
  while not os.path.exists(os.path.join(here, "experiments", "sweep.py")):
    parent = os.path.dirname(here)
    if parent == here:
      raise FileNotFoundError(
        "run this notebook inside a kvjax checkout: experiments/ is not "
        "part of the pip package."
      )
    here = parent
  return here


ROOT = find_checkout()
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from IPython.display import Image, Markdown, display

from experiments.configs import sweep as sweep_config
from experiments.sweeps import loop, plan, report, store

print("kvjax checkout:", ROOT)

# %% [markdown]
# ## The config
#
# `get_config()` is the default preset (the shipped `kvjax-tiny`); any
# field can be set, as `--config.<field>=<value>` does on the command line.
# `plan.plan_units` checks the config and lists the units before anything
# runs.

# %%
cfg = sweep_config.get_config()
cfg.methods = METHODS
cfg.ratios = RATIOS
cfg.tasks = TASKS
cfg.modes = MODES
cfg.context_len = CONTEXT_LEN
cfg.num_examples = EXAMPLES
cfg.workdir = WORKDIR or tempfile.mkdtemp(prefix="kvjax-sweep-")
units = plan.plan_units(cfg)
print(f"{len(units)} units into {cfg.workdir}; the first ones:")
for unit in units[:4]:
  print(" ", unit)

# %% [markdown]
# ## Run it
#
# `loop.run` is the whole sweep main: it appends one row per finished unit
# to `results.jsonl` (a rerun skips the units already there), then writes
# `summary.md`, `facts.json` and four PNG figures into the workdir.

# %%
rows = loop.run(cfg)

# %% [markdown]
# ## Read the rows
#
# `store.read_results` reads a results file: one dict per unit, refused
# units included (`status` "refused", with the reason). Below, a few fields
# of each row; the summary table above is `report.summarize(rows)`.

# %%
path = os.path.join(cfg.workdir, "results.jsonl")
rows = store.read_results(path)
print(f"{len(rows)} rows; the fields of one:")
print(json.dumps(rows[-1], indent=1)[:1200])

fields = ("mode", "method", "ratio", "task", "accuracy", "kl")
lines = ["| " + " | ".join(fields) + " | physical B/token |"]
lines.append("|" + "---|" * (len(fields) + 1))
for r in rows:
  if r.get("status") == "refused":
    continue
  cells = [f"{r[f]:.3g}" if isinstance(r[f], float) else r[f] for f in fields]
  cells.append(f"{r['physical_bytes_per_token']:.0f}")
  lines.append("| " + " | ".join(str(c) for c in cells) + " |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# One of the sweep's figures: accuracy against the compression of the KV
# bytes, per method, in both question modes.

# %%
display(Image(os.path.join(cfg.workdir, "accuracy_vs_ratio.png")))

# %% [markdown]
# ## The committed results of the default sweep
#
# `results/sweep/` holds the default run (11 methods, 5 ratios, 5 tasks,
# both modes, on `kvjax-tiny` at context 512): the same reader and summary
# apply. Below, the 2-hop walks under question-aware SnapKV, where the
# mean over tasks hides a collapse (see the README).

# %%
committed = store.read_results(
  os.path.join(ROOT, "results", "sweep", "results.jsonl")
)
print(f"{len(committed)} committed rows")
display(Markdown(report.summarize(committed)[0]))
for r in committed:
  if r["task"] != "multihop_k2" or r.get("status") == "refused":
    continue
  aware_snapkv = r["method"] == "snapkv" and r["mode"] == "aware"
  if aware_snapkv or r["method"] == plan.BASELINE:
    print(
      f"{r['mode']:>8} {r['method']:>7} ratio {r['ratio']:<4g} "
      f"accuracy {r['accuracy']:.2f}  GER {r['ger']:.2f}"
    )
display(Image(os.path.join(ROOT, "results", "sweep", "accuracy_vs_ratio.png")))
