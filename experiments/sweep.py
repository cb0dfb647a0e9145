"""Compression sweep: methods x ratios x tasks x question modes.

kvjax's main job (`bash launch/local.sh`). For every unit (method, ratio,
task, mode) it prefills the task contexts, compresses the cache, feeds the
question teacher-forced and records accuracy, hallucination and abstention
rates, the Global Eviction Ratio of the answer-critical tokens (and per
layer: evicted from every head of that layer), their reachability in the
token-attention graph, the KL of the answer distribution to the
uncompressed model, the physical and logical bytes of the compressed
cache, and the wall time. Rows append to
`<workdir>/results.jsonl` (one per finished unit); a rerun skips the units
already there, so a killed sweep resumes without losing or duplicating a
unit. At the end it prints a summary table, writes `summary.md`,
`support.json` and the figures.

Question modes:
  agnostic  prefill the context with the transform (its observation window
            is the end of the context), then ask the question;
  aware     prefill the context, compress it while observing the question's
            queries (`kvjax.compress_observing`; the question proper,
            `kvjax.tasks.question_mask`, so no answer and nothing that
            follows from one), then ask the question.

  python -m experiments.sweep                       # the default (kvjax-tiny)
  python -m experiments.sweep --config=experiments/configs/sweep.py:smoke
  python -m experiments.sweep --config.model=hf:/path/to/checkpoint
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import tqdm

from experiments import common
from experiments.configs import sweep as sweep_config
import kvjax
from kvjax import compress
from kvjax import model as model_lib
from kvjax.analysis import graph as graph_lib
from kvjax.attention import resolve_backend
from kvjax.analysis import support as support_lib
from kvjax.cache import coded_share, kv_bytes, logical_bytes
from kvjax.tasks import generators, scoring
from kvjax.train import data as data_lib
from kvjax.train import evaluate

# Eviction policies: ratio -> transform.
EVICTION = {
    "snapkv": compress.snapkv,
    "h2o": compress.h2o,
    "streaming_llm": compress.streaming_llm,
    "tova": compress.tova,
    "adakv_snapkv": lambda r: compress.adakv("snapkv", r),
    "pyramidkv": compress.pyramidkv,
    "knorm": compress.knorm,
    "expected_attention": compress.expected_attention,
    "random": compress.random,
    "oracle": compress.oracle,
}
# Codecs: no ratio; () -> transform.
QUANTIZERS = {
    "kivi2": lambda: compress.kivi(2),
    "kivi4": lambda: compress.kivi(4),
    "int4": lambda: compress.uniform(4),
    "fp8": compress.fp8,
    "turboquant2": lambda: compress.turboquant(2),
    "turboquant3": lambda: compress.turboquant(3),
    "qjl": compress.qjl,
    "polarquant": compress.polarquant,
}
MODES = ("agnostic", "aware")


def method_transform(method: str, ratio: float):
  """The transform of `method` at eviction `ratio` (None: uncompressed).

  Transforms compare by value, so the transform built anew for each unit
  reuses the program compiled for the first task.

  Raises:
    ValueError: unknown method, or a ratio given to a quantizer.
  """
  if method == "none":
    return None
  if "+" in method:
    evict, quant = method.split("+", 1)
    if evict not in EVICTION or quant not in QUANTIZERS:
      raise ValueError(f"method {method!r}: compose an eviction policy "
                       f"{sorted(EVICTION)} with a quantizer "
                       f"{sorted(QUANTIZERS)} as 'policy+quantizer'.")
    return compress.chain(EVICTION[evict](ratio), QUANTIZERS[quant]())
  if method in EVICTION:
    return EVICTION[method](ratio)
  if method in QUANTIZERS:
    return QUANTIZERS[method]()
  raise ValueError(f"unknown method {method!r}; allowed: "
                   f"{sorted(EVICTION) + sorted(QUANTIZERS)} or "
                   "'policy+quantizer'.")


def _split(value, cast=str, field: str = "value") -> list:
  """A comma-separated string (or a sequence) as a list of `cast`."""
  items = ([v for v in value.split(",") if v.strip()]
           if isinstance(value, str) else value)
  try:
    return [cast(v.strip()) if isinstance(v, str) else cast(v)
            for v in items]
  except (TypeError, ValueError):
    raise ValueError(f"config.{field}={value!r} is not a comma-separated "
                     f"list of {cast.__name__} values.") from None


def _check_number(cfg, field: str, cast, lo, hi=None, lo_open=False,
                  hi_open=False) -> None:
  value = cfg[field]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok and cast is int:
    ok = float(value).is_integer()
  if ok:
    v = float(value)
    ok = np.isfinite(v) and (v > lo if lo_open else v >= lo) and (
        hi is None or (v < hi if hi_open else v <= hi))
  if not ok:
    interval = (("(" if lo_open else "[") + f"{lo:g}, " +
                ("inf)" if hi is None else f"{hi:g}" +
                 (")" if hi_open else "]")))
    raise ValueError(f"config.{field}={value!r}: must be {cast.__name__} in "
                     f"{interval}.")


def validate_config(cfg) -> None:
  """Checks every field before anything runs or any file is written.

  Raises:
    ValueError: a field out of its range, or a list field that does not
      parse, naming the field and what is allowed.
  """
  for field, cast, lo, hi, lo_open, hi_open in (
      ("context_len", int, 1, None, False, False),
      ("mqar_pairs", int, 1, None, False, False),
      ("num_examples", int, 1, None, False, False),
      ("seed", int, 0, None, False, False),
      ("support_share", float, 0, 1, True, False),
      ("graph_eps", float, 0, 1, True, True),
      ("confidence", float, 0, 1, False, False),
      ("stop_after_units", int, 0, None, False, False)):
    _check_number(cfg, field, cast, lo, hi, lo_open, hi_open)
  if cfg.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.dtype={cfg.dtype!r}; allowed: float32, "
                     "bfloat16, float16.")
  for field in ("methods", "tasks", "modes"):
    if not _split(cfg[field], field=field):
      raise ValueError(
          f"config.{field} is empty; name at least one (the uncompressed "
          "baseline runs with every sweep, it is not a method)."
          if field == "methods" else f"config.{field} is empty.")
  if not _split(cfg.ratios, float, "ratios"):
    raise ValueError("config.ratios is empty.")
  try:
    resolve_backend(cfg.backend)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.backend={cfg.backend!r}: {e}") from None


def plan_units(cfg) -> list[dict[str, Any]]:
  """Every unit of the sweep, in run order (transform-major, so a compiled
  transform serves all tasks before the next one compiles)."""
  validate_config(cfg)
  methods = _split(cfg.methods, field="methods")
  ratios = _split(cfg.ratios, float, "ratios")
  tasks = _split(cfg.tasks, field="tasks")
  modes = _split(cfg.modes, field="modes")
  for m in methods:
    method_transform(m, 0.5)  # validates the name
  for r in ratios:
    if not 0.0 <= r < 1.0:
      raise ValueError(f"ratios must be in [0, 1), got {r}.")
  for t in tasks:
    _suite_entry(t)  # validates the name
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; allowed: {MODES}.")
  configs = [("none", 0.0)]
  for m in methods:
    if m in QUANTIZERS:
      configs.append((m, 0.0))
    else:
      configs += [(m, r) for r in ratios if r > 0]
  return [dict(method=m, ratio=r, task=t, mode=mode)
          for mode in modes for m, r in configs for t in tasks
          if not (m == "none" and mode == "aware")]


def _suite_entry(name: str) -> tuple[int, str, dict[str, Any]]:
  """(index, task, generator params) of the `evaluate.SUITE` entry `name`
  (the index seeds the entry's rows)."""
  for index, (entry_name, task, params) in enumerate(evaluate.SUITE):
    if entry_name == name:
      return index, task, dict(params)
  raise ValueError(f"unknown task {name!r}; allowed: "
                   f"{sorted(n for n, _, _ in evaluate.SUITE)}.")


def unit_key(unit: dict[str, Any], tag: str) -> str:
  return f"{tag}|{unit['method']}|{unit['ratio']:g}|{unit['task']}|{unit['mode']}"


def params_fingerprint(params, samples: int = 4096) -> str:
  """A hash of the weights: every leaf's path, shape, dtype and up to
  `samples` evenly strided values (cheap even for a large checkpoint; a
  retrained or different model changes it)."""
  digest = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    flat = jnp.ravel(leaf)
    stride = max(1, flat.size // samples)
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}"
                  .encode())
    digest.update(np.asarray(flat[::stride].astype(jnp.float32)).tobytes())
  return digest.hexdigest()[:16]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The source that defines a row: the model, cache, attention, generation,
