"""Tests of kvjax/tasks/text.py: task batches through a real tokenizer.

Every tokenizer here is trained inside the test (the `tokenizers` BPE
trainer, milliseconds) and saved as a checkpoint directory's
`tokenizer.json`: no network, no weights.
"""

import itertools
import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from kvjax import tasks
from kvjax.tasks import scoring, text
from kvjax.tasks.generators import question_mask
from kvjax.tasks.suite import SUITE

CONTEXT_LEN = 96  # fits every suite entry (mqar: 32 pairs)
BATCH = 3
SPECIALS = ["<s>", "</s>", "<pad>"]
NAMES = text.DEFAULT_WORDS


def _suite_batches():
  return {
    entry.name: tasks.make_batch(
      entry.task, BATCH, seed=(7, i), context_len=CONTEXT_LEN, **entry.params
    )
    for i, entry in enumerate(SUITE)
  }


BATCHES = _suite_batches()


def _train(corpus, pre_tokenizer, vocab_size=4000, decoder=None):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  if pre_tokenizer is not None:
    tok.pre_tokenizer = pre_tokenizer
  if decoder is not None:
    tok.decoder = decoder
  alphabet = (
    pre_tokenizers.ByteLevel.alphabet()
    if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel)
    else []
  )
  tok.train_from_iterator(
    corpus,
    tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=SPECIALS,
      initial_alphabet=alphabet,
      show_progress=False,
    ),
  )
  return tok


def _checkpoint(directory, tok, config=None, special_map=None):
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  for name, data in (
    ("tokenizer_config.json", config),
    ("special_tokens_map.json", special_map),
  ):
    if data is not None:
      with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f)
  return text.load_tokenizer(str(directory))


def _corpus(words):
  """Rendered suite texts plus every word of the table, a few times."""
  lines = [t for b in BATCHES.values() for t in text.render(b, words)]
  return lines + [" ".join(words.all_words)] * 3


LLAMA_LIKE = {
  "bos_token": "<s>",
  "eos_token": "</s>",
  "pad_token": "<pad>",
  "add_bos_token": True,
  "model_max_length": 4096,
}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """Splits on whitespace; every word of the names table is one token."""
  tok = _train(_corpus(NAMES), pre_tokenizers.WhitespaceSplit())
  return _checkpoint(tmp_path_factory.mktemp("whole"), tok, LLAMA_LIKE)


def _coded_words(vocab=tasks.VOCAB):
  """Keys and values `<2 consonants><digits>`: under a GPT-2 style
  pre-tokenizer each is two tokens, ` bc` + `12`, the first one distinct."""
  consonants = "bcdfghjklmnpqrstvwxz"
  codes = ["".join(p) for p in itertools.product(consonants, repeat=2)]
  keys = tuple(f"{codes[i]}{i}" for i in range(vocab.num_keys))
  values = tuple(
    f"{codes[vocab.num_keys + i]}{i}" for i in range(vocab.num_values)
  )
  return text.Words(vocab, text.DEFAULT_WORDS.fillers, keys, values)


CODED = _coded_words()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  """GPT-2 style byte-level BPE: letters and digits are separate tokens."""
  tok = _train(
    _corpus(CODED) + _corpus(NAMES),
    pre_tokenizers.ByteLevel(add_prefix_space=False),
    decoder=decoders.ByteLevel(),
  )
  return _checkpoint(tmp_path_factory.mktemp("split"), tok, LLAMA_LIKE)


def _id_word(ck, token_id):
  return ck.tokenizer.id_to_token(int(token_id))


def _span_text(ck, ids):
  return ck.tokenizer.decode([int(i) for i in ids]).strip()


# --------------------------------------------------------------------------
# Rendering.


def test_render_is_the_names_of_the_ids():
  batch = BATCHES["needle"]
  texts = text.render(batch)
  assert texts == text.render(batch)  # deterministic
  for b, row in enumerate(texts):
    ids = batch.tokens[b, 1 : batch.lengths[b]]
    expected = [
      {tasks.QUERY: "Query:", tasks.ARROW: "->", tasks.UNKNOWN: "unknown"}.get(
        int(i)
      )
      or tasks.VOCAB.token_name(i)
      for i in ids
    ]
    assert row.split() == expected
  assert texts[0].split()[CONTEXT_LEN - 1] == "Query:"


