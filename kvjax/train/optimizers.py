"""Optimizers for kvjax params: AdamW, and the Muon split.

The Muon split (`muon_split`) runs `optax.contrib.muon` on the hidden
matrices of every layer (wq, wk, wv, wo, w_gate, w_up, w_down) and AdamW on
the rest (embeddings, LM head, norms, biases). The hidden matrices carry a
leading L axis and, for attention, split head axes; `muon_dimension_numbers`
tells Muon which axes are the matrix's reduction (input) and output axes so
that L is a batch axis and each layer's [D, N*H] (or [N*H, D]) matrix is
orthogonalized on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import optax
from optax.contrib import MuonDimensionNumbers

OPTIMIZERS = ("adamw", "muon_split")

# Param layout: see kvjax/model.py. Axis 0 is L (a batch axis for Muon).
MUON_DIMENSION_NUMBERS = {
  # [L, D, N, H]: D -> N,H
  "wq": MuonDimensionNumbers(reduction_axis=1, output_axis=(2, 3)),
  # [L, D, K, H]: D -> K,H
  "wk": MuonDimensionNumbers(reduction_axis=1, output_axis=(2, 3)),
  "wv": MuonDimensionNumbers(reduction_axis=1, output_axis=(2, 3)),
  # [L, N, H, D]: N,H -> D
  "wo": MuonDimensionNumbers(reduction_axis=(1, 2), output_axis=3),
  "w_gate": MuonDimensionNumbers(reduction_axis=1, output_axis=2),  # D -> F
  "w_up": MuonDimensionNumbers(reduction_axis=1, output_axis=2),  # D -> F
  "w_down": MuonDimensionNumbers(reduction_axis=1, output_axis=2),  # F -> D
}


def muon_dimension_numbers(params: Any) -> Any:
  """A tree like `params`: `MuonDimensionNumbers` for hidden matrices, None
  (meaning AdamW) for everything else."""

  def spec(path, _):
    names = [getattr(k, "key", None) for k in path]
    if len(names) == 2 and names[0] == "layers":
      return MUON_DIMENSION_NUMBERS.get(names[1])
    return None

  return jax.tree.map_with_path(spec, params)


def param_labels(params: Any) -> Any:
  """A tree like `params` with "muon" or "adamw" at every leaf."""
  specs = muon_dimension_numbers(params)
  return jax.tree.map(
    lambda s, _: "adamw" if s is None else "muon",
    specs,
    params,
    is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
  )


def warmup_cosine(
  peak: float, total_steps: int, warmup_steps: int, final_fraction: float = 0.1
) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine decay to
  `final_fraction * peak` at `total_steps`.

  Raises:
    ValueError: non-positive steps or warmup >= total steps.
  """
  if total_steps <= 0 or warmup_steps < 0 or warmup_steps >= total_steps:
    raise ValueError(
      f"need 0 <= warmup_steps < total_steps, got "
      f"warmup_steps={warmup_steps}, total_steps={total_steps}."
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=final_fraction * peak,
  )


def warmup_stable_decay(
  peak: float,
  total_steps: int,
  warmup_steps: int,
  decay_steps: int,
  final_fraction: float = 0.1,
  restarts: Sequence[int] = (),
) -> optax.Schedule:
  """Linear warmup to `peak`, constant, then a cosine decay over the last
  `decay_steps` steps to `final_fraction * peak` at `total_steps` (WSD).

  The rate of a step before the decay does not depend on `total_steps`, so
  a run can be lengthened (or its later curriculum changed) after it has
  started and still equal a run configured that way from the start.

  With `restarts` (increasing steps in (0, total_steps)), the run is a
  sequence of such cycles: each restart ends the cycle before it (decayed
  over its last `decay_steps`) and starts a new one that warms up linearly
  from `final_fraction * peak` back to `peak`. Adding a restart at the
  end of a finished run continues it without changing any earlier rate.

  Raises:
    ValueError: non-positive steps, warmup + decay longer than a cycle, or
      restarts not increasing inside (0, total_steps).
  """
  restarts = tuple(int(r) for r in restarts)
  bounds = (0, *restarts, total_steps)
  if restarts and any(b >= e for b, e in itertools.pairwise(bounds)):
    raise ValueError(
      f"restarts must increase inside (0, total_steps="
      f"{total_steps}), got {restarts!r}."
    )
  # The first cycle warms up from 0, a restarted one from the decayed rate.
  cycles = [
    _one_cycle(
      peak,
      e - b,
      warmup_steps,
      decay_steps,
      final_fraction,
      0.0 if i == 0 else final_fraction * peak,
    )
    for i, (b, e) in enumerate(itertools.pairwise(bounds))
  ]
  return (
    cycles[0]
    if not restarts
    else optax.join_schedules(cycles, boundaries=list(restarts))
  )


