"""The typed training configuration: what `kvjax.train.loop.train` runs.

  TrainConfig           the run: steps, seed, init, loss, bookkeeping
    .model              ModelConfig (`kvjax.config`), the decoder
    .data               DataConfig, the task stream: a curriculum
      .phases           Phase: steps below `until`, contexts, overrides
      .mixture          Mixture: what rows a step draws (phases start here)
    .optimizer          OptimizerConfig: optimizer and learning-rate schedule
    .evaluation         EvalConfig: the held-out evaluation

Every class is a frozen dataclass: its constructor checks each field and
raises a ValueError that names the field, the value and what is allowed;
sequences are stored as tuples and mappings as tuples of pairs, so equal
configs compare and hash equal. `replace(**changes)` gives a changed (and
re-checked) copy.

`TrainConfig.from_dict` / `to_dict` read and write the flat layout of the
experiment config (`experiments/configs/train.py`, an ml_collections
ConfigDict) and of the `config` a training job records next to its
checkpoint (`config.json`, an export's `training.json`): the optimizer and
evaluation fields sit at the top level (`optimizer` is the optimizer's name,
`lr_restarts` its restarts, `eval_*` the evaluation), `model` and `data` are
nested. An ml_collections ConfigDict is read as `TrainConfig.from_dict(
json.loads(cfg.to_json()))`; the library only ever sees the typed config.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kvjax.config import ModelConfig
from kvjax.tasks import generators
from kvjax.tasks.vocab import VOCAB
from kvjax.train import losses, optimizers

# --------------------------------------------------------------------------
# Field checks: each takes `where` (the field's name, as the error says it)
# and the value, and returns the value in its stored form.


def _fail(where: str, value: Any, allowed: str):
  raise ValueError(f"{where}={value!r}; allowed: {allowed}.")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(
    value, (bool, np.bool_)
  )


def _int(where: str, value, minimum: int = 0) -> int:
  if not _is_int(value) or value < minimum:
    _fail(where, value, f"an int >= {minimum}")
  return int(value)


def _float(
  where: str,
  value,
  low: float = 0.0,
  high: float = math.inf,
  high_open: bool = False,
  low_open: bool = False,
) -> float:
  ok = (
    _is_int(value) or isinstance(value, (float, np.floating))
  ) and math.isfinite(value)
  if ok:
    number = float(value)
    ok = (number > low if low_open else number >= low) and (
      number < high if high_open else number <= high
    )
  if not ok:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    high_text = "inf)" if high == math.inf else f"{high:g}{right}"
    _fail(where, value, f"a finite float in {left}{low:g}, {high_text}")
  return number


def _optional(check: Callable[..., Any], **kwargs):
  """`check`, or None when the value is None."""

  def run(where, value):
    return None if value is None else check(where, value, **kwargs)

  return run


def _ints(
  where: str, value, minimum: int = 1, allowed: Sequence[int] | None = None
) -> tuple[int, ...]:
  what = (
    f"a non-empty sequence of values in {tuple(allowed)}"
    if allowed
    else f"a non-empty sequence of ints >= {minimum}"
  )
  if (
    isinstance(value, (str, bytes, Mapping))
    or not isinstance(value, (Sequence, np.ndarray))
    or len(value) == 0
  ):
    _fail(where, value, what)
  for v in value:
    if not _is_int(v) or v < minimum or (allowed and v not in allowed):
      _fail(where, value, what)
  return tuple(int(v) for v in value)


def _names(where: str, value, allowed: Sequence[str]) -> tuple[str, ...]:
  what = f"a non-empty sequence of names in {tuple(allowed)}"
  if (
    isinstance(value, (str, bytes, Mapping))
    or not isinstance(value, Sequence)
    or len(value) == 0
    or any(v not in allowed for v in value)
  ):
    _fail(where, value, what)
  return tuple(str(v) for v in value)


def _bool(where: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    _fail(where, value, "True or False")
  return bool(value)


def _choice(where: str, value, allowed: Sequence[str]) -> str:
  if value not in allowed:
    _fail(where, value, f"one of {tuple(allowed)}")
  return value


def _fractions(where: str, value) -> tuple[tuple[str, float], ...]:
  """Task -> share, kept in the given order (it breaks rounding ties)."""
  what = (
    f"a mapping from tasks in {generators.TASK_NAMES} to finite "
    "shares >= 0, at least one > 0"
  )
  try:
    pairs = tuple(value.items() if isinstance(value, Mapping) else value)
    pairs = tuple((name, share) for name, share in pairs)
  except (TypeError, ValueError):
    _fail(where, value, what)
  names = [name for name, _ in pairs]
  if (
    not pairs
    or len(set(names)) != len(names)
    or any(name not in generators.TASK_NAMES for name in names)
  ):
    _fail(where, dict(pairs) if pairs else value, what)
  shares = tuple(_float(f"{where}[{name!r}]", share) for name, share in pairs)
  if not any(shares):
    _fail(where, dict(pairs), what)
  return tuple(zip(names, shares))


def _steps(where: str, value) -> tuple[int, ...]:
  """A possibly empty sequence of steps >= 1."""
  if (
    isinstance(value, (str, bytes, Mapping))
    or not isinstance(value, (Sequence, np.ndarray))
    or not all(_is_int(v) and v >= 1 for v in value)
  ):
    _fail(where, value, "a sequence of steps (ints >= 1)")
  return tuple(int(v) for v in value)


def _plain(value: Any) -> Any:
  """A JSON-able copy: tuples become lists."""
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  return value


def _check_keys(
  where: str,
  given: Sequence[str],
  allowed: Sequence[str],
  required: Sequence[str] = (),
):
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    raise ValueError(
      f"{where} has unknown field(s) {unknown}; allowed: {sorted(allowed)}."
    )
  missing = [name for name in required if name not in given]
  if missing:
    raise ValueError(f"{where} is missing the required field(s) {missing}.")


class _Config:
  """What every config class shares."""

  def replace(self, **changes):
    """A copy with `changes` (checked as in the constructor)."""
    return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mixture(_Config):
  """What rows a training step draws, and how.

  A step's context length `context_len` (BOS included) is drawn from its
  phase's `context_lens`; the step has B = max(1, tokens_per_step //
  context_len) rows: round(B * copy_fraction) copy rows and round(B *
  chain_fraction) chain rows (training aids, not tasks of the suite; see
  `kvjax.train.data.copy_batch` and `chain_batch`), the rest split among
  the tasks by `task_fractions`. Every batch is padded to T = context_len
  + 1 + 2 * max(mqar_pairs) (at least context_len + 2 + 2 *
  max(multihop_hops) with walks), so each (phase, context_len) compiles
  once.

  Attributes:
    tokens_per_step: rows per step = max(1, tokens_per_step //
      context_len).
    task_fractions: task -> share of the task rows (rounded, at least one
      row per task with a positive share; the rounding remainder goes to
      the largest, the first given among equals). Given as a mapping,
      stored as (task, share) pairs in the given order.
    mqar_pairs: choices of mqar num_pairs, drawn per step among those that
      fit the context (2 * num_pairs + 1 <= context_len).
    mqar_placements: choices of mqar placement, drawn per step.
    multihop_hops: hops drawn per multihop row.
    multihop_walk: the multihop question format: False asks for the end of
      the chain in one token (latent), True for the walk to it (see
      `kvjax.tasks.multihop`).
    multihop_distractor_chains: chains besides the queried one.
    needle_distractors: facts besides the needle.
    overwrite_writes: assignments of the queried key (>= 2).
    overwrite_distractors: other facts in overwrite rows.
    abstention_distractors: facts in abstention rows (none queried).
    copy_fraction: share of copy rows, in [0, 1).
    chain_fraction: share of chain rows, in [0, 1); copy_fraction +
      chain_fraction < 1.
    chain_count: at most this many chains per chain row (as many as fit
      in the context).
    chain_hops: links per chain, drawn per chain.
    chain_queries: chains asked per chain row; None asks as many as the
      padded width holds (4 tokens each).
    chain_key_ends: share of the chains ending at a key id, in [0, 1].
    lens_weight: weight of the lens loss (>= 0; see
      `kvjax.train.data.lens_mask` and `kvjax.train.loop.loss_fn`).
  """

  tokens_per_step: int
  task_fractions: tuple[tuple[str, float], ...]
  mqar_pairs: tuple[int, ...]
  mqar_placements: tuple[str, ...] = ("prefix",)
  multihop_hops: tuple[int, ...] = generators.HOPS
  multihop_walk: bool = False
  multihop_distractor_chains: int = 2
  needle_distractors: int = 3
  overwrite_writes: int = 2
  overwrite_distractors: int = 3
  abstention_distractors: int = 4
  copy_fraction: float = 0.0
  chain_fraction: float = 0.0
  chain_count: int = 4
  chain_hops: tuple[int, ...] = (2,)
  chain_queries: int | None = None
  chain_key_ends: float = 0.0
  lens_weight: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = _MIXTURE_CHECKS[field.name](
        f"Mixture.{field.name}", getattr(self, field.name)
      )
      object.__setattr__(self, field.name, value)
    if self.copy_fraction + self.chain_fraction >= 1:
      _fail(
        "Mixture.copy_fraction + chain_fraction",
        self.copy_fraction + self.chain_fraction,
        "< 1 (task rows must remain)",
      )

  @property
  def tasks(self) -> tuple[str, ...]:
    """The tasks with a positive share, in `task_fractions` order."""
    return tuple(name for name, share in self.task_fractions if share > 0)

  def generator_params(self, task: str) -> dict[str, Any]:
    """The generator parameters of `task` fixed by this mixture.

    mqar has none: its num_pairs and placement are drawn per step from
    `mqar_pairs` and `mqar_placements`.
    """
    return {
      "mqar": {},
      "needle": {"num_distractors": self.needle_distractors},
      "multihop": {
        "hops": self.multihop_hops,
        "num_distractor_chains": self.multihop_distractor_chains,
        "walk": self.multihop_walk,
      },
      "overwrite": {
        "num_writes": self.overwrite_writes,
        "num_distractors": self.overwrite_distractors,
      },
      "abstention": {"num_distractors": self.abstention_distractors},
    }[_choice("task", task, generators.TASK_NAMES)]

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON-able values (`task_fractions` a dict)."""
    return {
      name: _plain_field(name, getattr(self, name)) for name in MIXTURE_FIELDS
    }


