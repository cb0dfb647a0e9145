"""Train loop: the jitted step, exact resume after a kill, metrics JSONL."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.train import data, loop, losses
from kvjax.train.config import (
  DataConfig,
  Mixture,
  OptimizerConfig,
  Phase,
  TrainConfig,
)

MIXTURE = Mixture(
  tokens_per_step=160,
  task_fractions={
    "mqar": 1,
    "needle": 1,
    "multihop": 1,
    "overwrite": 1,
    "abstention": 1,
  },
  mqar_pairs=(2, 4),
  mqar_placements=("prefix", "scattered"),
  multihop_hops=(1, 2),
  overwrite_distractors=1,
  needle_distractors=1,
  abstention_distractors=1,
  multihop_distractor_chains=1,
)
DATA = DataConfig(
  phases=(
    Phase(until=3, context_lens=(24,)),
    Phase(until=100, context_lens=(24, 32)),
  ),
  mixture=MIXTURE,
)


def _cfg(optimizer="muon_split", total_steps=6) -> TrainConfig:
  return TrainConfig(
    model=kvjax.ModelConfig(
      vocab_size=512,
      d_model=32,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      mlp_dim=64,
    ),
    data=DATA,
    optimizer=OptimizerConfig(
      name=optimizer,
      learning_rate=0.01,
      adam_learning_rate=3e-3,
      weight_decay=0.01,
      warmup_steps=2,
    ),
    total_steps=total_steps,
    seed=3,
    log_every=2,
    checkpoint_every=2,
  )


def _jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def _data(**changes) -> DataConfig:
  """DATA with the mixture's fields changed."""
  return DATA.replace(mixture=MIXTURE.replace(**changes))


def test_weighted_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = rng.random((2, 5)) > 0.5
  loss, m = losses.weighted_cross_entropy(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
  )
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), nll[weights].mean(), rtol=1e-5)
  assert float(m["num_targets"]) == weights.sum()
  with pytest.raises(ValueError, match="weights shape"):
    losses.weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.ones((2, 4))
    )


def test_loss_on_answers_or_all():
  batch = data.task_batch(DATA, 0, 0)
  answers = data.model_inputs(batch, "answers")["weights"]
  every = data.model_inputs(batch, "all")["weights"]
  np.testing.assert_array_equal(answers, batch.loss_mask[:, 1:])
  assert every.sum() == (batch.lengths - 1).sum() > answers.sum()
  with pytest.raises(ValueError, match="loss_on"):
    data.model_inputs(batch, "question")


def test_data_is_a_pure_function_of_seed_and_step():
  d = DATA
  a, b, c = (
    data.task_batch(d, 0, 5),
    data.task_batch(d, 0, 5),
    data.task_batch(d, 0, 6),
  )
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.tokens.shape != c.tokens.shape or not np.array_equal(
    a.tokens, c.tokens
  )
  # Fixed width per context: T = context_len + 1 + 2 * max(mqar_pairs).
  assert data.task_batch(d, 0, 0).tokens.shape[1] == 24 + 1 + 8


def test_copy_rows_repeat_the_sequence_and_mark_the_second_copy():
  d = _data(copy_fraction=0.2, tokens_per_step=360)
  batch = data.task_batch(d, 0, 1)  # 360 // 24 = 15 rows, 3 copy rows
  rows = np.flatnonzero(batch.task_ids == data.COPY_TASK_ID)
  assert len(rows) == 3 and batch.tokens.shape[0] == 15
  for r in rows:
    t, c = batch.tokens[r], int(batch.context_end[r])  # c: context_len
    n = int(batch.lengths[r]) - c - 1
    assert 2 <= n <= 8 and t[c] == kvjax.tasks.vocab.QUERY  # 8 = 2 * 4 pairs
    copy = t[c + 1 : c + 1 + n]
    assert len(set(copy.tolist())) == n  # distinct ids
    starts = [
      i for i in range(1, c - n + 1) if np.array_equal(t[i : i + n], copy)
    ]
    assert len(starts) == 1  # s sits once in the context
    assert batch.loss_mask[r].sum() == n - 1
    assert batch.loss_mask[r, c + 2 : c + 1 + n].all()
  assert not data.task_batch(DATA, 0, 1).task_ids.min() < 0
  with pytest.raises(ValueError, match="copy_fraction"):
    MIXTURE.replace(copy_fraction=1.0)
  # A split that rounds to no task rows is caught when drawn.
  few = _data(
    copy_fraction=0.3, chain_fraction=0.3, chain_hops=(1,), tokens_per_step=48
  )  # 2 rows, each fraction rounds to one
  with pytest.raises(ValueError, match="no task rows"):
    data.task_batch(few, 0, 1)


def _follow(facts, node):
  while node in facts:
    node = facts[node]
  return node


