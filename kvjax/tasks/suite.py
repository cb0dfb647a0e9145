"""The task suite: the named task entries every kvjax-tiny number refers to.

An entry is a name, a generator of `kvjax.tasks.generators` and its
parameters; `make_batch(entry.task, B, seed=..., context_len=C,
**entry.params)` draws its rows. The context length C is not part of an
entry: evaluation and the sweep choose it.

The order is part of the contract: the sweep seeds an entry's rows with its
index in `SUITE`, so appending is safe but inserting, removing or reordering
changes the rows of every later entry.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, NamedTuple


class SuiteEntry(NamedTuple):
  """One task of the suite.

  Attributes:
    name: the entry's name, unique in `SUITE` (the key of result tables).
    task: the generator, one of `kvjax.tasks.generators.TASK_NAMES`.
    params: the generator's parameters beyond batch_size, seed and
      context_len (read-only; copy with `dict(params)` to change one).
  """

  name: str
  task: str
  params: Mapping[str, Any]


def _entry(name: str, task: str, **params) -> SuiteEntry:
  return SuiteEntry(name, task, types.MappingProxyType(params))


SUITE: tuple[SuiteEntry, ...] = (
  # Zoology's multi-query associative recall with 32 key-value bigrams,
  # every key queried once: recall of many facts at a time.
  _entry("mqar", "mqar", num_pairs=32),
  # One `key -> value` fact among 3 distractors in filler, at a random
  # depth: single-fact retrieval.
  _entry("needle", "needle"),
  # The queried key is assigned twice (3 distractor facts); the answer is
  # the latest value: recency, which eviction of late tokens breaks.
  _entry("overwrite", "overwrite"),
  # The queried key is absent (4 distractor facts); the answer is UNKNOWN:
  # a compressed cache must not make the model hallucinate a value.
  _entry("abstention", "abstention"),
  # Multi-hop chains of k = 1..4 links (2 distractor chains), answered by
  # walking the chain one link per answer slot (`walk=True`): k lookups,
  # each of one fact of the context.
  _entry("multihop_k1", "multihop", hops=1, walk=True),
  _entry("multihop_k2", "multihop", hops=2, walk=True),
  _entry("multihop_k3", "multihop", hops=3, walk=True),
  _entry("multihop_k4", "multihop", hops=4, walk=True),
  # The end of a 2-link chain in one token (latent composition inside the
  # forward pass), the composition kvjax-tiny does not learn (see README).
  _entry("multihop_k2_latent", "multihop", hops=2),
)
"""The suite, in seed order (see the module docstring)."""

SUITE_NAMES: tuple[str, ...] = tuple(entry.name for entry in SUITE)


def suite_entry(name: str) -> tuple[int, SuiteEntry]:
  """The index (the entry's seed) and the entry named `name`.

  Raises:
    ValueError: no entry has that name.
  """
  if name not in SUITE_NAMES:
    raise ValueError(
      f"unknown suite entry {name!r}; allowed: {list(SUITE_NAMES)}."
    )
  index = SUITE_NAMES.index(name)
  return index, SUITE[index]
