"""The sweep on a real checkpoint's layout: a random HF Llama checkpoint with
its own tokenizer.json (a byte-level BPE trained here, as Llama 3's), the
tasks written as text and tokenized (`experiments/sweeps/tokens.py`).

No network, no weights: the tokenizer is trained inside the test (the
`tokenizers` BPE trainer, milliseconds) and the weights are random
(`kvjax.hf.save_pretrained` writes config.json + model.safetensors).
"""

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers

import kvjax
from experiments.configs import sweep as sweep_config
from experiments.sweeps import loop
from experiments.sweeps import plan
from experiments.sweeps import store
from experiments.sweeps import tokens as tokens_lib
from experiments.sweeps import units
from experiments.sweeps.task_data import TaskData
from kvjax import hf
from kvjax.tasks import generators
from kvjax.tasks import vocab

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SPECIALS = ["<s>", "</s>", "<pad>"]
LLAMA_LIKE = {
  "bos_token": "<s>",
  "eos_token": "</s>",
  "pad_token": "<pad>",
  "add_bos_token": True,
  "model_max_length": 4096,
}


def _pseudo_words(n=700):
  """Lowercase 4-letter words (`baba`, `babe`, ...): more than the 504 the
  private vocabulary needs (keys, values, fillers)."""
  syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
  return [a + b for a, b in itertools.product(syllables, syllables)][:n]