def _one_cycle(
  peak, total_steps, warmup_steps, decay_steps, final_fraction, init
):
  if (
    total_steps <= 0
    or warmup_steps < 0
    or decay_steps <= 0
    or warmup_steps + decay_steps > total_steps
  ):
    raise ValueError(
      f"need warmup_steps >= 0, decay_steps > 0 and warmup_steps + "
      f"decay_steps <= steps of each cycle ({total_steps}), got "
      f"warmup_steps={warmup_steps}, decay_steps={decay_steps}."
    )
  stable = total_steps - warmup_steps - decay_steps
  return optax.join_schedules(
    [
      optax.linear_schedule(init, peak, warmup_steps),
      optax.constant_schedule(peak),
      optax.cosine_decay_schedule(peak, decay_steps, alpha=final_fraction),
    ],
    boundaries=[warmup_steps, warmup_steps + stable],
  )


def _schedule(
  peak, total_steps, warmup_steps, decay_steps, final_fraction, restarts
):
  if decay_steps:
    return warmup_stable_decay(
      peak, total_steps, warmup_steps, decay_steps, final_fraction, restarts
    )
  if restarts:
    raise ValueError(
      f"lr_restarts={tuple(restarts)!r} need the WSD "
      f"schedule (decay_steps > 0)."
    )
  return warmup_cosine(peak, total_steps, warmup_steps, final_fraction)


def _decay_mask(params: Any) -> Any:
  """Weight decay on the hidden matrices only (the Muon leaves), never on
  embeddings, LM head, norms or biases; the same for both optimizers."""
  return jax.tree.map(lambda label: label == "muon", param_labels(params))


def make_optimizer(
  name: str,
  *,
  learning_rate: float,
  total_steps: int,
  warmup_steps: int,
  weight_decay: float = 0.0,
  adam_learning_rate: float | None = None,
  b1: float = 0.9,
  b2: float = 0.95,
  grad_clip: float | None = 1.0,
  final_lr_fraction: float = 0.1,
  decay_steps: int = 0,
  restarts: Sequence[int] = (),
) -> optax.GradientTransformation:
  """Builds an optimizer with a warmup + cosine (or WSD) schedule.

  Args:
    name: "adamw" or "muon_split".
    learning_rate: peak learning rate (of Muon, for muon_split).
    total_steps: schedule length.
    warmup_steps: linear warmup steps.
    weight_decay: decoupled weight decay on the hidden matrices (wq, wk,
      wv, wo, w_gate, w_up, w_down) only, for both optimizers.
    adam_learning_rate: peak AdamW learning rate of the non-Muon params in
      muon_split (default: `learning_rate`). Ignored for adamw.
    b1, b2: Adam moments (of the AdamW half, for muon_split; Muon keeps
      its own Nesterov momentum 0.95).
    grad_clip: global-norm clip applied first, or None.
    final_lr_fraction: the cosine ends at this fraction of the peak.
    decay_steps: 0 for warmup + cosine over the whole run; otherwise
      warmup, constant, and a cosine over the last `decay_steps` steps
      (`warmup_stable_decay`).
    restarts: steps where a new WSD cycle starts (`warmup_stable_decay`);
      needs decay_steps > 0.

  Returns:
    An `optax.GradientTransformation` over kvjax params.

  Raises:
    ValueError: unknown name or bad schedule.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r}; allowed: {OPTIMIZERS}.")
  schedule = _schedule(
    learning_rate,
    total_steps,
    warmup_steps,
    decay_steps,
    final_lr_fraction,
    restarts,
  )
  if name == "adamw":
    core = optax.adamw(
      schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask
    )
  else:
    adam_schedule = _schedule(
      adam_learning_rate if adam_learning_rate is not None else learning_rate,
      total_steps,
      warmup_steps,
      decay_steps,
      final_lr_fraction,
      restarts,
    )
    # Weight decay touches the hidden matrices only, as in `adamw` above
    # (see `_decay_mask`), so the AdamW half runs without decay.
    core = optax.contrib.muon(
      schedule,
      weight_decay=weight_decay,
      adam_learning_rate=adam_schedule,
      adam_b1=b1,
      adam_b2=b2,
      adam_weight_decay=0.0,
      muon_weight_dimension_numbers=muon_dimension_numbers,
    )
  if grad_clip:
    return optax.chain(optax.clip_by_global_norm(grad_clip), core)
  return core
