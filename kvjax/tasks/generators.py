"""Deterministic generators of the controlled synthetic tasks.

Five tasks, one token layout, one batch type:

  mqar        Zoology's multi-query associative recall: `key value` bigrams
              in the context, every key queried once in the question.
  needle      a few `key -> value` facts in long filler; one key is queried.
  multihop    chains `x1 -> x2`, `x2 -> x3`, ..., `xk -> y` scattered in the
              context (keys x*, value y); the question gives x1, the answer
              is y (latent) or the walk x2, ..., y (walk=True). k = `hops`
              in 1..4.
  overwrite   one key is assigned several times; the answer is the value of
              the latest (right-most) assignment.
  abstention  facts as in `needle`, but the queried key is absent; the answer
              is the dedicated UNKNOWN token.

Token layout (`context_len` tokens of context, BOS included, the same for
every row of a task; c = context_len in the positions below)::

  position  0     1 .. c-1                 c      c+1  c+2   c+3
  token     BOS   context: facts + filler  QUERY  key  ARROW answer

  mqar:     BOS   k v pairs + filler       QUERY  k_1 v_1 k_2 v_2 ... k_q v_q
  walk:     BOS   chains + filler          QUERY  x1 ARROW x2 ARROW ... y

* The context is the prefix `tokens[:context_end]` (BOS included), so it can
  be prefilled and compressed before the question is seen; the question
  starts at `context_end` with the QUERY marker.
* The answers are part of `tokens` (teacher forcing). The answer token at
  position p is predicted from the logits at position p - 1:
  `inputs = tokens[:, :-1]`, `targets = tokens[:, 1:]`,
  `weights = loss_mask[:, 1:]`. `loss_mask` is True exactly at the answer
  positions. For the four lookup tasks the single answer is the last token
  (a multihop walk has one after every ARROW); for mqar the answers sit
  inside the question right after each queried key.
  The question tokens proper are `question_mask(batch)`: the positions in
  `[context_end, lengths)` that are no answer and follow from none.
* Evaluating under compression: prefill `tokens[:, :context_end]` (the same
  context_len in every row, mixtures included), compress the cache, feed
  `tokens[:, context_end:]` in one teacher-forced call and read the answers
  with `scoring.predictions_from_logits(batch, logits,
  offset=batch.context_end)`.
* Facts of the lookup tasks are `key ARROW value` (3 tokens); mqar facts are
  Zoology's adjacent `key value` bigrams. Keys come from `vocab`'s key range
  and values from its value range (two disjoint halves). Keys are distinct
  within an example, and so are values, except where a task says otherwise.
* `critical_positions` lists the context positions of the key and value
  tokens of every fact the answer depends on (for multihop every link, in
  chain order; for overwrite the latest assignment only; for abstention
  none). The ARROW markers, identical in every fact, are not listed.

Deviations from Zoology's `multiquery_ar` (HazyResearch/zoology
`zoology/data/multiquery_ar.py`), made so one layout serves every task and
the context is a compressible prefix: filler tokens come from a dedicated
range instead of the whole vocabulary, the queries follow a QUERY marker
back to back instead of being spread over the tail with power-law gaps, and
each answer is also the next input token. Since each key is queried once,
the teacher-forced answers reveal nothing about later queries.

Seeds: every generator takes `seed` (an int or a tuple of ints, e.g.
`(base_seed, step)` for a training stream) and is a pure function of its
arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from kvjax.tasks.vocab import ARROW, BOS, PAD, QUERY, UNKNOWN, VOCAB, Vocab

TASK_NAMES = ("mqar", "needle", "multihop", "overwrite", "abstention")
HOPS = (1, 2, 3, 4)
MQAR_PLACEMENTS = ("prefix", "scattered")
LOOKUP_QUESTION_LEN = 4  # QUERY key ARROW answer

# Parameters make_mixture_batch passes unless task_params overrides them.
DEFAULT_MIXTURE_PARAMS = {"multihop": {"hops": HOPS}}


class TaskBatch(NamedTuple):
  """A batch of task examples; every leaf is a numpy array (a pytree).

  Attributes:
    tokens: [B, T] int32 ids, answers included, right-padded with PAD.
    lengths: [B] int32 number of real tokens per row.
    context_end: [B] int32 first question position (the QUERY marker); the
      context is `tokens[b, :context_end[b]]`.
    answer_start: [B] int32 position of the first answer token.
    answer_positions: [B, A] int32 positions of the answer tokens, -1 pad.
    answers: [B, A] int32 answer ids (`tokens` at `answer_positions`), PAD
      where `answer_positions` is -1.
    loss_mask: [B, T] bool, True at the answer positions: the targets of the
      next-token loss (predicted from the logits one position earlier).
    critical_positions: [B, C] int32 context positions the answer depends
      on, -1 pad.
    task_ids: [B] int32 index of each row's task in `TASK_NAMES`.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  context_end: np.ndarray
  answer_start: np.ndarray
  answer_positions: np.ndarray
  answers: np.ndarray
  loss_mask: np.ndarray
  critical_positions: np.ndarray
  task_ids: np.ndarray

  @property
  def batch_size(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def task_names(self) -> tuple[str, ...]:
    """The task name of every row."""
    return tuple(TASK_NAMES[i] for i in self.task_ids)

  @property
  def task(self) -> str:
    """The batch's task name, or "mixture" when rows differ."""
    names = set(self.task_names)
    return names.pop() if len(names) == 1 else "mixture"

  def example(self, index: int, vocab: Vocab = VOCAB) -> TaskExample:
    """Row `index` without padding, as a `TaskExample`."""
    if not -self.batch_size <= index < self.batch_size:
      raise IndexError(
        f"index={index} out of range for batch_size={self.batch_size}."
      )
    answer_valid = self.answer_positions[index] >= 0
    critical_valid = self.critical_positions[index] >= 0
    return TaskExample(
      task=TASK_NAMES[self.task_ids[index]],
      tokens=self.tokens[index, : self.lengths[index]],
      context_end=int(self.context_end[index]),
      answer_start=int(self.answer_start[index]),
      answer_positions=self.answer_positions[index][answer_valid],
      answers=self.answers[index][answer_valid],
      critical_positions=self.critical_positions[index][critical_valid],
      vocab=vocab,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TaskExample:
  """One example without padding (see `TaskBatch` for the fields)."""

  task: str
  tokens: np.ndarray  # [T] int32
  context_end: int
  answer_start: int
  answer_positions: np.ndarray  # [A] int32
  answers: np.ndarray  # [A] int32
  critical_positions: np.ndarray  # [C] int32
  vocab: Vocab = VOCAB

  @property
  def context(self) -> np.ndarray:
    """[context_end] the prefix, BOS included."""
    return self.tokens[: self.context_end]

  def render(self, *, collapse_filler: bool = True) -> str:
    """Readable text: `[..]` marks critical tokens, `(..)` answers, `||`
    the end of the context."""
    critical = set(self.critical_positions.tolist())
    answers = set(self.answer_positions.tolist())
    words = []
    filler_run = 0
    for position, token_id in enumerate(self.tokens.tolist()):
      plain = position not in critical and position not in answers
      if (
        collapse_filler
        and plain
        and position != self.context_end
        and self.vocab.is_filler(token_id)
      ):
        filler_run += 1
        continue
      if filler_run:
        words.append(f"{{filler x{filler_run}}}")
        filler_run = 0
      if position == self.context_end:
        words.append("||")
      word = self.vocab.token_name(token_id)
      if position in critical:
        word = f"[{word}]"
      if position in answers:
        word = f"({word})"
      words.append(word)
    if filler_run:
      words.append(f"{{filler x{filler_run}}}")
    return f"{self.task}: " + " ".join(words)


# --------------------------------------------------------------------------
# Argument checks.


def _check_int(
  name: str,
  value,
  minimum: int | None = None,
  maximum: int | None = None,
  task: str | None = None,
) -> int:
  where = f" ({task})" if task else ""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}{where} must be an int, got {value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}{where} must be >= {minimum}, got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name}{where} must be <= {maximum}, got {value}.")
  return int(value)