def _fraction_check(where, value):
  return _float(where, value, 0.0, 1.0, high_open=True)


_MIXTURE_CHECKS: dict[str, Callable[[str, Any], Any]] = {
  "tokens_per_step": lambda w, v: _int(w, v, 1),
  "task_fractions": _fractions,
  "mqar_pairs": lambda w, v: _ints(w, v, 1),
  "mqar_placements": lambda w, v: _names(w, v, generators.MQAR_PLACEMENTS),
  "multihop_hops": lambda w, v: _ints(w, v, allowed=generators.HOPS),
  "multihop_walk": _bool,
  "multihop_distractor_chains": lambda w, v: _int(w, v, 0),
  "needle_distractors": lambda w, v: _int(w, v, 0),
  "overwrite_writes": lambda w, v: _int(w, v, 2),
  "overwrite_distractors": lambda w, v: _int(w, v, 0),
  "abstention_distractors": lambda w, v: _int(w, v, 0),
  "copy_fraction": _fraction_check,
  "chain_fraction": _fraction_check,
  "chain_count": lambda w, v: _int(w, v, 1),
  "chain_hops": lambda w, v: _ints(w, v, allowed=generators.HOPS),
  "chain_queries": _optional(_int, minimum=1),
  "chain_key_ends": lambda w, v: _float(w, v, 0.0, 1.0),
  "lens_weight": lambda w, v: _float(w, v, 0.0),
}
MIXTURE_FIELDS: tuple[str, ...] = tuple(
  f.name for f in dataclasses.fields(Mixture)
)
"""The fields of a Mixture, which a Phase may override."""


