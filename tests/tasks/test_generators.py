"""Tests of the synthetic task generators (kvjax/tasks/generators.py)."""

import time

import numpy as np
import pytest

from kvjax import tasks
from kvjax.tasks import ARROW, BOS, PAD, QUERY, UNKNOWN, VOCAB

CONTEXT_LEN = 96
BATCH = 16
# Small but non-trivial settings per task, all fitting CONTEXT_LEN.
PARAMS = {
  "mqar": {"num_pairs": 6},
  "needle": {"num_distractors": 3},
  "multihop": {"hops": 3, "num_distractor_chains": 2},
  "overwrite": {"num_writes": 3, "num_distractors": 3},
  "abstention": {"num_distractors": 4},
}


def _batch(task, seed=0, batch_size=BATCH, context_len=CONTEXT_LEN, **extra):
  params = {**PARAMS[task], **extra}
  return tasks.make_batch(
    task, batch_size, seed=seed, context_len=context_len, **params
  )


# --------------------------------------------------------------------------
# A symbolic solver that sees only the visible context tokens + the question.


def solve(tokens, visible, context_end, task, vocab=VOCAB):
  """Answers the question of one example from the visible context tokens.

  Args:
    tokens: [T] ids of one example (answers included; only the query keys of
      the question are read, never the answer tokens).
    visible: [context_end] bool, which context tokens the solver may read.
    context_end: start of the question.
    task: task name (fixes the fact format).

  Returns:
    A list with one entry per queried key: the answer id, UNKNOWN when the
    key is in no visible fact, or None when the evidence is broken (a chain
    that stops at a key) or ambiguous (several values for one mqar key).
  """
  context = np.where(visible, tokens[:context_end], PAD)
  question = tokens[context_end:]
  assert question[0] == QUERY
  is_key, is_value = vocab.is_key, vocab.is_value
  if task == "mqar":
    values_of = {}
    for p in range(1, context_end - 1):  # bigram `key value`
      if is_key(context[p]) and is_value(context[p + 1]):
        values_of.setdefault(int(context[p]), set()).add(int(context[p + 1]))
    query_keys = question[1::2][: (len(question) - 1) // 2]
    results = []
    for key in query_keys:
      found = values_of.get(int(key), set())
      results.append(
        UNKNOWN if not found else (found.pop() if len(found) == 1 else None)
      )
    return results
  # Parse `key ARROW object` facts left to right; facts never overlap, so a
  # token taken as an object is not read again as a key. A hidden token
  # (PAD) may stand for the ARROW.
  facts = {}  # key -> [(position, object)]
  p = 1
  while p < context_end - 2:
    arrow_ok = context[p + 1] in (ARROW, PAD)
    if (
      is_key(context[p])
      and arrow_ok
      and (is_key(context[p + 2]) or is_value(context[p + 2]))
    ):
      facts.setdefault(int(context[p]), []).append((p, int(context[p + 2])))
      p += 3
    else:
      p += 1
  current, walk = int(question[1]), []
  for hop in range(8):
    if current not in facts:
      return [UNKNOWN if hop == 0 else None]
    _, current = max(facts[current])  # the latest assignment wins
    walk.append(current)
    if is_value(current):
      # A multihop walk question (`QUERY x1 ARROW x2 ARROW ...`) is
      # answered by every node after x1, a latent one by the end only.
      return walk if len(question) > 4 else [current]
  return [None]


def _answers(batch, row):
  valid = batch.answer_positions[row] >= 0
  return batch.answers[row][valid].tolist()


def _critical(batch, row):
  return batch.critical_positions[row][batch.critical_positions[row] >= 0]


# --------------------------------------------------------------------------
# Determinism, shapes and the shared layout.


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_same_seed_same_arrays_different_seed_differs(task):
  first, again, other = _batch(task, 3), _batch(task, 3), _batch(task, 4)
  for field in tasks.TaskBatch._fields:
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
  assert not np.array_equal(first.tokens, other.tokens)


def test_tuple_seed_gives_a_stream_and_tasks_are_independent():
  step0 = _batch("needle", seed=(7, 0))
  step1 = _batch("needle", seed=(7, 1))
  assert not np.array_equal(step0.tokens, step1.tokens)
  np.testing.assert_array_equal(
    _batch("needle", seed=(7, 1)).tokens, step1.tokens
  )
  needle = _batch("needle", seed=7)
  abstain = _batch("abstention", seed=7)
  assert not np.array_equal(needle.tokens[:, :40], abstain.tokens[:, :40])


EXPECTED_SHAPES = {  # task -> (T, A, C)
  "mqar": (CONTEXT_LEN + 1 + 2 * 6, 6, 12),
  "needle": (CONTEXT_LEN + 4, 1, 2),
  "multihop": (CONTEXT_LEN + 4, 1, 6),
  "overwrite": (CONTEXT_LEN + 4, 1, 2),
  "abstention": (CONTEXT_LEN + 4, 1, 0),
}


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_shapes_dtypes_and_layout(task):
  batch = _batch(task)
  total_len, num_answers, num_critical = EXPECTED_SHAPES[task]
  assert batch.tokens.shape == (BATCH, total_len)
  assert batch.tokens.dtype == np.int32
  assert batch.loss_mask.shape == (BATCH, total_len)
  assert batch.loss_mask.dtype == bool
  for field in ("lengths", "context_end", "answer_start", "task_ids"):
    assert getattr(batch, field).shape == (BATCH,), field
    assert getattr(batch, field).dtype == np.int32, field
  assert (
    batch.answers.shape == batch.answer_positions.shape == (BATCH, num_answers)
  )
  assert batch.critical_positions.shape == (BATCH, num_critical)
  for field in ("answers", "answer_positions", "critical_positions"):
    assert getattr(batch, field).dtype == np.int32, field
  assert batch.task == task
  assert set(batch.task_names) == {task}

  rows = np.arange(BATCH)[:, None]
  np.testing.assert_array_equal(batch.lengths, total_len)
  np.testing.assert_array_equal(batch.context_end, CONTEXT_LEN)
  assert (batch.tokens[:, 0] == BOS).all()
  assert (batch.tokens[:, CONTEXT_LEN] == QUERY).all()
  context = batch.tokens[:, :CONTEXT_LEN]
  assert not np.isin(context[:, 1:], [PAD, BOS, QUERY, UNKNOWN]).any()
  # The answers are in the tokens, marked by loss_mask and nothing else.
  np.testing.assert_array_equal(
    batch.tokens[rows, batch.answer_positions], batch.answers
  )
  expected_mask = np.zeros_like(batch.loss_mask)
  expected_mask[rows, batch.answer_positions] = True
  np.testing.assert_array_equal(batch.loss_mask, expected_mask)
  np.testing.assert_array_equal(
    batch.answer_start, batch.answer_positions[:, 0]
  )
  assert (batch.answer_positions > batch.context_end[:, None]).all()
  # Critical positions are inside the context and are key/value tokens.
  crit = batch.critical_positions
  assert ((crit >= 1) & (crit < CONTEXT_LEN)).all()
  critical_tokens = batch.tokens[rows, crit]
  assert (VOCAB.is_key(critical_tokens) | VOCAB.is_value(critical_tokens)).all()
  if task != "mqar":  # single answer, last token, after `QUERY key ARROW`
    np.testing.assert_array_equal(batch.answer_start, total_len - 1)
    assert (batch.tokens[:, CONTEXT_LEN + 2] == ARROW).all()


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_generation_is_fast_at_context_512(task):
  start = time.perf_counter()
  tasks.make_batch(task, 64, seed=0, context_len=512)
  assert time.perf_counter() - start < 0.5


def test_mixture_generation_is_fast_at_context_512():
  start = time.perf_counter()
  tasks.make_mixture_batch(64, seed=0, context_len=512)
  assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------
# The critical positions are sufficient and necessary.


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_answer_recovered_from_critical_positions_only(task):
  batch = _batch(task, batch_size=8)
  for row in range(8):
    example = batch.tokens[row, : batch.lengths[row]]
    end = int(batch.context_end[row])
    only_critical = np.zeros(end, dtype=bool)
    only_critical[_critical(batch, row)] = True
    assert solve(example, only_critical, end, task) == _answers(batch, row)
    everything = np.ones(end, dtype=bool)
    assert solve(example, everything, end, task) == _answers(batch, row)


@pytest.mark.parametrize("task", ["mqar", "needle", "multihop", "overwrite"])
def test_masking_any_critical_position_breaks_the_answer(task):
  batch = _batch(task, batch_size=8)
  for row in range(8):
    example = batch.tokens[row, : batch.lengths[row]]
    end = int(batch.context_end[row])
    nothing = np.zeros(end, dtype=bool)
    assert solve(example, nothing, end, task) != _answers(batch, row)
    for position in _critical(batch, row):
      visible = np.ones(end, dtype=bool)
      visible[position] = False
      recovered = solve(example, visible, end, task)
      assert recovered != _answers(batch, row), (task, row, position)


def test_overwrite_without_latest_write_gives_the_stale_value():
  batch = _batch("overwrite", batch_size=8)
  for row in range(8):
    example = batch.tokens[row, : batch.lengths[row]]
    end = int(batch.context_end[row])
    visible = np.ones(end, dtype=bool)
    visible[_critical(batch, row)[0]] = False  # the latest key
    (stale,) = solve(example, visible, end, "overwrite")
    assert VOCAB.is_value(stale) and stale != batch.answers[row, 0]


# --------------------------------------------------------------------------
# Task-specific properties.


def test_mqar_keys_and_values_from_their_halves_each_key_queried_once():
  batch = _batch("mqar", num_pairs=6)
  end = CONTEXT_LEN
  query_keys = batch.tokens[:, end + 1 :: 2]  # [B, 6]
  assert VOCAB.is_key(query_keys).all()
  assert VOCAB.is_value(batch.answers).all()
  assert VOCAB.key_start + VOCAB.num_keys == VOCAB.value_start
  for row in range(BATCH):
    context = batch.tokens[row, :end]
    context_keys = context[VOCAB.is_key(context)]
    context_values = context[VOCAB.is_value(context)]
    assert len(context_keys) == len(set(context_keys.tolist())) == 6
    assert len(context_values) == 6
    assert sorted(query_keys[row].tolist()) == sorted(context_keys.tolist())
  # Zoology's layout: pairs right after BOS, then filler.
  assert VOCAB.is_key(batch.tokens[:, 1:13:2]).all()
  assert VOCAB.is_value(batch.tokens[:, 2:13:2]).all()
  assert VOCAB.is_filler(batch.tokens[:, 13:end]).all()


def test_mqar_scattered_and_partial_queries():
  batch = _batch("mqar", num_pairs=6, num_queries=2, placement="scattered")
  assert batch.answers.shape == (BATCH, 2)
  assert batch.tokens.shape[1] == CONTEXT_LEN + 5
  # Scattered pairs do not all sit at the front.
  assert not VOCAB.is_key(batch.tokens[:, 1:13:2]).all()
  for row in range(BATCH):
    end = CONTEXT_LEN
    visible = np.zeros(end, dtype=bool)
    visible[_critical(batch, row)] = True
    assert solve(batch.tokens[row], visible, end, "mqar") == _answers(
      batch, row
    )


@pytest.mark.parametrize("num_writes", [2, 4])
def test_overwrite_answer_is_the_latest_assignment(num_writes):
  batch = _batch("overwrite", num_writes=num_writes)
  for row in range(BATCH):
    tokens = batch.tokens[row]
    query = tokens[CONTEXT_LEN + 1]
    writes = [
      p
      for p in range(1, CONTEXT_LEN - 2)
      if tokens[p] == query and tokens[p + 1] == ARROW
    ]
    assert len(writes) == num_writes
    values = [tokens[p + 2] for p in writes]
    assert len(set(values)) == num_writes
    assert batch.answers[row, 0] == tokens[max(writes) + 2]
    assert batch.critical_positions[row].tolist() == [
      max(writes),
      max(writes) + 2,
    ]


def test_abstention_key_is_absent_and_answer_is_unknown():
  batch = _batch("abstention", num_distractors=6)
  assert (batch.answers == UNKNOWN).all()
  for row in range(BATCH):
    query = batch.tokens[row, CONTEXT_LEN + 1]
    assert VOCAB.is_key(query)
    assert query not in batch.tokens[row, :CONTEXT_LEN]
    assert (batch.tokens[row, :CONTEXT_LEN] == ARROW).sum() == 6


@pytest.mark.parametrize("hops", tasks.HOPS)
def test_multihop_every_link_present_in_chain_order(hops):
  batch = _batch("multihop", hops=hops, num_distractor_chains=2)
  assert batch.critical_positions.shape == (BATCH, 2 * hops)
  for row in range(BATCH):
    tokens = batch.tokens[row]
    crit = batch.critical_positions[row]
    key_positions, value_positions = crit[0::2], crit[1::2]
    np.testing.assert_array_equal(value_positions, key_positions + 2)
    assert (tokens[key_positions + 1] == ARROW).all()
    chain = tokens[key_positions].tolist() + [tokens[value_positions[-1]]]
    assert chain[0] == tokens[CONTEXT_LEN + 1]  # starts at the question
    assert chain[-1] == batch.answers[row, 0]  # ends at the answer
    np.testing.assert_array_equal(
      tokens[value_positions[:-1]], tokens[key_positions[1:]]
    )  # linked
    assert VOCAB.is_key(chain[:-1]).all() and VOCAB.is_value(chain[-1])
    assert len(set(chain)) == hops + 1
    # 3 chains of `hops` links in the context.
    assert (tokens[:CONTEXT_LEN] == ARROW).sum() == 3 * hops


def test_multihop_mixed_hops_pads_critical_positions():
  batch = _batch("multihop", batch_size=64, hops=(1, 4))
  counts = (batch.critical_positions >= 0).sum(axis=1)
  assert set(counts.tolist()) == {2, 8}
  assert batch.critical_positions.shape == (64, 8)
  for row in range(64):
    end = CONTEXT_LEN
    visible = np.zeros(end, dtype=bool)
    visible[_critical(batch, row)] = True
    assert solve(batch.tokens[row], visible, end, "multihop") == _answers(
      batch, row
    )


@pytest.mark.parametrize("hops", tasks.HOPS)
def test_multihop_walk_asks_every_node_after_the_start(hops):
  latent = _batch("multihop", hops=hops)
  batch = _batch("multihop", hops=hops, walk=True)
  c = CONTEXT_LEN
  assert batch.tokens.shape == (BATCH, c + 2 + 2 * hops)
  assert batch.answers.shape == (BATCH, hops)
  # The same context, links and end as the latent question.
  np.testing.assert_array_equal(
    batch.tokens[:, : c + 2], latent.tokens[:, : c + 2]
  )
  np.testing.assert_array_equal(
    batch.critical_positions, latent.critical_positions
  )
  np.testing.assert_array_equal(batch.answers[:, -1], latent.answers[:, 0])
  np.testing.assert_array_equal(
    batch.answer_positions[0], c + 3 + 2 * np.arange(hops)
  )
  assert (batch.tokens[:, batch.answer_positions[0] - 1] == ARROW).all()
  rows = np.arange(BATCH)[:, None]
  np.testing.assert_array_equal(
    batch.tokens[rows, batch.answer_positions], batch.answers
  )
  # Step j is the value slot of link j: its key is the step before.
  value_slots = batch.critical_positions[:, 1::2]
  np.testing.assert_array_equal(batch.tokens[rows, value_slots], batch.answers)
  for row in range(BATCH):
    end = int(batch.context_end[row])
    visible = np.zeros(end, dtype=bool)
    visible[_critical(batch, row)] = True
    assert solve(batch.tokens[row], visible, end, "multihop") == _answers(
      batch, row
    )
    for position in _critical(batch, row):  # every link is needed
      visible = np.ones(end, dtype=bool)
      visible[position] = False
      assert solve(batch.tokens[row], visible, end, "multihop") != _answers(
        batch, row
      )


def test_multihop_mixed_walks_pad_tokens_and_answers():
  batch = _batch("multihop", batch_size=64, hops=(1, 3), walk=True)
  steps = (batch.answer_positions >= 0).sum(axis=1)
  hops = (batch.critical_positions >= 0).sum(axis=1) // 2
  np.testing.assert_array_equal(steps, hops)
  assert set(steps.tolist()) == {1, 3}
  np.testing.assert_array_equal(batch.lengths, CONTEXT_LEN + 2 + 2 * hops)
  assert (batch.tokens[steps == 1, CONTEXT_LEN + 4 :] == PAD).all()


def test_question_mask_is_the_question_before_any_answer():
  c = CONTEXT_LEN
  walk = _batch("multihop", hops=3, walk=True)
  expected = np.zeros_like(walk.loss_mask)
  expected[:, c : c + 3] = True  # QUERY x1 ARROW, not `x2 ARROW x3 ARROW y`
  np.testing.assert_array_equal(tasks.question_mask(walk), expected)
  mqar = _batch("mqar", num_pairs=4)
  expected = np.zeros_like(mqar.loss_mask)
  expected[:, c] = True
  expected[:, c + 1 :: 2] = True  # every queried key
  np.testing.assert_array_equal(tasks.question_mask(mqar), expected)
  for task in ("needle", "overwrite", "abstention"):
    batch = _batch(task)
    expected = np.zeros_like(batch.loss_mask)
    expected[:, c : c + 3] = True
    np.testing.assert_array_equal(tasks.question_mask(batch), expected)
  mixed = tasks.question_mask(tasks.concat_batches([walk, mqar]))
  width = walk.tokens.shape[1]
  np.testing.assert_array_equal(
    mixed[:BATCH, :width], tasks.question_mask(walk)
  )
  assert not mixed[:BATCH, width:].any()
  np.testing.assert_array_equal(mixed[BATCH:], tasks.question_mask(mqar))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_depth(depth):
  batch = _batch("needle", depth=depth, num_distractors=3)
  key_positions = batch.critical_positions[:, 0]
  if depth == 0.0:
    assert (key_positions == 1).all()
  elif depth == 1.0:
    assert (key_positions == CONTEXT_LEN - 3).all()
  else:
    filler = CONTEXT_LEN - 1 - 4 * 3
    for row in range(BATCH):
      before = VOCAB.is_filler(batch.tokens[row, : key_positions[row]]).sum()
      assert before == round(0.5 * filler)


# --------------------------------------------------------------------------
# Mixture, examples, rendering.


def test_mixture_batch_pads_and_keeps_each_row_valid():
  batch = tasks.make_mixture_batch(64, seed=1, context_len=CONTEXT_LEN)
  again = tasks.make_mixture_batch(64, seed=1, context_len=CONTEXT_LEN)
  for field in tasks.TaskBatch._fields:
    np.testing.assert_array_equal(getattr(batch, field), getattr(again, field))
  assert set(batch.task_names) == set(tasks.TASK_NAMES)
  assert batch.task == "mixture"
  assert batch.tokens.shape[1] == batch.lengths.max()
  for row in range(64):
    length = batch.lengths[row]
    assert (batch.tokens[row, length:] == PAD).all()
    assert not batch.loss_mask[row, length:].any()
    assert (batch.tokens[row, :length] != PAD).all()
    task = batch.task_names[row]
    visible = np.zeros(CONTEXT_LEN, dtype=bool)
    visible[_critical(batch, row)] = True
    assert solve(
      batch.tokens[row, :length], visible, CONTEXT_LEN, task
    ) == _answers(batch, row)
  # The mixture's multihop rows draw their hops from 1..4.
  multihop_rows = np.array(batch.task_names) == "multihop"
  hops = (batch.critical_positions[multihop_rows] >= 0).sum(axis=1) // 2
  assert set(hops.tolist()) <= set(tasks.HOPS) and len(set(hops.tolist())) > 1


def test_mixture_weights_and_task_params():
  batch = tasks.make_mixture_batch(
    32,
    seed=0,
    context_len=CONTEXT_LEN,
    weights={"needle": 1.0, "abstention": 3.0},
    task_params={"needle": {"depth": 0.0}},
  )
  assert set(batch.task_names) == {"needle", "abstention"}
  needle_rows = np.array(batch.task_names) == "needle"
  assert (batch.critical_positions[needle_rows, 0] == 1).all()
  assert batch.critical_positions.shape == (32, 2)


def test_make_example_matches_batch_row_and_renders():
  example = tasks.make_example("multihop", seed=5, context_len=40, hops=2)
  batch = tasks.make_batch("multihop", 1, seed=5, context_len=40, hops=2)
  np.testing.assert_array_equal(example.tokens, batch.tokens[0])
  assert example.context_end == 40
  assert example.context.shape == (40,)
  text = example.render()
  assert text.startswith("multihop: <bos>") and "||" in text
  assert text.count("[") == 4 and "<q>" in text
  plain = tasks.render(batch.tokens)
  assert plain.startswith("<bos>") and "->" in plain and "filler x" in plain
  assert "f" in tasks.render(batch.tokens[0], collapse_filler=False)
  assert tasks.render([1, 2, 4, 0, 0]) == "<bos> <q> <unk>"


def test_vocab_ranges_partition_the_ids():
  ids = np.arange(VOCAB.size)
  kinds = (
    VOCAB.is_filler(ids).astype(int) + VOCAB.is_key(ids) + VOCAB.is_value(ids)
  )
  assert (kinds[tasks.NUM_SPECIAL :] == 1).all()
  assert (kinds[: tasks.NUM_SPECIAL] == 0).all()
  assert VOCAB.num_keys == VOCAB.num_values
  small = tasks.Vocab(size=64, num_filler=16)
  batch = tasks.make_batch("needle", 4, seed=0, context_len=30, vocab=small)
  assert batch.tokens.max() < 64


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
  "task, params, context_len",
  [
    ("mqar", {"num_pairs": 8}, 16),
    ("needle", {"num_distractors": 5}, 18),
    ("multihop", {"hops": 4, "num_distractor_chains": 1}, 24),
    ("overwrite", {"num_writes": 3, "num_distractors": 2}, 15),
    ("abstention", {"num_distractors": 4}, 12),
  ],
)
def test_context_too_short_raises(task, params, context_len):
  with pytest.raises(ValueError, match=r"context_len=\d+ is too short.*>= "):
    tasks.make_batch(task, 2, seed=0, context_len=context_len, **params)
  # One more token fits.
  tasks.make_batch(task, 2, seed=0, context_len=context_len + 1, **params)