def _make_rng(seed, task: str | None = None) -> np.random.Generator:
  """A Generator from an int seed or a tuple/list of ints.

  A salt naming the task (or the mixture) is appended, so different tasks
  at the same seed draw independent examples. It is never 0, because
  SeedSequence ignores trailing zeros (seed 5 and seed (5, 0) would agree).
  """
  entropy = list(seed) if isinstance(seed, (tuple, list)) else [seed]
  if not entropy:
    raise ValueError("seed must be an int or a non-empty tuple of ints.")
  for part in entropy:
    if isinstance(part, bool) or not isinstance(part, (int, np.integer)):
      raise TypeError(f"seed must be an int or a tuple of ints, got {seed!r}.")
    if part < 0:
      raise ValueError(f"seed must be non-negative, got {seed!r}.")
  salt = 1 + (len(TASK_NAMES) if task is None else TASK_NAMES.index(task))
  return np.random.default_rng([int(part) for part in entropy] + [salt])


def _check_vocab(vocab) -> Vocab:
  if not isinstance(vocab, Vocab):
    raise TypeError(f"vocab must be a kvjax.tasks.Vocab, got {vocab!r}.")
  return vocab


class ContextTooShortError(ValueError):
  """The context cannot hold the facts a task's parameters ask for.

  Attributes:
    task: the task name.
    context_len: the context length asked for.
    minimum: the shortest context_len the task accepts with its parameters
      (`min_context_len`).
  """

  def __init__(self, task: str, context_len: int, minimum: int, what: str):
    super().__init__(
      f"context_len={context_len} is too short for {task} with {what}: "
      f"it needs context_len >= {minimum} (BOS + the facts)."
    )
    self.task = task
    self.context_len = context_len
    self.minimum = minimum


def _check_fits(
  task: str, context_len: int, num_facts: int, fact_width: int, what: str
):
  minimum = 1 + num_facts * fact_width
  if context_len < minimum:
    raise ContextTooShortError(
      task,
      context_len,
      minimum,
      f"{what} ({num_facts} facts of {fact_width} tokens)",
    )


def _check_ids(task: str, needed: int, available: int, kind: str, what: str):
  if needed > available:
    raise ValueError(
      f"{task} with {what} needs {needed} distinct {kind} ids but the "
      f"vocabulary has {available}; lower it or use a larger Vocab."
    )


# --------------------------------------------------------------------------
# Vectorized sampling helpers. B = batch size, n = facts per example.


def _distinct_ids(
  rng, batch_size: int, start: int, available: int, count: int
) -> np.ndarray:
  """[B, count] ids from [start, start + available), distinct per row, in
  random order."""
  scores = rng.random((batch_size, available))
  return np.argsort(scores, axis=1)[:, :count] + start


