"""The sweep's markdown summary and facts (collapse ratios, Pearson r).

Refused units are listed under the table, never averaged into it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from experiments.sweeps import metrics
from experiments.sweeps import plan
from kvjax.compress import registry

_HEADER = (
  "| mode | method | ratio | accuracy | hallucination | abstention "
  "| GER | reachability | KL | bytes/token (phys) | bytes/token "
  "(logical) | compression (bytes) | coded | s/unit |"
)
# The table's columns that are means of a row field, in order, with format.
_MEANS = (
  ("accuracy", ".3f"),
  ("hallucination_rate", ".3f"),
  ("abstention_rate", ".3f"),
  ("ger", ".3f"),
  ("reachability", ".3f"),
  ("kl", ".3f"),
  ("physical_bytes_per_token", ".0f"),
)


def refused(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows of units a transform refused (no metrics)."""
  return [r for r in rows if r.get("status") == "refused"]


def evicts(method: str) -> bool:
  """Whether `method` has an eviction policy (alone or before a codec)."""
  return plan.method_parts(method)[0] is not None


def _groups(rows):
  """(mode, method, ratio) -> rows; the baseline's rows join both modes."""
  groups = {}
  for r in rows:
    modes = plan.MODES if r["method"] == plan.BASELINE else (r["mode"],)
    for mode in modes:
      groups.setdefault((mode, r["method"], r["ratio"]), []).append(r)
  return groups


def _table(groups, base_bytes: float) -> list[str]:
  lines = [_HEADER, "|" + "---|" * 14]
  for (mode, method, ratio), rs in sorted(
    groups.items(),
    key=lambda kv: (kv[0][0], kv[0][1] != plan.BASELINE, kv[0][1], kv[0][2]),
  ):
    logical = metrics.mean(rs, "logical_bytes_per_token")
    coded = [r["coded_share"][0] for r in rs if r.get("coded_share")]
    has_codec = plan.method_parts(method)[1] is not None
    coded = f"{np.mean(coded):.2f}" if coded and has_codec else "-"
    means = [format(metrics.mean(rs, field), fmt) for field, fmt in _MEANS]
    learned = method != plan.BASELINE and registry.is_learned(method)
    cells = (
      mode,
      method,
      "learned" if learned else f"{ratio:g}",
      *means,
      f"{logical:.0f}",
      f"{1 - logical / base_bytes:.3f}",
      coded,
      f"{metrics.warm_seconds(rs):.3f}",
    )
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def summarize(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
  """Markdown summary table + facts (collapse ratios, Pearson r).

  Refused units are listed under the table, never averaged into it; a
  codec that stored part of the kept entries uncoded shows it in the
  "coded" column (the share of kept keys stored by the codec).
  """
  skipped = refused(rows)
  rows = [r for r in rows if r.get("status") != "refused"]
  base = {r["task"]: r for r in rows if r["method"] == plan.BASELINE}
  groups = _groups(rows)
  text = "\n".join(
    _table(groups, metrics.mean(list(base.values()), "logical_bytes_per_token"))
  )
  facts = {"collapse_ratio": {}, "pearson_ger_hallucination": {}}
  base_acc = metrics.mean(list(base.values()), "accuracy")
  for (mode, method, ratio), rs in sorted(groups.items()):
    # A learned method has no ratio to collapse at (what it keeps shows in
    # the table's logical bytes and compression, and rows' kept_share).
    if method == plan.BASELINE or not registry.takes_ratio(method):
      continue
    key = f"{mode}/{method}"
    if metrics.mean(rs, "accuracy") < 0.5 * base_acc:
      prev = facts["collapse_ratio"].get(key)
      if prev is None or ratio < prev:
        facts["collapse_ratio"][key] = ratio
  evict_rows = eviction_rows(rows)
  for mode in plan.MODES + ("all",):
    rs = [r for r in evict_rows if mode in ("all", r["mode"])]
    facts["pearson_ger_hallucination"][mode] = metrics.pearson(
      [r["ger"] for r in rs], [r["hallucination_rate"] for r in rs]
    )
  facts["baseline_accuracy"] = {t: r["accuracy"] for t, r in base.items()}
  text += (
    "\n\nCollapse (first ratio where the mean accuracy over tasks "
    "falls below half the uncompressed one): "
    + json.dumps(facts["collapse_ratio"])
  )
  text += (
    "\n\nPearson r of GER vs hallucination rate (eviction units): "
    + json.dumps(
      {k: round(v, 3) for k, v in facts["pearson_ger_hallucination"].items()}
    )
  )
  facts["refused"] = sorted(
    {(r["mode"], r["method"], r["ratio"]) for r in skipped}
  )
  if skipped:
    reasons = {}
    for r in skipped:
      reasons.setdefault((r["mode"], r["method"], r["ratio"]), r["reason"])
    text += (
      "\n\nRefused (no metrics: the transform would compress nothing, or "
      "cannot run on this input):"
    )
    for (mode, method, ratio), reason in sorted(reasons.items()):
      text += f"\n- {mode} {method} {ratio:g}: {reason}"
  return text, facts


def eviction_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows of evicting units with a GER (the Pearson r's points)."""
  return [
    r
    for r in rows
    if r["method"] != plan.BASELINE
    and r["ger"] is not None
    and evicts(r["method"])
  ]


def tokens_note(cfg, rows: list[dict[str, Any]]) -> str:
  """What the model read, for the summary's head: nothing for the private
  ids of a model trained on them, the tokenizer for text, a warning for
  raw ids on an hf:PATH checkpoint."""
  modes = {r.get("tokens", "raw") for r in rows}
  lines = []
  if "text" in modes:
    hashes = sorted({r["tokenizer"] for r in rows if r.get("tokenizer")})
    contexts = sorted(
      {
        r["context_len"]
        for r in rows
        if r.get("tokens") == "text" and "context_len" in r
      }
    )
    lines.append(
      "Tasks written as text and encoded by the checkpoint's "
      f"tokenizer.json ({', '.join(hashes)}): context {cfg.context_len} "
      f"task positions = {', '.join(map(str, contexts))} tokens; answers "
      "scored by their first token."
    )
  if "raw" in modes and cfg.model.startswith("hf:"):
    lines.append(
      "**Warning: config.tokens=raw: kvjax's private task ids were fed "
      "to this checkpoint as token ids, which are arbitrary tokens to it; "
      "these numbers say nothing about how it reads text.**"
    )
  return "".join(line + "\n\n" for line in lines)


def write(cfg, rows: list[dict[str, Any]], support: dict[str, Any]) -> str:
  """Writes `summary.md` and `facts.json` (with the active support) into
  `cfg.workdir`; returns the summary's text."""
  text, facts = summarize(rows)
  facts["active_support"] = support
  facts["tokens"] = sorted({r.get("tokens", "raw") for r in rows})
  passes = int(cfg.get("ingest_passes", 1))
  ingest = (
    f"Compute before eviction: the context was read {passes} times in one "
    "causal prefill and every unit compressed the last read "
    "(`kvjax.ingest`); the question continues after it. Reachability is "
    "not computed.\n\n"
    if passes > 1
    else ""
  )
  with open(os.path.join(cfg.workdir, "summary.md"), "w") as f:
    f.write(
      f"# Sweep of {cfg.model}, context {cfg.context_len}, "
      f"{cfg.num_examples} rows per task\n\n{tokens_note(cfg, rows)}"
      f"{ingest}{text}\n"
    )
  with open(os.path.join(cfg.workdir, "facts.json"), "w") as f:
    json.dump(facts, f, indent=2)
  return text