# every transform, the analysis metrics, the tasks and their scoring, and
# this file (the unit's own metrics).
CODE_GLOBS = ("kvjax/__init__.py", "kvjax/cache.py", "kvjax/model.py",
              "kvjax/attention.py", "kvjax/generate.py", "kvjax/config.py",
              "kvjax/checks.py", "kvjax/pretrained.py", "kvjax/hf.py",
              "kvjax/compress/*.py", "kvjax/analysis/*.py",
              "kvjax/tasks/*.py", "kvjax/train/evaluate.py",
              "kvjax/train/data.py", "experiments/sweep.py",
              "experiments/common.py")


def code_files() -> list[str]:
  """The source files `code_fingerprint` hashes, sorted."""
  return sorted({f for g in CODE_GLOBS
                 for f in glob.glob(os.path.join(_ROOT, g))})


def code_fingerprint() -> str:
  """A hash of the kvjax version and of every file of `code_files()`:
  rows computed by other code never count as done."""
  digest = hashlib.sha1(kvjax.__version__.encode())
  for path in code_files():
    digest.update(os.path.relpath(path, _ROOT).encode())
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def run_tag(cfg, params) -> str:
  """A hash of what makes rows comparable: the weights, the code that
  computes a row (`code_fingerprint`), the task entries (names and
  generator parameters), the data and the scoring settings. A rerun in a
  workdir whose rows came from other weights, other code or other task
  definitions starts over instead of reusing them."""
  tasks = {name: _suite_entry(name)[1:] for name in _split(cfg.tasks)}
  fields = dict(model=cfg.model, weights=params_fingerprint(params),
                code=code_fingerprint(), tasks=tasks, dtype=cfg.dtype,
                context_len=cfg.context_len,
                mqar_pairs=cfg.mqar_pairs, num_examples=cfg.num_examples,
                seed=cfg.seed, confidence=cfg.confidence,
                graph_eps=cfg.graph_eps,
                backend=resolve_backend(cfg.backend).value)
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest(
  )[:10]