def _filler_before(
  rng, batch_size: int, num_facts: int, num_filler: int
) -> np.ndarray:
  """[B, n] nondecreasing counts of filler tokens before each fact.

  Uniform over the arrangements of n facts among `num_filler` filler tokens:
  choose n of the num_filler + n slots, sorted; the j-th chosen slot has j
  facts and slot_j - j fillers before it.
  """
  scores = rng.random((batch_size, num_filler + num_facts))
  slots = np.sort(np.argsort(scores, axis=1)[:, :num_facts], axis=1)
  return slots - np.arange(num_facts)


def _fact_starts(
  rng,
  batch_size: int,
  num_facts: int,
  fact_width: int,
  context_len: int,
  pinned_depth: float | None = None,
) -> np.ndarray:
  """[B, n] start positions of non-overlapping facts in
  tokens[1:context_len].

  Columns are facts in random position order. With `pinned_depth`, fact 0
  has round(depth * num_filler) filler tokens before it (depth 0: first
  fact after BOS; depth 1: last fact before the question).
  """
  num_filler = context_len - 1 - num_facts * fact_width
  if pinned_depth is None:
    before = _filler_before(rng, batch_size, num_facts, num_filler)
    sort_key = 2 * before
  else:
    others = _filler_before(rng, batch_size, num_facts - 1, num_filler)
    pinned = np.full((batch_size, 1), int(round(pinned_depth * num_filler)))
    before = np.concatenate([pinned, others], axis=1)
    # Ties with other facts: the pinned fact goes first for shallow depths
    # and last for deep ones, so depth 0 and 1 are the extremes.
    tie = -1 if pinned_depth < 0.5 else 1
    sort_key = 2 * before
    sort_key[:, 0] += tie
  rank = np.argsort(np.argsort(sort_key, axis=1, kind="stable"), axis=1)
  starts = 1 + before + rank * fact_width  # [B, n]
  if pinned_depth is None:
    return rng.permuted(starts, axis=1)
  starts[:, 1:] = rng.permuted(starts[:, 1:], axis=1)
  return starts


def _filler_tokens(
  rng, batch_size: int, length: int, vocab: Vocab
) -> np.ndarray:
  """[B, length] random filler ids with BOS at position 0."""
  tokens = rng.integers(
    vocab.filler_start,
    vocab.key_start,
    size=(batch_size, length),
    dtype=np.int64,
  )
  tokens[:, 0] = BOS
  return tokens


def _assemble(
  task: str,
  tokens: np.ndarray,
  context_len: int,
  answer_positions: np.ndarray,
  answers: np.ndarray,
  critical_positions: np.ndarray,
) -> TaskBatch:
  """A TaskBatch from unpadded [B, T] tokens (all rows the same length)."""
  batch_size, total_len = tokens.shape
  loss_mask = np.zeros((batch_size, total_len), dtype=bool)
  np.put_along_axis(loss_mask, answer_positions, True, axis=1)
  answer_start = (
    answer_positions[:, 0]
    if answer_positions.shape[1]
    else np.full(batch_size, -1)
  )
  return TaskBatch(
    tokens=tokens.astype(np.int32),
    lengths=np.full(batch_size, total_len, dtype=np.int32),
    context_end=np.full(batch_size, context_len, dtype=np.int32),
    answer_start=answer_start.astype(np.int32),
    answer_positions=answer_positions.astype(np.int32),
    answers=answers.astype(np.int32),
    loss_mask=loss_mask,
    critical_positions=critical_positions.astype(np.int32),
    task_ids=np.full(batch_size, TASK_NAMES.index(task), dtype=np.int32),
  )


def _lookup_batch(
  task: str,
  rng,
  vocab: Vocab,
  context_len: int,
  fact_keys: np.ndarray,
  fact_values: np.ndarray,
  starts: np.ndarray,
  query_keys: np.ndarray,
  answers: np.ndarray,
  critical_positions: np.ndarray,
) -> TaskBatch:
  """Writes `key ARROW value` facts into filler and appends the question.

  Args:
    fact_keys, fact_values, starts: [B, n] facts and their start positions.
    query_keys: [B] the queried key.
    answers: [B] its answer, or [B, A] a walk: the question is then
      `QUERY key (ARROW answer) * A` with an answer slot after every ARROW.
    critical_positions: [B, C].
  """
  batch_size = fact_keys.shape[0]
  if answers.ndim == 1:
    answers = answers[:, None]
  num_answers = answers.shape[1]
  tokens = _filler_tokens(
    rng, batch_size, context_len + LOOKUP_QUESTION_LEN, vocab
  )
  # A walk's extra `ARROW answer` slots (written below): the same draws,
  # so its context equals the latent question's.
  tokens = np.pad(tokens, ((0, 0), (0, 2 * (num_answers - 1))))
  rows = np.arange(batch_size)[:, None]
  tokens[rows, starts] = fact_keys
  tokens[rows, starts + 1] = ARROW
  tokens[rows, starts + 2] = fact_values
  tokens[:, context_len] = QUERY
  tokens[:, context_len + 1] = query_keys
  answer_positions = np.broadcast_to(
    context_len + 3 + 2 * np.arange(num_answers), answers.shape
  )
  np.put_along_axis(tokens, answer_positions - 1, ARROW, axis=1)
  np.put_along_axis(tokens, answer_positions, answers, axis=1)
  return _assemble(
    task, tokens, context_len, answer_positions, answers, critical_positions
  )


