"""The typed training config: checks on construction, values that compare
and hash equal, the dict layout read back, and the stream it describes."""

import hashlib
import json

import numpy as np
import pytest

import kvjax
from kvjax import pretrained
from kvjax.train import data
from kvjax.train.config import (
  DataConfig,
  EvalConfig,
  Mixture,
  OptimizerConfig,
  Phase,
  TrainConfig,
)

MODEL = kvjax.ModelConfig(
  vocab_size=512,
  d_model=32,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
)
MIXTURE = Mixture(
  tokens_per_step=256,
  task_fractions={"mqar": 0.5, "needle": 0.5},
  mqar_pairs=(2, 4),
)
DATA = DataConfig(
  phases=(
    Phase(until=5, context_lens=(24,)),
    Phase(until=10, context_lens=(32, 48), overrides={"copy_fraction": 0.25}),
  ),
  mixture=MIXTURE,
)


def _config(**changes) -> TrainConfig:
  fields = {
    "model": MODEL,
    "data": DATA,
    "optimizer": OptimizerConfig(learning_rate=1e-3, warmup_steps=2),
    "total_steps": 10,
  }
  return TrainConfig(**{**fields, **changes})


def _fingerprint(batch) -> str:
  digest = hashlib.sha1()
  for field in batch:
    digest.update(np.ascontiguousarray(field).tobytes())
  return digest.hexdigest()[:16]


