"""Tests of kvjax/tasks/scoring.py on hand-built predictions."""

import math

import numpy as np
import pytest

from kvjax import tasks
from kvjax.tasks import PAD, UNKNOWN

CONTEXT_LEN = 64


def _wrong_value(answers):
  """Value ids that differ from `answers`, elementwise."""
  answers = np.asarray(answers)
  return np.where(tasks.VOCAB.is_value(answers + 1), answers + 1, answers - 1)


def test_needle_rates_without_confidence():
  batch = tasks.make_batch("needle", 10, seed=0, context_len=CONTEXT_LEN)
  answers = batch.answers[:, 0]
  predicted = answers.copy()
  predicted[6:8] = UNKNOWN  # 2 abstentions
  predicted[8:] = _wrong_value(answers[8:])  # 2 wrong values
  result = tasks.score(batch, predicted)  # [B] accepted when A == 1
  assert set(result) == {"needle", "all"}
  needle = result["needle"]
  assert needle.accuracy == pytest.approx(0.6)
  assert needle.abstention_rate == pytest.approx(0.2)
  # No confidence: every wrong non-UNKNOWN answer is a hallucination.
  assert needle.hallucination_rate == pytest.approx(0.2)
  assert needle.low_confidence_error_rate == 0.0
  assert needle.exact_match == pytest.approx(0.6)
  assert (needle.num_answers, needle.num_examples) == (10, 10)
  assert result["all"] == needle


def test_confidence_threshold_separates_hallucinations():
  batch = tasks.make_batch("overwrite", 8, seed=1, context_len=CONTEXT_LEN)
  answers = batch.answers  # [8, 1]
  predicted = answers.copy()
  predicted[4:] = _wrong_value(answers[4:])  # 4 wrong values
  confidence = np.array([0.9, 0.2, 0.9, 0.2, 0.9, 0.5, 0.49, 0.1])[:, None]
  result = tasks.score(batch, predicted, confidence=confidence)["overwrite"]
  assert result.accuracy == pytest.approx(0.5)
  assert result.abstention_rate == 0.0
  # Wrong with confidence >= 0.5: rows 4 and 5 (the threshold is inclusive).
  assert result.hallucination_rate == pytest.approx(2 / 8)
  assert result.low_confidence_error_rate == pytest.approx(2 / 8)
  stricter = tasks.score(
    batch, predicted, confidence=confidence, threshold=0.95
  )["overwrite"]
  assert stricter.hallucination_rate == 0.0
  assert stricter.low_confidence_error_rate == pytest.approx(0.5)


def test_abstention_task_correct_means_unknown():
  batch = tasks.make_batch("abstention", 4, seed=2, context_len=CONTEXT_LEN)
  some_value = tasks.VOCAB.value_start + 3
  predicted = np.array([[UNKNOWN], [UNKNOWN], [some_value], [some_value]])
  confidence = np.array([[0.99], [0.1], [0.8], [0.3]])
  result = tasks.score(batch, predicted, confidence=confidence)["abstention"]
  assert result.accuracy == pytest.approx(0.5)
  assert result.abstention_rate == result.accuracy
  assert result.hallucination_rate == pytest.approx(0.25)
  assert result.low_confidence_error_rate == pytest.approx(0.25)


def test_mqar_rates_are_per_answer_slot_and_exact_match_per_row():
  batch = tasks.make_batch(
    "mqar", 4, seed=3, context_len=CONTEXT_LEN, num_pairs=4
  )
  predicted = batch.answers.copy()  # [4, 4]
  predicted[0, 0] = UNKNOWN
  predicted[1, :2] = _wrong_value(batch.answers[1, :2])
  result = tasks.score(batch, predicted)["mqar"]
  assert result.num_answers == 16
  assert result.accuracy == pytest.approx(13 / 16)
  assert result.abstention_rate == pytest.approx(1 / 16)
  assert result.hallucination_rate == pytest.approx(2 / 16)
  assert result.exact_match == pytest.approx(2 / 4)