def test_render_refuses_ids_without_a_word():
  batch = BATCHES["needle"]
  bad = batch._replace(tokens=batch.tokens.copy())
  bad.tokens[0, 5] = 6  # reserved
  with pytest.raises(ValueError, match="has no word"):
    text.render(bad)
  no_bos = batch._replace(tokens=batch.tokens.copy())
  no_bos.tokens[1, 0] = tasks.VOCAB.filler_start
  with pytest.raises(ValueError, match="does not start with BOS"):
    text.render(no_bos)


def test_words_are_checked():
  with pytest.raises(ValueError, match="used twice"):
    text.Words.names(query="K3")
  with pytest.raises(ValueError, match="without whitespace"):
    text.Words.names(arrow="- >")
  with pytest.raises(ValueError, match="needs 188"):
    text.Words(tasks.VOCAB, NAMES.fillers, NAMES.keys[:-1], NAMES.values)


# --------------------------------------------------------------------------
# Every suite entry, one token per word.


@pytest.mark.parametrize("name", [entry.name for entry in SUITE])
def test_suite_fields_point_at_the_right_tokens(whole, name):
  batch = BATCHES[name]
  tb = text.tokenize(batch, whole)
  new = tb.batch
  assert isinstance(new, tasks.TaskBatch)
  for field in new._fields:
    assert getattr(new, field).dtype == getattr(batch, field).dtype
  B = batch.batch_size
  assert (new.tokens[:, 0] == whole.bos_id).all()
  assert (new.context_end == new.context_end[0]).all()
  assert (new.task_ids == batch.task_ids).all()
  for b in range(B):
    n = int(new.lengths[b])
    # The whole row, word by word (one token each here).
    got = [_id_word(whole, i) for i in new.tokens[b, 1:n]]
    assert got == tb.texts[b].split()
    assert (new.tokens[b, n:] == whole.pad_id).all()
    # Critical positions decode to the words of the original tokens.
    old_c = batch.critical_positions[b][batch.critical_positions[b] >= 0]
    new_c = new.critical_positions[b][new.critical_positions[b] >= 0]
    assert [_id_word(whole, i) for i in new.tokens[b, new_c]] == [
      NAMES.word(i) for i in batch.tokens[b, old_c]
    ]
    assert (new_c < new.context_end[b]).all()
    # Answers: the answer word's token, at the mapped position.
    valid = batch.answer_positions[b] >= 0
    assert ((new.answer_positions[b] >= 0) == valid).all()
    pos = new.answer_positions[b][valid]
    assert (new.tokens[b, pos] == new.answers[b][valid]).all()
    assert [_id_word(whole, i) for i in new.answers[b][valid]] == [
      NAMES.word(i) for i in batch.answers[b][valid]
    ]
    assert new.answer_start[b] == pos[0]
    assert (np.flatnonzero(new.loss_mask[b]) == pos).all()
    # The question proper covers exactly the question's words.
    old_q = np.flatnonzero(question_mask(batch)[b])
    new_q = np.flatnonzero(question_mask(new)[b])
    assert [_id_word(whole, i) for i in new.tokens[b, new_q]] == [
      NAMES.word(i) for i in batch.tokens[b, old_q]
    ]
    assert _id_word(whole, new.tokens[b, new.context_end[b]]) == "Query:"
  if name == "abstention":
    assert _id_word(whole, tb.unknown_id) == "unknown"
    assert (new.answers == tb.unknown_id).all()


@pytest.mark.parametrize("name", ["mqar", "multihop_k3", "abstention"])
def test_scoring_reads_the_mapped_answers(whole, name):
  new = text.tokenized_batch(BATCHES[name], whole)
  B, T = new.tokens.shape
  V = whole.tokenizer.get_vocab_size()
  # A perfect model: the logits before every token put it first.
  logits = np.zeros((B, T, V), np.float32)
  rows, cols = np.meshgrid(np.arange(B), np.arange(T - 1), indexing="ij")
  logits[rows, cols, new.tokens[:, 1:]] = 10.0
  predicted, _ = scoring.predictions_from_logits(new, logits)
  assert (predicted == new.answers).all()
  assert scoring.score(new, predicted)["all"].accuracy == 1.0
  # Offset by the context, as after a prefill.
  L = int(new.context_end[0])
  predicted, _ = scoring.predictions_from_logits(new, logits[:, L:], offset=L)
  assert (predicted == new.answers).all()