def _key_value_critical(starts: np.ndarray, value_offset: int) -> np.ndarray:
  """[B, 2m] interleaved (key, value) positions of m facts from [B, m]."""
  batch_size, num_facts = starts.shape
  return np.stack([starts, starts + value_offset], axis=2).reshape(
    batch_size, 2 * num_facts
  )


def _pad_to(array: np.ndarray, width: int, fill) -> np.ndarray:
  extra = width - array.shape[1]
  if extra == 0:
    return array
  pad = np.full((array.shape[0], extra), fill, dtype=array.dtype)
  return np.concatenate([array, pad], axis=1)


def concat_batches(batches: Sequence[TaskBatch]) -> TaskBatch:
  """Stacks batches along B, padding T, A and C to the widest.

  Args:
    batches: one or more TaskBatch (any tasks, context lengths).

  Returns:
    A TaskBatch whose rows are the rows of `batches` in order.

  Raises:
    ValueError: if `batches` is empty.
  """
  if not batches:
    raise ValueError("concat_batches needs at least one TaskBatch.")
  total_len = max(b.tokens.shape[1] for b in batches)
  num_answers = max(b.answers.shape[1] for b in batches)
  num_critical = max(b.critical_positions.shape[1] for b in batches)

  def cat(field, width=None, fill=None):
    parts = [getattr(b, field) for b in batches]
    if width is not None:
      parts = [_pad_to(p, width, fill) for p in parts]
    return np.concatenate(parts, axis=0)

  return TaskBatch(
    tokens=cat("tokens", total_len, PAD),
    lengths=cat("lengths"),
    context_end=cat("context_end"),
    answer_start=cat("answer_start"),
    answer_positions=cat("answer_positions", num_answers, -1),
    answers=cat("answers", num_answers, PAD),
    loss_mask=cat("loss_mask", total_len, False),
    critical_positions=cat("critical_positions", num_critical, -1),
    task_ids=cat("task_ids"),
  )


def question_mask(batch: TaskBatch) -> np.ndarray:
  """[B, T] bool: the question proper, the tokens a question-aware
  compressor may observe.

  The question positions `[context_end, lengths)` that are not answers and
  follow from no answer: in mqar every queried key (each key is queried
  once, so earlier answers say nothing about later keys); in the other
  tasks the positions before the first answer (a multihop walk's later
  tokens carry the walk itself).
  """
  positions = np.arange(batch.tokens.shape[1])[None, :]
  mask = (
    (positions >= batch.context_end[:, None])
    & (positions < batch.lengths[:, None])
    & ~batch.loss_mask
  )
  before_answers = positions < batch.answer_start[:, None]
  mqar_rows = batch.task_ids == TASK_NAMES.index("mqar")
  return mask & (mqar_rows[:, None] | before_answers)


def _take_rows(batch: TaskBatch, rows: np.ndarray) -> TaskBatch:
  return TaskBatch(*(field[rows] for field in batch))


def _grouped_rows(
  group_of_row: np.ndarray, build: Callable[[object, int], TaskBatch]
) -> TaskBatch:
  """Builds each group's rows with `build(group, count)` and puts every row
  back at its place in the batch."""
  parts, order = [], []
  for group in np.unique(group_of_row):
    rows = np.flatnonzero(group_of_row == group)
    parts.append(build(group, rows.size))
    order.append(rows)
  merged = concat_batches(parts)
  return _take_rows(merged, np.argsort(np.concatenate(order)))


# --------------------------------------------------------------------------
# Task builders: (rng, batch_size, context_len, vocab, **params) -> TaskBatch.
# They validate their parameters even when batch_size is 0, so a mixture
# rejects bad parameters whatever rows the seed gives each task.


def _build_mqar(
  rng,
  batch_size: int,
  context_len: int,
  vocab: Vocab,
  *,
  num_pairs: int = 8,
  num_queries: int | None = None,
  placement: str = "prefix",
) -> TaskBatch:
  num_pairs = _check_int("num_pairs", num_pairs, 1, task="mqar")
  if num_queries is None:
    num_queries = num_pairs
  num_queries = _check_int("num_queries", num_queries, 1, num_pairs, "mqar")
  if placement not in MQAR_PLACEMENTS:
    raise ValueError(
      f"placement={placement!r} is not one of {MQAR_PLACEMENTS} (mqar)."
    )
  what = f"num_pairs={num_pairs}"
  _check_fits("mqar", context_len, num_pairs, 2, what)
  _check_ids("mqar", num_pairs, vocab.num_keys, "key", what)

  keys = _distinct_ids(
    rng, batch_size, vocab.key_start, vocab.num_keys, num_pairs
  )  # [B, n]
  values = _distinct_ids(
    rng, batch_size, vocab.value_start, vocab.num_values, num_pairs
  )  # [B, n]
  if placement == "prefix":  # Zoology: the pairs open the sequence.
    starts = np.broadcast_to(
      1 + 2 * np.arange(num_pairs), (batch_size, num_pairs)
    )
  else:
    starts = _fact_starts(rng, batch_size, num_pairs, 2, context_len)
  # Each queried pair once, in random order: [B, q].
  queried = np.argsort(rng.random((batch_size, num_pairs)), axis=1)[
    :, :num_queries
  ]
  rows = np.arange(batch_size)[:, None]
  query_keys = keys[rows, queried]
  answers = values[rows, queried]

  total_len = context_len + 1 + 2 * num_queries
  tokens = _filler_tokens(rng, batch_size, total_len, vocab)
  tokens[rows, starts] = keys
  tokens[rows, starts + 1] = values
  tokens[:, context_len] = QUERY
  key_positions = context_len + 1 + 2 * np.arange(num_queries)  # [q]
  tokens[:, key_positions] = query_keys
  tokens[:, key_positions + 1] = answers
  answer_positions = np.broadcast_to(
    key_positions + 1, (batch_size, num_queries)
  )
  critical = _key_value_critical(starts[rows, queried], 1)
  return _assemble(
    "mqar", tokens, context_len, answer_positions, answers, critical
  )