def read_results(path: str) -> list[dict[str, Any]]:
  """The complete rows of a results file; a torn last line (a kill during
  a write) is cut off the file so appends stay line-aligned."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    raw = f.read()
  good = raw[:raw.rfind(b"\n") + 1]
  if len(good) != len(raw):
    with open(path, "wb") as f:
      f.write(good)
  rows = []
  for line in good.decode().splitlines():
    if line.strip():
      rows.append(json.loads(line))
  return rows


# ----------------------------------------------------------------------------
# Per-task data: batch, uncompressed reference, prefill attention graph.


@functools.partial(jax.jit, static_argnames=("config", "capture", "backend"))
def _question(params, cache, question, mask, *, config, backend,
              capture=("attn_probs",)):
  """Teacher-forced question on a (compressed) cache, with attention."""
  logits, cache, aux = model_lib.forward(params, question, cache,
                                         config=config, token_mask=mask,
                                         capture=capture, backend=backend)
  return logits, aux, cache.pos, cache.valid, cache.end


def _ask(params, cache, question, mask, *, config, backend,
         capture=("attn_probs",)):
  """`_question`, refusing a cache the question did not fit into (under
  jit the writes past capacity would be dropped: the question lost)."""
  logits, aux, pos, valid, end = _question(params, cache, question, mask,
                                           config=config, backend=backend,
                                           capture=capture)
  most = int(np.max(np.asarray(end)))
  if most > cache.capacity:
    raise ValueError(f"the question needs {most} cache slots, the compressed "
                     f"cache has {cache.capacity}: the transform did not "
                     "honour its reserve.")
  return logits, aux, pos, valid


@functools.partial(jax.jit, static_argnames=("config", "capacity", "backend"))
def _prefill(params, context, *, config, capacity, backend):
  """The uncompressed prefill and what every transform may observe."""
  cache = kvjax.init_cache(config, context.shape[0], capacity)
  _, cache, aux = model_lib.forward(params, context, cache, config=config,
                                    capture=_OBSERVED, backend=backend)
  return cache, aux


_OBSERVED = ("q", "q_pre_rope", "attn_mass")


@functools.partial(jax.jit, static_argnames=("config", "capacity", "backend"))
def _prefill_probs(params, tokens, *, config, capacity, backend):
  cache = kvjax.init_cache(config, tokens.shape[0], capacity)
  _, cache, aux = model_lib.forward(params, tokens, cache, config=config,
                                    capture=("attn_probs",), backend=backend)
  return aux["attn_probs"], cache.pos, cache.valid


class TaskData:
  """One task's rows and everything every unit of the task compares to."""

  def __init__(self, cfg, config, params, name):
    index, task, task_params = _suite_entry(name)
    if task == "mqar":
      task_params["num_pairs"] = int(cfg.mqar_pairs)
    L = int(cfg.context_len)
    batch = generators.make_batch(task, int(cfg.num_examples),
                                  seed=(int(cfg.seed), index),
                                  context_len=L, **task_params)
    width = L + 1 + 2 * int(cfg.mqar_pairs)  # every task: one shape
    self.batch = data_lib.pad_batch(batch, max(width, batch.tokens.shape[1]))
    self.name, self.L = name, L
    T = self.batch.tokens.shape[1]
    self.T, self.Tq = T, T - L
    tokens = jnp.asarray(self.batch.tokens)
    self.context, self.question = tokens[:, :L], tokens[:, L:]
    positions = L + np.arange(self.Tq)
    real = positions[None, :] < self.batch.lengths[:, None]  # [B, Tq]
    self.qmask = jnp.asarray(real)
    # The question proper: no answer, nothing that follows from one.
    self.observe_mask = jnp.asarray(
        generators.question_mask(self.batch)[:, L:])
    self.query_pos = np.where(real, positions[None, :], -1)  # [B, Tq]
    # Rows predicting answers: the input position before each answer.
    valid = self.batch.answer_positions >= 0
    self.sources = np.where(valid, self.batch.answer_positions - 1, -1)
    self.targets = self.batch.critical_positions

    self.config, self.params = config, params
    self.backend = resolve_backend(cfg.backend)
    # One prefill serves every unit: agnostic transforms observe the end of
    # the context, aware ones the question's own queries.
    self.cache, self.context_observed = _prefill(params, self.context,
                                                 config=config, capacity=T,
                                                 backend=self.backend)
    B = self.context.shape[0]
    self.context_pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    self.context_mask = jnp.ones((B, L), bool)
    logits, aux, _, _ = _ask(params, self.cache, self.question, self.qmask,
                             config=config, backend=self.backend,
                             capture=("q", "q_pre_rope", "attn_probs"))
    probs = aux["attn_probs"]
    self.logits = np.asarray(logits)
    self.question_observed = dict(
        q=aux["q"], q_pre_rope=aux["q_pre_rope"],
        attn_mass=jnp.einsum("lbnts,bt->lbns", probs,
                             self.observe_mask.astype(jnp.float32)))
    self.question_pos = jnp.asarray(np.maximum(self.query_pos, 0))
    # Oracle input: what the question's real queries pay to each slot.
    self.future_mass = jnp.einsum("lbnts,bt->lbns", probs,
                                  self.qmask.astype(jnp.float32))
    self.prefill_graph = self._prefill_graph(cfg)
    self.support = np.asarray(support_lib.active_support(
        self._answer_rows(probs), share=float(cfg.support_share)))

  def _answer_rows(self, probs):
    """probs [L, B, N, Tq, S] at the rows predicting answers -> [L,B,N,A,S]."""
    idx = np.maximum(self.sources - self.L, 0)  # [B, A]
    return jnp.take_along_axis(probs, jnp.asarray(idx)[None, :, None, :, None],
                               axis=3)

  def _prefill_graph(self, cfg, rows: int = 8):
    """Token-attention graph inside the context (full attention), [L,B,T,T]."""
    parts = []
    B = self.context.shape[0]
    for i in range(0, B, rows):
      probs, pos, valid = _prefill_probs(self.params, self.context[i:i + rows],
                                         config=self.config, capacity=self.L,
                                         backend=self.backend)
      n = probs.shape[1]
      qpos = np.broadcast_to(np.arange(self.L), (n, self.L))
      parts.append(graph_lib.token_graph(
          probs, jnp.asarray(qpos), pos, valid, num_positions=self.T,
          eps=float(cfg.graph_eps)))
    return jnp.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------