def test_chain_rows_ask_every_chain_and_the_answer_is_its_end():
  v = kvjax.tasks.VOCAB
  batch = data.chain_batch(
    16, 40, seed=4, num_chains=3, hops=(1, 2, 3), max_queries=2
  )
  assert batch.tokens.shape == (16, 40 + 4 * 2)
  assert (batch.task_ids == data.CHAIN_TASK_ID).all()
  lengths = set()
  for r in range(16):
    t = batch.tokens[r]
    arrows = [i for i in range(1, 40) if t[i] == kvjax.tasks.vocab.ARROW]
    facts = {int(t[i - 1]): int(t[i + 1]) for i in arrows}
    assert len(facts) == len(arrows)  # every link key is distinct
    starts = set(facts) - set(facts.values())
    assert len(starts) == 3  # three chains
    for start in starts:  # a chain's length is its number of links
      node, k = start, 0
      while node in facts:
        node, k = facts[node], k + 1
      lengths.add(k)
      assert v.value_start <= node < v.value_start + v.num_values
    asked = []
    for q in range(2):
      qpos = 40 + 4 * q
      assert t[qpos] == kvjax.tasks.vocab.QUERY
      assert t[qpos + 2] == kvjax.tasks.vocab.ARROW
      assert int(t[qpos + 1]) in starts
      asked.append(int(t[qpos + 1]))
      # The target is the end of the chain that starts at the asked node.
      assert batch.answers[r, q] == _follow(facts, int(t[qpos + 1]))
      assert batch.answer_positions[r, q] == qpos + 3
      assert t[qpos + 3] == batch.answers[r, q]
    assert len(set(asked)) == 2  # each chain asked at most once
    assert batch.loss_mask[r].sum() == 2
  assert lengths == {1, 2, 3}
  np.testing.assert_array_equal(
    batch.tokens,
    data.chain_batch(
      16, 40, seed=4, num_chains=3, hops=(1, 2, 3), max_queries=2
    ).tokens,
  )
  with pytest.raises(ValueError, match="do not fit"):
    data.chain_batch(1, 24, seed=0, num_chains=4, hops=(2,))
  with pytest.raises(ValueError, match="hops"):
    data.chain_batch(1, 64, seed=0, hops=(5,))
  with pytest.raises(ValueError, match="num_chains"):
    data.chain_batch(1, 64, seed=0, num_chains=0)


def test_chain_rows_with_key_ends_and_their_lens_mask():
  v = kvjax.tasks.VOCAB
  batch = data.chain_batch(
    32, 64, seed=5, num_chains=4, hops=(1, 2), key_ends=0.5
  )
  mask = data.lens_mask(batch)
  kinds = {"key": 0, "value": 0}
  one_link = 0
  for r in range(32):
    t = batch.tokens[r]
    facts = {
      int(t[i - 1]): int(t[i + 1])
      for i in range(1, 64)
      if t[i] == kvjax.tasks.vocab.ARROW
    }
    for q in range(4):
      p = int(batch.answer_positions[r, q])
      x, y = int(t[p - 2]), int(t[p])
      assert y == _follow(facts, x) and y not in facts  # the chain's end
      kinds["key" if y < v.value_start else "value"] += 1
      # The lens mask marks exactly the answers one link away.
      assert mask[r, p] == (facts[x] == y)
      one_link += facts[x] == y
  assert kinds["key"] > 30 and kinds["value"] > 30  # about half each
  assert 0 < one_link < 128 and mask.sum() == one_link
  with pytest.raises(ValueError, match="key_ends"):
    data.chain_batch(1, 64, seed=0, key_ends=1.5)


def test_chain_rows_in_the_stream():
  d = _data(
    chain_fraction=0.2,
    copy_fraction=0.2,
    chain_count=2,
    chain_hops=(2,),
    tokens_per_step=360,
  )
  batch = data.task_batch(d, 0, 1)  # 15 rows: 3 copy, 3 chain, 9 tasks
  assert (batch.task_ids == data.CHAIN_TASK_ID).sum() == 3
  assert (batch.task_ids == data.COPY_TASK_ID).sum() == 3
  # Questions fit the stream's width: T = 24 + 1 + 2 * 4 = 33 holds 2.
  assert batch.tokens.shape[1] == 24 + 1 + 8
  rows = batch.task_ids == data.CHAIN_TASK_ID
  assert (batch.loss_mask[rows].sum(axis=1) == 2).all()
  with pytest.raises(ValueError, match="chain_fraction"):
    d.mixture.replace(chain_fraction=0.8)
  # chain_count is a cap: a context of 24 holds 3 chains of 2 links.
  capped = data.task_batch(
    d.replace(mixture=d.mixture.replace(chain_count=10)), 0, 1
  )
  for r in np.flatnonzero(capped.task_ids == data.CHAIN_TASK_ID):
    t = capped.tokens[r]
    context_len = int(capped.context_end[r])
    assert context_len == 24
    assert (t[:context_len] == kvjax.tasks.vocab.ARROW).sum() == 3 * 2