def test_a_walk_is_one_unit_judged_at_its_first_wrong_step():
  batch = tasks.make_batch(
    "multihop", 6, seed=7, context_len=CONTEXT_LEN, hops=3, walk=True
  )
  answers = batch.answers  # [6, 3]: x2, x3, y
  predicted = answers.copy()
  predicted[1, 2] = _wrong_value(answers[1, 2])  # wrong end
  predicted[2, 0] = UNKNOWN  # gives up at the first step
  predicted[2, 1:] = _wrong_value(answers[2, 1:])  # (later steps ignored)
  predicted[3, 1] = answers[4, 1]  # a confident wrong node ...
  predicted[4, 1] = answers[3, 1]  # ... and a timid one
  confidence = np.full((6, 3), 0.9)
  confidence[4, 1] = 0.2
  # Row 5: all steps right. Row 0 too, though its end is not confident.
  confidence[0, 2] = 0.1
  r = tasks.score(batch, predicted, confidence=confidence)["multihop"]
  assert (r.num_answers, r.num_examples) == (6, 6)
  assert r.accuracy == pytest.approx(2 / 6)
  assert r.exact_match == pytest.approx(2 / 6)
  assert r.abstention_rate == pytest.approx(1 / 6)  # row 2
  assert r.hallucination_rate == pytest.approx(2 / 6)  # rows 1, 3
  assert r.low_confidence_error_rate == pytest.approx(1 / 6)  # row 4
  # A one-step walk scores like the latent question with the same answer.
  k1 = tasks.make_batch(
    "multihop", 6, seed=7, context_len=CONTEXT_LEN, hops=1, walk=True
  )
  k1_latent = tasks.make_batch(
    "multihop", 6, seed=7, context_len=CONTEXT_LEN, hops=1
  )
  np.testing.assert_array_equal(k1.tokens, k1_latent.tokens)
  guesses = np.where(np.arange(6) % 2 == 0, k1.answers[:, 0], UNKNOWN)
  assert tasks.score(k1, guesses) == tasks.score(k1_latent, guesses)


def test_walks_mixed_with_mqar_keep_mqar_slots():
  walk = tasks.make_batch(
    "multihop", 4, seed=8, context_len=CONTEXT_LEN, hops=(1, 2, 4), walk=True
  )
  mqar = tasks.make_batch(
    "mqar", 4, seed=8, context_len=CONTEXT_LEN, num_pairs=3
  )
  batch = tasks.concat_batches([walk, mqar])
  predicted = batch.answers.copy()
  valid = batch.answer_positions >= 0
  predicted[~valid] = 12345
  steps = valid[:4].sum(axis=1)
  predicted[0, steps[0] - 1] = UNKNOWN  # walk 0 ends in UNKNOWN
  predicted[4, 0] = UNKNOWN  # one mqar slot abstains
  result = tasks.score(batch, predicted)
  assert result["multihop"].num_answers == 4
  assert result["multihop"].abstention_rate == pytest.approx(1 / 4)
  assert result["mqar"].num_answers == 12
  assert result["mqar"].accuracy == pytest.approx(11 / 12)
  assert result["all"].num_answers == 16
  assert result["all"].accuracy == pytest.approx(14 / 16)


def test_mixture_is_split_per_task_and_padding_ignored():
  batch = tasks.make_mixture_batch(
    40,
    seed=4,
    context_len=CONTEXT_LEN,
    weights={"mqar": 1, "needle": 1, "abstention": 1},
    task_params={"mqar": {"num_pairs": 3}},
  )
  names = np.array(batch.task_names)
  predicted = batch.answers.copy()  # [B, 3], PAD in padded slots
  valid = batch.answer_positions >= 0
  predicted[~valid] = 12345  # garbage in padded slots is ignored
  needle_rows = np.flatnonzero(names == "needle")
  predicted[needle_rows[0], 0] = UNKNOWN  # one needle abstention
  abstention_rows = np.flatnonzero(names == "abstention")
  predicted[abstention_rows[0], 0] = tasks.VOCAB.value_start  # hallucination
  result = tasks.score(batch, predicted)
  assert list(result) == ["mqar", "needle", "abstention", "all"]
  assert result["mqar"].accuracy == 1.0
  assert result["mqar"].num_answers == 3 * (names == "mqar").sum()
  assert result["needle"].accuracy == pytest.approx(1 - 1 / len(needle_rows))
  assert result["needle"].abstention_rate == pytest.approx(1 / len(needle_rows))
  assert result["abstention"].hallucination_rate == pytest.approx(
    1 / len(abstention_rows)
  )
  total = valid.sum()
  assert result["all"].num_answers == total
  assert result["all"].accuracy == pytest.approx(1 - 2 / total)
  assert result["all"].num_examples == 40


def test_rates_partition_on_non_abstention_tasks():
  rng = np.random.default_rng(0)
  batch = tasks.make_batch(
    "multihop",
    200,
    seed=5,
    context_len=CONTEXT_LEN,
    hops=2,
    num_distractor_chains=1,
  )
  predicted = rng.choice(
    [batch.answers[0, 0], UNKNOWN, tasks.VOCAB.value_start], size=(200, 1)
  )
  confidence = rng.random((200, 1))
  r = tasks.score(batch, predicted, confidence=confidence)["multihop"]
  assert (
    r.accuracy
    + r.abstention_rate
    + r.hallucination_rate
    + r.low_confidence_error_rate
  ) == pytest.approx(1.0)


