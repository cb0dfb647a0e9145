"""The resumable results file and the run tag that says which rows count.

Rows append to one JSONL file, one line per finished unit, each with a key
`<run tag>|method|ratio|task|mode`. The run tag hashes everything a row
depends on: the weights, the code that computes it (`CODE_GLOBS`), the task
entries, the tokens the model reads (raw ids, or text and the identity of
the tokenizer) and the data and scoring settings. A rerun skips the units whose
key is in the file, so a killed sweep resumes without losing or
duplicating a unit, and rows computed by other code or weights never count
as done.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from experiments.sweeps import plan
from experiments.sweeps import tokens as tokens_lib
import kvjax
from kvjax import parallel
from kvjax.attention import resolve_backend
from kvjax.tasks import suite

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
# The source that defines a row (paths under ROOT): the model, cache,
# attention, generation, every transform and the method registry, the
# analysis metrics, the tasks (suite table and scoring), the batching, and
# the sweep modules that build a unit and compute its row. Reports and
# figures read rows, they do not make them: not listed.
CODE_GLOBS = (
  "kvjax/__init__.py",
  "kvjax/cache.py",
  "kvjax/model.py",
  "kvjax/attention.py",
  "kvjax/kernels.py",  # the Pallas backends (imported when chosen)
  "kvjax/generate.py",
  "kvjax/config.py",
  "kvjax/checks.py",
  "kvjax/pretrained.py",
  "kvjax/hf.py",
  "kvjax/ingest.py",  # config.ingest_passes > 1
  "kvjax/compress/*.py",
  "kvjax/parallel/*.py",
  "kvjax/analysis/*.py",
  "kvjax/tasks/*.py",
  "kvjax/train/*.py",
  "pallas_kernels/*.py",
  "pallas_kernels/*/*.py",
  "experiments/common.py",
  "experiments/sweeps/plan.py",
  "experiments/sweeps/task_data.py",
  "experiments/sweeps/units.py",
  "experiments/sweeps/metrics.py",
  "experiments/sweeps/loop.py",
  "experiments/sweeps/tokens.py",
)


def unit_key(unit: dict[str, Any], tag: str) -> str:
  """The row key of `unit` under run tag `tag`."""
  return "|".join(
    (tag, unit["method"], f"{unit['ratio']:g}", unit["task"], unit["mode"])
  )


def params_fingerprint(params, samples: int = 4096) -> str:
  """A hash of the weights: every leaf's path, shape, dtype and up to
  `samples` evenly strided values (cheap even for a large checkpoint; a
  retrained or different model changes it)."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    flat = jnp.ravel(leaf)
    stride = max(1, flat.size // samples)
    digest.update(
      f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode()
    )
    digest.update(np.asarray(flat[::stride].astype(jnp.float32)).tobytes())
  return digest.hexdigest()[:16]


def code_files() -> list[str]:
  """The source files `code_fingerprint` hashes, sorted."""
  return sorted(
    {f for g in CODE_GLOBS for f in glob.glob(os.path.join(ROOT, g))}
  )


def code_fingerprint() -> str:
  """A hash of the kvjax version and of every file of `code_files()`:
  rows computed by other code never count as done."""
  digest = hashlib.sha1(kvjax.__version__.encode())
  for path in code_files():
    digest.update(os.path.relpath(path, ROOT).encode())
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def run_tag(cfg, config, params) -> str:
  """A hash of what makes rows comparable: the weights, the code that
  computes a row (`code_fingerprint`), the task entries (names and
  generator parameters), the tokens (raw ids, or text with a hash of the
  checkpoint's tokenizer files), the data and the scoring settings. A
  rerun in a workdir whose rows came from other weights, other code,
  other task definitions or another tokenizer starts over instead of
  reusing them.

  Raises:
    ValueError: a config `tokens.resolve` refuses.
  """
  tasks = {}
  for name in plan.parse_list(cfg.tasks):
    _, entry = suite.suite_entry(name)
    tasks[name] = (entry.task, dict(entry.params))
  tokens = tokens_lib.resolve(cfg)
  tokenizer = (
    tokens_lib.fingerprint(tokens_lib.checkpoint_dir(cfg.model))
    if tokens == tokens_lib.TEXT
    else None
  )
  fields = dict(
    model=cfg.model,
    model_config=config.to_dict(),
    weights=params_fingerprint(params),
    tokens=tokens,
    tokenizer=tokenizer,
    tokenizers_version=(tokenizers.__version__ if tokenizer else None),
    code=code_fingerprint(),
    tasks=tasks,
    dtype=cfg.dtype,
    context_len=cfg.context_len,
    mqar_pairs=cfg.mqar_pairs,
    num_examples=cfg.num_examples,
    seed=cfg.seed,
    confidence=cfg.confidence,
    graph_eps=cfg.graph_eps,
    backend=resolve_backend(cfg.backend).value,
  )
  # A mesh pads capacities (bytes per token differ); one device: no field,
  # so single-device tags are what they were.
  if cfg.get("mesh", ""):
    fields["mesh"] = parallel.mesh.parse_spec(cfg.mesh, jax.device_count())
  if not cfg.get("reachability", True):  # rows without that metric
    fields["reachability"] = False
  if int(cfg.get("ingest_passes", 1)) != 1:  # a re-read context
    fields["ingest_passes"] = int(cfg.ingest_passes)
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[
    :10
  ]


def read_results(path: str) -> list[dict[str, Any]]:
  """The complete rows of a results file; a torn last line (a kill during
  a write) is cut off the file so appends stay line-aligned."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    raw = f.read()
  good = raw[: raw.rfind(b"\n") + 1]
  if len(good) != len(raw):
    print(
      f"{path}: cut a torn last line ({len(raw) - len(good)} bytes, an "
      "interrupted write); its unit runs again.",
      flush=True,
    )
    with open(path, "wb") as f:
      f.write(good)
  rows = []
  for line in good.decode().splitlines():
    if line.strip():
      rows.append(json.loads(line))
  return rows


def append_row(path: str, row: dict[str, Any]) -> None:
  """Appends `row` as one line and syncs it to disk (a kill after this
  returns cannot lose the row)."""
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())
