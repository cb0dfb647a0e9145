"""The training stream: task batches as a pure function of (seed, step).

`task_batch(data, seed, step)` draws one step's batch from the synthetic
task suite, following the curriculum of a `kvjax.train.config.DataConfig`
(phases, the mixture of tasks and training aids of each, and how a step's
rows are counted and padded: see `Mixture`), so a resumed run sees exactly
the batches an uninterrupted one would. Besides the tasks of
`kvjax.tasks`, a stream may hold two training aids: copy rows
(`copy_batch`) and chain rows (`chain_batch`); `lens_mask` marks the
answers the lens loss asks of an earlier layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvjax.tasks import generators
from kvjax.tasks.generators import TASK_NAMES, TaskBatch
from kvjax.tasks.vocab import ARROW, BOS, PAD, QUERY, VOCAB
from kvjax.train import losses
from kvjax.train.config import DataConfig, Mixture

COPY_TASK_ID = -1  # task_ids value of copy rows (not a task of the suite).
CHAIN_TASK_ID = -2  # task_ids value of chain rows (not a task either).
AID_NAMES = {COPY_TASK_ID: "copy", CHAIN_TASK_ID: "chain"}


def padded_length(mixture: Mixture, context_len: int) -> int:
  """T of every batch of `mixture` at `context_len`: room for the longest
  mqar question and, with multihop walks, the longest walk."""
  width = 1 + 2 * max(mixture.mqar_pairs)
  if mixture.multihop_walk:
    # QUERY x1, then (ARROW step) for each of the k steps.
    width = max(width, 2 + 2 * max(mixture.multihop_hops))
  return context_len + width


def rows_per_task(mixture: Mixture, batch_size: int) -> dict[str, int]:
  """Rows of each task in a batch of `batch_size` task rows (a fixed
  composition: `mixture.task_fractions`, rounded).

  Raises:
    ValueError: fewer rows than tasks.
  """
  fractions = {
    name: share for name, share in mixture.task_fractions if share > 0
  }
  total = sum(fractions.values())
  rows = {
    k: max(1, round(batch_size * v / total)) for k, v in fractions.items()
  }
  # Give the rounding remainder to (or take it from) the largest task.
  largest = max(rows, key=rows.get)
  rows[largest] += batch_size - sum(rows.values())
  if rows[largest] < 1:
    raise ValueError(
      f"batch_size={batch_size} is too small for {len(rows)} tasks."
    )
  return rows


def task_batch(
  data: DataConfig,
  seed: int,
  step: int,
  context_len: int | None = None,
  batch_size: int | None = None,
) -> TaskBatch:
  """The TaskBatch of training step `step` (pure in seed, step).

  Args:
    data: the stream (`kvjax.train.config.DataConfig`).
    seed: base seed of the stream.
    step: the step index.
    context_len: override the phase's drawn context length (tests, eval).
    batch_size: override tokens_per_step // context_len.

  Returns:
    A TaskBatch, tokens padded to `padded_length(mixture, context_len)`.

  Raises:
    ValueError: no row left for the tasks, or (with an overridden
      context_len) a task that does not fit.
  """
  rng = np.random.default_rng([int(seed), int(step), 99])
  phase = data.phase_at(step)
  mixture = phase.mixture(data.mixture)
  lens = phase.context_lens
  # An overridden context draws nothing: the later draws stay the same.
  context_len = int(context_len or lens[rng.integers(len(lens))])
  B = int(batch_size or max(1, mixture.tokens_per_step // context_len))
  copy_rows = round(B * mixture.copy_fraction)
  chain_rows = round(B * mixture.chain_fraction)
  if copy_rows + chain_rows >= B:
    raise ValueError(
      f"copy_fraction + chain_fraction leave no task rows in a batch of {B}."
    )
  B -= copy_rows + chain_rows
  width = padded_length(mixture, context_len)
  pairs = [p for p in mixture.mqar_pairs if 2 * p + 1 <= context_len]
  parts = []
  for i, (task, rows) in enumerate(sorted(rows_per_task(mixture, B).items())):
    params = mixture.generator_params(task)
    if task == "mqar":
      if not pairs:
        raise ValueError(f"no mqar_pairs fits context_len={context_len}.")
      placements = mixture.mqar_placements
      params.update(
        num_pairs=pairs[rng.integers(len(pairs))],
        placement=placements[rng.integers(len(placements))],
      )
    parts.append(
      generators.make_batch(
        task,
        rows,
        seed=(int(seed), int(step), i + 1),
        context_len=context_len,
        **params,
      )
    )
  if copy_rows:
    parts.append(
      copy_batch(
        copy_rows,
        context_len,
        seed=(int(seed), int(step), 0),
        max_copy=width - context_len - 1,
      )
    )
  if chain_rows:
    # Questions take 4 tokens each, after the context.
    max_queries = (width - context_len) // 4
    if mixture.chain_queries is not None:
      max_queries = min(max_queries, mixture.chain_queries)
    hops = mixture.chain_hops
    parts.append(
      chain_batch(
        chain_rows,
        context_len,
        seed=(int(seed), int(step), 0, 1),
        num_chains=min(
          mixture.chain_count, (context_len - 1) // (3 * max(hops))
        ),
        hops=hops,
        max_queries=max_queries,
        key_ends=mixture.chain_key_ends,
      )
    )
  return pad_batch(generators.concat_batches(parts), width)


def copy_batch(
  batch_size: int, context_len: int, seed, max_copy: int | None = None
) -> TaskBatch:
  """Rows `BOS f.. s f.. QUERY s`: a random sequence s in filler, then s again.

  A training aid for the recall circuit, not a task of the suite: every
  token of the second copy is predicted by attending to the token after
  the previous occurrence of the current one (an induction head), the
  circuit every recall task needs, with a target at each copied position
  instead of a few answers per row. The length of s (2 to
  `min((context_len - 1) // 2, max_copy)`, distinct ids from the key and
  value ranges)
  and its offset in the context are drawn per row, so no fixed positional
  offset solves it. The context is `context_len` tokens (BOS included) as
  in the tasks; the loss covers the second s but its first token. Rows
  carry task id `COPY_TASK_ID` and no critical positions.

  Raises:
    ValueError: context_len < 6 or max_copy < 2.
  """
  if context_len < 6:
    raise ValueError(f"copy_batch needs context_len >= 6, got {context_len}.")
  if max_copy is not None and max_copy < 2:
    raise ValueError(f"max_copy must be >= 2, got {max_copy}.")
  rng = np.random.default_rng(seed)
  max_n = (context_len - 1) // 2
  if max_copy is not None:
    max_n = min(max_n, max_copy)
  T = context_len + 1 + max_n
  tokens = np.zeros((batch_size, T), np.int32)
  loss_mask = np.zeros((batch_size, T), bool)
  lengths = np.zeros((batch_size,), np.int32)
  answer_positions = np.full((batch_size, max_n - 1), -1, np.int32)
  for b in range(batch_size):
    n = int(rng.integers(2, max_n + 1))
    ids = VOCAB.key_start + rng.choice(2 * VOCAB.num_keys, n, replace=False)
    start = int(rng.integers(1, context_len - n + 1))
    tokens[b, :context_len] = VOCAB.filler_start + rng.integers(
      0, VOCAB.num_filler, context_len
    )
    tokens[b, 0] = BOS
    tokens[b, start : start + n] = ids
    tokens[b, context_len] = QUERY
    tokens[b, context_len + 1 : context_len + 1 + n] = ids
    loss_mask[b, context_len + 2 : context_len + 1 + n] = True
    lengths[b] = context_len + 1 + n
    answer_positions[b, : n - 1] = np.arange(
      context_len + 2, context_len + 1 + n
    )
  answers = np.where(
    answer_positions >= 0,
    np.take_along_axis(tokens, np.maximum(answer_positions, 0), 1),
    PAD,
  )
  full = lambda v: np.full((batch_size,), v, np.int32)
  return TaskBatch(
    tokens=tokens,
    lengths=lengths,
    context_end=full(context_len),
    answer_start=full(context_len + 2),
    answer_positions=answer_positions,
    answers=answers.astype(np.int32),
    loss_mask=loss_mask,
    critical_positions=np.full((batch_size, 0), -1, np.int32),
    task_ids=full(COPY_TASK_ID),
  )


def chain_batch(
  batch_size: int,
  context_len: int,
  seed,
  *,
  num_chains: int = 4,
  hops: Sequence[int] = (2,),
  max_queries: int | None = None,
  key_ends: float = 0.0,
) -> TaskBatch:
  """Rows of `num_chains` multi-hop chains, several asked: a dense aid.

  A training aid for multi-hop, not a task of the suite. A multihop row
  has one answer, so composing two lookups gets one target per row and
  little gradient; a chain row writes `num_chains` chains (links
  `x -> x'` ending in a value, as in `kvjax.tasks.multihop`, each chain's
  length drawn from `hops`) at random positions in filler and then asks
  the start of each one, `QUERY x1 ARROW y` per chain in random order, with
  a target at every y. The first question has the multihop layout, so a
  model that answers chain rows answers multihop. With more chains than
  queries (`max_queries`), the unasked ones are distractors, and the
  answers of earlier questions cannot be ruled out for later ones.

  With `key_ends` > 0, that share of the chains ends at a key id that is
  not the key of any link (the chain stops there: it is followed while a
  link leads on). The type of a token then no longer says whether a chain
  goes on, so a lookup must carry key ids forward and the next lookup must
  check for a link from them, the two steps 2-hop composes.

  Rows carry task id `CHAIN_TASK_ID` and no critical positions; T =
  context_len + 4 * min(num_chains, max_queries).

  Raises:
    ValueError: num_chains < 1, hops outside 1..4 or empty, max_queries
      < 1, key_ends outside [0, 1], or the links do not fit in
      context_len - 1 tokens (or in the key ids).
  """
  hops = tuple(int(h) for h in hops)
  if num_chains < 1:
    raise ValueError(f"num_chains must be >= 1, got {num_chains}.")
  if not hops or any(h not in generators.HOPS for h in hops):
    raise ValueError(
      f"hops must be a non-empty sequence of values in "
      f"{generators.HOPS}, got {hops!r}."
    )
  if max_queries is not None and max_queries < 1:
    raise ValueError(f"max_queries must be >= 1, got {max_queries}.")
  if not 0.0 <= key_ends <= 1.0:
    raise ValueError(f"key_ends must be in [0, 1], got {key_ends}.")
  if 1 + 3 * num_chains * max(hops) > context_len:
    raise ValueError(
      f"{num_chains} chains of up to {max(hops)} links (3 tokens each) "
      f"do not fit in context_len={context_len} (BOS included)."
    )
  if num_chains * (max(hops) + 1) > VOCAB.num_keys:
    raise ValueError(
      f"{num_chains} chains of {max(hops)} links need more "
      f"than the {VOCAB.num_keys} key ids."
    )
  rng = np.random.default_rng(seed)
  q = num_chains if max_queries is None else min(num_chains, max_queries)
  T = context_len + 4 * q
  tokens = np.zeros((batch_size, T), np.int32)
  answer_positions = np.broadcast_to(
    context_len + 3 + 4 * np.arange(q), (batch_size, q)
  ).astype(np.int32)
  answers = np.zeros((batch_size, q), np.int32)
  for b in range(batch_size):
    lengths = rng.choice(np.asarray(hops), num_chains)
    num_links = int(lengths.sum())
    # Key ends draw extra ids only when asked for, so rows without them
    # are the same draws as before the option existed.
    nodes = VOCAB.key_start + rng.choice(
      VOCAB.num_keys, num_links + (num_chains if key_ends else 0), replace=False
    )
    ends = VOCAB.value_start + rng.choice(
      VOCAB.num_values, num_chains, replace=False
    )
    if key_ends:
      ends = np.where(
        rng.random(num_chains) < key_ends, nodes[num_links:], ends
      )
    keys, values, firsts = [], [], []
    offset = 0
    for chain, length in enumerate(lengths):
      chain_nodes = list(nodes[offset : offset + length]) + [ends[chain]]
      offset += length
      keys += chain_nodes[:-1]
      values += chain_nodes[1:]
      firsts.append(chain_nodes[0])
    starts = generators._fact_starts(  # pylint: disable=protected-access
      rng, 1, len(keys), 3, context_len
    )[0]
    tokens[b, :context_len] = VOCAB.filler_start + rng.integers(
      0, VOCAB.num_filler, context_len
    )
    tokens[b, 0] = BOS
    tokens[b, starts] = keys
    tokens[b, starts + 1] = ARROW
    tokens[b, starts + 2] = values
    asked = rng.permutation(num_chains)[:q]
    answers[b] = ends[asked]
    tokens[b, context_len + 4 * np.arange(q)] = QUERY
    tokens[b, context_len + 1 + 4 * np.arange(q)] = np.asarray(firsts)[asked]
    tokens[b, context_len + 2 + 4 * np.arange(q)] = ARROW
    tokens[b, answer_positions[b]] = answers[b]
  loss_mask = np.zeros((batch_size, T), bool)
  np.put_along_axis(loss_mask, answer_positions, True, axis=1)
  full = lambda v: np.full((batch_size,), v, np.int32)
  return TaskBatch(
    tokens=tokens,
    lengths=full(T),
    context_end=full(context_len),
    answer_start=full(context_len + 3),
    answer_positions=answer_positions,
    answers=answers,
    loss_mask=loss_mask,
    critical_positions=np.full((batch_size, 0), -1, np.int32),
    task_ids=full(CHAIN_TASK_ID),
  )


def pad_batch(batch: TaskBatch, total_len: int) -> TaskBatch:
  """Right-pads tokens and loss_mask of `batch` to `total_len`.

  Raises:
    ValueError: the batch is already longer.
  """
  T = batch.tokens.shape[1]
  if T > total_len:
    raise ValueError(f"batch has T={T} > total_len={total_len}.")
  pad = total_len - T
  return batch._replace(
    tokens=np.pad(batch.tokens, ((0, 0), (0, pad))),
    loss_mask=np.pad(batch.loss_mask, ((0, 0), (0, pad))),
  )


# Tasks whose every answer needs a single lookup (multihop: the rows with
# one answer per link, i.e. 1-hop rows and walks).
ONE_LOOKUP_TASKS = ("mqar", "needle", "overwrite", "abstention")


def lens_mask(batch: TaskBatch) -> np.ndarray:
  """[B, T] bool: the answer targets that one lookup answers.

  Those of copy rows, of the tasks in `ONE_LOOKUP_TASKS`, of 1-hop
  multihop rows, of every step of multihop walks and of the 1-link chains
  of chain rows. The lens loss asks these answers of an earlier layer
  (see `kvjax.train.loop.loss_fn`), which leaves the later layers free to
  compose a second lookup.
  """
  ids = [TASK_NAMES.index(t) for t in ONE_LOOKUP_TASKS] + [COPY_TASK_ID]
  rows = np.isin(batch.task_ids, ids)
  hops = (batch.critical_positions >= 0).sum(axis=1) // 2
  steps = (batch.answer_positions >= 0).sum(axis=1)
  # One answer per link (1-hop rows, walks): each answer is one lookup.
  rows |= (batch.task_ids == TASK_NAMES.index("multihop")) & (steps == hops)
  mask = batch.loss_mask & rows[:, None]
  for r in np.flatnonzero(batch.task_ids == CHAIN_TASK_ID):
    tokens, context_len = batch.tokens[r], int(batch.context_end[r])
    link = {
      int(tokens[i - 1]): int(tokens[i + 1])
      for i in np.flatnonzero(tokens[:context_len] == ARROW)
    }
    for p in np.flatnonzero(batch.loss_mask[r]):  # asked x, answer y at p
      mask[r, p] = link[int(tokens[p - 2])] == tokens[p]  # a 1-link chain
  return mask


def model_inputs(
  batch: TaskBatch, loss_on: str = "answers", lens_weight: float = 0.0
) -> dict[str, np.ndarray]:
  """The arrays a train step consumes, shifted for next-token prediction.

  Args:
    batch: a TaskBatch.
    loss_on: "answers" or "all" (see `losses.loss_weights`).
    lens_weight: > 0 adds "lens_weights" [B, T-1] float32 (`lens_mask`)
      and "lens_scale" (this weight), for the lens loss.

  Returns:
    dict with inputs [B, T-1] int32, targets [B, T-1] int32, weights
    [B, T-1] float32, token_mask [B, T-1] bool, answer_mask [B, T-1] bool
    (the answer targets, whatever `loss_on`) and task_ids [B] int32 (index
    in `kvjax.tasks.TASK_NAMES`, -1 for copy rows), for per-task metrics.

  Raises:
    ValueError: unknown loss_on or a negative lens_weight.
  """
  if lens_weight < 0:
    raise ValueError(f"lens_weight must be >= 0, got {lens_weight}.")
  tokens = batch.tokens
  T = tokens.shape[1]
  return {
    "inputs": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "weights": np.asarray(
      losses.loss_weights(batch.loss_mask, batch.lengths, loss_on), np.float32
    ),
    "token_mask": np.arange(T - 1)[None, :] < batch.lengths[:, None],
    "answer_mask": np.asarray(batch.loss_mask[:, 1:], bool),
    "task_ids": np.asarray(batch.task_ids, np.int32),
    **(
      {
        "lens_weights": lens_mask(batch)[:, 1:].astype(np.float32),
        "lens_scale": np.float32(lens_weight),
      }
      if lens_weight > 0
      else {}
    ),
  }
