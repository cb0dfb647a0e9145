"""Scoring of predicted answers: accuracy, abstention and hallucination.

The unit of scoring is one answer slot: a pair (b, a) with
`batch.answer_positions[b, a] >= 0`. mqar rows have several slots, the other
tasks one, except multihop walks (`multihop(..., walk=True)`), whose slots
are the steps of one answer: a multihop row is scored as one unit, its
prediction being the first step that departs from the true walk (or the
last step if none does), i.e. what greedy decoding commits to when the
ARROW separators between steps are given. So a walk is correct only if
every step is, and a walk that goes astray at an
intermediate node is wrong (abstained, if that step says UNKNOWN). For
each unit, with `pred` the predicted token, `answer` the true token and
`conf` the model's confidence in `pred`:

  correct        pred == answer
  abstained      pred == UNKNOWN
  confident      conf >= threshold (every slot when confidence is None)
  hallucinated   not correct and not abstained and confident
  low-confidence error  not correct and not abstained and not confident

and the rates are means over units:

  accuracy                   = mean(correct)
  abstention_rate            = mean(abstained)
  hallucination_rate         = mean(hallucinated)
  low_confidence_error_rate  = mean(low-confidence error)
  exact_match                = mean over rows of "every slot correct"

On the abstention task the answer is UNKNOWN, so there correct ==
abstained and accuracy == abstention_rate. On the other tasks UNKNOWN is
never the answer, so accuracy + abstention_rate + hallucination_rate +
low_confidence_error_rate == 1. A hallucination is thus a confident, wrong,
committed answer: a wrong value (stale, from a distractor, invented) given
where the model should have answered or abstained. The confidence of a
prediction is its maximum softmax probability (see
`predictions_from_logits`); the default threshold is 0.5.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kvjax.tasks.generators import TASK_NAMES, TaskBatch
from kvjax.tasks.vocab import PAD, UNKNOWN


class TaskScore(NamedTuple):
  """Rates over the answer slots of one task (see the module docstring).

  Attributes:
    accuracy: share of units (answer slots; multihop rows) predicted
      correctly.
    abstention_rate: share of units predicted UNKNOWN.
    hallucination_rate: share of units wrong, not UNKNOWN and confident.
    low_confidence_error_rate: share of units wrong, not UNKNOWN and not
      confident.
    exact_match: share of rows with every slot correct.
    num_answers: number of units scored (answer slots; a multihop walk
      counts once).
    num_examples: number of rows scored.
  """

  accuracy: float
  abstention_rate: float
  hallucination_rate: float
  low_confidence_error_rate: float
  exact_match: float
  num_answers: int
  num_examples: int


def _check_unknown(unknown) -> None:
  """`unknown` (the abstention answer's id) must be an int >= 0."""
  if (
    isinstance(unknown, bool)
    or not isinstance(unknown, (int, np.integer))
    or unknown < 0
  ):
    raise ValueError(
      f"unknown must be a token id (an int >= 0), got {unknown!r}."
    )


def predictions_from_logits(
  batch: TaskBatch, logits, *, offset=0, unknown: int = UNKNOWN
) -> tuple[np.ndarray, np.ndarray]:
  """Greedy answers and their confidence from next-token logits.

  The answer at position p is read from the logits at input position p - 1.
  `logits[b, t]` is taken to be the output at input position `t + offset`:
  offset 0 for a forward pass over all of `batch.tokens`, and
  `batch.context_end` when the context was prefilled (and compressed) first
  and only the question tokens `tokens[:, context_end:]` were fed.

  Args:
    batch: the TaskBatch the logits were computed on.
    logits: [B, T', V] array (numpy or jax, any float dtype).
    offset: int or [B] ints, the input position of `logits[:, 0]`.
    unknown: the id of the abstention answer (UNKNOWN; for a batch in a
      checkpoint's ids, `kvjax.tasks.text.TextBatch.unknown_id`), which V
      must also cover.

  Returns:
    predicted_tokens: [B, A] int32 argmax ids, PAD in padded slots.
    confidence: [B, A] float32 max softmax probability, 0 in padded slots.

  Raises:
    ValueError: logits not [B, T', V] with B matching, a vocabulary V too
      small for the batch (V must exceed UNKNOWN and every token id of the
      batch, answers included), or an answer whose predicting position
      falls outside the logits.
  """
  logits = np.asarray(logits)
  batch_size, num_answers = batch.answer_positions.shape
  if logits.ndim != 3 or logits.shape[0] != batch_size:
    raise ValueError(
      f"logits must be [B={batch_size}, T, V], got shape {logits.shape}."
    )
  # argmax over a vocabulary missing the answer ids (or UNKNOWN) would
  # silently score every such answer wrong instead of failing.
  valid_answers = batch.answers[batch.answer_positions >= 0]
  largest = max(
    int(np.max(batch.tokens, initial=0)), int(np.max(valid_answers, initial=0))
  )
  _check_unknown(unknown)
  needed = max(int(unknown), largest) + 1
  if logits.shape[-1] < needed:
    raise ValueError(
      f"logits have vocabulary size V={logits.shape[-1]}, but the batch "
      f"needs V >= {needed} (UNKNOWN={unknown}; largest token or answer "
      f"id in the batch: {largest}); were the logits computed over the "
      "task vocabulary?"
    )
  offset = np.broadcast_to(np.asarray(offset, dtype=np.int64), (batch_size,))
  valid = batch.answer_positions >= 0  # [B, A]
  index = batch.answer_positions - 1 - offset[:, None]  # [B, A]
  out_of_range = valid & ((index < 0) | (index >= logits.shape[1]))
  if out_of_range.any():
    b, a = np.argwhere(out_of_range)[0]
    raise ValueError(
      f"answer {a} of row {b} at position {batch.answer_positions[b, a]} "
      f"is predicted from logits index {index[b, a]}, outside "
      f"[0, {logits.shape[1]}) for offset={offset[b]}; check offset."
    )
  rows = np.arange(batch_size)[:, None]
  gathered = logits[rows, np.where(valid, index, 0)].astype(np.float64)
  # gathered: [B, A, V]
  predicted = np.argmax(gathered, axis=-1)
  shifted = gathered - gathered.max(axis=-1, keepdims=True)
  confidence = 1.0 / np.exp(shifted).sum(axis=-1)  # max softmax probability
  predicted = np.where(valid, predicted, PAD).astype(np.int32)
  confidence = np.where(valid, confidence, 0.0).astype(np.float32)
  return predicted, confidence


def _rates(correct, abstained, confident, valid, row_mask) -> TaskScore:
  """TaskScore over the rows in `row_mask`; arrays are [B, A]."""
  slots = valid & row_mask[:, None]
  num_answers = int(slots.sum())
  rows_with_answers = row_mask & valid.any(axis=1)
  num_examples = int(rows_with_answers.sum())
  if num_answers == 0:
    nan = float("nan")
    return TaskScore(nan, nan, nan, nan, nan, 0, num_examples)
  wrong_committed = ~correct & ~abstained

  def share(flags):
    return float((flags & slots).sum() / num_answers)

  exact = (correct | ~valid).all(axis=1)
  return TaskScore(
    accuracy=share(correct),
    abstention_rate=share(abstained),
    hallucination_rate=share(wrong_committed & confident),
    low_confidence_error_rate=share(wrong_committed & ~confident),
    exact_match=float(exact[rows_with_answers].mean()),
    num_answers=num_answers,
    num_examples=num_examples,
  )


def _walk_units(walks, correct, abstained, confident, valid):
  """Collapses each walk row [A] of per-step flags into slot 0: the first
  wrong valid step (the last valid one if all are right)."""
  wrong = valid & ~correct
  last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
  step = np.where(wrong.any(axis=1), np.argmax(wrong, axis=1), last)
  rows = np.arange(valid.shape[0])

  def unit(flags):
    collapsed = np.zeros_like(flags)
    collapsed[:, 0] = flags[rows, step]
    return np.where(walks[:, None], collapsed, flags)

  has_answer = valid.any(axis=1)
  unit_valid = np.zeros_like(valid)
  unit_valid[:, 0] = has_answer
  return (
    unit(correct),
    unit(abstained),
    unit(confident),
    np.where(walks[:, None], unit_valid, valid),
  )


def score(
  batch: TaskBatch,
  predicted_tokens,
  *,
  confidence=None,
  threshold: float = 0.5,
  unknown: int = UNKNOWN,
) -> dict[str, TaskScore]:
  """Accuracy, abstention and hallucination rates per task.

  Definitions (per unit: an answer slot, or a whole multihop row judged at
  its first wrong step; see the module docstring):
    correct = predicted == answer; on the abstention task the answer is
      UNKNOWN, so correct means abstaining.
    abstention_rate = share of units predicting UNKNOWN.
    hallucination = wrong AND not UNKNOWN AND confident, where confident
      means confidence >= threshold (max softmax probability); with
      `confidence=None` every prediction counts as confident.
  Rates are pooled over the units of each task (answer slots; one per
  multihop row, whose slots are the steps of a walk); a mixture batch is
  split by `batch.task_ids`.

  Args:
    batch: the TaskBatch that was answered.
    predicted_tokens: [B, A] predicted ids (values in padded slots are
      ignored); [B] is accepted when A == 1.
    confidence: None or [B, A] (or [B] when A == 1) floats in [0, 1].
    threshold: confidence at or above which a prediction is confident, in
      [0, 1].
    unknown: the id that means "abstain": UNKNOWN for the private ids; for
      a batch in a checkpoint's ids (`kvjax.tasks.text`), its
      `TextBatch.unknown_id`, else the abstention and hallucination rates
      compare predictions with an arbitrary token.

  Returns:
    Dict task name -> TaskScore for every task present in the batch, in
    TASK_NAMES order, plus "all": the same rates pooled over every slot of
    the batch. A task with no answer slot gets NaN rates.

  Raises:
    TypeError: batch is not a TaskBatch.
    ValueError: shapes do not match `batch.answers`, confidence outside
      [0, 1] or not finite, threshold outside [0, 1].
  """
  if not isinstance(batch, TaskBatch):
    raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}.")
  answers = batch.answers  # [B, A]
  valid = batch.answer_positions >= 0  # [B, A]

  def as_slots(name, values):
    values = np.asarray(values)
    if values.shape == answers.shape[:1] and answers.shape[1] == 1:
      values = values[:, None]
    if values.shape != answers.shape:
      raise ValueError(
        f"{name} must have shape {answers.shape} like batch.answers"
        + (f" (or {answers.shape[:1]})" if answers.shape[1] == 1 else "")
        + f", got {values.shape}."
      )
    return values

  predicted = as_slots("predicted_tokens", predicted_tokens)
  if not np.issubdtype(predicted.dtype, np.integer):
    raise ValueError(
      f"predicted_tokens must hold integer ids, got dtype {predicted.dtype}."
    )
  threshold = float(threshold)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
  if confidence is None:
    confident = np.ones(answers.shape, dtype=bool)
  else:
    confidence = as_slots("confidence", confidence).astype(np.float64)
    checked = confidence[valid]
    if not np.all(np.isfinite(checked)) or np.any(
      (checked < 0) | (checked > 1)
    ):
      raise ValueError(
        "confidence must be finite and in [0, 1] in every answer slot."
      )
    confident = confidence >= threshold

  correct = predicted == answers
  _check_unknown(unknown)
  abstained = predicted == int(unknown)
  walks = batch.task_ids == TASK_NAMES.index("multihop")
  if walks.any() and answers.shape[1] > 1:
    correct, abstained, confident, valid = _walk_units(
      walks, correct, abstained, confident, valid
    )
  results = {}
  for task_id, name in enumerate(TASK_NAMES):
    rows = batch.task_ids == task_id
    if rows.any():
      results[name] = _rates(correct, abstained, confident, valid, rows)
  results["all"] = _rates(
    correct, abstained, confident, valid, np.ones(batch.batch_size, dtype=bool)
  )
  return results
