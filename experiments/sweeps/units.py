"""One unit of the sweep: compress a task's prefilled cache, ask the
question teacher-forced, and measure the row.

Question modes:
  agnostic  the transform observes the end of the context (as if it had
            compressed during prefill), then the question is asked;
  aware     the transform observes the question's own queries (the
            question proper, `kvjax.tasks.question_mask`: no answer and
            nothing that follows from one), as `kvjax.compress_observing`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from experiments.sweeps import metrics
from experiments.sweeps import plan
from experiments.sweeps.task_data import TaskData, ask
import kvjax
from kvjax import compress
from kvjax import parallel
from kvjax.cache import coded_share, kv_bytes, logical_bytes
from kvjax.compress import registry

# (`kvjax.compress.spkv` is the transform; the module by its full path)
from kvjax.compress.spkv import cache_utility, kept_counts
from kvjax.tasks import scoring


def extra_inputs(td: TaskData, transform) -> dict[str, Any]:
  """The keyword-only inputs `transform` declares (`transform.extras`),
  from the task's data (the oracle's `future_mass`). An optional one the
  sweep has no value for (`plan.OPTIONAL_EXTRAS`: Finch's
  `question_lengths`, the sweep gives the question as observed queries
  instead) is left out.

  Raises:
    ValueError: the transform needs an input the sweep cannot give.
  """
  available = dict(future_mass=td.future_mass)
  missing = sorted(
    set(transform.extras) - set(available) - plan.OPTIONAL_EXTRAS
  )
  if missing:
    raise ValueError(
      f"{transform.name} needs the inputs {missing}; the "
      f"sweep provides {sorted(available)}."
    )
  return {n: available[n] for n in transform.extras if n in available}


def compress_learned(td: TaskData, unit: dict[str, Any]):
  """A learned method's unit (SP-KV): the context prefilled under the
  method's hard write gate, compressed by its transform at the largest
  head budget the gate kept (`kept_counts`: the cache physically
  that small, the head padding in the bytes), and the question's side
  inputs (the gate, each cached entry's utility) so that the question
  sees exactly what one gated pass would.

  Returns:
    (cache, dict of `ask` keyword arguments).
  """
  gate = registry.write_gate(unit["method"])
  cache, observed = td.gated(gate)
  mask = np.asarray(td.context_mask)
  counts = kept_counts(
    np.asarray(observed["write_utility"]), mask, gate.tau, gate.window
  )
  transform = plan.method_transform(
    unit["method"], unit["ratio"], capacity=int(counts.max())
  )
  cache = kvjax.compress_cache(
    cache,
    transform,
    config=td.config,
    observed=observed,
    positions=td.context_pos,
    mask=td.context_mask,
    reserve=td.Tq,
  )
  utility = cache_utility(
    cache, observed["write_utility"], td.context_pos, td.context_mask
  )
  return cache, dict(write_gate=gate, cache_utility=utility)


def compress_unit(td: TaskData, unit: dict[str, Any]):
  """The task's prefilled cache compressed as `unit` says (method, ratio,
  mode); the uncompressed cache for the baseline. A learned method:
  `compress_learned`.

  Returns:
    (cache, dict of `ask` keyword arguments: empty but for learned
    methods).

  Raises:
    compress.Degenerate: the transform would compress nothing here.
  """
  if unit["method"] != plan.BASELINE and registry.is_learned(unit["method"]):
    return compress_learned(td, unit)
  transform = plan.method_transform(unit["method"], unit["ratio"])
  if transform is None:
    return td.cache, {}
  extra = extra_inputs(td, transform)
  # Aware: as kvjax.compress_observing, reusing the question run.
  agnostic = unit["mode"] == "agnostic"
  cache = kvjax.compress_cache(
    td.cache,
    transform,
    config=td.config,
    observed=td.context_observed if agnostic else td.question_observed,
    positions=td.context_pos if agnostic else td.question_pos,
    mask=td.context_mask if agnostic else td.observe_mask,
    reserve=td.Tq,
    # The model and the context's ids, for methods that read them
    # (CriticalKV's W_o, KVzip's replay); ignored by the others.
    params=td.params,
    tokens=td.context,
    **extra,
  )
  return cache, {}


def run_unit(cfg, td: TaskData, unit: dict[str, Any]) -> dict[str, Any]:
  """One unit's row; a transform that refuses the input (it would compress
  nothing, `compress.Degenerate`, or cannot run on a re-read context,
  `plan.ingest_refusal`) gives a row marked "refused" with the reason and
  no metrics."""
  learned = unit["method"] != plan.BASELINE and registry.is_learned(
    unit["method"]
  )
  if learned:  # the task's gated prefill, as the others' is, untimed
    td.gated(registry.write_gate(unit["method"]))
  t0 = time.perf_counter()
  refuse = lambda reason: dict(
    method=unit["method"],
    ratio=unit["ratio"],
    task=unit["task"],
    mode=unit["mode"],
    status="refused",
    reason=reason,
  )
  reason = (
    None
    if unit["method"] == plan.BASELINE
    else plan.ingest_refusal(
      plan.method_transform(unit["method"], unit["ratio"]),
      unit["mode"],
      td.passes,
    )
  )
  if reason is not None:
    return refuse(reason)
  try:
    cache, side = compress_unit(td, unit)
  except compress.Degenerate as e:
    return refuse(str(e))
  # What the metrics read, on the host (gathered from every process under
  # a multi-process mesh); the device cache answers the question.
  host = parallel.to_host(cache)
  policy, codec = plan.method_parts(unit["method"])
  if codec is not None and max(coded_share(host)) == 0:
    return refuse(
      f"{codec} stored none of the kept entries coded (all in "
      "its full-precision window): not a compressed unit."
    )
  logits, aux, pos, valid = ask(
    td.params,
    cache,
    td.question,
    td.qmask,
    config=td.config,
    backend=td.backend,
    **side,
  )
  probs = aux["attn_probs"]
  logits = np.asarray(logits)
  seconds = time.perf_counter() - t0

  # Abstaining is the unknown word's token on text, not the private id.
  predicted, confidence = scoring.predictions_from_logits(
    td.batch, logits, offset=td.L, unknown=td.unknown_id
  )
  score = scoring.score(
    td.batch,
    predicted,
    confidence=confidence,
    threshold=float(cfg.confidence),
    unknown=td.unknown_id,
  )["all"]
  answers = td.batch.answer_positions >= 0
  kl = metrics.kl(
    metrics.answer_logits(td, td.logits),
    metrics.answer_logits(td, logits),
    answers,
  )
  if policy in plan.RENUMBERS_POSITIONS:
    # Its cache holds new positions, not the original ones the answer
    # tokens are found by: GER and reachability are not computed (None).
    eviction = dict(ger=None, ger_per_layer=None, reachability=None)
  else:
    # A re-read context's last read sits `offset` positions later: the
    # answer tokens are found at their context positions.
    eviction = metrics.answer_eviction(
      td,
      host._replace(pos=host.pos - td.offset),
      probs,
      pos - td.offset,
      valid,
      float(cfg.graph_eps),
    )
  tokens = td.batch.batch_size * td.L  # context tokens (text: tokenized)
  return dict(
    method=unit["method"],
    ratio=unit["ratio"],
    task=unit["task"],
    mode=unit["mode"],
    status="ok",
    accuracy=score.accuracy,
    hallucination_rate=score.hallucination_rate,
    abstention_rate=score.abstention_rate,
    exact_match=score.exact_match,
    ger=eviction["ger"],
    ger_per_layer=eviction["ger_per_layer"],
    reachability=eviction["reachability"],
    kl=kl,
    # Entries the compressed cache holds per context entry (measured).
    kept_share=float(np.sum(host.valid) / td.entries),
    physical_bytes_per_token=kv_bytes(host) / tokens,
    logical_bytes_per_token=logical_bytes(host) / tokens,
    coded_share=list(coded_share(host)),
    seconds=round(seconds, 4),
    num_examples=score.num_examples,
    num_answers=score.num_answers,
  )