def _build_needle(
  rng,
  batch_size: int,
  context_len: int,
  vocab: Vocab,
  *,
  num_distractors: int = 3,
  depth: float | None = None,
) -> TaskBatch:
  num_distractors = _check_int(
    "num_distractors", num_distractors, 0, task="needle"
  )
  if depth is not None:
    if isinstance(depth, bool) or not isinstance(
      depth, (int, float, np.integer, np.floating)
    ):
      raise TypeError(f"depth (needle) must be a float or None, got {depth!r}.")
    if not 0.0 <= depth <= 1.0:
      raise ValueError(
        f"depth (needle) must be in [0, 1] or None, got {depth}."
      )
    depth = float(depth)
  num_facts = num_distractors + 1
  what = f"num_distractors={num_distractors}"
  _check_fits("needle", context_len, num_facts, 3, what)
  _check_ids("needle", num_facts, vocab.num_keys, "key", what)

  keys = _distinct_ids(
    rng, batch_size, vocab.key_start, vocab.num_keys, num_facts
  )  # [B, n]; column 0 is the needle
  values = _distinct_ids(
    rng, batch_size, vocab.value_start, vocab.num_values, num_facts
  )
  starts = _fact_starts(
    rng, batch_size, num_facts, 3, context_len, pinned_depth=depth
  )
  critical = _key_value_critical(starts[:, :1], 2)
  return _lookup_batch(
    "needle",
    rng,
    vocab,
    context_len,
    keys,
    values,
    starts,
    keys[:, 0],
    values[:, 0],
    critical,
  )


def _build_multihop_fixed(
  rng,
  batch_size: int,
  context_len: int,
  vocab: Vocab,
  hops: int,
  num_distractor_chains: int,
  walk: bool,
) -> TaskBatch:
  num_chains = num_distractor_chains + 1
  num_links = num_chains * hops
  nodes = _distinct_ids(
    rng, batch_size, vocab.key_start, vocab.num_keys, num_links
  ).reshape(batch_size, num_chains, hops)
  ends = _distinct_ids(
    rng, batch_size, vocab.value_start, vocab.num_values, num_chains
  )  # [B, chains]
  # Link j of chain i: nodes[i, j] -> nodes[i, j + 1], the last -> ends[i].
  targets = np.concatenate([nodes[:, :, 1:], ends[:, :, None]], axis=2)
  fact_keys = nodes.reshape(batch_size, num_links)  # chain 0 first
  fact_values = targets.reshape(batch_size, num_links)
  starts = _fact_starts(rng, batch_size, num_links, 3, context_len)
  critical = _key_value_critical(starts[:, :hops], 2)  # [B, 2 * hops]
  answers = targets[:, 0] if walk else ends[:, 0]  # [B, hops] or [B]
  return _lookup_batch(
    "multihop",
    rng,
    vocab,
    context_len,
    fact_keys,
    fact_values,
    starts,
    nodes[:, 0, 0],
    answers,
    critical,
  )


def _build_multihop(
  rng,
  batch_size: int,
  context_len: int,
  vocab: Vocab,
  *,
  hops: int | Sequence[int] = 2,
  num_distractor_chains: int = 2,
  walk: bool = False,
) -> TaskBatch:
  hop_choices = (
    tuple(hops) if isinstance(hops, (tuple, list, np.ndarray)) else (hops,)
  )
  if not hop_choices:
    raise ValueError(
      f"hops (multihop) must be one of {HOPS} or a non-empty "
      f"sequence of them, got {hops!r}."
    )
  for value in hop_choices:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(
        f"hops (multihop) must be an int in {HOPS} or a "
        f"sequence of them, got {hops!r}."
      )
    if int(value) not in HOPS:
      raise ValueError(f"hops (multihop) must be one of {HOPS}, got {hops!r}.")
  hop_choices = tuple(int(value) for value in hop_choices)
  if not isinstance(walk, (bool, np.bool_)):
    raise TypeError(f"walk (multihop) must be a bool, got {walk!r}.")
  walk = bool(walk)
  num_distractor_chains = _check_int(
    "num_distractor_chains", num_distractor_chains, 0, task="multihop"
  )
  max_hops = max(hop_choices)
  num_links = (num_distractor_chains + 1) * max_hops
  what = f"hops={max_hops} and num_distractor_chains={num_distractor_chains}"
  _check_fits("multihop", context_len, num_links, 3, what)
  _check_ids("multihop", num_links, vocab.num_keys, "key", what)

  if len(hop_choices) == 1 or batch_size == 0:
    return _build_multihop_fixed(
      rng,
      batch_size,
      context_len,
      vocab,
      hop_choices[0],
      num_distractor_chains,
      walk,
    )
  hops_of_row = rng.choice(np.asarray(hop_choices), size=batch_size)
  return _grouped_rows(
    hops_of_row,
    lambda group, count: _build_multihop_fixed(
      rng, count, context_len, vocab, int(group), num_distractor_chains, walk
    ),
  )


