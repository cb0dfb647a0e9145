"""The training stream: task batches as a pure function of (seed, step).

`task_batch(data_config, seed, step)` draws one step's batch from the
synthetic task suite, so a resumed run sees exactly the batches an
uninterrupted one would. A data config is a mapping (a dict or an
`ml_collections.ConfigDict`) with the fields documented in
`experiments/configs/train.py`:

  phases        list of {"until": last step (exclusive), "context_lens":
                [L choices]}; a step uses the first phase with step < until.
                A phase may also set any other field below (e.g.
                "mqar_pairs", "tokens_per_step", "task_fractions",
                "multihop_hops"), overriding it during that phase.
  tokens_per_step  rows per step = max(1, tokens_per_step // L).
  task_fractions   task -> share of the rows (rounded, at least 1 row each).
  mqar_pairs       choices of mqar num_pairs (those that fit L are used).
  mqar_placements  choices of mqar placement.
  multihop_hops    hops drawn per multihop row.
  multihop_walk    multihop question format (default False, latent; True:
                   the answer walks the chain, see `kvjax.tasks.multihop`).
  copy_fraction    share of extra "copy" rows (default 0): a training aid,
                   not a task of the suite (see `copy_batch`).
  lens_weight      weight of the lens loss (default 0; see `lens_mask` and
                   `kvjax.train.loop.loss_fn`).
  chain_fraction   share of extra "chain" rows (default 0): a training aid
                   for multi-hop (see `chain_batch`), with up to
                   chain_count chains per row (default 4; as many as fit
                   in L) of chain_hops links each (drawn per chain,
                   default [2]), chain_queries of them asked (default:
                   as many as the padded width holds), a share
                   chain_key_ends of the chains ending at a key id
                   (default 0).
  ...              other task params: needle_distractors, overwrite_writes,
                   overwrite_distractors, abstention_distractors,
                   multihop_distractor_chains.

Every batch for context L is padded to T = L + 1 + 2 * max(mqar_pairs) (of
the phase; at least L + 2 + 2 * max(multihop_hops) with walks), so each
(phase, context) compiles once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from kvjax.tasks import generators
from kvjax.tasks.generators import TASK_NAMES, TaskBatch
from kvjax.tasks.vocab import ARROW, BOS, PAD, QUERY, VOCAB

COPY_TASK_ID = -1  # task_ids value of copy rows (not a task of the suite).
CHAIN_TASK_ID = -2  # task_ids value of chain rows (not a task either).
AID_NAMES = {COPY_TASK_ID: "copy", CHAIN_TASK_ID: "chain"}


def _get(cfg, name, default=None):
  return cfg[name] if name in cfg else default


def phase_of(data_config: Mapping[str, Any], step: int) -> Mapping[str, Any]:
  """The phase that `step` belongs to (the last phase for later steps)."""
  phases = list(data_config["phases"])
  if not phases:
    raise ValueError("data_config.phases must be a non-empty list.")
  for phase in phases:
    if step < phase["until"]:
      return phase
  return phases[-1]


_REQUIRED = object()


def phase_value(data_config: Mapping[str, Any], phase: Mapping[str, Any],
                name: str, default: Any = _REQUIRED):
  """`phase[name]` if the phase sets it, else `data_config[name]` (else
  `default` when given)."""
  if name in phase:
    return phase[name]
  if default is not _REQUIRED and name not in data_config:
    return default
  return data_config[name]


def padded_length(data_config: Mapping[str, Any], context_len: int,
                  phase: Mapping[str, Any] | None = None) -> int:
  """T of every batch at context `context_len` (in `phase`): room for the
  longest mqar question and, with multihop walks, the longest walk."""
  phase = phase or {}
  width = 1 + 2 * max(phase_value(data_config, phase, "mqar_pairs"))
  if phase_value(data_config, phase, "multihop_walk", False):
    hops = phase_value(data_config, phase, "multihop_hops", generators.HOPS)
    width = max(width, 2 + 2 * max(hops))  # QUERY x1 (ARROW step) * k
  return context_len + width


def rows_per_task(data_config: Mapping[str, Any], batch_size: int
                  ) -> dict[str, int]:
  """Rows of each task in a batch of `batch_size` (fixed composition)."""
  fractions = {k: float(v) for k, v in data_config["task_fractions"].items()
               if float(v) > 0}
  unknown = set(fractions) - set(TASK_NAMES)
  if unknown:
    raise ValueError(f"task_fractions has unknown tasks {sorted(unknown)}; "
                     f"allowed: {TASK_NAMES}.")
  total = sum(fractions.values())
  rows = {k: max(1, int(round(batch_size * v / total)))
          for k, v in fractions.items()}
  # Give the rounding remainder to (or take it from) the largest task.
  largest = max(rows, key=rows.get)
  rows[largest] += batch_size - sum(rows.values())
  if rows[largest] < 1:
    raise ValueError(f"batch_size={batch_size} is too small for "
                     f"{len(rows)} tasks.")
  return rows


def task_batch(data_config: Mapping[str, Any], seed: int, step: int,
               context_len: int | None = None,
               batch_size: int | None = None) -> TaskBatch:
  """The TaskBatch of training step `step` (pure in seed, step).

  Args:
    data_config: see the module docstring.
    seed: base seed of the stream.
    step: the step index.
    context_len: override the phase's drawn context (for tests/eval).
    batch_size: override tokens_per_step // context_len.

  Returns:
    A TaskBatch, tokens padded to `padded_length(data_config, L)`.
  """
  rng = np.random.default_rng([int(seed), int(step), 99])
  phase = phase_of(data_config, step)
  # The phase's own fields override the top-level ones.
  data_config = {**{k: data_config[k] for k in data_config},
                 **{k: phase[k] for k in phase}}
  lens = list(phase["context_lens"])
  L = int(context_len or lens[rng.integers(len(lens))])
  tokens = phase_value(data_config, phase, "tokens_per_step")
  B = int(batch_size or max(1, tokens // L))
  copy_rows = int(round(B * float(_get(data_config, "copy_fraction", 0.0))))
  chain_rows = int(round(B * float(_get(data_config, "chain_fraction",
                                        0.0))))
  if copy_rows + chain_rows >= B:
    raise ValueError(f"copy_fraction + chain_fraction leave no task rows in "
                     f"a batch of {B}.")
  B -= copy_rows + chain_rows
  pairs = [int(p) for p in phase_value(data_config, phase, "mqar_pairs")
           if 2 * p + 1 <= L]
  parts = []
  for i, (task, rows) in enumerate(sorted(rows_per_task(data_config,
                                                        B).items())):
    sub_seed = (int(seed), int(step), i + 1)
    if task == "mqar":
      if not pairs:
        raise ValueError(f"no mqar_pairs fits context_len={L}.")
      placements = list(_get(data_config, "mqar_placements", ["prefix"]))
      params = dict(num_pairs=pairs[rng.integers(len(pairs))],
                    placement=placements[rng.integers(len(placements))])
    elif task == "needle":
      params = dict(num_distractors=int(_get(data_config,
                                             "needle_distractors", 3)))
    elif task == "multihop":
      params = dict(hops=tuple(int(h) for h in data_config["multihop_hops"]),
                    num_distractor_chains=int(_get(
                        data_config, "multihop_distractor_chains", 2)),
                    walk=bool(_get(data_config, "multihop_walk", False)))
    elif task == "overwrite":
      params = dict(num_writes=int(_get(data_config, "overwrite_writes", 2)),
                    num_distractors=int(_get(data_config,
                                             "overwrite_distractors", 3)))
    else:
      params = dict(num_distractors=int(_get(data_config,
                                             "abstention_distractors", 4)))
    parts.append(generators.make_batch(task, rows, seed=sub_seed,
                                       context_len=L, **params))
  if copy_rows:
    width = padded_length(data_config, L, phase) - L - 1
    parts.append(copy_batch(copy_rows, L, seed=(int(seed), int(step), 0),
                            max_copy=width))
  if chain_rows:
    chain_hops = tuple(int(h) for h in _get(data_config, "chain_hops", [2]))
    # Questions take 4 tokens each, after the context.
    max_queries = (padded_length(data_config, L, phase) - L) // 4
    if _get(data_config, "chain_queries") is not None:
      max_queries = min(max_queries, int(data_config["chain_queries"]))
    parts.append(chain_batch(
        chain_rows, L, seed=(int(seed), int(step), 0, 1),
        num_chains=min(int(_get(data_config, "chain_count", 4)),
                       (L - 1) // (3 * max(chain_hops))),
        hops=chain_hops, max_queries=max_queries,
        key_ends=float(_get(data_config, "chain_key_ends", 0.0))))
  batch = generators.concat_batches(parts)
  return pad_batch(batch, padded_length(data_config, L, phase))


def copy_batch(batch_size: int, context_len: int, seed,
               max_copy: int | None = None) -> TaskBatch:
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
  L = context_len
  max_n = (L - 1) // 2 if max_copy is None else min((L - 1) // 2, max_copy)
  T = L + 1 + max_n
  tokens = np.zeros((batch_size, T), np.int32)
  loss_mask = np.zeros((batch_size, T), bool)
  lengths = np.zeros((batch_size,), np.int32)
  answer_positions = np.full((batch_size, max_n - 1), -1, np.int32)
  for b in range(batch_size):
    n = int(rng.integers(2, max_n + 1))
    ids = VOCAB.key_start + rng.choice(2 * VOCAB.num_keys, n, replace=False)
    start = int(rng.integers(1, L - n + 1))
    tokens[b, :L] = VOCAB.filler_start + rng.integers(0, VOCAB.num_filler, L)
    tokens[b, 0] = BOS
    tokens[b, start:start + n] = ids
    tokens[b, L] = QUERY
    tokens[b, L + 1:L + 1 + n] = ids
    loss_mask[b, L + 2:L + 1 + n] = True
    lengths[b] = L + 1 + n
    answer_positions[b, :n - 1] = np.arange(L + 2, L + 1 + n)
  answers = np.where(answer_positions >= 0,
                     np.take_along_axis(tokens, np.maximum(answer_positions,
                                                           0), 1), PAD)
  full = lambda v: np.full((batch_size,), v, np.int32)
  return TaskBatch(
      tokens=tokens, lengths=lengths, context_end=full(L),
      answer_start=full(L + 2), answer_positions=answer_positions,
      answers=answers.astype(np.int32), loss_mask=loss_mask,
      critical_positions=np.full((batch_size, 0), -1, np.int32),
      task_ids=full(COPY_TASK_ID))


def chain_batch(batch_size: int, context_len: int, seed, *,
                num_chains: int = 4, hops: Sequence[int] = (2,),
                max_queries: int | None = None,
                key_ends: float = 0.0) -> TaskBatch:
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
    raise ValueError(f"hops must be a non-empty sequence of values in "
                     f"{generators.HOPS}, got {hops!r}.")
  if max_queries is not None and max_queries < 1:
    raise ValueError(f"max_queries must be >= 1, got {max_queries}.")
  if not 0.0 <= key_ends <= 1.0:
    raise ValueError(f"key_ends must be in [0, 1], got {key_ends}.")
  if 1 + 3 * num_chains * max(hops) > context_len:
    raise ValueError(
        f"{num_chains} chains of up to {max(hops)} links (3 tokens each) "
        f"do not fit in context_len={context_len} (BOS included).")
  if num_chains * (max(hops) + 1) > VOCAB.num_keys:
    raise ValueError(f"{num_chains} chains of {max(hops)} links need more "
                     f"than the {VOCAB.num_keys} key ids.")
  rng = np.random.default_rng(seed)
  L = context_len
  q = num_chains if max_queries is None else min(num_chains, max_queries)
  T = L + 4 * q
  tokens = np.zeros((batch_size, T), np.int32)
  answer_positions = np.broadcast_to(L + 3 + 4 * np.arange(q),
                                     (batch_size, q)).astype(np.int32)
  answers = np.zeros((batch_size, q), np.int32)
  for b in range(batch_size):
    lengths = rng.choice(np.asarray(hops), num_chains)
    num_links = int(lengths.sum())
    # Key ends draw extra ids only when asked for, so rows without them
    # are the same draws as before the option existed.
    nodes = VOCAB.key_start + rng.choice(
        VOCAB.num_keys, num_links + (num_chains if key_ends else 0),
        replace=False)
    ends = VOCAB.value_start + rng.choice(VOCAB.num_values, num_chains,
                                          replace=False)
    if key_ends:
      ends = np.where(rng.random(num_chains) < key_ends, nodes[num_links:],
                      ends)
    keys, values, firsts = [], [], []
    offset = 0
    for chain, length in enumerate(lengths):
      chain_nodes = list(nodes[offset:offset + length]) + [ends[chain]]
      offset += length
      keys += chain_nodes[:-1]
      values += chain_nodes[1:]
      firsts.append(chain_nodes[0])
    starts = generators._fact_starts(  # pylint: disable=protected-access
        rng, 1, len(keys), 3, L)[0]
    tokens[b, :L] = VOCAB.filler_start + rng.integers(0, VOCAB.num_filler, L)
    tokens[b, 0] = BOS
    tokens[b, starts] = keys
    tokens[b, starts + 1] = ARROW
    tokens[b, starts + 2] = values
    asked = rng.permutation(num_chains)[:q]
    answers[b] = ends[asked]
    tokens[b, L + 4 * np.arange(q)] = QUERY
    tokens[b, L + 1 + 4 * np.arange(q)] = np.asarray(firsts)[asked]
    tokens[b, L + 2 + 4 * np.arange(q)] = ARROW
    tokens[b, answer_positions[b]] = answers[b]
  loss_mask = np.zeros((batch_size, T), bool)
  np.put_along_axis(loss_mask, answer_positions, True, axis=1)
  full = lambda v: np.full((batch_size,), v, np.int32)
  return TaskBatch(
      tokens=tokens, lengths=full(T), context_end=full(L),
      answer_start=full(L + 3), answer_positions=answer_positions,
      answers=answers, loss_mask=loss_mask,
      critical_positions=np.full((batch_size, 0), -1, np.int32),
      task_ids=full(CHAIN_TASK_ID))


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
      loss_mask=np.pad(batch.loss_mask, ((0, 0), (0, pad))))


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
    tokens, L = batch.tokens[r], int(batch.context_end[r])
    link = {int(tokens[i - 1]): int(tokens[i + 1])
            for i in np.flatnonzero(tokens[:L] == ARROW)}
    for p in np.flatnonzero(batch.loss_mask[r]):  # asked x, answer y at p
      mask[r, p] = link[int(tokens[p - 2])] == tokens[p]  # a 1-link chain
  return mask


def model_inputs(batch: TaskBatch, loss_on: str = "answers",
                 lens_weight: float = 0.0) -> dict[str, np.ndarray]:
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
  from kvjax.train.losses import loss_weights  # pylint: disable=g-import-not-at-top
  tokens = batch.tokens
  T = tokens.shape[1]
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "weights": np.asarray(loss_weights(batch.loss_mask, batch.lengths,
                                         loss_on), np.float32),
      "token_mask": np.arange(T - 1)[None, :] < batch.lengths[:, None],
      "answer_mask": np.asarray(batch.loss_mask[:, 1:], bool),
      "task_ids": np.asarray(batch.task_ids, np.int32),
      **({"lens_weights": lens_mask(batch)[:, 1:].astype(np.float32),
          "lens_scale": np.float32(lens_weight)} if lens_weight > 0 else {}),
  }
