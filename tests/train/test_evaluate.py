"""Evaluation: prefill + teacher-forced question equals one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import tasks
from kvjax.train import evaluate

CONFIG = kvjax.ModelConfig(vocab_size=512, d_model=32, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16,
                           mlp_dim=64)


def _params():
  return kvjax.init_params(CONFIG, jax.random.key(0), std=0.2)


def test_prefill_then_question_matches_one_forward():
  params = _params()
  batch = tasks.make_mixture_batch(6, seed=1, context_len=40,
                                   task_params={"mqar": {"num_pairs": 4}})
  scores = evaluate.evaluate_batch(params, CONFIG, batch)
  B, T = batch.tokens.shape
  mask = jnp.arange(T)[None, :] < batch.lengths[:, None]
  logits, _, _ = kvjax.forward(params, jnp.asarray(batch.tokens),
                               kvjax.init_cache(CONFIG, B, T), config=CONFIG,
                               token_mask=mask)
  predicted, confidence = tasks.predictions_from_logits(batch, logits)
  expected = tasks.score(batch, predicted, confidence=confidence)
  assert scores.keys() == expected.keys()
  for name in scores:
    np.testing.assert_allclose(scores[name].accuracy,
                               expected[name].accuracy)
    assert scores[name].num_answers == expected[name].num_answers


def test_cache_fn_is_applied_between_prefill_and_question():
  params = _params()
  batch = tasks.make_batch("needle", 4, seed=0, context_len=32)
  def forget(cache):  # drop the whole context: answers become guesses
    return cache._replace(valid=jnp.zeros_like(cache.valid))
  plain = evaluate.evaluate_batch(params, CONFIG, batch)
  forgot = evaluate.evaluate_batch(params, CONFIG, batch, cache_fn=forget)
  assert plain["needle"].num_answers == forgot["needle"].num_answers == 4


def test_evaluate_task_and_suite_shapes():
  params = _params()
  score = evaluate.evaluate_task(params, CONFIG, "mqar", context_len=24,
                                 num_examples=5, seed=3, batch_size=4,
                                 num_pairs=4)
  assert score.num_examples == 5 and score.num_answers == 20
  out = evaluate.evaluate_suite(params, CONFIG, context_lens=(40,),
                                num_examples=4, batch_size=4, mqar_pairs=4)
  assert set(out) == {40}
  assert set(out[40]) == {name for name, _, _ in evaluate.SUITE}
  assert all(0.0 <= v <= 1.0 for v in out[40].values())


def test_mixed_context_lengths_raise():
  batch = tasks.concat_batches([
      tasks.make_batch("needle", 2, seed=0, context_len=20),
      tasks.make_batch("needle", 2, seed=0, context_len=24)])
  with pytest.raises(ValueError, match="context_end"):
    evaluate.evaluate_batch(_params(), CONFIG, batch)