def _build_overwrite(
  rng,
  batch_size: int,
  context_len: int,
  vocab: Vocab,
  *,
  num_writes: int = 2,
  num_distractors: int = 3,
) -> TaskBatch:
  num_writes = _check_int("num_writes", num_writes, 2, task="overwrite")
  num_distractors = _check_int(
    "num_distractors", num_distractors, 0, task="overwrite"
  )
  num_facts = num_writes + num_distractors
  what = f"num_writes={num_writes} and num_distractors={num_distractors}"
  _check_fits("overwrite", context_len, num_facts, 3, what)
  _check_ids("overwrite", num_distractors + 1, vocab.num_keys, "key", what)
  _check_ids("overwrite", num_facts, vocab.num_values, "value", what)

  keys = _distinct_ids(
    rng, batch_size, vocab.key_start, vocab.num_keys, num_distractors + 1
  )  # column 0 is queried
  values = _distinct_ids(
    rng, batch_size, vocab.value_start, vocab.num_values, num_facts
  )  # [B, n]
  fact_keys = np.concatenate(
    [np.repeat(keys[:, :1], num_writes, axis=1), keys[:, 1:]], axis=1
  )
  starts = _fact_starts(rng, batch_size, num_facts, 3, context_len)
  latest = np.argmax(starts[:, :num_writes], axis=1)  # [B]
  rows = np.arange(batch_size)
  critical = _key_value_critical(starts[rows, latest][:, None], 2)
  return _lookup_batch(
    "overwrite",
    rng,
    vocab,
    context_len,
    fact_keys,
    values,
    starts,
    keys[:, 0],
    values[rows, latest],
    critical,
  )


def _build_abstention(
  rng,
  batch_size: int,
  context_len: int,
  vocab: Vocab,
  *,
  num_distractors: int = 4,
) -> TaskBatch:
  num_distractors = _check_int(
    "num_distractors", num_distractors, 0, task="abstention"
  )
  what = f"num_distractors={num_distractors}"
  _check_fits("abstention", context_len, num_distractors, 3, what)
  _check_ids("abstention", num_distractors + 1, vocab.num_keys, "key", what)

  keys = _distinct_ids(
    rng, batch_size, vocab.key_start, vocab.num_keys, num_distractors + 1
  )  # column 0: queried, absent
  values = _distinct_ids(
    rng, batch_size, vocab.value_start, vocab.num_values, num_distractors
  )
  starts = _fact_starts(rng, batch_size, num_distractors, 3, context_len)
  answers = np.full(batch_size, UNKNOWN)
  critical = np.zeros((batch_size, 0), dtype=np.int64)
  return _lookup_batch(
    "abstention",
    rng,
    vocab,
    context_len,
    keys[:, 1:],
    values,
    starts,
    keys[:, 0],
    answers,
    critical,
  )


_BUILDERS = {
  "mqar": _build_mqar,
  "needle": _build_needle,
  "multihop": _build_multihop,
  "overwrite": _build_overwrite,
  "abstention": _build_abstention,
}


def _check_batch_args(batch_size, context_len) -> tuple[int, int]:
  batch_size = _check_int("batch_size", batch_size, 1)
  context_len = _check_int("context_len", context_len, 1)
  return batch_size, context_len


# --------------------------------------------------------------------------
# Public generators.


def mqar(
  batch_size: int,
  *,
  seed,
  context_len: int,
  num_pairs: int = 8,
  num_queries: int | None = None,
  placement: str = "prefix",
  vocab: Vocab = VOCAB,
) -> TaskBatch:
  """Multi-query associative recall (Zoology).

  The context holds `num_pairs` adjacent `key value` bigrams with distinct
  keys and values, the rest is filler; the question is
  `QUERY k_1 v_1 ... k_q v_q`, each queried key once, in random order.

  Args:
    batch_size: B.
    seed: int or tuple of ints.
    context_len: context tokens including BOS; T = context_len + 1 + 2 q.
    num_pairs: key-value pairs in the context.
    num_queries: q, pairs queried (default: all, as in Zoology); the others
      are distractors.
    placement: "prefix" (Zoology: the pairs right after BOS, then filler) or
      "scattered" (pairs at random non-overlapping positions in filler).
    vocab: the vocabulary.

  Returns:
    A TaskBatch with A = q answers and C = 2 q critical positions per row
    (key and value of each queried pair, in question order).

  Raises:
    ValueError: context_len too short (< 1 + 2 * num_pairs), num_queries
      outside [1, num_pairs], unknown placement, too few key ids.
  """
  batch_size, context_len = _check_batch_args(batch_size, context_len)
  return _build_mqar(
    _make_rng(seed, "mqar"),
    batch_size,
    context_len,
    _check_vocab(vocab),
    num_pairs=num_pairs,
    num_queries=num_queries,
    placement=placement,
  )


def needle(
  batch_size: int,
  *,
  seed,
  context_len: int,
  num_distractors: int = 3,
  depth: float | None = None,
  vocab: Vocab = VOCAB,
) -> TaskBatch:
  """Needle in a haystack: a few `key -> value` facts in filler, one queried.

  Args:
    batch_size: B.
    seed: int or tuple of ints.
    context_len: context tokens including BOS; T = context_len + 4.
    num_distractors: facts besides the needle (distinct keys and values).
    depth: fraction of the context's filler tokens placed before the
      needle, in [0, 1] (0: first fact after BOS, 1: last fact before the
      question); None draws the position at random.
    vocab: the vocabulary.

  Returns:
    A TaskBatch with A = 1 and C = 2 (the needle's key and value).

  Raises:
    ValueError: context_len < 1 + 3 * (num_distractors + 1), depth outside
      [0, 1], too few key ids.
  """
  batch_size, context_len = _check_batch_args(batch_size, context_len)
  return _build_needle(
    _make_rng(seed, "needle"),
    batch_size,
    context_len,
    _check_vocab(vocab),
    num_distractors=num_distractors,
    depth=depth,
  )