def _plain_field(name: str, value: Any) -> Any:
  if name == "task_fractions":
    return dict(value)
  return _plain(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phase(_Config):
  """A stretch of the curriculum: the steps below `until` (and at or above
  the previous phase's `until`).

  Attributes:
    until: the first step after the phase (exclusive end), >= 1.
    context_lens: context lengths (BOS included), one drawn uniformly per
      step; repeat a length to draw it more often.
    overrides: Mixture fields this phase sets, replacing the DataConfig's
      `mixture` during the phase (e.g. `{"task_fractions": {"mqar": 1.0},
      "copy_fraction": 0.75}`). Given as a mapping; stored as (field,
      value) pairs in Mixture field order, each value checked as that
      Mixture field.
  """

  until: int
  context_lens: tuple[int, ...]
  overrides: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "until", _int("Phase.until", self.until, 1))
    object.__setattr__(
      self, "context_lens", _ints("Phase.context_lens", self.context_lens, 1)
    )
    overrides = self.overrides
    overrides = dict(
      overrides.items() if isinstance(overrides, Mapping) else overrides
    )
    _check_keys(
      f"Phase(until={self.until}).overrides", list(overrides), MIXTURE_FIELDS
    )
    object.__setattr__(
      self,
      "overrides",
      tuple(
        (
          name,
          _MIXTURE_CHECKS[name](
            f"Phase(until={self.until}).{name}", overrides[name]
          ),
        )
        for name in MIXTURE_FIELDS
        if name in overrides
      ),
    )

  def mixture(self, default: Mixture) -> Mixture:
    """`default` with this phase's overrides."""
    return default.replace(**dict(self.overrides))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Phase:
    """A Phase from `{"until", "context_lens", **overrides}`.

    Raises:
      ValueError: a missing or bad field.
    """
    d = dict(d)
    _check_keys(
      "phase",
      list(d),
      ("until", "context_lens", *MIXTURE_FIELDS),
      ("until", "context_lens"),
    )
    until, context_lens = d.pop("until"), d.pop("context_lens")
    return cls(until=until, context_lens=context_lens, overrides=d)

  def to_dict(self) -> dict[str, Any]:
    """`{"until", "context_lens", **overrides}`, JSON-able."""
    return {
      "until": self.until,
      "context_lens": list(self.context_lens),
      **{name: _plain_field(name, value) for name, value in self.overrides},
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Config):
  """The training stream: task batches as a pure function of (seed, step).

  `kvjax.train.data.task_batch(data, seed, step)` draws step `step`'s batch
  from the phase the step belongs to, so a resumed run sees exactly the
  batches an uninterrupted one would.

  Attributes:
    phases: the curriculum, `until` strictly increasing. A step belongs to
      the first phase with step < until; steps past the last `until` stay
      in the last phase.
    mixture: the Mixture of every phase that does not override a field.

  On construction every phase's mixture is checked against each of its
  context lengths: every task with rows, and the copy and chain rows, must
  fit.
  """

  phases: tuple[Phase, ...]
  mixture: Mixture

  def __post_init__(self):
    phases = self.phases
    if (
      isinstance(phases, Phase)
      or not isinstance(phases, Sequence)
      or not phases
      or not all(isinstance(p, Phase) for p in phases)
    ):
      _fail("DataConfig.phases", phases, "a non-empty sequence of Phase")
    object.__setattr__(self, "phases", tuple(phases))
    if not isinstance(self.mixture, Mixture):
      _fail("DataConfig.mixture", self.mixture, "a Mixture")
    untils = [p.until for p in self.phases]
    if any(a >= b for a, b in itertools.pairwise(untils)):
      _fail("DataConfig.phases[*].until", untils, "strictly increasing")
    for i, phase in enumerate(self.phases):
      where = f"DataConfig.phases[{i}] (until={phase.until})"
      try:
        mixture = phase.mixture(self.mixture)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
      for context_len in sorted(set(phase.context_lens)):
        _check_fits(f"{where}.context_lens", context_len, mixture)

  def phase_index(self, step: int) -> int:
    """The index of the phase `step` belongs to."""
    for i, phase in enumerate(self.phases):
      if step < phase.until:
        return i
    return len(self.phases) - 1

  def phase_at(self, step: int) -> Phase:
    """The phase `step` belongs to."""
    return self.phases[self.phase_index(step)]

  def mixture_at(self, step: int) -> Mixture:
    """The mixture of step `step`: its phase's overrides applied."""
    return self.phase_at(step).mixture(self.mixture)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
    """A DataConfig from `{"phases": [phase dicts], **mixture fields}`.

    Raises:
      ValueError: a missing or bad field.
    """
    d = dict(d)
    _check_keys(
      "data",
      list(d),
      ("phases", *MIXTURE_FIELDS),
      ("phases", "tokens_per_step", "task_fractions", "mqar_pairs"),
    )
    phases = d.pop("phases")
    if isinstance(phases, (str, bytes, Mapping)) or not isinstance(
      phases, Sequence
    ):
      _fail("data.phases", phases, "a sequence of phase mappings")
    return cls(
      phases=tuple(Phase.from_dict(p) for p in phases), mixture=Mixture(**d)
    )

  def to_dict(self) -> dict[str, Any]:
    """`{"phases": [...], **mixture fields}`, JSON-able."""
    return {
      "phases": [p.to_dict() for p in self.phases],
      **self.mixture.to_dict(),
    }