# One unit.


def _kl(p_logits, q_logits, mask):
  """Mean KL(p || q) of next-token distributions over the True slots."""
  lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
  lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
  kl = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
  return float(kl[mask].mean()) if mask.any() else 0.0


def _answer_logits(td: TaskData, logits):
  """[B, Tq, V] question logits -> [B, A, V] at the answer-predicting rows."""
  idx = np.maximum(td.sources - td.L, 0)
  return np.take_along_axis(np.asarray(logits), idx[:, :, None], axis=1)


def compress_unit(td: TaskData, unit: dict[str, Any]):
  """The task's prefilled cache compressed as `unit` says (method, ratio,
  mode); the uncompressed cache for "none"."""
  transform = method_transform(unit["method"], unit["ratio"])
  if transform is None:
    return td.cache
  extra = {}
  if unit["method"].split("+")[0] == "oracle":
    extra["future_mass"] = td.future_mass
  if unit["mode"] == "agnostic":
    return kvjax.compress_cache(
        td.cache, transform, config=td.config,
        observed=td.context_observed, positions=td.context_pos,
        mask=td.context_mask, reserve=td.Tq, **extra)
  # The same as kvjax.compress_observing, reusing the question run.
  return kvjax.compress_cache(
      td.cache, transform, config=td.config,
      observed=td.question_observed, positions=td.question_pos,
      mask=td.observe_mask, reserve=td.Tq, **extra)