def multihop(
  batch_size: int,
  *,
  seed,
  context_len: int,
  hops: int | Sequence[int] = 2,
  num_distractor_chains: int = 2,
  walk: bool = False,
  vocab: Vocab = VOCAB,
) -> TaskBatch:
  """Multi-hop chains: follow `x1 -> x2 -> ... -> y` from x1 to y.

  Each chain has `hops` links; the nodes x* are keys and the end y is a
  value, so the chain ends where a value is reached. Distractor chains have
  the same length and disjoint tokens. All links sit at random positions,
  in random order.

  Two question formats ask for the end of the chain from its start:

    latent (walk=False)  `QUERY x1 ARROW y`: y in one token, every hop
                         composed inside the forward pass.
    walk (walk=True)     `QUERY x1 ARROW x2 ARROW x3 ... ARROW y`: the
                         answer walks the chain, one link per answer slot
                         (a chain of thought; each slot is a single lookup
                         of the token before its ARROW). Scoring counts a
                         walk row correct only if every step is
                         (`kvjax.tasks.score`): what greedy decoding from
                         `QUERY x1 ARROW` reaches when the decoder writes
                         the ARROW separators itself (they are not
                         answers, so a model is not trained to emit
                         them). Only
                         `QUERY x1 ARROW` is the question proper
                         (`question_mask`): later question tokens carry
                         the walk.

  Args:
    batch_size: B.
    seed: int or tuple of ints.
    context_len: context tokens including BOS; T = context_len + 4
      (latent) or context_len + 2 + 2 k (walk).
    hops: k in 1..4, or a sequence of such values: each row then draws its
      k uniformly (rows with different k differ in C, and for walks in T
      and A, padded).
    num_distractor_chains: chains besides the queried one.
    walk: the question format (above).
    vocab: the vocabulary.

  Returns:
    A TaskBatch with A = 1 (latent) or A = k (walk: answers x2, ..., y)
    and C = 2 k: key and value position of every link, in chain order (-1
    padded when k varies; k = count of valid critical positions // 2).

  Raises:
    ValueError: hops not in 1..4, context_len < 1 + 3 * k_max * (chains),
      too few key ids.
  """
  batch_size, context_len = _check_batch_args(batch_size, context_len)
  return _build_multihop(
    _make_rng(seed, "multihop"),
    batch_size,
    context_len,
    _check_vocab(vocab),
    hops=hops,
    num_distractor_chains=num_distractor_chains,
    walk=walk,
  )


def overwrite(
  batch_size: int,
  *,
  seed,
  context_len: int,
  num_writes: int = 2,
  num_distractors: int = 3,
  vocab: Vocab = VOCAB,
) -> TaskBatch:
  """Overwrite: the queried key is assigned `num_writes` times.

  The answer is the value of the latest (right-most) assignment; the earlier
  values are stale. Every value in the example is distinct.

  Args:
    batch_size: B.
    seed: int or tuple of ints.
    context_len: context tokens including BOS; T = context_len + 4.
    num_writes: assignments of the queried key, >= 2.
    num_distractors: facts about other keys, each assigned once.
    vocab: the vocabulary.

  Returns:
    A TaskBatch with A = 1 and C = 2 (key and value of the latest write).

  Raises:
    ValueError: num_writes < 2, context_len < 1 + 3 * (num_writes +
      num_distractors), too few key or value ids.
  """
  batch_size, context_len = _check_batch_args(batch_size, context_len)
  return _build_overwrite(
    _make_rng(seed, "overwrite"),
    batch_size,
    context_len,
    _check_vocab(vocab),
    num_writes=num_writes,
    num_distractors=num_distractors,
  )


def abstention(
  batch_size: int,
  *,
  seed,
  context_len: int,
  num_distractors: int = 4,
  vocab: Vocab = VOCAB,
) -> TaskBatch:
  """Abstention: the queried key appears nowhere in the context.

  Same layout as `needle`; the correct answer is UNKNOWN.

  Args:
    batch_size: B.
    seed: int or tuple of ints.
    context_len: context tokens including BOS; T = context_len + 4.
    num_distractors: facts in the context (none about the queried key).
    vocab: the vocabulary.

  Returns:
    A TaskBatch with A = 1 (UNKNOWN) and C = 0.

  Raises:
    ValueError: context_len < 1 + 3 * num_distractors, too few key ids.
  """
  batch_size, context_len = _check_batch_args(batch_size, context_len)
  return _build_abstention(
    _make_rng(seed, "abstention"),
    batch_size,
    context_len,
    _check_vocab(vocab),
    num_distractors=num_distractors,
  )


TASKS: dict[str, Callable[..., TaskBatch]] = {
  "mqar": mqar,
  "needle": needle,
  "multihop": multihop,
  "overwrite": overwrite,
  "abstention": abstention,
}
"""Task name -> generator `(batch_size, *, seed, context_len, **params)`;
see each generator's docstring for its parameters."""