def test_mixture_rows_keep_their_padding(whole):
  batch = tasks.make_mixture_batch(8, seed=2, context_len=CONTEXT_LEN)
  new = text.tokenized_batch(batch, whole)
  for b in range(8):
    valid = batch.answer_positions[b] >= 0
    assert ((new.answer_positions[b] >= 0) == valid).all()
    assert (new.answers[b][~valid] == whole.pad_id).all()
    assert (
      new.tokens[b, new.answer_positions[b][valid]] == new.answers[b][valid]
    ).all()
    n = (batch.critical_positions[b] >= 0).sum()
    assert (new.critical_positions[b, :n] >= 0).all()
    assert (new.critical_positions[b, n:] == -1).all()
  assert (new.lengths == batch.lengths).all()  # one token per word, BOS


# --------------------------------------------------------------------------
# Words split into several tokens.


@pytest.mark.parametrize("name", ["needle", "mqar", "multihop_k2"])
def test_split_critical_words(split, name):
  batch = BATCHES[name]
  every = text.tokenize(batch, split, words=CODED)
  last = text.tokenize(batch, split, words=CODED, critical="last")
  assert last.batch.critical_positions.shape == batch.critical_positions.shape
  for b in range(batch.batch_size):
    start, end = every.token_start[b], every.token_end[b]
    tokens = every.batch.tokens[b]
    old_c = batch.critical_positions[b][batch.critical_positions[b] >= 0]
    # Every critical word is two tokens here, ` bc` + `12`.
    assert ((end - start)[old_c] == 2).all()
    assert [_span_text(split, tokens[start[p] : end[p]]) for p in old_c] == [
      CODED.word(i) for i in batch.tokens[b, old_c]
    ]
    all_c = every.batch.critical_positions[b]
    assert (
      all_c == np.concatenate([np.arange(start[p], end[p]) for p in old_c])
    ).all()
    assert (
      last.batch.critical_positions[b][: len(old_c)] == end[old_c] - 1
    ).all()


def test_split_answers_score_by_first_token(split):
  batch = BATCHES["mqar"]
  tb = text.tokenize(batch, split, words=CODED)
  new = tb.batch
  for b in range(batch.batch_size):
    old_a = batch.answer_positions[b]
    start, end = tb.token_start[b], tb.token_end[b]
    assert (new.answer_positions[b] == start[old_a]).all()
    # The answer's first token is scored; every token of it is a target,
    # none of it is question.
    targets = np.concatenate([np.arange(start[p], end[p]) for p in old_a])
    assert (np.flatnonzero(new.loss_mask[b]) == targets).all()
    assert not question_mask(new)[b, targets].any()
    assert [
      _span_text(split, new.tokens[b, start[p] : end[p]]) for p in old_a
    ] == [CODED.word(i) for i in batch.answers[b]]
  # Same first token exactly when the same answer word.
  same_new = new.answers.ravel()[:, None] == new.answers.ravel()[None, :]
  same_old = batch.answers.ravel()[:, None] == batch.answers.ravel()[None, :]
  assert (same_new == same_old).all()


def test_shared_first_tokens_raise(split):
  # ` K12` is ` K` + `12`: every key starts with ` K`.
  with pytest.raises(ValueError, match="both start with the token"):
    text.tokenize(BATCHES["needle"], split)


def test_answer_sharing_a_first_token_with_filler_raises(split):
  assert CODED.keys[0] == "bb0"
  fillers = ("bb77",) + CODED.fillers[1:]  # ` bb` + `77`, as key ` bb` `0`
  words = text.Words(tasks.VOCAB, fillers, CODED.keys, CODED.values)
  with pytest.raises(ValueError, match="'bb0' and the word 'bb77'"):
    text.tokenize(BATCHES["needle"], split, words=words)