def run_unit(cfg, td: TaskData, unit: dict[str, Any]) -> dict[str, Any]:
  """One unit's row; a transform that refuses the input (it would compress
  nothing, `compress.Degenerate`) gives a row marked "refused" with the
  reason and no metrics."""
  t0 = time.perf_counter()
  refuse = lambda reason: dict(
      method=unit["method"], ratio=unit["ratio"], task=unit["task"],
      mode=unit["mode"], status="refused", reason=reason)
  try:
    cache = compress_unit(td, unit)
  except compress.Degenerate as e:
    return refuse(str(e))
  codec = unit["method"].split("+")[-1]
  if codec in QUANTIZERS and max(coded_share(cache)) == 0:
    return refuse(f"{codec} stored none of the kept entries coded (all in "
                  "its full-precision window): not a compressed unit.")
  logits, aux, pos, valid = _ask(td.params, cache, td.question, td.qmask,
                                 config=td.config, backend=td.backend)
  probs = aux["attn_probs"]
  logits = np.asarray(logits)
  seconds = time.perf_counter() - t0

  predicted, confidence = scoring.predictions_from_logits(
      td.batch, logits, offset=td.L)
  score = scoring.score(td.batch, predicted, confidence=confidence,
                        threshold=float(cfg.confidence))
  task_score = score["all"]
  answers = td.batch.answer_positions >= 0
  kl = _kl(_answer_logits(td, td.logits), _answer_logits(td, logits), answers)
  has_targets = (td.targets >= 0).any(axis=1)
  if has_targets.any():
    ger = graph_lib.global_eviction_ratio(cache.pos, cache.valid, td.targets)
    ger = float(np.asarray(ger)[has_targets].mean())
    # Evicted from every head of one layer: the lookup layer's loss can
    # break an answer that GER (every layer) still calls kept.
    ger_per_layer = graph_lib.global_eviction_ratio(
        cache.pos, cache.valid, td.targets, per_layer=True)
    ger_per_layer = [round(float(x), 6) for x in
                     np.asarray(ger_per_layer)[:, has_targets].mean(axis=1)]
    q_graph = graph_lib.token_graph(
        probs, jnp.asarray(td.query_pos), pos, valid, num_positions=td.T,
        eps=float(cfg.graph_eps))
    reach = np.asarray(graph_lib.reachable(
        graph_lib.merge_graphs(td.prefill_graph, q_graph), td.sources,
        td.targets))
    reachability = float(reach[td.targets >= 0].mean())
  else:  # abstention: nothing in the context answers the question
    ger = reachability = ger_per_layer = None
  tokens = td.batch.batch_size * td.L
  return dict(
      method=unit["method"], ratio=unit["ratio"], task=unit["task"],
      mode=unit["mode"], status="ok", accuracy=task_score.accuracy,
      hallucination_rate=task_score.hallucination_rate,
      abstention_rate=task_score.abstention_rate,
      exact_match=task_score.exact_match, ger=ger,
      ger_per_layer=ger_per_layer, reachability=reachability, kl=kl,
      physical_bytes_per_token=kv_bytes(cache) / tokens,
      logical_bytes_per_token=logical_bytes(cache) / tokens,
      coded_share=list(coded_share(cache)),
      seconds=round(seconds, 4), num_examples=task_score.num_examples,
      num_answers=task_score.num_answers)