def test_predictions_from_logits_full_and_question_only():
  batch = tasks.make_batch(
    "mqar", 3, seed=6, context_len=CONTEXT_LEN, num_pairs=2
  )
  batch_size, total_len = batch.tokens.shape
  vocab_size = tasks.VOCAB.size
  logits = np.zeros((batch_size, total_len, vocab_size), dtype=np.float32)
  rows = np.arange(batch_size)[:, None]
  # Put mass 4 on the answer at the position before it (next-token shift).
  logits[rows, batch.answer_positions - 1, batch.answers] = 4.0
  predicted, confidence = tasks.predictions_from_logits(batch, logits)
  np.testing.assert_array_equal(predicted, batch.answers)
  expected = math.exp(4) / (math.exp(4) + vocab_size - 1)
  np.testing.assert_allclose(confidence, expected, rtol=1e-5)
  # Logits of the question only, after prefilling the context.
  question_logits = logits[:, CONTEXT_LEN:]
  predicted_q, confidence_q = tasks.predictions_from_logits(
    batch, question_logits, offset=batch.context_end
  )
  np.testing.assert_array_equal(predicted_q, predicted)
  np.testing.assert_allclose(confidence_q, confidence)
  result = tasks.score(batch, predicted, confidence=confidence)["mqar"]
  assert result.accuracy == 1.0
  # With offset 0 the question-only logits are misaligned: out of range.
  with pytest.raises(ValueError, match="offset"):
    tasks.predictions_from_logits(batch, question_logits[:, :3])


def test_predictions_from_logits_padded_slots():
  batch = tasks.make_mixture_batch(
    6,
    seed=0,
    context_len=CONTEXT_LEN,
    weights={"mqar": 1, "needle": 1},
    task_params={"mqar": {"num_pairs": 2}},
  )
  logits = np.random.default_rng(0).normal(
    size=batch.tokens.shape + (tasks.VOCAB.size,)
  )
  predicted, confidence = tasks.predictions_from_logits(batch, logits)
  padded = batch.answer_positions < 0
  assert (predicted[padded] == PAD).all() and (confidence[padded] == 0).all()
  assert ((confidence[~padded] > 0) & (confidence[~padded] <= 1)).all()


def test_predictions_from_logits_rejects_a_small_vocabulary():
  batch = tasks.make_batch("needle", 2, seed=0, context_len=CONTEXT_LEN)
  needed = int(batch.tokens.max()) + 1
  assert needed > UNKNOWN + 1 and needed <= tasks.VOCAB.size
  for vocab_size in (UNKNOWN, needed - 1):
    logits = np.zeros(batch.tokens.shape + (vocab_size,), np.float32)
    with pytest.raises(
      ValueError,
      match=rf"vocabulary size V={vocab_size}, "
      rf"but the batch needs V >= {needed}",
    ):
      tasks.predictions_from_logits(batch, logits)
  logits = np.zeros(batch.tokens.shape + (needed,), np.float32)
  predicted, _ = tasks.predictions_from_logits(batch, logits)
  assert predicted.shape == batch.answers.shape
  # UNKNOWN must be predictable even when no token of the batch is as large.
  tiny = batch._replace(
    tokens=np.zeros_like(batch.tokens), answers=np.zeros_like(batch.answers)
  )
  with pytest.raises(ValueError, match=rf"needs V >= {UNKNOWN + 1}"):
    tasks.predictions_from_logits(tiny, logits[..., :UNKNOWN])


def test_task_with_no_answers_reports_nan():
  batch = tasks.make_batch("needle", 2, seed=0, context_len=CONTEXT_LEN)
  batch = batch._replace(
    answer_positions=np.full_like(batch.answer_positions, -1)
  )
  result = tasks.score(batch, batch.answers)["needle"]
  assert math.isnan(result.accuracy) and result.num_answers == 0


@pytest.mark.parametrize(
  "kwargs, error, pattern",
  [
    (
      {"predicted_tokens": np.zeros((4, 2), np.int32)},
      ValueError,
      r"predicted_tokens must have shape \(4, 1\)",
    ),
    (
      {"predicted_tokens": np.zeros((4, 1), np.float32)},
      ValueError,
      r"integer ids",
    ),
    ({"confidence": np.full((4, 1), 1.5)}, ValueError, r"confidence.*\[0, 1\]"),
    (
      {"confidence": np.ones((3, 1))},
      ValueError,
      r"confidence must have shape",
    ),
    ({"threshold": 2.0}, ValueError, r"threshold must be in \[0, 1\]"),
  ],
)
def test_bad_score_arguments(kwargs, error, pattern):
  batch = tasks.make_batch("needle", 4, seed=0, context_len=CONTEXT_LEN)
  call = {"predicted_tokens": batch.answers, **kwargs}
  predicted = call.pop("predicted_tokens")
  with pytest.raises(error, match=pattern):
    tasks.score(batch, predicted, **call)


def test_score_rejects_non_batch():
  with pytest.raises(TypeError, match="TaskBatch"):
    tasks.score({"answers": np.zeros((1, 1))}, np.zeros((1, 1), np.int32))