def _check_fits(where: str, context_len: int, mixture: Mixture):
  """Raises unless every row kind of `mixture` fits `context_len`."""
  for task in mixture.tasks:
    if task == "mqar":
      needed = 1 + 2 * min(mixture.mqar_pairs)
      what = f"mqar with the smallest of mqar_pairs={mixture.mqar_pairs}"
    else:
      params = mixture.generator_params(task)
      needed = generators.min_context_len(task, **params)
      what = f"{task} with {params}"
    if context_len < needed:
      _fail(where, context_len, f"lengths >= {needed} ({what})")
  if mixture.copy_fraction > 0 and context_len < 6:
    _fail(where, context_len, "lengths >= 6 (copy rows)")
  if (
    mixture.chain_fraction > 0
    and (context_len - 1) // (3 * max(mixture.chain_hops)) < 1
  ):
    needed = 1 + 3 * max(mixture.chain_hops)
    _fail(
      where,
      context_len,
      f"lengths >= {needed} (one chain of "
      f"chain_hops={mixture.chain_hops} per chain row)",
    )


# --------------------------------------------------------------------------
# Optimizer and evaluation.


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig(_Config):
  """Optimizer and learning-rate schedule (`optimizers.make_optimizer`).

  Attributes:
    name: "adamw" or "muon_split" (Muon on the hidden matrices, AdamW on
      the rest; `kvjax.train.optimizers`).
    learning_rate: peak learning rate (Muon's, for muon_split).
    adam_learning_rate: peak rate of the AdamW half of muon_split; None
      uses `learning_rate`. Ignored by adamw.
    weight_decay: decoupled decay of the hidden matrices only.
    b1: Adam beta1.
    b2: Adam beta2.
    grad_clip: global-norm clip, or None for none.
    warmup_steps: linear warmup steps.
    decay_steps: 0: warmup, then cosine over the whole run. > 0: warmup,
      constant, cosine over the last `decay_steps` steps (WSD: a step's
      rate does not depend on total_steps, so a run can be lengthened).
    final_lr_fraction: the cosine ends at this fraction of the peak.
    restarts: steps where a new WSD cycle starts (warmup again, constant,
      decay), increasing; needs decay_steps > 0. A finished run continues
      by a restart at its end without changing any earlier rate.
  """

  name: str = "adamw"
  learning_rate: float
  adam_learning_rate: float | None = None
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float | None = 1.0
  warmup_steps: int = 0
  decay_steps: int = 0
  final_lr_fraction: float = 0.1
  restarts: tuple[int, ...] = ()

  def __post_init__(self):
    checks = {
      "name": lambda w, v: _choice(w, v, optimizers.OPTIMIZERS),
      "learning_rate": lambda w, v: _float(w, v, 0.0, low_open=True),
      "adam_learning_rate": _optional(_float, low=0.0, low_open=True),
      "weight_decay": lambda w, v: _float(w, v, 0.0),
      "b1": lambda w, v: _float(w, v, 0.0, 1.0, high_open=True),
      "b2": lambda w, v: _float(w, v, 0.0, 1.0, high_open=True),
      "grad_clip": _optional(_float, low=0.0, low_open=True),
      "warmup_steps": lambda w, v: _int(w, v, 0),
      "decay_steps": lambda w, v: _int(w, v, 0),
      "final_lr_fraction": lambda w, v: _float(w, v, 0.0, 1.0),
      "restarts": _steps,
    }
    for name, check in checks.items():
      object.__setattr__(
        self, name, check(f"OptimizerConfig.{name}", getattr(self, name))
      )
    if any(a >= b for a, b in itertools.pairwise(self.restarts)):
      _fail("OptimizerConfig.restarts", self.restarts, "increasing steps")
    if self.restarts and not self.decay_steps:
      _fail(
        "OptimizerConfig.restarts",
        self.restarts,
        "() unless decay_steps > 0 (restarts are WSD cycles)",
      )

  def make(self, total_steps: int):
    """The `optax.GradientTransformation` over `total_steps` steps.

    Raises:
      ValueError: a schedule that does not fit total_steps.
    """
    return optimizers.make_optimizer(
      self.name,
      learning_rate=self.learning_rate,
      adam_learning_rate=self.adam_learning_rate,
      total_steps=total_steps,
      warmup_steps=self.warmup_steps,
      weight_decay=self.weight_decay,
      b1=self.b1,
      b2=self.b2,
      grad_clip=self.grad_clip,
      final_lr_fraction=self.final_lr_fraction,
      decay_steps=self.decay_steps,
      restarts=self.restarts,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(_Config):
  """The held-out evaluation on the task suite (`kvjax.tasks.suite`).

  Attributes:
    every: steps between evaluations during training (0: at the end only).
    context_lens: context lengths of the final evaluation.
    num_examples: held-out rows per (suite entry, context length).
    seed: the held-out seed (training draws from `TrainConfig.seed`).
    mqar_pairs: num_pairs of every mqar entry; None keeps the suite's.
  """

  every: int = 0
  context_lens: tuple[int, ...] = (512,)
  num_examples: int = 256
  seed: int = 12345
  mqar_pairs: int | None = 32

  def __post_init__(self):
    checks = {
      "every": lambda w, v: _int(w, v, 0),
      "context_lens": lambda w, v: _ints(w, v, 1),
      "num_examples": lambda w, v: _int(w, v, 1),
      "seed": lambda w, v: _int(w, v, 0),
      "mqar_pairs": _optional(_int, minimum=1),
    }
    for name, check in checks.items():
      object.__setattr__(
        self, name, check(f"EvalConfig.{name}", getattr(self, name))
      )


# --------------------------------------------------------------------------
# The run.

# Flat key of the dict layout -> field of OptimizerConfig / EvalConfig.
_OPTIMIZER_KEYS = {
  "optimizer": "name",
  "learning_rate": "learning_rate",
  "adam_learning_rate": "adam_learning_rate",
  "weight_decay": "weight_decay",
  "b1": "b1",
  "b2": "b2",
  "grad_clip": "grad_clip",
  "warmup_steps": "warmup_steps",
  "decay_steps": "decay_steps",
  "final_lr_fraction": "final_lr_fraction",
  "lr_restarts": "restarts",
}
_EVAL_KEYS = {
  "eval_every": "every",
  "eval_context_lens": "context_lens",
  "eval_examples": "num_examples",
  "eval_seed": "seed",
  "eval_mqar_pairs": "mqar_pairs",
}
_RUN_KEYS = (
  "model",
  "data",
  "total_steps",
  "seed",
  "init_std",
  "init_out_std",
  "loss_on",
  "log_every",
  "checkpoint_every",
  "max_checkpoints",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Config):
  """A training run (`kvjax.train.loop.train`).

  Attributes:
    model: the decoder; its vocabulary must hold the task ids
      (`kvjax.tasks.VOCAB`).
    data: the task stream and its curriculum.
    optimizer: optimizer and schedule (over `total_steps`).
    total_steps: updates in all.
    seed: init and data seed (the batch of step s is a function of
      (seed, s)).
    init_std: std of the normal init of the matrices.
    init_out_std: std of the residual-output matrices (wo, w_down); None
      uses init_std (`kvjax.model.init_params`).
    loss_on: "answers" (the answer tokens) or "all" (every token).
    log_every: steps between rows of metrics.jsonl.
    checkpoint_every: steps between orbax checkpoints.
    max_checkpoints: checkpoints kept.
    evaluation: the held-out evaluation.
  """

  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  total_steps: int
  seed: int = 0
  init_std: float = 0.02
  init_out_std: float | None = None
  loss_on: str = "answers"
  log_every: int = 10
  checkpoint_every: int = 200
  max_checkpoints: int = 2
  evaluation: EvalConfig = EvalConfig()

  def __post_init__(self):
    for name, kind in (
      ("model", ModelConfig),
      ("data", DataConfig),
      ("optimizer", OptimizerConfig),
      ("evaluation", EvalConfig),
    ):
      if not isinstance(getattr(self, name), kind):
        _fail(f"TrainConfig.{name}", getattr(self, name), f"a {kind.__name__}")
    checks = {
      "total_steps": lambda w, v: _int(w, v, 1),
      "seed": lambda w, v: _int(w, v, 0),
      "init_std": lambda w, v: _float(w, v, 0.0, low_open=True),
      "init_out_std": _optional(_float, low=0.0, low_open=True),
      "loss_on": lambda w, v: _choice(w, v, losses.LOSS_ON),
      "log_every": lambda w, v: _int(w, v, 1),
      "checkpoint_every": lambda w, v: _int(w, v, 1),
      "max_checkpoints": lambda w, v: _int(w, v, 1),
    }
    for name, check in checks.items():
      object.__setattr__(
        self, name, check(f"TrainConfig.{name}", getattr(self, name))
      )
    if self.model.vocab_size < VOCAB.size:
      _fail(
        "TrainConfig.model.vocab_size",
        self.model.vocab_size,
        f">= {VOCAB.size}, the ids of kvjax.tasks.VOCAB",
      )
    try:
      self.optimizer.make(self.total_steps)
    except ValueError as e:
      raise ValueError(
        f"TrainConfig.optimizer does not fit total_steps="
        f"{self.total_steps}: {e}"
      ) from e

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from the flat dict layout (see the module docstring).

    Reads `experiments/configs/train.py`'s `get_config(...).to_dict()`, a
    workdir's `config.json` and an export's `training.json["config"]`. A
    field left out takes its default; `grad_clip` 0 means no clipping and
    `adam_learning_rate` 0 means `learning_rate`, as in the experiment
    config.

    Raises:
      ValueError: an unknown, missing or bad field.
    """
    d = dict(d)
    _check_keys(
      "train config",
      list(d),
      (*_RUN_KEYS, *_OPTIMIZER_KEYS, *_EVAL_KEYS),
      ("model", "data", "total_steps", "learning_rate"),
    )
    optimizer = {
      field: d.pop(key) for key, field in _OPTIMIZER_KEYS.items() if key in d
    }
    for field in ("grad_clip", "adam_learning_rate"):  # 0: none / default
      if field in optimizer and not optimizer[field]:
        optimizer[field] = None
    evaluation = {
      field: d.pop(key) for key, field in _EVAL_KEYS.items() if key in d
    }
    model = d.pop("model")
    if not isinstance(model, Mapping):
      _fail("model", model, "a mapping of ModelConfig fields")
    data = d.pop("data")
    if not isinstance(data, Mapping):
      _fail("data", data, "a mapping of DataConfig fields")
    return cls(
      model=ModelConfig.from_dict(dict(model)),
      data=DataConfig.from_dict(data),
      optimizer=OptimizerConfig(**optimizer),
      evaluation=EvalConfig(**evaluation),
      **d,
    )

  def to_dict(self) -> dict[str, Any]:
    """The flat dict layout, JSON-able; `from_dict` inverts it."""
    out = {"model": self.model.to_dict()}
    out.update(
      {
        key: _plain(getattr(self.optimizer, field))
        for key, field in _OPTIMIZER_KEYS.items()
      }
    )
    out.update(
      {
        key: _plain(getattr(self, key))
        for key in _RUN_KEYS
        if key not in ("model", "data")
      }
    )
    out["data"] = self.data.to_dict()
    out.update(
      {
        key: _plain(getattr(self.evaluation, field))
        for key, field in _EVAL_KEYS.items()
      }
    )
    return out