def default_params(task: str) -> dict[str, object]:
  """The parameters of `task` beyond batch_size/seed/context_len, with their
  defaults."""
  _check_task(task)
  signature = inspect.signature(TASKS[task])
  return {
    name: p.default
    for name, p in signature.parameters.items()
    if name not in ("batch_size", "seed", "context_len")
  }


def _check_task(task) -> str:
  if task not in TASKS:
    raise ValueError(f"task={task!r} is not one of {TASK_NAMES}.")
  return task


def _check_params(task: str, params: Mapping[str, object]):
  allowed = default_params(task)
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise TypeError(
      f"unknown parameter(s) {unknown} for task {task!r}; allowed: "
      f"{sorted(allowed)}."
    )


def make_batch(
  task: str, batch_size: int, *, seed, context_len: int, **params
) -> TaskBatch:
  """A batch of one task: `TASKS[task](batch_size, seed=..., ...)`.

  Args:
    task: one of TASK_NAMES.
    batch_size: B.
    seed: int or tuple of ints, e.g. (base_seed, step).
    context_len: context tokens including BOS.
    **params: the task's parameters (see `default_params(task)`).

  Returns:
    A TaskBatch (see the module docstring for the layout).

  Raises:
    ValueError: unknown task or bad parameter value.
    TypeError: parameter not accepted by the task or of the wrong type.
  """
  _check_params(_check_task(task), params)
  return TASKS[task](batch_size, seed=seed, context_len=context_len, **params)


def min_context_len(task: str, **params) -> int:
  """The shortest `context_len` that `make_batch(task, ...)` accepts.

  Args:
    task: one of TASK_NAMES.
    **params: the task's parameters (see `default_params(task)`).

  Returns:
    1 + the context tokens the task's facts take (BOS + facts).

  Raises:
    ValueError: unknown task or bad parameter value.
    TypeError: parameter not accepted by the task or of the wrong type.
  """
  _check_params(_check_task(task), params)
  params = dict(params)
  vocab = _check_vocab(params.pop("vocab", VOCAB))
  try:  # The builders check the fit before drawing anything (no rows here).
    _BUILDERS[task](_make_rng(0, task), 0, 1, vocab, **params)
  except ContextTooShortError as e:
    return e.minimum
  return 1


def make_example(task: str, *, seed, context_len: int, **params) -> TaskExample:
  """One example: row 0 of `make_batch(task, 1, ...)` without padding."""
  batch = make_batch(task, 1, seed=seed, context_len=context_len, **params)
  return batch.example(0, vocab=params.get("vocab", VOCAB))


def make_mixture_batch(
  batch_size: int,
  *,
  seed,
  context_len: int,
  weights: Mapping[str, float] | None = None,
  task_params: Mapping[str, Mapping[str, object]] | None = None,
  vocab: Vocab = VOCAB,
) -> TaskBatch:
  """A batch mixing tasks row by row, padded to a common T, A and C.

  Each row's task is drawn independently with probability proportional to
  its weight. All tasks share `context_len`, so `context_end` is the same in
  every row while `lengths` differ (mqar's question is longer).

  Args:
    batch_size: B.
    seed: int or tuple of ints.
    context_len: context tokens including BOS, shared by every task.
    weights: task name -> non-negative weight; None is uniform over
      TASK_NAMES. Tasks left out get weight 0.
    task_params: task name -> parameters for that task, layered over
      DEFAULT_MIXTURE_PARAMS (multihop draws hops from 1..4) and the
      generator's defaults.
    vocab: the vocabulary.

  Returns:
    A TaskBatch; `task_ids` says each row's task.

  Raises:
    ValueError: unknown task name, negative or all-zero weights, or a bad
      parameter of any task with positive weight (checked whatever the draw).
    TypeError: a parameter a task does not accept.
  """
  batch_size, context_len = _check_batch_args(batch_size, context_len)
  _check_vocab(vocab)
  weights = dict.fromkeys(TASK_NAMES, 1.0) if weights is None else dict(weights)
  task_params = {} if task_params is None else dict(task_params)
  for name in list(weights) + list(task_params):
    _check_task(name)
  probabilities = np.zeros(len(TASK_NAMES))
  for name, weight in weights.items():
    weight = float(weight)
    if not np.isfinite(weight) or weight < 0:
      raise ValueError(
        f"weights[{name!r}] must be finite and >= 0, got {weight}."
      )
    probabilities[TASK_NAMES.index(name)] = weight
  if probabilities.sum() <= 0:
    raise ValueError(f"weights must have a positive entry, got {weights}.")
  probabilities /= probabilities.sum()

  params_of = {}
  for task_id, name in enumerate(TASK_NAMES):
    if probabilities[task_id] == 0:
      continue
    params = {
      **DEFAULT_MIXTURE_PARAMS.get(name, {}),
      **task_params.get(name, {}),
    }
    _check_params(name, params)
    if "vocab" in params:
      raise TypeError("pass vocab to make_mixture_batch, not in task_params.")
    params_of[task_id] = params

  rng = _make_rng(seed)
  # Validate every weighted task's parameters before drawing rows.
  for task_id, params in params_of.items():
    _BUILDERS[TASK_NAMES[task_id]](rng, 0, context_len, vocab, **params)
  task_of_row = rng.choice(len(TASK_NAMES), size=batch_size, p=probabilities)
  return _grouped_rows(
    task_of_row,
    lambda task_id, count: _BUILDERS[TASK_NAMES[task_id]](
      rng, count, context_len, vocab, **params_of[int(task_id)]
    ),
  )