def _train_tokenizer():
  """A byte-level BPE (Llama 3's kind: `Ġword` pieces) in which every
  pseudo-word is one token; `Query:` stays two (`ĠQuery`, `:`)."""
  words = _pseudo_words()
  corpus = [
    " " + " ".join(words[i : i + 50]) for i in range(0, len(words), 50)
  ] * 3
  corpus += [" Query: -> unknown"] * 50
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    corpus,
    tokenizers.trainers.BpeTrainer(
      vocab_size=4000,
      special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    ),
  )
  return tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random Llama checkpoint directory with tokenizer.json."""
  path = str(tmp_path_factory.mktemp("llama"))
  tok = _train_tokenizer()
  config = kvjax.get_config("tiny", vocab_size=tok.get_vocab_size())
  params = kvjax.init_params(config, jax.random.key(0), std=0.1)
  hf.save_pretrained(path, params, config)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(LLAMA_LIKE, f)
  assert (
    json.load(open(os.path.join(path, "config.json")))["model_type"] == "llama"
  )
  return path


@pytest.fixture(scope="module")
def no_tokenizer(checkpoint, tmp_path_factory):
  """The same weights without any tokenizer file."""
  path = str(tmp_path_factory.mktemp("bare"))
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(checkpoint, name), path)
  return path


def _cfg(workdir, checkpoint, **overrides):
  cfg = sweep_config.get_config("smoke")
  cfg.model = f"hf:{checkpoint}"
  cfg.methods = "snapkv"
  cfg.ratios = "0,0.5"
  cfg.tasks = "mqar,abstention"
  cfg.context_len = 72  # longer than SnapKV's window of 64
  cfg.num_examples = 2
  cfg.workdir = str(workdir)
  cfg.plots = False
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _decode(tokens, ids):
  return tokens.tokenizer.tokenizer.decode([int(i) for i in ids]).strip()


def test_sweep_on_a_checkpoint_writes_the_tasks_as_its_text(
  checkpoint, tmp_path
):
  cfg = _cfg(tmp_path, checkpoint)
  rows = loop.run(cfg)
  # none on 2 tasks; snapkv 0.5 on 2 tasks x 2 modes.
  assert len(rows) == len(plan.plan_units(cfg)) == 6
  tag = tokens_lib.fingerprint(checkpoint)
  for r in rows:
    assert r["status"] == "ok", r.get("reason")
    assert r["tokens"] == "text" and r["tokenizer"] == tag
    # BOS + one token per context word: the layout of the private ids.
    assert r["context_len"] == 72
    assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["kl"])
  by = {(r["method"], r["task"], r["mode"]): r for r in rows}
  assert by[("none", "mqar", "agnostic")]["ger"] == 0.0
  assert by[("none", "abstention", "agnostic")]["ger"] is None  # no facts
  assert 0.0 <= by[("snapkv", "mqar", "aware")]["ger"] <= 1.0
  summary = open(os.path.join(tmp_path, "summary.md")).read()
  assert f"tokenizer.json ({tag})" in summary and "Warning" not in summary
  # Resumes under the same tokenizer; another tokenizer.json (the same
  # tokenizer written differently is enough) gives another run tag.
  path = os.path.join(tmp_path, "results.jsonl")
  assert len(loop.run(cfg)) == 6
  assert len(open(path).read().splitlines()) == 6
  config, params = hf.load_pretrained(checkpoint)
  before = store.run_tag(cfg, config, params)
  assert before == rows[0]["key"].split("|")[0]
  raw_cfg = _cfg(tmp_path, checkpoint, tokens="raw")
  assert store.run_tag(raw_cfg, config, params) != before
  tok_file = os.path.join(checkpoint, "tokenizer.json")
  original = open(tok_file).read()
  try:
    with open(tok_file, "w") as f:
      json.dump(json.loads(original), f, indent=1)
    assert store.run_tag(cfg, config, params) != before
  finally:
    with open(tok_file, "w") as f:
      f.write(original)
  assert store.run_tag(cfg, config, params) == before


@pytest.mark.parametrize("name", ["mqar", "multihop_k2"])
def test_mapped_positions_decode_to_the_rendered_words(checkpoint, name):
  """Critical tokens, answers, the question span and the context end of
  the batch the sweep feeds the model are the words the task rendered."""
  cfg = _cfg("/tmp/unused", checkpoint, tasks=name)
  tokens = tokens_lib.load(cfg)
  config, params = hf.load_pretrained(checkpoint)
  td = TaskData(cfg, config, params, name, tokens)
  raw, new, words = td.source_batch, td.batch, tokens.words
  assert td.text_batch is not None and td.L == int(new.context_end[0])
  assert (new.tokens[:, 0] == tokens.tokenizer.bos_id).all()
  assert _decode(tokens, [td.unknown_id]) == "unknown"
  question = np.asarray(generators.question_mask(new))
  for b in range(raw.batch_size):
    old_c = raw.critical_positions[b][raw.critical_positions[b] >= 0]
    new_c = new.critical_positions[b][new.critical_positions[b] >= 0]
    assert len(new_c) == len(old_c) > 0
    assert [_decode(tokens, [i]) for i in new.tokens[b, new_c]] == [
      words.word(i) for i in raw.tokens[b, old_c]
    ]
    assert np.array_equal(td.targets[b], new.critical_positions[b])
    valid = raw.answer_positions[b] >= 0
    assert [_decode(tokens, [i]) for i in new.answers[b][valid]] == [
      words.word(i) for i in raw.answers[b][valid]
    ]
    pos = new.answer_positions[b][valid]
    assert (td.sources[b][valid] == pos - 1).all()
    old_q = np.flatnonzero(generators.question_mask(raw)[b])
    assert _decode(tokens, new.tokens[b, question[b]]) == " ".join(
      words.word(i) for i in raw.tokens[b, old_q]
    )
    # The aware mode observes exactly that span of the question.
    assert np.array_equal(np.asarray(td.observe_mask)[b], question[b, td.L :])
    assert _decode(tokens, new.tokens[b, td.L : td.L + 2]) == "Query:"


def test_scoring_abstains_on_the_unknown_words_token(checkpoint, monkeypatch):
  """A model that always says `unknown` abstains everywhere: right on the
  abstention task, never a hallucination (the private UNKNOWN id, 4, is
  an arbitrary token here)."""
  cfg = _cfg("/tmp/unused", checkpoint)
  tokens = tokens_lib.load(cfg)
  config, params = hf.load_pretrained(checkpoint)
  real_ask = units.ask
  for name in ("mqar", "abstention"):
    td = TaskData(cfg, config, params, name, tokens)
    assert td.unknown_id != vocab.UNKNOWN

    def says_unknown(*args, td=td, **kwargs):
      logits, aux, pos, valid = real_ask(*args, **kwargs)
      return (
        jnp.zeros_like(logits).at[..., td.unknown_id].set(10.0),
        aux,
        pos,
        valid,
      )

    monkeypatch.setattr(units, "ask", says_unknown)
    row = units.run_unit(
      cfg, td, dict(method="snapkv", ratio=0.5, task=name, mode="agnostic")
    )
    assert row["abstention_rate"] == 1.0 and row["hallucination_rate"] == 0.0
    assert row["accuracy"] == (1.0 if name == "abstention" else 0.0)


def test_checkpoint_without_tokenizer_is_refused(no_tokenizer, tmp_path):
  cfg = _cfg(tmp_path / "w", no_tokenizer)
  message = "has no tokenizer.json"
  for tokens in ("auto", "text"):
    cfg.tokens = tokens
    with pytest.raises(ValueError, match=message) as e:
      loop.run(cfg)
    assert "--config.tokens=raw" in str(e.value)
    assert not (tmp_path / "w").exists()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.sweep",
      "--config=experiments/configs/sweep.py:smoke",
      f"--config.model=hf:{no_tokenizer}",
      f"--config.workdir={tmp_path / 'w'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode != 0
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()
  for model, tokens, match in (
    ("random:tiny", "text", "needs an hf:PATH model"),
    ("random:tiny", "words", "config.tokens='words'; allowed"),
    (f"hf:{tmp_path}/nowhere", "auto", "is not a directory"),
  ):
    with pytest.raises(ValueError, match=match):
      plan.plan_units(
        _cfg(tmp_path / "w", no_tokenizer, model=model, tokens=tokens)
      )


def test_raw_ids_on_a_checkpoint_run_when_asked_and_say_so(
  no_tokenizer, tmp_path, caplog
):
  cfg = _cfg(
    tmp_path, no_tokenizer, tokens="raw", tasks="mqar", modes="agnostic"
  )
  with caplog.at_level(logging.WARNING):
    rows = loop.run(cfg)
  assert "config.tokens=raw on hf:" in caplog.text
  assert len(rows) == 2
  for r in rows:
    assert r["status"] == "ok" and r["tokens"] == "raw"
    assert "tokenizer" not in r and r["context_len"] == 72
  summary = open(os.path.join(tmp_path, "summary.md")).read()
  assert "Warning: config.tokens=raw" in summary
