"""What a sweep runs: the config's checks and its units, in run order.

A unit is a dict (method, ratio, task, mode). Methods are names of
`kvjax.compress.registry` ("snapkv", "kivi2", "snapkv+kivi2", "spkv") or
the uncompressed baseline `BASELINE`, which runs once per task, question-
agnostic only (it does not compress, so the mode changes nothing).
A learned method (SP-KV, `registry.LEARNED_NAMES`) also runs once per task
and question-agnostic only: its model's gates decide what is written as
each entry is written, before any question exists; it needs a model with
write gates (config.model=kvjax-tiny-spkv, the "spkv" preset).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.sweeps import tokens
from kvjax import ingest
from kvjax.attention import resolve_backend
from kvjax.compress import registry
from kvjax.tasks import suite

BASELINE = "none"  # the uncompressed model; every sweep runs it
MODES = ("agnostic", "aware")


# Policies whose compressed cache records new positions (keys re-rotated to
# 0..n-1) instead of the original ones: the eviction metrics, which find
# the answer tokens by their original positions, are not computed for them.
RENUMBERS_POSITIONS = frozenset({"key_rerotation"})
# Extra inputs a transform may go without (Finch's question split: the
# sweep observes the question's queries instead).
OPTIONAL_EXTRAS = frozenset({"question_lengths"})


def parse_list(value, cast=str, field: str = "value") -> list:
  """A comma-separated string (or a sequence) as a list of `cast`.

  Raises:
    ValueError: an item `cast` refuses, naming config.`field`.
  """
  items = (
    [v for v in value.split(",") if v.strip()]
    if isinstance(value, str)
    else value
  )
  try:
    return [cast(v.strip()) if isinstance(v, str) else cast(v) for v in items]
  except (TypeError, ValueError):
    raise ValueError(
      f"config.{field}={value!r} is not a comma-separated "
      f"list of {cast.__name__} values."
    ) from None


def _check_number(
  cfg, field: str, cast, lo, hi=None, lo_open=False, hi_open=False
) -> None:
  value = cfg[field]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok and cast is int:
    ok = float(value).is_integer()
  if ok:
    v = float(value)
    ok = (
      np.isfinite(v)
      and (v > lo if lo_open else v >= lo)
      and (hi is None or (v < hi if hi_open else v <= hi))
    )
  if not ok:
    interval = (
      ("(" if lo_open else "[")
      + f"{lo:g}, "
      + ("inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]"))
    )
    raise ValueError(
      f"config.{field}={value!r}: must be {cast.__name__} in {interval}."
    )


def validate_config(cfg) -> None:
  """Checks every field before anything runs or any file is written.

  Raises:
    ValueError: a field out of its range, a list field that does not
      parse, or tokens the model cannot read (`tokens.resolve`: an
      hf:PATH without tokenizer.json, unless config.tokens=raw), naming
      the field and what is allowed.
  """
  for field, cast, lo, hi, lo_open, hi_open in (
    ("context_len", int, 1, None, False, False),
    ("mqar_pairs", int, 1, None, False, False),
    ("num_examples", int, 1, None, False, False),
    ("seed", int, 0, None, False, False),
    ("support_share", float, 0, 1, True, False),
    ("graph_eps", float, 0, 1, True, True),
    ("confidence", float, 0, 1, False, False),
    ("stop_after_units", int, 0, None, False, False),
    ("ingest_passes", int, 1, None, False, False),
  ):
    _check_number(cfg, field, cast, lo, hi, lo_open, hi_open)
  if cfg.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(
      f"config.dtype={cfg.dtype!r}; allowed: float32, bfloat16, float16."
    )
  for field in ("methods", "tasks", "modes"):
    if not parse_list(cfg[field], field=field):
      raise ValueError(
        f"config.{field} is empty; name at least one (the uncompressed "
        "baseline runs with every sweep, it is not a method)."
        if field == "methods"
        else f"config.{field} is empty."
      )
  if not parse_list(cfg.ratios, float, "ratios"):
    raise ValueError("config.ratios is empty.")
  learned = [
    m
    for m in parse_list(cfg.methods, field="methods")
    if m.split(registry.SEPARATOR)[0] in registry.LEARNED_NAMES
  ]
  if learned and cfg.get("mesh", ""):
    raise ValueError(
      f"config.methods has learned methods {learned}: their gated "
      "attention runs on the reference backend on one device; run them "
      f"without config.mesh (got {cfg.mesh!r})."
    )
  if learned and "agnostic" not in parse_list(cfg.modes, field="modes"):
    raise ValueError(
      f"config.methods has learned methods {learned}, which run "
      "question-agnostic only (the gate decides as entries are written); "
      f"config.modes={cfg.modes!r} has no 'agnostic'."
    )
  if int(cfg.ingest_passes) > 1 and (learned or cfg.get("mesh", "")):
    raise ValueError(
      f"config.ingest_passes={cfg.ingest_passes} re-reads the context on "
      "one device, for eviction policies and codecs: not with "
      + (
        f"learned methods {learned}."
        if learned
        else f"config.mesh={cfg.mesh!r}."
      )
    )
  try:
    resolve_backend(cfg.backend)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.backend={cfg.backend!r}: {e}") from None
  # An hf:PATH checkpoint without tokenizer.json is refused here, unless
  # config.tokens=raw asks for the private ids explicitly.
  tokens.resolve(cfg)


def method_parts(method: str) -> tuple[str | None, str | None]:
  """(policy, codec) names of a unit's method; (None, None) for the
  baseline.

  Raises:
    ValueError: an unknown method (see `kvjax.compress.registry.parse`).
  """
  return (None, None) if method == BASELINE else registry.parse(method)


def method_transform(method: str, ratio: float, capacity: int | None = None):
  """The transform of `method` at eviction `ratio` (a learned method: at
  static head `capacity`); None for the baseline.

  Transforms compare by value, so the transform built anew for each unit
  reuses the program compiled for the first task.

  Raises:
    ValueError: an unknown method, or a ratio > 0 for a codec alone.
  """
  if method == BASELINE:
    return None
  if registry.is_learned(method):
    return registry.build(method, capacity=capacity)
  return registry.build(method, ratio)


def ingest_refusal(transform, mode: str, passes: int) -> str | None:
  """Why `transform` cannot run on a context read `passes` times (the
  row is marked refused with this reason), or None.

  With passes > 1 the cache is the last read (`kvjax.ingest.last_read`):
  question-agnostic transforms that read the prefill's per-slot
  attention (`kvjax.ingest.per_slot_captures`: it covers every read's
  slots), as `kvjax.ingest.reread` refuses them, and transforms that
  replay the prompt's ids (one read, at positions the last read does not
  hold) are refused.
  """
  if transform is None or passes == 1:
    return None
  needs = set(transform.needs)
  if "tokens" in needs:
    return (
      f"{transform.name} replays the prompt's ids: one read, at positions "
      f"the re-read context (ingest_passes={passes}) does not hold."
    )
  per_slot = ingest.per_slot_captures(transform)
  if mode == "agnostic" and per_slot:
    return (
      f"{transform.name} reads the prefill's per-slot attention "
      f"{per_slot}, which covers all {passes} reads, not "
      "the last read it would compress."
    )
  return None


def single_unit(method: str) -> bool:
  """Whether `method` runs once per task (at ratio 0): a codec alone and a
  learned method take no ratio."""
  return not registry.takes_ratio(method)


def plan_units(cfg) -> list[dict[str, Any]]:
  """Every unit of the sweep, in run order (transform-major, so a compiled
  transform serves all tasks before the next one compiles).

  Raises:
    ValueError: a bad config field, or an unknown method, task or mode.
  """
  validate_config(cfg)
  methods = parse_list(cfg.methods, field="methods")
  ratios = parse_list(cfg.ratios, float, "ratios")
  tasks = parse_list(cfg.tasks, field="tasks")
  modes = parse_list(cfg.modes, field="modes")
  # The baseline is no method: it runs with every sweep.
  for m in methods:
    registry.parse(m)  # validates the names
  for r in ratios:
    if not 0.0 <= r < 1.0:
      raise ValueError(f"ratios must be in [0, 1), got {r}.")
  for t in tasks:
    suite.suite_entry(t)  # validates the name
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; allowed: {MODES}.")
  for field, values in (
    ("methods", methods),
    ("ratios", ratios),
    ("tasks", tasks),
    ("modes", modes),
  ):
    # A value listed twice would run (and average) its units twice; ratios
    # are compared as the row keys write them.
    keys = [f"{v:g}" if field == "ratios" else v for v in values]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
      raise ValueError(f"config.{field} lists {repeated} more than once.")
  configs = [(BASELINE, 0.0)]
  for m in methods:
    if single_unit(m):  # a codec alone or a learned method: no ratio
      configs.append((m, 0.0))
    else:
      configs += [(m, r) for r in ratios if r > 0]
  for m, r in configs[1:]:  # a composition `chain` refuses fails here
    try:
      registry.build(m, None if single_unit(m) else r)
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"config.methods: {m} at ratio {r:g} cannot be built: {e}"
      ) from e
  # The baseline and learned methods observe no question: agnostic only.
  agnostic_only = lambda m: m == BASELINE or registry.is_learned(m)
  return [
    dict(method=m, ratio=r, task=t, mode=mode)
    for mode in modes
    for m, r in configs
    for t in tasks
    if not (agnostic_only(m) and mode == "aware")
  ]