def test_lens_mask_keeps_one_lookup_answers():
  d = _data(
    copy_fraction=0.2,
    chain_fraction=0.2,
    chain_count=2,
    chain_hops=(2,),
    tokens_per_step=360,
  )
  batch = data.task_batch(d, 0, 1)
  mask = data.lens_mask(batch)
  names = kvjax.tasks.TASK_NAMES
  hops = (batch.critical_positions >= 0).sum(axis=1) // 2
  for r, task in enumerate(batch.task_ids):
    name = names[task] if task >= 0 else data.AID_NAMES[int(task)]
    one = name in ("mqar", "needle", "overwrite", "abstention", "copy") or (
      name == "multihop" and hops[r] == 1
    )
    np.testing.assert_array_equal(mask[r], batch.loss_mask[r] & one)
  assert mask.any() and (batch.loss_mask & ~mask).any()
  arrays = data.model_inputs(batch, "answers", lens_weight=0.5)
  np.testing.assert_array_equal(arrays["lens_weights"], mask[:, 1:])
  assert float(arrays["lens_scale"]) == 0.5
  assert "lens_weights" not in data.model_inputs(batch)
  with pytest.raises(ValueError, match="lens_weight"):
    data.model_inputs(batch, lens_weight=-1.0)
  # Every step of a walk is one lookup; a latent 3-hop answer is not.
  walks = kvjax.tasks.make_batch(
    "multihop", 4, seed=0, context_len=48, hops=3, walk=True
  )
  np.testing.assert_array_equal(data.lens_mask(walks), walks.loss_mask)
  latent = kvjax.tasks.make_batch("multihop", 4, seed=0, context_len=48, hops=3)
  assert not data.lens_mask(latent).any()


def test_walk_phases_pad_to_the_longest_walk():
  walks = MIXTURE.replace(
    mqar_pairs=(4,),
    multihop_hops=(4,),
    multihop_walk=True,
    task_fractions={"multihop": 1.0},
  )
  assert data.padded_length(walks, 64) == 64 + 2 + 2 * 4
  d = DataConfig(phases=(Phase(until=100, context_lens=(64,)),), mixture=walks)
  batch = data.task_batch(d, 0, 1)
  assert batch.tokens.shape[1] == 74 and batch.answers.shape[1] == 4
  assert data.padded_length(walks.replace(multihop_walk=False), 64) == 64 + 9


def test_lens_loss_is_the_readout_cross_entropy_before_the_last_layer():
  config = _cfg().model.replace(num_layers=2)
  params = kvjax.model.init_params(config, jax.random.key(0))
  batch = data.task_batch(DATA, 0, 1)
  plain = data.model_inputs(batch)
  arrays = data.model_inputs(batch, lens_weight=0.25)
  loss0, _ = loop.loss_fn(params, plain, config=config)
  loss1, m = loop.loss_fn(params, arrays, config=config)
  # By hand: the logit lens at the residual entering layer 1 (of 0, 1).
  _, _, aux = kvjax.forward(
    params,
    jnp.asarray(plain["inputs"]),
    kvjax.init_cache(config, *plain["inputs"].shape),
    config=config,
    capture=("resid",),
  )
  h = kvjax.model.rms_norm(
    aux["resid"][1], params["final_norm"], config.norm_eps
  )
  assert not config.tie_embeddings
  logits = np.asarray(h @ params["lm_head"], np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, plain["targets"][..., None], -1)[..., 0]
  w = arrays["lens_weights"]
  expected = (nll * w).sum() / w.sum()
  np.testing.assert_allclose(float(m["lens_loss"]), expected, rtol=1e-4)
  np.testing.assert_allclose(
    float(loss1), float(loss0) + 0.25 * expected, rtol=1e-5
  )
  assert float(m["loss"]) == float(loss0)  # "loss" stays the main loss