def test_merge_across_words_raises(tmp_path):
  # No pre-tokenizer: BPE learns tokens across the spaces between words.
  tok = _train(_corpus(NAMES), None, vocab_size=3000)
  ck = _checkpoint(tmp_path, tok, LLAMA_LIKE)
  with pytest.raises(ValueError, match="spans the words"):
    text.tokenize(BATCHES["needle"], ck)


def test_dropped_characters_raise(tmp_path):
  tok = _train(["f1 K2 V3 -> Query: unknown"], pre_tokenizers.WhitespaceSplit())
  ck = _checkpoint(tmp_path, tok, LLAMA_LIKE)  # no byte fallback, no unk
  with pytest.raises(ValueError, match="none of its tokens|got no token"):
    text.tokenize(BATCHES["needle"], ck)


# --------------------------------------------------------------------------
# Equal contexts, lengths.


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
  """Fillers f64.. never seen whole: two tokens (`f6` `4`); the rest one."""
  corpus = _corpus(NAMES)
  held_out = set(NAMES.fillers[64:])
  corpus = [
    " ".join(w for w in line.split() if w not in held_out) for line in corpus
  ]
  tok = _train(corpus, pre_tokenizers.WhitespaceSplit())
  return _checkpoint(tmp_path_factory.mktemp("uneven"), tok, LLAMA_LIKE)


def test_contexts_are_padded_to_one_length(uneven):
  batch = tasks.make_batch("needle", 6, seed=3, context_len=CONTEXT_LEN)
  alone = [
    int(
      text.tokenize(
        batch._replace(
          **{f: getattr(batch, f)[b : b + 1] for f in batch._fields}
        ),
        uneven,
      ).batch.context_end[0]
    )
    for b in range(6)
  ]
  assert len(set(alone)) > 1  # the rows' contexts differ in tokens
  tb = text.tokenize(batch, uneven)
  new = tb.batch
  assert (new.context_end == max(alone)).all()
  for b in range(6):
    words = tb.texts[b].split()
    query = words.index("Query:")
    added = max(alone) - alone[b]
    assert (
      words[: query - added] == text.render(batch)[b].split()[: CONTEXT_LEN - 1]
    )
    assert all(w in NAMES.fillers[:64] for w in words[query - added : query])
    # Fields still point at their words.
    p = batch.critical_positions[b]
    assert [
      _id_word(uneven, i) for i in new.tokens[b, tb.token_start[b, p]]
    ] == [NAMES.word(i) for i in batch.tokens[b, p]]
    assert _id_word(uneven, new.answers[b, 0]) == NAMES.word(
      batch.answers[b, 0]
    )
  fixed = text.tokenize(
    batch, uneven, context_len=max(alone) + 5, total_len=200
  )
  assert (fixed.batch.context_end == max(alone) + 5).all()
  assert fixed.batch.tokens.shape == (6, 200)
  with pytest.raises(ValueError, match="more than context_len"):
    text.tokenize(batch, uneven, context_len=max(alone) - 1)


def test_no_single_token_filler_raises(split):
  # Under byte-level BPE every name filler is ` f` + digits.
  words = text.Words(tasks.VOCAB, NAMES.fillers, CODED.keys, CODED.values)
  batch = BATCHES["needle"]
  width = int(text.tokenize(batch, split, words=words).batch.context_end[0])
  with pytest.raises(ValueError, match="no filler word is a single token"):
    text.tokenize(batch, split, words=words, context_len=width + 1)


def test_lengths_past_the_model_context_raise(whole):
  batch = BATCHES["needle"]
  T = int(text.tokenized_batch(batch, whole).lengths.max())
  with pytest.raises(ValueError, match="longer than the model's context"):
    text.tokenize(batch, whole, max_len=T - 1)
  with pytest.raises(ValueError, match="more than total_len"):
    text.tokenize(batch, whole, total_len=T - 1)
  assert text.tokenized_batch(batch, whole, max_len=T).lengths.max() == T