@pytest.mark.parametrize(
  "build, match",
  [
    (
      lambda: MIXTURE.replace(tokens_per_step=0),
      r"Mixture\.tokens_per_step=0; allowed: an int >= 1",
    ),
    (
      lambda: MIXTURE.replace(task_fractions={"mqar": 1.0, "lookup": 1.0}),
      r"Mixture\.task_fractions=.*'lookup'.*allowed: a mapping from tasks",
    ),
    (
      lambda: MIXTURE.replace(task_fractions={"mqar": 0.0}),
      r"Mixture\.task_fractions=.*at least one > 0",
    ),
    (
      lambda: MIXTURE.replace(mqar_placements=("middle",)),
      r"Mixture\.mqar_placements=\('middle',\); allowed: .*'scattered'",
    ),
    (
      lambda: MIXTURE.replace(multihop_hops=(1, 5)),
      r"Mixture\.multihop_hops=\(1, 5\); allowed: .*\(1, 2, 3, 4\)",
    ),
    (
      lambda: MIXTURE.replace(multihop_walk=1),
      r"Mixture\.multihop_walk=1; allowed: True or False",
    ),
    (
      lambda: MIXTURE.replace(overwrite_writes=1),
      r"Mixture\.overwrite_writes=1; allowed: an int >= 2",
    ),
    (
      lambda: MIXTURE.replace(copy_fraction=0.6, chain_fraction=0.4),
      r"copy_fraction \+ chain_fraction=1\.0; allowed: < 1",
    ),
    (
      lambda: MIXTURE.replace(lens_weight=float("nan")),
      r"Mixture\.lens_weight=nan; allowed: a finite float",
    ),
    (
      lambda: Phase(until=0, context_lens=(24,)),
      r"Phase\.until=0; allowed: an int >= 1",
    ),
    (
      lambda: Phase(until=5, context_lens=()),
      r"Phase\.context_lens=\(\); allowed: a non-empty sequence",
    ),
    (
      lambda: Phase(until=5, context_lens=(24,), overrides={"mqar": 1}),
      r"Phase\(until=5\)\.overrides has unknown field\(s\) \['mqar'\]",
    ),
    (
      lambda: Phase(
        until=5, context_lens=(24,), overrides={"copy_fraction": 2.0}
      ),
      r"Phase\(until=5\)\.copy_fraction=2\.0; allowed: .*\[0, 1\)",
    ),
    (
      lambda: DATA.replace(phases=(DATA.phases[1], DATA.phases[0])),
      (
        r"DataConfig\.phases\[\*\]\.until=\[10, 5\]; allowed: strictly "
        r"increasing"
      ),
    ),
    (
      lambda: DATA.replace(phases=()),
      r"DataConfig\.phases=\(\); allowed: a non-empty sequence of Phase",
    ),
    # The context of a phase must hold every kind of row it draws.
    (
      lambda: DATA.replace(phases=(Phase(until=5, context_lens=(12, 24)),)),
      (
        r"phases\[0\] \(until=5\)\.context_lens=12; allowed: lengths >= 13 "
        r"\(needle"
      ),
    ),
    (
      lambda: DATA.replace(mixture=MIXTURE.replace(mqar_pairs=(16,))),
      r"context_lens=24; allowed: lengths >= 33 \(mqar",
    ),
    (
      lambda: OptimizerConfig(name="sgd", learning_rate=1.0),
      (
        r"OptimizerConfig\.name='sgd'; allowed: one of \('adamw', "
        r"'muon_split'\)"
      ),
    ),
    (
      lambda: OptimizerConfig(learning_rate=0.0),
      (
        r"OptimizerConfig\.learning_rate=0\.0; allowed: a finite float in "
        r"\(0, inf\)"
      ),
    ),
    (
      lambda: OptimizerConfig(learning_rate=1.0, restarts=(4,)),
      r"OptimizerConfig\.restarts=\(4,\); allowed: \(\) unless decay_steps",
    ),
    (
      lambda: OptimizerConfig(
        learning_rate=1.0, decay_steps=2, restarts=(6, 4)
      ),
      r"OptimizerConfig\.restarts=\(6, 4\); allowed: increasing steps",
    ),
    (
      lambda: EvalConfig(context_lens=(0,)),
      (
        r"EvalConfig\.context_lens=\(0,\); allowed: a non-empty sequence of "
        r"ints >= 1"
      ),
    ),
    (
      lambda: _config(total_steps=0),
      r"TrainConfig\.total_steps=0; allowed: an int >= 1",
    ),
    (
      lambda: _config(loss_on="question"),
      (
        r"TrainConfig\.loss_on='question'; allowed: one of \('answers', "
        r"'all'\)"
      ),
    ),
    (
      lambda: _config(model=MODEL.replace(vocab_size=256)),
      r"TrainConfig\.model\.vocab_size=256; allowed: >= 512",
    ),
    # Schedules are checked against total_steps.
    (
      lambda: _config(
        optimizer=OptimizerConfig(learning_rate=1.0, warmup_steps=10)
      ),
      r"TrainConfig\.optimizer does not fit total_steps=10: .*warmup_steps",
    ),
    (
      lambda: _config(
        optimizer=OptimizerConfig(
          learning_rate=1.0, decay_steps=2, restarts=(10,)
        )
      ),
      r"does not fit total_steps=10: restarts must increase inside",
    ),
  ],
)
def test_a_bad_field_is_named_with_its_value_and_what_is_allowed(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_configs_are_values():
  """Sequences become tuples and mappings pairs: equal configs compare and
  hash equal, whatever container they were given in."""
  a = Mixture(
    tokens_per_step=256,
    task_fractions={"mqar": 1, "needle": 1},
    mqar_pairs=[2, 4],
    multihop_hops=np.array([1, 2]),
  )
  b = Mixture(
    tokens_per_step=256,
    task_fractions=(("mqar", 1.0), ("needle", 1.0)),
    mqar_pairs=(2, 4),
    multihop_hops=(1, 2),
  )
  assert a == b and hash(a) == hash(b)
  assert a.task_fractions == (("mqar", 1.0), ("needle", 1.0))
  assert a.multihop_hops == (1, 2) and isinstance(a.mqar_pairs, tuple)
  p = Phase(
    until=5, context_lens=[24], overrides={"lens_weight": 1, "mqar_pairs": [2]}
  )
  q = Phase(
    until=5,
    context_lens=(24,),
    overrides=(("mqar_pairs", (2,)), ("lens_weight", 1.0)),
  )
  assert p == q and hash(p) == hash(q)
  assert p.overrides == (("mqar_pairs", (2,)), ("lens_weight", 1.0))
  assert hash(_config()) == hash(_config())
  assert _config() != _config(seed=1)
  with pytest.raises(AttributeError):
    _config().seed = 1  # frozen


def test_task_fractions_keep_their_order():
  """The order breaks rounding ties (the remainder goes to the first of
  the largest), so it is part of the value."""
  a = MIXTURE.replace(task_fractions={"mqar": 1.0, "needle": 1.0})
  b = MIXTURE.replace(task_fractions={"needle": 1.0, "mqar": 1.0})
  assert a != b
  assert data.rows_per_task(a, 5) == {"mqar": 3, "needle": 2}
  assert data.rows_per_task(b, 5) == {"needle": 3, "mqar": 2}


def test_a_step_takes_the_first_phase_it_is_below():
  assert [DATA.phase_index(s) for s in (0, 4, 5, 9, 10, 1000)] == [
    0,
    0,
    1,
    1,
    1,
    1,
  ]
  assert DATA.mixture_at(4) == MIXTURE
  assert DATA.mixture_at(5) == MIXTURE.replace(copy_fraction=0.25)
  assert DATA.phase_at(7).context_lens == (32, 48)


def test_dict_layout_round_trip():
  config = _config(
    init_out_std=0.01,
    evaluation=EvalConfig(every=5, context_lens=(64,), mqar_pairs=None),
  )
  d = config.to_dict()
  assert json.loads(json.dumps(d)) == d  # JSON-able
  # The flat layout of the experiment config and training.json.
  assert d["optimizer"] == "adamw" and d["lr_restarts"] == []
  assert d["eval_every"] == 5 and d["eval_mqar_pairs"] is None
  assert d["data"]["phases"][1] == {
    "until": 10,
    "context_lens": [32, 48],
    "copy_fraction": 0.25,
  }
  assert d["data"]["task_fractions"] == {"mqar": 0.5, "needle": 0.5}
  assert TrainConfig.from_dict(d) == config
  assert TrainConfig.from_dict(json.loads(json.dumps(d))) == config


def test_from_dict_reads_the_flat_layout_and_its_conventions():
  d = _config().to_dict()
  # grad_clip 0: no clipping; adam_learning_rate 0: learning_rate.
  read = TrainConfig.from_dict(dict(d, grad_clip=0, adam_learning_rate=0))
  assert read.optimizer.grad_clip is None
  assert read.optimizer.adam_learning_rate is None
  # A field left out takes its default.
  short = {k: v for k, v in d.items() if not k.startswith("eval_")}
  assert TrainConfig.from_dict(short).evaluation == EvalConfig()
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]"):
    TrainConfig.from_dict(dict(d, lr=1.0))
  with pytest.raises(ValueError, match=r"missing .* \['total_steps'\]"):
    TrainConfig.from_dict({k: v for k, v in d.items() if k != "total_steps"})
  with pytest.raises(ValueError, match=r"phase has unknown field\(s\)"):
    TrainConfig.from_dict(
      dict(
        d,
        data=dict(
          d["data"], phases=[{"until": 5, "context_lens": [24], "x": 1}]
        ),
      )
    )


