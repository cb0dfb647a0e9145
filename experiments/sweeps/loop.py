"""Runs or resumes a sweep: plan the units, skip those already stored, run
the rest (each row appended as it finishes), then write the summary, the
facts and the figures.

Every row says what the model read (`tokens.Tokens.row_fields`: "tokens"
is "text" with the tokenizer's hash, or "raw") and `context_len`, the
context in the model's tokens.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import numpy as np
import tqdm

from experiments import common
from experiments.sweeps import figures
from experiments.sweeps import metrics
from experiments.sweeps import plan
from experiments.sweeps import report
from experiments.sweeps import store
from experiments.sweeps import tokens as tokens_lib
from experiments.sweeps import units
from experiments.sweeps.task_data import TaskData
from kvjax import model as model_lib
from kvjax import parallel
from kvjax.compress import registry


def run(cfg) -> list[dict[str, Any]]:
  """Runs (or resumes) the sweep of `cfg`; returns every row of this run
  (every row of the workdir's results file with this run's tag).

  With `cfg.mesh` ("seq:8", "data:2,seq:4", ...) every step runs under
  that mesh over all devices (of every process, when launched as several:
  `kvjax.parallel.initialize`); process 0 alone writes.

  Raises:
    ValueError: a bad config (before anything is written: an hf:PATH
      without tokenizer.json among them, unless config.tokens=raw), or
      task rows the model cannot read (raw ids past its vocabulary, text
      the tokenizer cannot map; before any row is written).
  """
  mesh = parallel.make_mesh(cfg.mesh) if cfg.get("mesh", "") else None
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return _run(cfg)


def _rows(path, planned, tag) -> list[dict[str, Any]]:
  """This config's rows of the results file (the workdir may hold other
  methods' rows)."""
  keys = {store.unit_key(u, tag) for u in planned}
  return [r for r in store.read_results(path) if r["key"] in keys]


def _run(cfg) -> list[dict[str, Any]]:
  writer = jax.process_index() == 0
  planned = plan.plan_units(cfg)
  path = os.path.join(cfg.workdir, "results.jsonl")
  config, params = common.load_model(cfg.model, cfg.dtype)
  learned = [
    m
    for m in plan.parse_list(cfg.methods, field="methods")
    if registry.is_learned(m)
  ]
  if learned and not model_lib.has_write_gate(params):
    raise ValueError(
      f"config.methods has learned methods {learned}, which read a model's "
      f"write gates; config.model={cfg.model!r} has none (use "
      "config.model=kvjax-tiny-spkv: the 'spkv' preset)."
    )
  tokens = tokens_lib.load(cfg)
  tag = store.run_tag(cfg, config, params)
  # Only the writer reads its file: another process's copy (an unshared
  # workdir, or a damaged one) must not make it diverge or fail alone.
  done = {r["key"] for r in store.read_results(path)} if writer else set()
  todo = [store.unit_key(u, tag) not in done for u in planned]
  if jax.process_count() > 1:
    # Process 0's file decides (the others write none): every process runs
    # the same units, so the same collectives, in the same order.
    from jax.experimental import multihost_utils

    todo = multihost_utils.broadcast_one_to_all(np.array(todo, bool))
  todo = [u for u, t in zip(planned, todo) if t]
  print(
    f"sweep: {len(planned)} units, {len(planned) - len(todo)} already "
    f"in {path}, model {cfg.model} ({config.num_layers} layers), "
    f"{tokens.describe()}",
    flush=True,
  )
  task_data = {}

  def task(name):
    if name not in task_data:
      task_data[name] = TaskData(cfg, config, params, name, tokens)
    return task_data[name]

  limit = int(cfg.stop_after_units) or len(todo)
  compiled, computed = set(), []
  # Every task is built (and so checked) before the first row is written.
  for name in sorted({u["task"] for u in todo[:limit]}):
    task(name)
  if writer:
    os.makedirs(cfg.workdir, exist_ok=True)
  for unit in tqdm.tqdm(todo[:limit], desc="sweep", dynamic_ncols=True):
    td = task(unit["task"])
    # Text tasks may differ in shape: each shape compiles its own program.
    program = (unit["method"], unit["ratio"], unit["mode"], td.L, td.T)
    if unit["method"] != plan.BASELINE and registry.is_learned(unit["method"]):
      # Its capacity is the gate's largest head budget on these rows.
      program += (unit["task"],)
    row = units.run_unit(cfg, td, unit)
    row.update(
      key=store.unit_key(unit, tag),
      model=cfg.model,
      context_len=td.L,
      ingest_passes=td.passes,
      **tokens.row_fields(),
      includes_compile=program not in compiled,
    )
    compiled.add(program)
    computed.append(row)
    if writer:
      store.append_row(path, row)
  if len(todo) > limit:
    print(f"stopped after {limit} units; rerun to resume.")
    return _rows(path, planned, tag) if writer else computed
  # Every process builds every task (their steps are collectives).
  for name in plan.parse_list(cfg.tasks):
    task(name)
  support = metrics.active_support(task_data, float(cfg.support_share))
  if not writer:  # the rows are process 0's to write and report
    return computed
  rows = _rows(path, planned, tag)
  text = report.write(cfg, rows, support)
  if cfg.plots:
    figures.plot(rows, support, cfg.workdir)
  print(text)
  if report.refused(rows):
    print(
      f"{len(report.refused(rows))} units refused by their transform "
      "(listed above and in summary.md)."
    )
  print(
    "active support (median keys for "
    f"{cfg.support_share:g} of the mass) per layer: "
    f"{support['median_per_layer']}"
  )
  return rows