def test_model_max_length_is_the_default_limit(tmp_path):
  tok = _train(_corpus(NAMES), pre_tokenizers.WhitespaceSplit())
  short = _checkpoint(
    tmp_path / "short", tok, {**LLAMA_LIKE, "model_max_length": 64}
  )
  assert short.max_len == 64
  with pytest.raises(ValueError, match="max_len=64"):
    text.tokenize(BATCHES["needle"], short)
  unlimited = _checkpoint(
    tmp_path / "huge", tok, {**LLAMA_LIKE, "model_max_length": 1e30}
  )
  assert unlimited.max_len is None


# --------------------------------------------------------------------------
# The checkpoint directory: tokenizer.json and special tokens.


def test_missing_tokenizer_json_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    text.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.model").write_bytes(b"\0")
  with pytest.raises(FileNotFoundError, match="SentencePiece"):
    text.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    text.load_tokenizer(str(tmp_path / "nothing"))


def test_special_tokens(tmp_path):
  tok = _train(_corpus(NAMES), pre_tokenizers.WhitespaceSplit())
  bos, eos, pad = (tok.token_to_id(t) for t in SPECIALS)
  ck = _checkpoint(tmp_path / "a", tok, LLAMA_LIKE)
  assert (ck.bos_id, ck.eos_id, ck.pad_id) == (bos, eos, pad)
  # special_tokens_map.json wins, AddedToken objects are read.
  ck = _checkpoint(
    tmp_path / "b",
    tok,
    {"bos_token": "</s>", "add_bos_token": True},
    {"bos_token": {"content": "<s>", "lstrip": False}},
  )
  assert (ck.bos_id, ck.eos_id, ck.pad_id) == (bos, None, None)
  # Not said by the config: used only if the post-processor adds it.
  ck = _checkpoint(tmp_path / "c", tok, {"bos_token": "<s>"})
  assert ck.bos_id is None
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", bos)]
  )
  ck = _checkpoint(tmp_path / "d", tok, {"bos_token": "<s>"})
  assert ck.bos_id == bos
  # A BOS the tokenizer lacks.
  with pytest.raises(ValueError, match="no such token"):
    _checkpoint(tmp_path / "e", tok, {"bos_token": "<|begin|>"})


def test_without_bos_position_0_has_no_token(tmp_path):
  tok = _train(_corpus(NAMES), pre_tokenizers.WhitespaceSplit())
  ck = _checkpoint(tmp_path, tok, {"bos_token": "<s>", "add_bos_token": False})
  assert ck.bos_id is None
  batch = BATCHES["overwrite"]
  tb = text.tokenize(batch, ck)
  assert (tb.token_start[:, 0] == 0).all() and (tb.token_end[:, 0] == 0).all()
  assert (tb.batch.context_end == CONTEXT_LEN - 1).all()
  assert (tb.batch.lengths == batch.lengths - 1).all()
  first = [_id_word(ck, i) for i in tb.batch.tokens[:, 0]]
  assert first == [NAMES.word(i) for i in batch.tokens[:, 1]]


def test_truncating_tokenizer_is_refused(whole):
  tok = tokenizers.Tokenizer.from_str(whole.tokenizer.to_str())
  tok.enable_truncation(16)
  ck = text.CheckpointTokenizer(tok, bos_id=whole.bos_id)
  with pytest.raises(ValueError, match="truncates or pads"):
    text.tokenize(BATCHES["needle"], ck)


def test_argument_types(whole):
  with pytest.raises(ValueError, match="critical"):
    text.tokenize(BATCHES["needle"], whole, critical="first")
  with pytest.raises(TypeError, match="CheckpointTokenizer"):
    text.tokenize(BATCHES["needle"], whole.tokenizer)
  with pytest.raises(TypeError, match="TaskBatch"):
    text.tokenize(BATCHES["needle"].tokens, whole)


# --------------------------------------------------------------------------
# Words chosen from the tokenizer's own vocabulary.


