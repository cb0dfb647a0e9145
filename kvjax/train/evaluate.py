"""Accuracy of a model on the task suite, the way compression is evaluated.

Each batch is answered in two jitted calls, as in the tasks docstring
("Evaluating under compression"): prefill the context
`tokens[:, :context_len]` into an empty cache, optionally transform the
cache (`cache_fn`, e.g. a compression), then feed the question
`tokens[:, context_len:]` teacher-forced and read the answers from its
logits. Without `cache_fn` this equals one forward over the whole sequence.
Tq = T - context_len is the question's length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import model as model_lib
from kvjax.cache import KVCache, init_cache
from kvjax.config import ModelConfig
from kvjax.tasks import generators, scoring
from kvjax.tasks.generators import TaskBatch
from kvjax.tasks.suite import SUITE, SuiteEntry

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "cache_fn"))
def _answer_logits(
  params, tokens, lengths, context_shape, *, config, cache_fn=None
):
  B, T = tokens.shape
  context_len = context_shape.shape[0]  # static, carried as a shape
  cache = init_cache(config, B, T)
  _, cache, _ = model_lib.forward(
    params, tokens[:, :context_len], cache, config=config
  )
  if cache_fn is not None:
    cache = cache_fn(cache)
  question = tokens[:, context_len:]  # [B, Tq]
  positions = context_len + jnp.arange(T - context_len)  # [Tq]
  mask = positions[None, :] < lengths[:, None]  # [B, Tq]
  logits, cache, _ = model_lib.forward(
    params, question, cache, config=config, token_mask=mask
  )
  # [B, Tq, V], and [B] slots each row needed beyond the capacity.
  return logits, cache.end - cache.capacity


def _question_logits(params, config, batch, cache_fn):
  """[B, Tq, V] logits of the question after the prefilled (and
  cache_fn'd) context; raises when the question did not fit (under jit its
  writes past the capacity would have been dropped)."""
  context_len = int(batch.context_end[0])
  logits, over = _answer_logits(
    params,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.lengths),
    jnp.zeros((context_len,)),
    config=config,
    cache_fn=cache_fn,
  )
  over = int(np.max(np.asarray(over)))
  if over > 0:
    raise ValueError(
      f"the question needs {over} more cache slots than the "
      "cache cache_fn returned has: its writes past the "
      "capacity would be dropped; leave room for it."
    )
  return logits


def evaluate_batch(
  params: Any,
  config: ModelConfig,
  batch: TaskBatch,
  *,
  cache_fn: Callable[[KVCache], KVCache] | None = None,
) -> dict[str, scoring.TaskScore]:
  """Scores one TaskBatch: prefill the context, answer the question.

  Args:
    params: model params.
    config: the model config.
    batch: a TaskBatch whose rows share `context_end` (any task batch or
      mixture from `kvjax.tasks`).
    cache_fn: optional hashable `cache -> cache` applied after the prefill
      (e.g. a compression); it must keep enough capacity for the question.

  Returns:
    `kvjax.tasks.score(...)` of the greedy answers: task -> TaskScore.

  Raises:
    ValueError: rows with different context lengths, or a `cache_fn`
      whose cache has no room for the question.
  """
  ends = np.unique(batch.context_end)
  if ends.size != 1:
    raise ValueError(
      f"batch rows have different context_end {ends}; "
      "evaluate each context length separately."
    )
  logits = _question_logits(params, config, batch, cache_fn)
  predicted, confidence = scoring.predictions_from_logits(
    batch, logits, offset=int(ends[0])
  )
  return scoring.score(batch, predicted, confidence=confidence)


def evaluate_task(
  params: Any,
  config: ModelConfig,
  task: str,
  *,
  context_len: int,
  num_examples: int,
  seed,
  batch_size: int = 16,
  cache_fn: Callable[[KVCache], KVCache] | None = None,
  **task_params,
) -> scoring.TaskScore:
  """Accuracy (and the other rates) of one task over `num_examples` rows.

  Rows are drawn in batches of `batch_size` with seeds `(seed, i)`.

  Args:
    params: the model params.
    config: the model config.
    task: one of `kvjax.tasks.TASK_NAMES`.
    context_len: context tokens of every row, BOS included.
    num_examples: rows in all.
    seed: int or tuple of ints, the base seed of the rows.
    batch_size: rows per call (the last batch is cut to the rows left).
    cache_fn: optional `cache -> cache` applied after each prefill (see
      `evaluate_batch`).
    **task_params: the task's generator parameters.

  Returns:
    The pooled TaskScore of the task.

  Raises:
    ValueError: num_examples or batch_size < 1, a bad task parameter, a
      context too short for the task, or a `cache_fn` whose cache has no
      room for the question.
  """
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(
      f"num_examples and batch_size must be > 0, got "
      f"{num_examples}, {batch_size}."
    )
  parts, done, i = [], 0, 0
  while done < num_examples:
    n = min(batch_size, num_examples - done)
    batch = generators.make_batch(
      task,
      batch_size,
      seed=(*np.atleast_1d(seed).tolist(), i),
      context_len=context_len,
      **task_params,
    )
    batch = TaskBatch(*(field[:n] for field in batch))  # the first n rows
    predicted, confidence = _predict(params, config, batch, cache_fn)
    parts.append((batch, predicted, confidence))
    done, i = done + n, i + 1
  batch = generators.concat_batches([p[0] for p in parts])
  A = batch.answers.shape[1]
  pad = lambda x, fill: np.pad(
    x, ((0, 0), (0, A - x.shape[1])), constant_values=fill
  )
  predicted = np.concatenate([pad(p[1], 0) for p in parts])
  confidence = np.concatenate([pad(p[2], 0.0) for p in parts])
  return scoring.score(batch, predicted, confidence=confidence)[task]


def _predict(params, config, batch, cache_fn):
  logits = _question_logits(params, config, batch, cache_fn)
  return scoring.predictions_from_logits(
    batch, logits, offset=int(batch.context_end[0])
  )


def evaluate_suite(
  params: Any,
  config: ModelConfig,
  *,
  context_lens: Sequence[int] = (512,),
  num_examples: int = 256,
  seed=12345,
  batch_size: int = 16,
  suite: Sequence[SuiteEntry] = SUITE,
  mqar_pairs: int | None = None,
  progress: Callable[[str], None] | None = None,
) -> dict[int, dict[str, float]]:
  """Accuracy per suite entry and context length.

  Args:
    params: the model params.
    config: the model config.
    context_lens: the context lengths to evaluate.
    num_examples: rows per (entry, context length).
    seed: base seed of the held-out stream (training uses other seeds).
    batch_size: rows per call.
    suite: (name, task, task params) entries; default
      `kvjax.tasks.suite.SUITE`.
    mqar_pairs: if set, replaces num_pairs of every mqar entry.
    progress: optional callback given one line per finished entry.

  Returns:
    {context_len: {name: accuracy}}; an entry whose facts do not fit a
    context (`kvjax.tasks.min_context_len`) gets NaN there.
  """
  out = {}
  for context_len in map(int, context_lens):
    out[context_len] = {}
    for name, task, task_params in suite:
      task_params = dict(task_params)
      if task == "mqar" and mqar_pairs is not None:
        task_params["num_pairs"] = int(mqar_pairs)
      if context_len < generators.min_context_len(task, **task_params):
        out[context_len][name] = float("nan")
        continue
      s = evaluate_task(
        params,
        config,
        task,
        context_len=context_len,
        num_examples=num_examples,
        seed=seed,
        batch_size=batch_size,
        **task_params,
      )
      out[context_len][name] = s.accuracy
      if progress:
        progress(f"context_len={context_len} {name}: {s.accuracy:.4f}")
  return out
