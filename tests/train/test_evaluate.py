"""Evaluation: prefill + teacher-forced question equals one full forward;
cache_fn acts on the prefilled cache, before the question."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import tasks
from kvjax.cache import KVCache
from kvjax.tasks import generators
from kvjax.tasks import suite as suite_lib
from kvjax.tasks.suite import SUITE
from kvjax.train import evaluate

CONFIG = kvjax.ModelConfig(
  vocab_size=512,
  d_model=32,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
)


def _params():
  return kvjax.init_params(CONFIG, jax.random.key(0), std=0.2)


def test_prefill_then_question_matches_one_forward():
  params = _params()
  batch = tasks.make_mixture_batch(
    6, seed=1, context_len=40, task_params={"mqar": {"num_pairs": 4}}
  )
  scores = evaluate.evaluate_batch(params, CONFIG, batch)
  B, T = batch.tokens.shape
  mask = jnp.arange(T)[None, :] < batch.lengths[:, None]
  logits, _, _ = kvjax.forward(
    params,
    jnp.asarray(batch.tokens),
    kvjax.init_cache(CONFIG, B, T),
    config=CONFIG,
    token_mask=mask,
  )
  predicted, confidence = tasks.predictions_from_logits(batch, logits)
  expected = tasks.score(batch, predicted, confidence=confidence)
  assert scores.keys() == expected.keys()
  for name in scores:
    np.testing.assert_allclose(scores[name].accuracy, expected[name].accuracy)
    assert scores[name].num_answers == expected[name].num_answers


# kvjax-tiny answers mqar at context 128 perfectly uncompressed (128 of 128
# answers on the batches below), so a cache_fn that takes the context away
# must show; chance among the 16 context values is 0.06.
TINY_L, TINY_PAIRS, TINY_ROWS = 128, 16, 8


@pytest.fixture(scope="module")
def tiny():
  return kvjax.pretrained.load("kvjax-tiny")


def _tiny_batch(seed):
  return tasks.make_batch(
    "mqar", TINY_ROWS, seed=seed, context_len=TINY_L, num_pairs=TINY_PAIRS
  )


def _forget(cache):
  """Every context slot invalid: the question attends to itself only."""
  return cache._replace(valid=jnp.zeros_like(cache.valid))


def _zero_values(cache):
  """Context slots still attended, but every value read is zero."""
  return cache._replace(v=jax.tree.map(jnp.zeros_like, cache.v))


def test_cache_fn_gets_the_prefilled_cache_once_and_identity_is_a_no_op(tiny):
  config, params = tiny
  batch = _tiny_batch(0)
  B, T = batch.tokens.shape
  traced, seen = [], []

  def identity(cache):
    traced.append(cache)
    # The run-time cache holds the context and nothing of the question.
    jax.debug.callback(
      lambda *x: seen.append(tuple(map(np.asarray, x))),
      cache.length,
      cache.end,
      jnp.sum(cache.valid, axis=-1),
    )
    return cache

  plain = evaluate.evaluate_batch(params, config, batch)
  same = evaluate.evaluate_batch(params, config, batch, cache_fn=identity)
  jax.effects_barrier()
  assert len(traced) == 1 and isinstance(traced[0], KVCache)
  assert traced[0].pos.shape == (config.num_layers, B, config.num_kv_heads, T)
  assert len(seen) == 1
  length, end, num_valid = seen[0]
  np.testing.assert_array_equal(length, np.full(B, TINY_L))
  np.testing.assert_array_equal(end, np.full(B, TINY_L))
  np.testing.assert_array_equal(
    num_valid, np.full((config.num_layers, B, config.num_kv_heads), TINY_L)
  )
  assert plain["mqar"].accuracy >= 0.95, plain
  assert same == plain


@pytest.mark.parametrize("destroy", [_forget, _zero_values])
def test_cache_fn_that_destroys_the_context_loses_the_answers(tiny, destroy):
  config, params = tiny
  batch = _tiny_batch(0)
  kept = evaluate.evaluate_batch(params, config, batch)["mqar"]
  lost = evaluate.evaluate_batch(params, config, batch, cache_fn=destroy)[
    "mqar"
  ]
  assert kept.accuracy >= 0.95 and lost.accuracy <= 0.2, (kept, lost)
  assert lost.num_answers == kept.num_answers == TINY_ROWS * TINY_PAIRS
  # evaluate_task hands cache_fn on to every batch (same shapes: no compile).
  task = dict(
    context_len=TINY_L,
    num_examples=TINY_ROWS,
    seed=1,
    batch_size=TINY_ROWS,
    num_pairs=TINY_PAIRS,
  )
  kept = evaluate.evaluate_task(params, config, "mqar", **task)
  lost = evaluate.evaluate_task(
    params, config, "mqar", cache_fn=destroy, **task
  )
  assert kept.accuracy >= 0.95 and lost.accuracy <= 0.2, (kept, lost)


def test_evaluate_task_and_suite_shapes():
  params = _params()
  score = evaluate.evaluate_task(
    params,
    CONFIG,
    "mqar",
    context_len=24,
    num_examples=5,
    seed=3,
    batch_size=4,
    num_pairs=4,
  )
  assert score.num_examples == 5 and score.num_answers == 20
  out = evaluate.evaluate_suite(
    params,
    CONFIG,
    context_lens=(40,),
    num_examples=4,
    batch_size=4,
    mqar_pairs=4,
  )
  assert set(out) == {40}
  assert list(out[40]) == [name for name, _, _ in SUITE]
  assert all(0.0 <= v <= 1.0 for v in out[40].values())


def test_suite_entries_that_do_not_fit_a_context_get_nan():
  """min_context_len decides which entries a context holds (no error
  message is parsed); the others are scored."""
  out = evaluate.evaluate_suite(
    _params(),
    CONFIG,
    context_lens=(20,),
    num_examples=2,
    batch_size=2,
    mqar_pairs=4,
  )
  for name, task, params in SUITE:
    params = dict(params, **({"num_pairs": 4} if task == "mqar" else {}))
    fits = generators.min_context_len(task, **params) <= 20
    assert np.isnan(out[20][name]) != fits, (name, out[20][name])
  assert np.isnan(out[20]["multihop_k3"])  # 28 tokens of facts
  assert not np.isnan(out[20]["needle"])  # 13


@pytest.mark.parametrize("entry", SUITE, ids=lambda e: e.name)
def test_min_context_len_is_the_shortest_context_a_task_accepts(entry):
  shortest = generators.min_context_len(entry.task, **entry.params)
  generators.make_batch(
    entry.task, 1, seed=0, context_len=shortest, **entry.params
  )
  with pytest.raises(generators.ContextTooShortError) as info:
    generators.make_batch(
      entry.task, 1, seed=0, context_len=shortest - 1, **entry.params
    )
  assert info.value.minimum == shortest
  assert isinstance(info.value, ValueError)  # what callers caught before


def test_mixed_context_lengths_raise():
  batch = tasks.concat_batches(
    [
      tasks.make_batch("needle", 2, seed=0, context_len=20),
      tasks.make_batch("needle", 2, seed=0, context_len=24),
    ]
  )
  with pytest.raises(ValueError, match="context_end"):
    evaluate.evaluate_batch(_params(), CONFIG, batch)


def test_suite_order_is_the_seed_order():
  """Rows of an entry are seeded by its index: the table may only grow."""
  assert suite_lib.SUITE_NAMES == (
    "mqar",
    "needle",
    "overwrite",
    "abstention",
    "multihop_k1",
    "multihop_k2",
    "multihop_k3",
    "multihop_k4",
    "multihop_k2_latent",
  )
  index, entry = suite_lib.suite_entry("multihop_k2")
  assert index == 5 and entry == (
    "multihop_k2",
    "multihop",
    {"hops": 2, "walk": True},
  )
  assert evaluate.SUITE is SUITE
  with pytest.raises(TypeError):
    entry.params["hops"] = 3  # read-only: copy with dict(params)
  with pytest.raises(ValueError, match="unknown suite entry 'k2'"):
    suite_lib.suite_entry("k2")