def test_the_shipped_training_record_reads_and_draws_the_same_stream():
  """kvjax-tiny's training.json (written from the experiment's dict) is a
  TrainConfig, and its stream is the one the model was trained on: these
  fingerprints are those of the dict-driven stream before the typed config
  (git 2e4d7af), at steps of five of its phases."""
  config = TrainConfig.from_dict(
    pretrained.training_record("kvjax-tiny")["config"]
  )
  assert config.total_steps == 17600 and config.model.num_layers == 3
  assert config.optimizer.restarts == (12700, 16000)
  expected = {
    0: "eed761c0422ff08c",
    2500: "f9a7c77680b06181",
    7500: "c686f50733f1195f",
    9000: "38fc39e5e72706d0",
    17000: "a7bdfc1ad69b8f62",
  }
  for step, fingerprint in expected.items():
    assert _fingerprint(data.task_batch(config.data, 0, step)) == (
      fingerprint
    ), step


def test_the_stream_with_every_aid_is_unchanged():
  """Copy and chain rows with capped queries and key ends (the lens loss's
  stream), against the dict-driven stream of git 2e4d7af."""
  aids = DataConfig(
    phases=(
      Phase(
        until=10,
        context_lens=(48, 64),
        overrides={
          "chain_fraction": 0.3,
          "chain_count": 8,
          "chain_queries": 4,
          "chain_key_ends": 0.5,
          "copy_fraction": 0.05,
          "lens_weight": 1.0,
        },
      ),
    ),
    mixture=Mixture(
      tokens_per_step=1024,
      task_fractions={
        "mqar": 0.2,
        "needle": 0.1,
        "multihop": 0.4,
        "overwrite": 0.15,
        "abstention": 0.15,
      },
      mqar_pairs=(8, 12, 16),
      mqar_placements=("prefix", "scattered"),
      multihop_hops=(1, 2, 2),
      chain_hops=(1, 2),
    ),
  )
  assert _fingerprint(data.task_batch(aids, 7, 3)) == "f44cfb5bc449b3ca"
  assert _fingerprint(data.task_batch(aids, 7, 4)) == "b653108d15953f03"
