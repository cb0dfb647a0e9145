"""Accuracy of a model on the task suite, the way compression is evaluated.

Each batch is answered in two jitted calls, as in the tasks docstring
("Evaluating under compression"): prefill the context `tokens[:, :L]` into
an empty cache, optionally transform the cache (`cache_fn`, e.g. a
compression), then feed the question `tokens[:, L:]` teacher-forced and
read the answers from its logits. Without `cache_fn` this equals one
forward over the whole sequence.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import model as model_lib
from kvjax.cache import KVCache, init_cache
from kvjax.config import ModelConfig
from kvjax.tasks import generators, scoring
from kvjax.tasks.generators import TaskBatch

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "cache_fn"))
def _answer_logits(params, tokens, lengths, context_len, *, config,
                   cache_fn=None):
  B, T = tokens.shape
  L = context_len.shape[0]  # static context length carried as a shape
  cache = init_cache(config, B, T)
  _, cache, _ = model_lib.forward(params, tokens[:, :L], cache, config=config)
  if cache_fn is not None:
    cache = cache_fn(cache)
  question = tokens[:, L:]  # [B, T - L]
  mask = (L + jnp.arange(T - L))[None, :] < lengths[:, None]
  logits, cache, _ = model_lib.forward(params, question, cache,
                                       config=config, token_mask=mask)
  # [B, T - L, V], and [B] slots each row needed beyond the capacity.
  return logits, cache.end - cache.capacity


def _question_logits(params, config, batch, cache_fn):
  """[B, T - L, V] logits of the question after the prefilled (and
  cache_fn'd) context; raises when the question did not fit (under jit its
  writes past the capacity would have been dropped)."""
  L = int(batch.context_end[0])
  logits, over = _answer_logits(params, jnp.asarray(batch.tokens),
                                jnp.asarray(batch.lengths), jnp.zeros((L,)),
                                config=config, cache_fn=cache_fn)
  over = int(np.max(np.asarray(over)))
  if over > 0:
    raise ValueError(f"the question needs {over} more cache slots than the "
                     "cache cache_fn returned has: its writes past the "
                     "capacity would be dropped; leave room for it.")
  return logits


def evaluate_batch(params: Any, config: ModelConfig, batch: TaskBatch, *,
                   cache_fn: Callable[[KVCache], KVCache] | None = None
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
    raise ValueError(f"batch rows have different context_end {ends}; "
                     "evaluate each context length separately.")
  L = int(ends[0])
  logits = _question_logits(params, config, batch, cache_fn)
  predicted, confidence = scoring.predictions_from_logits(
      batch, logits, offset=L)
  return scoring.score(batch, predicted, confidence=confidence)


def evaluate_task(params: Any, config: ModelConfig, task: str, *,
                  context_len: int, num_examples: int, seed,
                  batch_size: int = 16,
                  cache_fn: Callable[[KVCache], KVCache] | None = None,
                  **task_params) -> scoring.TaskScore:
  """Accuracy (and the other rates) of one task over `num_examples` rows.

  Rows are drawn in batches of `batch_size` with seeds `(seed, i)`.

  Returns:
    The pooled TaskScore of the task.
  """
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(f"num_examples and batch_size must be > 0, got "
                     f"{num_examples}, {batch_size}.")
  parts, done, i = [], 0, 0
  while done < num_examples:
    n = min(batch_size, num_examples - done)
    batch = generators.make_batch(task, batch_size, seed=(*np.atleast_1d(
        seed).tolist(), i), context_len=context_len, **task_params)
    batch = generators._take_rows(batch, np.arange(n))  # pylint: disable=protected-access
    predicted, confidence = _predict(params, config, batch, cache_fn)
    parts.append((batch, predicted, confidence))
    done, i = done + n, i + 1
  batch = generators.concat_batches([p[0] for p in parts])
  A = batch.answers.shape[1]
  pad = lambda x, fill: np.pad(x, ((0, 0), (0, A - x.shape[1])),
                               constant_values=fill)
  predicted = np.concatenate([pad(p[1], 0) for p in parts])
  confidence = np.concatenate([pad(p[2], 0.0) for p in parts])
  return scoring.score(batch, predicted, confidence=confidence)[task]


def _predict(params, config, batch, cache_fn):
  L = int(batch.context_end[0])
  logits = _question_logits(params, config, batch, cache_fn)
  return scoring.predictions_from_logits(batch, logits, offset=L)


# The suite every kvjax-tiny number refers to: (name, task, params).
# multihop_k* answer by walking the chain; multihop_k2_latent asks for the
# end in one token (the composition kvjax-tiny does not learn, see README).
SUITE: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mqar", "mqar", {"num_pairs": 32}),
    ("needle", "needle", {}),
    ("overwrite", "overwrite", {}),
    ("abstention", "abstention", {}),
    ("multihop_k1", "multihop", {"hops": 1, "walk": True}),
    ("multihop_k2", "multihop", {"hops": 2, "walk": True}),
    ("multihop_k3", "multihop", {"hops": 3, "walk": True}),
    ("multihop_k4", "multihop", {"hops": 4, "walk": True}),
    ("multihop_k2_latent", "multihop", {"hops": 2}),
)


def evaluate_suite(params: Any, config: ModelConfig, *,
                   context_lens: Sequence[int] = (512,),
                   num_examples: int = 256, seed=12345,
                   batch_size: int = 16,
                   suite: Sequence[tuple[str, str, Mapping[str, Any]]] = SUITE,
                   mqar_pairs: int | None = None,
                   progress: Callable[[str], None] | None = None
                   ) -> dict[int, dict[str, float]]:
  """Accuracy per suite entry and context length.

  Args:
    params, config: the model.
    context_lens: contexts L to evaluate.
    num_examples: rows per (entry, L).
    seed: base seed of the held-out stream (training uses other seeds).
    batch_size: rows per call.
    suite: (name, task, task params) entries; default `SUITE` (mqar with 32
      pairs, needle, overwrite, abstention, multihop walks k = 1..4 and
      the latent 2-hop question).
    mqar_pairs: if set, replaces num_pairs of every mqar entry.
    Entries whose facts do not fit a context get NaN there.
    progress: optional callback given one line per finished entry.

  Returns:
    {L: {name: accuracy}}.
  """
  out = {}
  for L in context_lens:
    out[int(L)] = {}
    for name, task, params_ in suite:
      params_ = dict(params_)
      if task == "mqar" and mqar_pairs is not None:
        params_["num_pairs"] = int(mqar_pairs)
      try:
        s = evaluate_task(params, config, task, context_len=int(L),
                          num_examples=num_examples, seed=seed,
                          batch_size=batch_size, **dict(params_))
      except ValueError as e:
        if "is too short for" not in str(e):
          raise
        out[int(L)][name] = float("nan")  # the task does not fit L
        continue
      out[int(L)][name] = s.accuracy
      if progress:
        progress(f"L={L} {name}: {s.accuracy:.4f}")
  return out