# ----------------------------------------------------------------------------
# Summary and figures.


def pearson(x, y) -> float:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def _mean(rows, field):
  vals = [r[field] for r in rows if r.get(field) is not None]
  return float(np.mean(vals)) if vals else float("nan")


def _seconds(rows) -> float:
  """Mean unit time, leaving out units that paid a compile when any did not."""
  warm = [r for r in rows if not r.get("includes_compile", False)]
  return _mean(warm or rows, "seconds")


def refused(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows of units a transform refused (no metrics)."""
  return [r for r in rows if r.get("status") == "refused"]


def summarize(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
  """Markdown summary table + facts (collapse ratios, Pearson r).

  Refused units are listed under the table, never averaged into it; a
  codec that stored part of the kept entries uncoded shows it in the
  "coded" column (the share of kept keys stored by the codec).
  """
  skipped = refused(rows)
  rows = [r for r in rows if r.get("status") != "refused"]
  base = {}
  for r in rows:
    if r["method"] == "none":
      base[r["task"]] = r
  base_bytes = _mean(list(base.values()), "logical_bytes_per_token")
  groups = {}
  for r in rows:
    modes = MODES if r["method"] == "none" else (r["mode"],)
    for mode in modes:
      groups.setdefault((mode, r["method"], r["ratio"]), []).append(r)
  lines = ["| mode | method | ratio | accuracy | hallucination | abstention "
           "| GER | reachability | KL | bytes/token (phys) | bytes/token "
           "(logical) | compression (bytes) | coded | s/unit |",
           "|" + "---|" * 14]
  for (mode, method, ratio), rs in sorted(
      groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "none",
                                      kv[0][1], kv[0][2])):
    logical = _mean(rs, "logical_bytes_per_token")
    coded = [r["coded_share"][0] for r in rs if r.get("coded_share")]
    coded = (f"{np.mean(coded):.2f}" if coded and method.split("+")[-1] in
             QUANTIZERS else "-")
    lines.append(
        f"| {mode} | {method} | {ratio:g} | {_mean(rs, 'accuracy'):.3f} | "
        f"{_mean(rs, 'hallucination_rate'):.3f} | "
        f"{_mean(rs, 'abstention_rate'):.3f} | {_mean(rs, 'ger'):.3f} | "
        f"{_mean(rs, 'reachability'):.3f} | {_mean(rs, 'kl'):.3f} | "
        f"{_mean(rs, 'physical_bytes_per_token'):.0f} | {logical:.0f} | "
        f"{1 - logical / base_bytes:.3f} | {coded} | {_seconds(rs):.3f} |")
  facts = {"collapse_ratio": {}, "pearson_ger_hallucination": {}}
  base_acc = _mean(list(base.values()), "accuracy")
  for (mode, method, ratio), rs in sorted(groups.items()):
    if method == "none" or method not in EVICTION and "+" not in method:
      continue
    key = f"{mode}/{method}"
    if _mean(rs, "accuracy") < 0.5 * base_acc:
      prev = facts["collapse_ratio"].get(key)
      if prev is None or ratio < prev:
        facts["collapse_ratio"][key] = ratio
  evict_rows = [r for r in rows if r["method"] != "none"
                and r["ger"] is not None
                and (r["method"] in EVICTION or "+" in r["method"])]
  for mode in MODES + ("all",):
    rs = [r for r in evict_rows if mode in ("all", r["mode"])]
    facts["pearson_ger_hallucination"][mode] = pearson(
        [r["ger"] for r in rs], [r["hallucination_rate"] for r in rs])
  facts["baseline_accuracy"] = {t: r["accuracy"] for t, r in base.items()}
  text = "\n".join(lines)
  text += ("\n\nCollapse (first ratio where the mean accuracy over tasks "
           "falls below half the uncompressed one): " + json.dumps(
               facts["collapse_ratio"]))
  text += ("\n\nPearson r of GER vs hallucination rate (eviction units): "
           + json.dumps({k: round(v, 3) for k, v in
                         facts["pearson_ger_hallucination"].items()}))
  facts["refused"] = sorted({(r["mode"], r["method"], r["ratio"])
                             for r in skipped})
  if skipped:
    reasons = {}
    for r in skipped:
      reasons.setdefault((r["mode"], r["method"], r["ratio"]), r["reason"])
    text += "\n\nRefused (the transform would compress nothing; no row):"
    for (mode, method, ratio), reason in sorted(reasons.items()):
      text += f"\n- {mode} {method} {ratio:g}: {reason}"
  return text, facts


def plot(rows, support, workdir):
  """Writes the sweep's four figures into `workdir` (refused units left
  out)."""
  rows = [r for r in rows if r.get("status") != "refused"]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  base = [r for r in rows if r["method"] == "none"]
  base_bytes = _mean(base, "logical_bytes_per_token")
  methods = sorted({r["method"] for r in rows} - {"none"})
  # 1. Accuracy vs compression (the phase-transition figure), both modes.
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
  colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
  for ax, mode in zip(axes, MODES):
    for m in methods:
      rs = [r for r in rows if r["method"] == m and r["mode"] == mode]
      if not rs:
        continue
      ratios = sorted({r["ratio"] for r in rs})
      xs = [0.0] + [1 - _mean([r for r in rs if r["ratio"] == x],
                              "logical_bytes_per_token") / base_bytes
                    for x in ratios]
      ys = [_mean(base, "accuracy")] + [
          _mean([r for r in rs if r["ratio"] == x], "accuracy")
          for x in ratios]
      ax.plot(xs, ys, marker="o", label=m, color=colors[m])
    ax.set_title(f"question-{mode}")
    ax.set_xlabel("compression: 1 - logical KV bytes / uncompressed")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy (mean over tasks)")
  axes[1].legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "accuracy_vs_ratio.png"), dpi=120)
  plt.close(fig)
  # 2. GER vs hallucination.
  ev = [r for r in rows if r["method"] != "none" and r["ger"] is not None
        and (r["method"] in EVICTION or "+" in r["method"])]
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  for mode, marker in zip(MODES, ("o", "^")):
    rs = [r for r in ev if r["mode"] == mode]
    ax.scatter([r["ger"] for r in rs], [r["hallucination_rate"] for r in rs],
               marker=marker, alpha=0.6,
               label=f"{mode} (r={pearson([r['ger'] for r in rs], [r['hallucination_rate'] for r in rs]):.2f})")
  ax.set_xlabel("Global Eviction Ratio of answer-critical tokens")
  ax.set_ylabel("hallucination rate")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "ger_vs_hallucination.png"), dpi=120)
  plt.close(fig)
  # 3. Active support per layer.
  layers = len(support["histogram"])
  fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2),
                           sharey=True)
  axes = np.atleast_1d(axes)
  edges = np.asarray(support["bin_edges"])
  for l, ax in enumerate(axes):
    ax.bar(edges[:-1], support["histogram"][l], width=np.diff(edges),
           align="edge")
    ax.set_xscale("log")
    ax.set_title(f"layer {l} (median {support['median_per_layer'][l]:g})")
    ax.set_xlabel(f"keys holding {support['share']:g} of the mass")
  axes[0].set_ylabel("(head, answer query) count")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "active_support.png"), dpi=120)
  plt.close(fig)
  # 4. Bytes per token per method.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for m in methods:
    rs = [r for r in rows if r["method"] == m and r["mode"] == "agnostic"]
    ratios = sorted({r["ratio"] for r in rs})
    for field, style in (("physical_bytes_per_token", "-"),
                         ("logical_bytes_per_token", ":")):
      ax.plot(ratios, [_mean([r for r in rs if r["ratio"] == x], field)
                       for x in ratios], style, marker="o", color=colors[m],
              label=m if style == "-" else None)
  ax.axhline(_mean(base, "physical_bytes_per_token"), color="k", ls="--",
             label="uncompressed (physical)")
  ax.set_xlabel("eviction ratio (quantizers at 0)")
  ax.set_ylabel("KV bytes per context token (solid: physical, dotted: "
                "logical)")
  ax.set_yscale("log")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "bytes_per_token.png"), dpi=120)
  plt.close(fig)


def support_report(task_data: dict[str, TaskData], share: float):
  """Active support of the answer queries of the uncompressed model."""
  per_layer = []
  for l in range(next(iter(task_data.values())).support.shape[0]):
    vals = []
    for td in task_data.values():
      s = td.support[l]  # [B, N, A]
      mask = np.broadcast_to((td.sources >= 0)[:, None, :], s.shape)
      vals.append(s[mask])
    per_layer.append(np.concatenate(vals))
  top = max(2, int(max(v.max() for v in per_layer)))
  edges = np.unique(np.round(np.geomspace(1, top + 1, 20)).astype(int))
  edges = np.concatenate([edges, [edges[-1] + 1]]) if len(edges) < 2 else edges
  hist = [np.histogram(v, bins=edges)[0].tolist() for v in per_layer]
  return dict(share=share, bin_edges=edges.tolist(), histogram=hist,
              median_per_layer=[float(np.median(v)) for v in per_layer],
              mean_per_layer=[float(np.mean(v)) for v in per_layer])


# ----------------------------------------------------------------------------


def run(cfg) -> list[dict[str, Any]]:
  """Runs (or resumes) the sweep of `cfg`; returns every row of this run."""
  units = plan_units(cfg)
  path = os.path.join(cfg.workdir, "results.jsonl")
  config, params = common.load_model(cfg.model, cfg.dtype)
  if config.vocab_size < kvjax.tasks.vocab.VOCAB.size:
    raise ValueError(f"model vocab_size {config.vocab_size} < the task "
                     f"vocabulary {kvjax.tasks.vocab.VOCAB.size}.")
  tag = run_tag(cfg, params)
  done = {r["key"] for r in read_results(path)}
  todo = [u for u in units if unit_key(u, tag) not in done]
  print(f"sweep: {len(units)} units, {len(units) - len(todo)} already in "
        f"{path}, model {cfg.model} ({config.num_layers} layers)", flush=True)
  task_data = {}

  def task(name):
    if name not in task_data:
      task_data[name] = TaskData(cfg, config, params, name)
    return task_data[name]

  limit = int(cfg.stop_after_units) or len(todo)
  compiled = set()
  # Every task is built (and so checked) before the first row is written.
  for name in sorted({u["task"] for u in todo[:limit]}):
    task(name)
  os.makedirs(cfg.workdir, exist_ok=True)
  for unit in tqdm.tqdm(todo[:limit], desc="sweep", dynamic_ncols=True):
    row = run_unit(cfg, task(unit["task"]), unit)
    program = (unit["method"], unit["ratio"], unit["mode"])
    row.update(key=unit_key(unit, tag), model=cfg.model,
               context_len=int(cfg.context_len),
               includes_compile=program not in compiled)
    compiled.add(program)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
  rows = [r for r in read_results(path) if r["key"].startswith(tag + "|")]
  if len(todo) > limit:
    print(f"stopped after {limit} units; rerun to resume.")
    return rows
  for name in _split(cfg.tasks):
    task(name)
  support = support_report(task_data, float(cfg.support_share))
  text, facts = summarize(rows)
  facts["active_support"] = support
  with open(os.path.join(cfg.workdir, "summary.md"), "w") as f:
    f.write(f"# Sweep of {cfg.model}, context {cfg.context_len}, "
            f"{cfg.num_examples} rows per task\n\n{text}\n")
  with open(os.path.join(cfg.workdir, "facts.json"), "w") as f:
    json.dump(facts, f, indent=2)
  if cfg.plots:
    plot(rows, support, cfg.workdir)
  print(text)
  if refused(rows):
    print(f"{len(refused(rows))} units refused by their transform (listed "
          "above and in summary.md).")
  print("active support (median keys for "
        f"{cfg.support_share:g} of the mass) per layer: "
        f"{support['median_per_layer']}")
  return rows


def main(argv):
  del argv
  run(_CONFIG.value)


if __name__ == "__main__":
  # Defined here, not at import, so tests can import several mains.
  common.check_config_overrides(sys.argv, sweep_config.get_config())
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "sweep.py"),
      "Sweep config (see experiments/configs/sweep.py).")
  app.run(main)