def test_train_step_learns_and_compiles_once():
  cfg = _cfg()
  config = cfg.model
  opt = cfg.optimizer.make(total_steps=40)
  state = loop.init_state(config, opt, 0)
  step = loop.make_train_step(config, opt)
  arrays = data.model_inputs(data.task_batch(DATA, 0, 0, context_len=24))
  first = None
  for _ in range(15):
    state, metrics = step(state, arrays)
    first = first if first is not None else float(metrics["loss"])
  assert float(metrics["loss"]) < first  # overfits one batch
  assert int(state.step) == 15
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
  cfg = _cfg("muon_split")  # the larger optimizer state (Muon + AdamW)
  full = loop.train(cfg, str(tmp_path / "full"), progress=False)
  # "Kill" after 3 steps, then delete the step-3 checkpoint: the run
  # restarts from step 2 with a metrics row for step 3 already written,
  # which must be dropped and redone.
  part_dir = str(tmp_path / "part")
  loop.train(
    cfg.replace(checkpoint_every=2), part_dir, stop_after=3, progress=False
  )
  # Simulate a kill between checkpoints: drop the step-3 checkpoint.
  ckpts = os.path.join(part_dir, "checkpoints")
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.rmtree(os.path.join(ckpts, "3"))
  resumed = loop.train(cfg, part_dir, progress=False)
  assert int(resumed.step) == int(full.step) == cfg.total_steps
  for a, b in zip(
    jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(
    jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = _jsonl(os.path.join(part_dir, "metrics.jsonl"))
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)) == list(range(1, 7))
  full_rows = _jsonl(tmp_path / "full" / "metrics.jsonl")
  assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]


def test_a_restart_continues_a_finished_run_as_if_planned(tmp_path):
  # A finished 6-step WSD run, continued by a second cycle (lr_restarts),
  # ends where the two-cycle config run from scratch ends.
  cfg = _cfg("adamw")
  one_shape = DATA.replace(phases=(Phase(until=100, context_lens=(24,)),))
  first = cfg.replace(
    data=one_shape,
    checkpoint_every=3,
    optimizer=cfg.optimizer.replace(decay_steps=2),
  )
  both = first.replace(
    total_steps=10, optimizer=first.optimizer.replace(restarts=(6,))
  )
  loop.train(first, str(tmp_path / "cont"), progress=False)
  continued = loop.train(both, str(tmp_path / "cont"), progress=False)
  scratch = loop.train(both, str(tmp_path / "scratch"), progress=False)
  assert int(continued.step) == int(scratch.step) == 10
  for a, b in zip(
    jax.tree.leaves(continued.params), jax.tree.leaves(scratch.params)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_per_task_accuracy_counts_answers_of_each_task():
  targets = jnp.array([[5, 6, 7], [5, 6, 7], [8, 8, 8], [9, 9, 9]])
  answer_mask = jnp.array(
    [
      [False, True, True],
      [True, False, False],
      [False, False, True],
      [True, True, False],
    ]
  )
  logits = jax.nn.one_hot(
    jnp.array([[0, 6, 0], [5, 0, 0], [0, 0, 1], [9, 0, 0]]), 16
  )
  task_ids = jnp.array([0, -1, 3, -2])  # mqar, copy, overwrite, chain
  out = loop.per_task_accuracy(logits, targets, answer_mask, task_ids)
  # mqar: answer (0,1) right, (0,2) wrong -> 1/2; copy: (1,0) right.
  np.testing.assert_allclose(float(out["acc/mqar"]), 1 / 2, rtol=1e-6)
  assert float(out["n/mqar"]) == 2
  assert float(out["acc/copy"]) == 1.0 and float(out["n/copy"]) == 1
  assert float(out["acc/chain"]) == 0.5 and float(out["n/chain"]) == 2
  assert float(out["acc/overwrite"]) == 0.0 and float(out["n/overwrite"]) == 1
  assert float(out["n/needle"]) == 0


def test_train_takes_a_typed_config_only(tmp_path):
  with pytest.raises(TypeError, match="TrainConfig"):
    loop.train(_cfg().to_dict(), str(tmp_path), progress=False)


def test_a_phase_override_applies_during_its_phase_only():
  d = DATA.replace(
    phases=(
      Phase(
        until=3,
        context_lens=(24,),
        overrides={"task_fractions": {"needle": 1.0}, "copy_fraction": 0.2},
      ),
      Phase(until=100, context_lens=(24,)),
    )
  )
  assert d.mixture_at(2).task_fractions == (("needle", 1.0),)
  assert d.mixture_at(3) == d.mixture_at(1000) == MIXTURE
  early, late = data.task_batch(d, 0, 2), data.task_batch(d, 0, 3)
  names = kvjax.tasks.TASK_NAMES
  assert set(early.task_ids.tolist()) == {
    names.index("needle"),
    data.COPY_TASK_ID,
  }
  assert set(late.task_ids.tolist()) == set(range(len(names)))


def test_metrics_rows_carry_per_task_accuracy(tmp_path):
  loop.train(_cfg("adamw", total_steps=3), str(tmp_path), progress=False)
  rows = _jsonl(tmp_path / "metrics.jsonl")
  for row in rows:
    tasks = [k for k in row if k.startswith("acc/")]
    assert tasks and not any(k.startswith("n/") for k in row)
    assert all(0.0 <= row[k] <= 1.0 for k in tasks)