def test_words_from_tokenizer_are_single_tokens(tmp_path):
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  pseudo = sorted({"".join(rng.choice(letters, 6)) for _ in range(120)})
  tok = _train(
    [" ".join(pseudo)] * 20 + ["Query: -> unknown 1 2"] * 20,
    pre_tokenizers.ByteLevel(add_prefix_space=False),
    decoder=decoders.ByteLevel(),
  )
  ck = _checkpoint(tmp_path, tok, LLAMA_LIKE)
  vocab = tasks.Vocab(size=72, num_filler=16)  # 24 keys, 24 values
  words = text.Words.from_tokenizer(ck, vocab)
  assert words == text.Words.from_tokenizer(ck, vocab)  # deterministic
  chosen = words.keys + words.values + words.fillers
  assert all(len(tok.encode(" " + w).ids) == 1 for w in chosen)
  for task, params in (
    ("needle", {}),
    ("multihop", {"hops": 2}),
    ("mqar", {"num_pairs": 8}),
  ):
    batch = tasks.make_batch(
      task, 4, seed=1, context_len=48, vocab=vocab, **params
    )
    tb = text.tokenize(batch, ck, words=words)
    real = batch.tokens[:, 1:] != tasks.PAD
    width = (tb.token_end - tb.token_start)[:, 1:]
    # Every marker, key, value and filler is one token: positions shift by
    # the markers' extra tokens only.
    assert (
      (width == 1)
      | ~real
      | np.isin(batch.tokens[:, 1:], (tasks.QUERY, tasks.ARROW, tasks.UNKNOWN))
    ).all()
    assert tb.batch.critical_positions.shape == batch.critical_positions.shape
  with pytest.raises(ValueError, match="single-token lowercase words"):
    text.Words.from_tokenizer(ck, tasks.VOCAB)


# The pre-tokenizers of real checkpoints, on a corpus of made-up words.
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
  r"\s+(?!\S)|\s+"
)


def _family_tokenizer(family):
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  pseudo = sorted(
    {"".join(rng.choice(letters, rng.integers(4, 8))) for _ in range(700)}
  )
  corpus = [" ".join(pseudo)] * 10 + [" Query: -> unknown"] * 10
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True))
  alphabet = []
  if family == "llama3":  # regex split, then bytes
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  elif family == "metaspace":  # Mistral, newer SentencePiece conversions
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
  else:  # Llama 2's legacy conversion: no pre-tokenizer at all
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
  tok.train_from_iterator(
    corpus,
    tokenizers.trainers.BpeTrainer(
      vocab_size=3000,
      special_tokens=SPECIALS,
      initial_alphabet=alphabet,
      show_progress=False,
    ),
  )
  if family == "legacy":
    tok.normalizer = normalizers.Sequence(
      [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.pre_tokenizer = None
  return text.CheckpointTokenizer(tok, bos_id=tok.token_to_id("<s>"))


@pytest.mark.parametrize("family", ["llama3", "metaspace", "legacy"])
def test_tokenizer_families(family):
  ck = _family_tokenizer(family)
  words = text.Words.from_tokenizer(ck)

  def word_of(token_id):
    return ck.tokenizer.id_to_token(int(token_id)).lstrip("Ġ▁")

  for name in ("mqar", "multihop_k2", "abstention"):
    batch = BATCHES[name]
    tb = text.tokenize(batch, ck, words=words)
    new = tb.batch
    assert new.critical_positions.shape == batch.critical_positions.shape
    for b in range(batch.batch_size):
      c = batch.critical_positions[b][batch.critical_positions[b] >= 0]
      new_c = new.critical_positions[b][new.critical_positions[b] >= 0]
      assert [word_of(i) for i in new.tokens[b, new_c]] == [
        words.word(i) for i in batch.tokens[b, c]
      ]
      valid = batch.answer_positions[b] >= 0
      assert [word_of(i) for i in new.answers[b][valid]] == [
        words.word(i) for i in batch.answers[b][valid]
      ]
      # The question's tokens: its words' (`Query:` may be two) and at most
      # space-only tokens between them.
      spans = [
        np.arange(tb.token_start[b, p], tb.token_end[b, p])
        for p in np.flatnonzero(question_mask(batch)[b])
      ]
      covered = np.concatenate(spans)
      new_q = np.flatnonzero(question_mask(new)[b])
      assert set(covered) <= set(new_q)
      assert all(
        word_of(i) == ""
        for i in new.tokens[b, sorted(set(new_q) - set(covered))]
      )
      assert "".join(word_of(i) for i in new.tokens[b, covered]) == "".join(
        words.word(i) for i in batch.tokens[b, question_mask(batch)[b]]
      )