def test_unknown_task_raises_with_allowed_names():
  with pytest.raises(ValueError, match=r"task='copy'.*'mqar'.*'abstention'"):
    tasks.make_batch("copy", 2, seed=0, context_len=64)
  with pytest.raises(ValueError, match=r"task='copy'"):
    tasks.make_mixture_batch(2, seed=0, context_len=64, weights={"copy": 1})


@pytest.mark.parametrize("hops", [0, 5, (2, 5), ()])
def test_hops_out_of_range_raises(hops):
  with pytest.raises(ValueError, match=r"hops.*\(1, 2, 3, 4\)"):
    tasks.make_batch("multihop", 2, seed=0, context_len=128, hops=hops)


@pytest.mark.parametrize(
  "call, error, pattern",
  [
    (
      lambda: tasks.make_batch("needle", 2, seed=0, context_len=64, hops=2),
      TypeError,
      r"unknown parameter.*'hops'.*allowed.*num_distractors",
    ),
    (
      lambda: tasks.make_batch("needle", 0, seed=0, context_len=64),
      ValueError,
      r"batch_size must be >= 1",
    ),
    (
      lambda: tasks.make_batch("needle", 2.0, seed=0, context_len=64),
      TypeError,
      r"batch_size must be an int",
    ),
    (
      lambda: tasks.make_batch("needle", 2, seed=-1, context_len=64),
      ValueError,
      r"seed must be non-negative",
    ),
    (
      lambda: tasks.make_batch("needle", 2, seed="a", context_len=64),
      TypeError,
      r"seed must be an int",
    ),
    (
      lambda: tasks.make_batch("needle", 2, seed=0, context_len=64, depth=1.5),
      ValueError,
      r"depth.*\[0, 1\]",
    ),
    (
      lambda: tasks.make_batch(
        "mqar", 2, seed=0, context_len=64, num_pairs=4, num_queries=5
      ),
      ValueError,
      r"num_queries.*<= 4",
    ),
    (
      lambda: tasks.make_batch(
        "mqar", 2, seed=0, context_len=64, placement="middle"
      ),
      ValueError,
      r"placement='middle'.*'prefix'.*'scattered'",
    ),
    (
      lambda: tasks.make_batch(
        "multihop", 2, seed=0, context_len=64, walk="yes"
      ),
      TypeError,
      r"walk \(multihop\) must be a bool",
    ),
    (
      lambda: tasks.make_batch(
        "overwrite", 2, seed=0, context_len=64, num_writes=1
      ),
      ValueError,
      r"num_writes.*>= 2",
    ),
    (
      lambda: tasks.make_batch(
        "mqar", 2, seed=0, context_len=999, num_pairs=300
      ),
      ValueError,
      r"300 distinct key ids.*188",
    ),
    (
      lambda: tasks.make_mixture_batch(
        2, seed=0, context_len=64, weights={"needle": -1.0}
      ),
      ValueError,
      r"weights\['needle'\] must be finite and >= 0",
    ),
    (
      lambda: tasks.make_mixture_batch(
        2, seed=0, context_len=64, weights={"needle": 0.0}
      ),
      ValueError,
      r"weights must have a positive entry",
    ),
    (
      lambda: tasks.make_mixture_batch(
        2, seed=0, context_len=64, task_params={"mqar": {"num_pairs": 40}}
      ),
      ValueError,
      r"context_len=64 is too short for mqar",
    ),
    (
      lambda: tasks.Vocab(size=20, num_filler=16),
      ValueError,
      r"Vocab.size=20.*size >= 26",
    ),
  ],
)
def test_bad_arguments_raise_clear_errors(call, error, pattern):
  with pytest.raises(error, match=pattern):
    call()
