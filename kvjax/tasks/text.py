"""Task batches as text, tokenized by a real checkpoint's own tokenizer.

The generators write ids of kvjax's private vocabulary (`vocab.VOCAB`, 512
ids). A real checkpoint has its own vocabulary, where ids 0..511 are
arbitrary tokens, so its task batches are rendered as text first:

  render     every private id becomes one word (`Words`): keys, values and
             filler ids a word each, QUERY `Query:`, ARROW `->`, UNKNOWN
             `unknown`; every word of a row follows one space (the first
             too, so a word encodes the same wherever it stands).
  tokenize   the text is encoded by the checkpoint's `tokenizer.json` (the
             `tokenizers` library: no torch, no transformers, no network)
             and every position-bearing field of the `TaskBatch` is mapped
             through the character offsets of the tokens: a word's tokens
             are those whose offsets overlap its characters.

The result is a `TaskBatch` again, padded as the generators pad, so code
that evaluates a generator's batch evaluates the tokenized one unchanged.
What the mapping decides:

* BOS. The private BOS (position 0) becomes the checkpoint's BOS token id,
  prepended to the encoded text (`CheckpointTokenizer.bos_id`), never
  written as text. A checkpoint without one (Qwen) gets no BOS: position 0
  maps to no token and the sequence starts with the first context word.
* Answers are scored by their first token. `answer_positions` points at
  the first token of each answer word and `answers` holds that token's id,
  so `scoring.predictions_from_logits` reads the argmax one position
  earlier, as for private ids: what greedy decoding commits to first. The
  word's later tokens are teacher-forced targets: `loss_mask` is True at
  every token of an answer word, so `generators.question_mask` never
  counts them as question. For the first token to name the answer, the
  first tokens of every word that can be an answer (all keys, all values,
  `unknown`) must differ; `tokenize` checks that and raises otherwise
  (kvjax's `K12`/`V3` names fail it on Llama 3, whose ` V12` is ` V`+`12`:
  use `Words.from_tokenizer`, which picks single-token words).
* Critical positions of a word split into several tokens: `critical="all"`
  (the default) lists every token of every critical word, in order (C
  grows, -1 padded), so an eviction of any piece of a fact counts;
  `critical="last"` keeps one token per critical word, its last (the one
  that has read the whole word in a causal model), which keeps C and the
  (key, value) pair layout. With single-token words the two agree.
* Merges. A token whose characters overlap two words raises: no position
  may lose its own token. Words are separated by spaces, which the
  whitespace-splitting pre-tokenizers (Llama, Qwen, Mistral, GPT-2) never
  merge across. A word that gets no token, a character of a word that is
  in none of its tokens (dropped by a tokenizer without byte fallback), or
  a word encoded as a special or unknown token raises too. Tokens that
  cover only the separating spaces belong to no word: they stay in the
  row as teacher-forced text and no field points at them.
* Equal contexts. Rows whose context encodes to fewer tokens than the
  longest (or than `context_len`) get extra single-token filler words at
  the end of their context, just before the question, so `context_end` is
  the same in every row, as the generators guarantee and a batched prefill
  needs. Filler is noise by construction, so no fact moves relative to
  another. No single-token filler word, or a context longer than
  `context_len`, raises.
* Length. A row longer than the model's context (`max_len`, else the
  tokenizer's `model_max_length`) raises. Rows are right-padded with the
  checkpoint's pad id (0 if it has none) to the longest row or
  `total_len`; `lengths` marks the real tokens, so padding is never read.

Abstention: `TextBatch.unknown_id` is the token that scores UNKNOWN in the
tokenized batch. `scoring.score` compares predictions with the private
UNKNOWN id (4) for its abstention and hallucination rates, so those two
rates need that id passed in; accuracy (prediction == answer) is right as
it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tokenizers

from kvjax.tasks.generators import TaskBatch
from kvjax.tasks.vocab import ARROW, BOS, QUERY, UNKNOWN, VOCAB, Vocab

CRITICAL_MODES = ("all", "last")

# transformers writes this for "no limit" (int(1e30)); any such value means
# the tokenizer does not know the model's context.
_NO_LIMIT = 10**12


# --------------------------------------------------------------------------
# Words: the text of every private id.


@dataclasses.dataclass(frozen=True)
class Words:
  """The word every private id is rendered as.

  Words hold no whitespace and are pairwise distinct, so a text splits back
  into its ids. PAD and BOS have no word (PAD is never rendered, BOS is a
  token id); ids 5..7 are reserved and never generated.

  Attributes:
    vocab: the private vocabulary the words are for.
    fillers: [vocab.num_filler] words of the filler ids, in id order.
    keys: [vocab.num_keys] words of the key ids.
    values: [vocab.num_values] words of the value ids.
    query: the QUERY marker's word (the first question word).
    arrow: the ARROW marker's word.
    unknown: the UNKNOWN word, the abstention answer.
  """

  vocab: Vocab
  fillers: tuple[str, ...]
  keys: tuple[str, ...]
  values: tuple[str, ...]
  query: str = "Query:"
  arrow: str = "->"
  unknown: str = "unknown"

  def __post_init__(self):
    if not isinstance(self.vocab, Vocab):
      raise TypeError(f"vocab must be a kvjax.tasks.Vocab, got {self.vocab!r}.")
    for name, size in (
      ("fillers", self.vocab.num_filler),
      ("keys", self.vocab.num_keys),
      ("values", self.vocab.num_values),
    ):
      value = getattr(self, name)
      if isinstance(value, str):
        raise TypeError(
          f"Words.{name} must be a sequence of words, got a string."
        )
      object.__setattr__(self, name, tuple(value))
      if len(getattr(self, name)) != size:
        raise ValueError(
          f"Words.{name} has {len(getattr(self, name))} "
          f"words, the vocabulary needs {size}."
        )
    seen = set()
    for word in self.all_words:
      if not isinstance(word, str) or not word or word.split() != [word]:
        raise ValueError(
          f"every word must be a non-empty string without "
          f"whitespace, got {word!r}."
        )
      if word in seen:
        raise ValueError(
          f"word {word!r} is used twice: a text would not "
          "say which id it stands for."
        )
      seen.add(word)

  @property
  def all_words(self) -> tuple[str, ...]:
    """Markers, fillers, keys and values."""
    return (
      (self.query, self.arrow, self.unknown)
      + self.fillers
      + self.keys
      + self.values
    )

  @property
  def answer_words(self) -> tuple[str, ...]:
    """Every word that can be an answer: keys (a walk's steps), values and
    `unknown`."""
    return self.keys + self.values + (self.unknown,)

  @functools.cached_property
  def by_id(self) -> tuple[str | None, ...]:
    """[vocab.size] the word of every id; None where an id has none."""
    table = [None] * self.vocab.size
    table[QUERY], table[ARROW], table[UNKNOWN] = (
      self.query,
      self.arrow,
      self.unknown,
    )
    for start, words in (
      (self.vocab.filler_start, self.fillers),
      (self.vocab.key_start, self.keys),
      (self.vocab.value_start, self.values),
    ):
      table[start : start + len(words)] = words
    return tuple(table)

  def word(self, token_id: int) -> str:
    """The word of private id `token_id`.

    Raises:
      ValueError: an id outside the vocabulary or without a word (PAD, BOS,
        reserved, unused).
    """
    token_id = int(token_id)
    if not 0 <= token_id < self.vocab.size or self.by_id[token_id] is None:
      raise ValueError(
        f"private id {token_id} has no word: PAD and BOS are "
        "never rendered, ids 5..7 and ids past the values "
        f"are never generated (vocabulary of {self.vocab.size}"
        " ids)."
      )
    return self.by_id[token_id]

  @classmethod
  def names(cls, vocab: Vocab = VOCAB, **markers) -> Words:
    """kvjax's readable names (`vocab.token_name`): `f40`, `K12`, `V3`.

    Args:
      vocab: the private vocabulary.
      **markers: `query`, `arrow`, `unknown` overrides.
    """
    return cls(
      vocab,
      tuple(f"f{i}" for i in range(vocab.num_filler)),
      tuple(f"K{i}" for i in range(vocab.num_keys)),
      tuple(f"V{i}" for i in range(vocab.num_values)),
      **markers,
    )

  @classmethod
  def from_tokenizer(
    cls,
    tokenizer: CheckpointTokenizer,
    vocab: Vocab = VOCAB,
    *,
    min_chars: int = 4,
    **markers,
  ) -> Words:
    """Words that are one token each in `tokenizer`, deterministically.

    Candidates are the tokenizer's own word-initial pieces (`Ġword`,
    `▁word` or a bare `word`) that are lowercase ASCII letters of at least
    `min_chars` characters, in token-id order (roughly most frequent
    first); a candidate is kept if, written after a space as `tokenize`
    writes it, it encodes to exactly one token. Kept words go round-robin
    to keys, values and fillers, so no role gets only the rarest words.
    Every answer word is then one token with its own id.

    Args:
      tokenizer: the checkpoint's tokenizer.
      vocab: the private vocabulary.
      min_chars: shortest word considered (4 skips `the`, `and`, ...).
      **markers: `query`, `arrow`, `unknown` overrides.

    Returns:
      A `Words` for `vocab`.

    Raises:
      ValueError: the tokenizer has too few such words.
    """
    markers_only = cls.names(vocab, **markers)
    reserved = {markers_only.query, markers_only.arrow, markers_only.unknown}
    tok = _unwrap(tokenizer)
    candidates, seen = [], set()
    for piece, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
      word = piece[1:] if piece[:1] in ("Ġ", "▁") else piece
      if (
        len(word) >= min_chars
        and word.isascii()
        and word.isalpha()
        and word.islower()
        and word not in seen
        and word not in reserved
      ):
        seen.add(word)
        candidates.append(word)
    need = vocab.num_keys + vocab.num_values + vocab.num_filler
    chosen = []
    for i in range(0, len(candidates), 1024):
      chunk = candidates[i : i + 1024]
      counts = _probe(tok, markers_only.query, chunk)[0]
      chosen.extend(w for w, n in zip(chunk, counts) if n == 1)
      if len(chosen) >= need:
        break
    if len(chosen) < need:
      raise ValueError(
        f"the tokenizer has {len(chosen)} single-token lowercase words of "
        f">= {min_chars} letters, the vocabulary needs {need} (keys, "
        "values, fillers); lower min_chars or pass your own Words."
      )
    roles = {"keys": [], "values": [], "fillers": []}
    sizes = {
      "keys": vocab.num_keys,
      "values": vocab.num_values,
      "fillers": vocab.num_filler,
    }
    order = list(roles)
    turn = 0
    for word in chosen[:need]:
      while len(roles[order[turn % 3]]) == sizes[order[turn % 3]]:
        turn += 1
      roles[order[turn % 3]].append(word)
      turn += 1
    return cls(
      vocab,
      tuple(roles["fillers"]),
      tuple(roles["keys"]),
      tuple(roles["values"]),
      **markers,
    )


DEFAULT_WORDS = Words.names(VOCAB)


# --------------------------------------------------------------------------
# The checkpoint's tokenizer.


@dataclasses.dataclass(frozen=True, eq=False)
class CheckpointTokenizer:
  """A checkpoint's `tokenizer.json` and the special tokens it uses.

  Attributes:
    tokenizer: the `tokenizers.Tokenizer` (truncation and padding off).
    bos_id: the token prepended to every row, or None for no BOS.
    eos_id: the end-of-sequence token, if named (a stop token).
    pad_id: the padding token, if named.
    max_len: `model_max_length` of `tokenizer_config.json`, if it gives a
      real limit.
    path: the checkpoint directory it was read from.
  """

  tokenizer: tokenizers.Tokenizer = dataclasses.field(repr=False)
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  max_len: int | None = None
  path: str | None = None


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise TypeError(f"{path} must hold a JSON object.")
  return data


def _token_content(value) -> str | None:
  """A special token as the configs write it: a string, an AddedToken dict
  (`{"content": ...}`) or null."""
  if isinstance(value, dict):
    value = value.get("content")
  if value is not None and not isinstance(value, str):
    raise ValueError(
      f"a special token must be a string, an object with "
      f"'content' or null, got {value!r}."
    )
  return value


def _adds_bos(tok: tokenizers.Tokenizer, bos_id: int) -> bool:
  """Whether the tokenizer's own post-processor prepends `bos_id`."""
  ids = tok.encode("a", add_special_tokens=True).ids
  return bool(ids) and ids[0] == bos_id


def load_tokenizer(checkpoint_dir: str) -> CheckpointTokenizer:
  """Reads `<checkpoint_dir>/tokenizer.json` and its special tokens.

  Special tokens are named by `tokenizer_config.json` and
  `special_tokens_map.json` (`bos_token`, `eos_token`, `pad_token`), the
  latter winning where both name one, as transformers loads them. The BOS
  is used when one is named and `add_bos_token` says so; where the config
  does not say, when `tokenizer.json`'s own post-processor prepends it
  (Llama 3). A named BOS with `add_bos_token: false`, or none named (Qwen),
  means no BOS.

  Args:
    checkpoint_dir: a Hugging Face checkpoint directory.

  Returns:
    A `CheckpointTokenizer`.

  Raises:
    FileNotFoundError: the directory or its `tokenizer.json` is missing.
    ValueError: a named special token that the tokenizer does not have, or
      a malformed config value.
    TypeError: a config file that is not a JSON object.
  """
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"{checkpoint_dir!r} is not a directory.")
  path = os.path.join(checkpoint_dir, "tokenizer.json")
  if not os.path.exists(path):
    hint = ""
    if os.path.exists(os.path.join(checkpoint_dir, "tokenizer.model")):
      hint = (
        " It has a SentencePiece tokenizer.model, which kvjax does not "
        "read: save the fast tokenizer (tokenizer.json) with "
        "transformers once, elsewhere."
      )
    raise FileNotFoundError(
      f"{checkpoint_dir!r} has no tokenizer.json: its task batches cannot "
      f"be written in the checkpoint's vocabulary.{hint}"
    )
  tok = tokenizers.Tokenizer.from_file(path)
  tok.no_truncation()
  tok.no_padding()
  config = _read_json(os.path.join(checkpoint_dir, "tokenizer_config.json"))
  special = dict(config)
  special.update(
    _read_json(os.path.join(checkpoint_dir, "special_tokens_map.json"))
  )

  def token_id(name):
    content = _token_content(special.get(name))
    if content is None:
      return None
    token = tok.token_to_id(content)
    if token is None:
      raise ValueError(
        f"{name}={content!r} is named by the configs of "
        f"{checkpoint_dir!r} but tokenizer.json has no such "
        "token."
      )
    return token

  bos_id = token_id("bos_token")
  if bos_id is not None:
    add = config.get("add_bos_token")
    if add is None:
      add = _adds_bos(tok, bos_id)
    if not isinstance(add, bool):
      raise ValueError(f"add_bos_token must be true or false, got {add!r}.")
    bos_id = bos_id if add else None
  max_len = config.get("model_max_length")
  if not isinstance(max_len, (int, float)) or max_len >= _NO_LIMIT:
    max_len = None
  return CheckpointTokenizer(
    tok,
    bos_id=bos_id,
    eos_id=token_id("eos_token"),
    pad_id=token_id("pad_token"),
    max_len=None if max_len is None else int(max_len),
    path=checkpoint_dir,
  )


def _unwrap(tokenizer) -> tokenizers.Tokenizer:
  if isinstance(tokenizer, CheckpointTokenizer):
    return tokenizer.tokenizer
  raise TypeError(
    f"tokenizer must be a CheckpointTokenizer (see "
    f"load_tokenizer), got {type(tokenizer).__name__}."
  )


# --------------------------------------------------------------------------
# Words -> tokens through character offsets.


def _join(words: Sequence[str]) -> str:
  """The text of `words`: each after a space, the first one too, so a word
  encodes the same wherever it stands."""
  return "".join(" " + word for word in words)


def _char_spans(words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """[W] start and end characters of `words` in `_join(words)`."""
  sizes = np.fromiter((len(w) for w in words), np.int64, len(words))
  ends = np.cumsum(sizes + 1)
  return ends - sizes, ends


def _forbidden_ids(tok: tokenizers.Tokenizer) -> dict[int, str]:
  """Tokens a word must never become: special added tokens and the model's
  unknown token (both lose what the word said)."""
  out = {
    i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special
  }
  unk = getattr(tok.model, "unk_token", None)
  if unk is not None and tok.token_to_id(unk) is not None:
    out[tok.token_to_id(unk)] = unk
  return out


def _word_tokens(
  encoding,
  words: Sequence[str],
  text: str,
  forbidden: dict[int, str],
  where: str,
) -> tuple[np.ndarray, np.ndarray]:
  """[W] first token and one past the last token of every word of `text`.

  A token belongs to the words its character offsets overlap: none (it
  covers spaces only), one, or more (a merge across words, which raises).

  Raises:
    ValueError: a merge across words, a word without a token, tokens out
      of order, or a word encoded as a special or unknown token.
  """
  starts, ends = _char_spans(words)
  offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
  t0, t1 = offsets[:, 0], offsets[:, 1]
  # First word ending after the token starts, last word starting before it
  # ends: the words the token overlaps.
  lo = np.searchsorted(ends, t0, side="right")
  hi = np.searchsorted(starts, t1, side="left") - 1
  merged = np.flatnonzero(lo < hi)
  if merged.size:
    t = int(merged[0])
    raise ValueError(
      f"{where}: token {encoding.tokens[t]!r} (characters "
      f"{t0[t]}..{t1[t]}) spans the words {words[lo[t]]!r} and "
      f"{words[lo[t] + 1]!r}: those positions would share one token. "
      "The tokenizer merges across spaces; use one that splits on "
      "whitespace or other words."
    )
  owner = np.where(lo == hi, lo, -1)  # [num_tokens] word index or -1
  owned = owner[owner >= 0]
  if np.any(np.diff(owned) < 0):
    raise ValueError(f"{where}: the tokens' offsets are out of order.")
  count = np.bincount(owned, minlength=len(words))
  if np.any(count == 0):
    w = int(np.argmin(count))
    raise ValueError(
      f"{where}: the word {words[w]!r} got no token (are "
      "its characters unknown to the tokenizer, or was the "
      "text truncated?)."
    )
  index = np.flatnonzero(owner >= 0)
  first = np.full(len(words), len(owner), np.int64)
  np.minimum.at(first, owned, index)
  last = np.full(len(words), -1, np.int64)
  np.maximum.at(last, owned, index)
  # Every character of a word is in one of its tokens: a tokenizer without
  # byte fallback drops characters it cannot encode.
  gap = (t0[index[1:]] > t1[index[:-1]]) & (owned[1:] == owned[:-1])
  uncovered = (t0[first] > starts) | (t1[last] < ends)
  if gap.any() or uncovered.any():
    w = int(owned[1:][gap][0]) if gap.any() else int(np.argmax(uncovered))
    raise ValueError(
      f"{where}: characters of the word {words[w]!r} are in "
      "none of its tokens (did the tokenizer drop characters "
      "it cannot encode?)."
    )
  ids = np.asarray(encoding.ids, np.int64)
  bad = np.flatnonzero(np.isin(ids, list(forbidden)) & (owner >= 0))
  if bad.size:
    t = int(bad[0])
    raise ValueError(
      f"{where}: the word {words[owner[t]]!r} became the "
      f"special or unknown token {forbidden[int(ids[t])]!r}, "
      "which loses what it said; choose other words."
    )
  return first, last + 1


def _probe(
  tok: tokenizers.Tokenizer, lead: str, words: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  """Tokens of `words` as a row writes them (after a space, behind `lead`).

  Returns:
    count: [W] tokens a word adds to a row: its own and any space-only
      tokens before it.
    first_id: [W] id of each word's first token.
  """
  probe = [lead, *words]
  text = _join(probe)
  encoding = tok.encode(text, add_special_tokens=False)
  first, end = _word_tokens(
    encoding, probe, text, _forbidden_ids(tok), "word table"
  )
  first_id = np.asarray(encoding.ids, np.int64)[first]
  return np.diff(end), first_id[1:]


def _first_ids(tok: tokenizers.Tokenizer, words: Words) -> np.ndarray:
  """[vocab.size] first token id of every word, -1 for ids without one.

  Raises:
    ValueError: an answer word (key, value, `unknown`) shares its first
      token with another word, so a first-token score would take one for
      the other.
  """
  vocab = words.vocab
  ids = np.concatenate(
    [
      [QUERY, ARROW, UNKNOWN],
      np.arange(vocab.num_filler) + vocab.filler_start,
      np.arange(vocab.num_keys) + vocab.key_start,
      np.arange(vocab.num_values) + vocab.value_start,
    ]
  ).astype(np.int64)
  all_words = words.all_words  # the same order
  _, first_id = _probe(tok, words.query, all_words)
  is_answer = vocab.is_key(ids) | vocab.is_value(ids) | (ids == UNKNOWN)
  _, inverse, counts = np.unique(
    first_id, return_inverse=True, return_counts=True
  )
  shared = np.flatnonzero(is_answer & (counts[inverse] > 1))
  if shared.size:
    i = int(shared[0])
    j = int(next(k for k in np.flatnonzero(first_id == first_id[i]) if k != i))
    raise ValueError(
      f"the answer word {all_words[i]!r} and the word {all_words[j]!r} "
      f"both start with the token {tok.id_to_token(int(first_id[i]))!r}: "
      "answers are scored by their first token, which could not tell "
      "them apart. Use words whose first tokens differ, e.g. "
      "Words.from_tokenizer(tokenizer)."
    )
  table = np.full(vocab.size, -1, np.int64)
  table[ids] = first_id
  return table


def _single_token_fillers(
  tok: tokenizers.Tokenizer, words: Words
) -> tuple[str, ...]:
  count, _ = _probe(tok, words.query, words.fillers)
  return tuple(w for w, n in zip(words.fillers, count) if n == 1)


# --------------------------------------------------------------------------
# Rendering and tokenizing a batch.


class TextBatch(NamedTuple):
  """A task batch in a checkpoint's vocabulary, and how it was made.

  Attributes:
    batch: the `TaskBatch` in the checkpoint's token ids.
    texts: [B] the text encoded for each row (BOS is a token, not text;
      context padding included).
    token_start: [B, T0] first token of each original position (T0 the
      original batch's T); equal to `token_end` where the position has no
      token (a BOS the checkpoint does not use), -1 past `lengths`.
    token_end: [B, T0] one past the last token of each original position.
    unknown_id: the token id that scores UNKNOWN (the first token of the
      `unknown` word); pass it where scoring needs the abstention answer.
  """

  batch: TaskBatch
  texts: tuple[str, ...]
  token_start: np.ndarray
  token_end: np.ndarray
  unknown_id: int


def _row_words(batch: TaskBatch, b: int, words: Words) -> list[str]:
  """Words of row b's positions 1..lengths-1 (position 0 is the BOS)."""
  length = int(batch.lengths[b])
  ids = batch.tokens[b, :length]
  if length < 1 or ids[0] != BOS:
    raise ValueError(f"row {b} does not start with BOS (id {BOS}).")
  return [words.word(i) for i in ids[1:]]


def render(batch: TaskBatch, words: Words = DEFAULT_WORDS) -> list[str]:
  """The text of every row: the words of its ids after BOS, space-joined.

  Example: ` f3 f9 K12 -> V3 f40 Query: K12 -> V3` (every word after a
  space). BOS is not written (it is a token id of the checkpoint) and
  neither is padding. `tokenize` may
  add filler before the question to equalize contexts (see the module
  docstring); `TextBatch.texts` holds what it encoded.

  Args:
    batch: a TaskBatch of private ids.
    words: the word of every id.

  Returns:
    [B] strings.

  Raises:
    ValueError: a row not starting with BOS, or an id without a word (PAD
      or BOS inside a row, reserved ids, ids outside `words.vocab`).
  """
  _check_batch(batch)
  return [_join(_row_words(batch, b, words)) for b in range(batch.batch_size)]


def _check_batch(batch):
  if not isinstance(batch, TaskBatch):
    raise TypeError(f"batch must be a TaskBatch, got {type(batch).__name__}.")


def _check_size(name, value):
  if value is None:
    return None
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or (value < 1)
  ):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
  return int(value)


def tokenize(
  batch: TaskBatch,
  tokenizer: CheckpointTokenizer,
  *,
  words: Words = DEFAULT_WORDS,
  critical: str = "all",
  context_len: int | None = None,
  total_len: int | None = None,
  max_len: int | None = None,
) -> TextBatch:
  """Renders `batch` as text and encodes it with the checkpoint's tokenizer.

  Every position-bearing field is mapped through the tokens' character
  offsets (see the module docstring for BOS, answers, critical positions,
  merges and padding).

  Args:
    batch: a TaskBatch of private ids (any generator, mixture or
      concatenation; every row starts with BOS).
    tokenizer: from `load_tokenizer`.
    words: the word of every private id; its answer words must have
      distinct first tokens (`Words.from_tokenizer` gives such words).
    critical: "all" (every token of a critical word) or "last" (its last
      token only, one per critical position).
    context_len: context tokens of every row (BOS included); None: the
      longest row's.
    total_len: T of the result; None: the longest row.
    max_len: the model's context; None: the tokenizer's `model_max_length`
      (no check if it has none).

  Returns:
    A `TextBatch` whose `batch` has the generators' layout in the
    checkpoint's ids.

  Raises:
    ValueError: a token spanning two words, a word without a token or
      encoded as a special/unknown token, answer words sharing a first
      token, a row longer than `context_len`, `total_len` or `max_len`,
      no single-token filler word when contexts need equalizing, an id
      without a word, a bad `critical`.
    TypeError: batch or tokenizer of the wrong type.
  """
  _check_batch(batch)
  tok = _unwrap(tokenizer)
  if critical not in CRITICAL_MODES:
    raise ValueError(f"critical={critical!r} is not one of {CRITICAL_MODES}.")
  context_len = _check_size("context_len", context_len)
  total_len = _check_size("total_len", total_len)
  max_len = _check_size("max_len", max_len)
  if max_len is None:
    max_len = tokenizer.max_len
  if tok.truncation is not None or tok.padding is not None:
    raise ValueError(
      "the tokenizer truncates or pads, which would cut or "
      "shift rows; call no_truncation() and no_padding() "
      "(load_tokenizer does)."
    )
  forbidden = _forbidden_ids(tok)
  if tokenizer.bos_id is not None:
    forbidden.setdefault(tokenizer.bos_id, tok.id_to_token(tokenizer.bos_id))
  first_of = _first_ids(tok, words)
  n_bos = int(tokenizer.bos_id is not None)
  B, T0 = batch.tokens.shape

  rows = [_row_words(batch, b, words) for b in range(B)]
  # origin[b][w]: the original position of word w (-1: context padding).
  origins = [np.arange(1, len(r) + 1) for r in rows]
  query = [int(batch.context_end[b]) - 1 for b in range(B)]  # word index
  for b in range(B):
    if not 0 <= query[b] < len(rows[b]):
      raise ValueError(
        f"row {b}: context_end={batch.context_end[b]} is not "
        "a position of the row."
      )

  def encode(indices):
    texts = [_join(rows[b]) for b in indices]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    out = {}
    for b, text, encoding in zip(indices, texts, encodings):
      first, end = _word_tokens(encoding, rows[b], text, forbidden, f"row {b}")
      out[b] = (text, encoding, first, end)
    return out

  encoded = encode(range(B))
  context = np.array([n_bos + encoded[b][2][query[b]] for b in range(B)])
  target = int(context.max()) if context_len is None else context_len
  if context.max() > target:
    b = int(np.argmax(context))
    raise ValueError(
      f"row {b}'s context is {context[b]} tokens, more than "
      f"context_len={target}."
    )
  short = [b for b in range(B) if context[b] < target]
  if short:
    pads = _single_token_fillers(tok, words)
    if not pads:
      raise ValueError(
        "rows encode their contexts to different numbers of "
        "tokens and no filler word is a single token to "
        "equalize them with; choose words with one."
      )
    for b in short:
      extra = target - int(context[b])
      padding = [pads[i % len(pads)] for i in range(extra)]
      rows[b][query[b] : query[b]] = padding
      origins[b] = np.concatenate(
        [
          origins[b][: query[b]],
          np.full(extra, -1, np.int64),
          origins[b][query[b] :],
        ]
      )
      query[b] += extra
    encoded.update(encode(short))
    for b in short:
      got = n_bos + int(encoded[b][2][query[b]])
      if got != target:
        raise ValueError(
          f"row {b}: padding the context with single-token "
          f"filler gave {got} tokens, not {target} (the "
          "tokenizer encodes words depending on context)."
        )

  lengths = np.array([n_bos + len(encoded[b][1].ids) for b in range(B)])
  longest = int(lengths.max())
  if max_len is not None and longest > max_len:
    b = int(np.argmax(lengths))
    raise ValueError(
      f"row {b} is {longest} tokens, longer than the model's "
      f"context max_len={max_len}; use a shorter context_len."
    )
  T = longest if total_len is None else total_len
  if longest > T:
    raise ValueError(
      f"row {int(np.argmax(lengths))} is {longest} tokens, "
      f"more than total_len={T}."
    )

  pad_id = 0 if tokenizer.pad_id is None else tokenizer.pad_id
  tokens = np.full((B, T), pad_id, np.int32)
  loss_mask = np.zeros((B, T), bool)
  token_start = np.full((B, T0), -1, np.int32)
  token_end = np.full((B, T0), -1, np.int32)
  answer_positions = np.full(batch.answer_positions.shape, -1, np.int32)
  answers = np.full(batch.answers.shape, pad_id, np.int32)
  critical_rows = []
  for b in range(B):
    _, encoding, first, after = encoded[b]
    length = int(lengths[b])
    if n_bos:
      tokens[b, 0] = tokenizer.bos_id
    tokens[b, n_bos:length] = encoding.ids
    kept = origins[b] >= 0
    token_start[b, 0], token_end[b, 0] = 0, n_bos
    token_start[b, origins[b][kept]] = first[kept] + n_bos
    token_end[b, origins[b][kept]] = after[kept] + n_bos
    start, end = token_start[b], token_end[b]
    for p in np.flatnonzero(batch.loss_mask[b, : batch.lengths[b]]):
      loss_mask[b, start[p] : end[p]] = True
    for a in np.flatnonzero(batch.answer_positions[b] >= 0):
      p = int(batch.answer_positions[b, a])
      token_id = int(tokens[b, start[p]])
      expected = first_of[batch.tokens[b, p]]
      if not (
        words.vocab.is_key(batch.tokens[b, p])
        or words.vocab.is_value(batch.tokens[b, p])
        or batch.tokens[b, p] == UNKNOWN
      ):
        raise ValueError(
          f"row {b}: answer {a} is the private id "
          f"{batch.tokens[b, p]}, not a key, value or "
          "UNKNOWN."
        )
      if token_id != expected:
        raise ValueError(
          f"row {b}: the answer {words.word(batch.tokens[b, p])!r} starts "
          f"with token {token_id} in the row but {expected} alone: the "
          "tokenizer encodes it depending on context, so its first "
          "token would not identify it."
        )
      answer_positions[b, a] = start[p]
      answers[b, a] = token_id
    positions = batch.critical_positions[b]
    positions = positions[positions >= 0]
    if critical == "all":
      critical_rows.append(
        np.concatenate(
          [np.arange(start[p], end[p]) for p in positions]
          + [np.zeros(0, np.int64)]
        )
      )
    else:
      critical_rows.append(end[positions] - 1)
  width = max([len(c) for c in critical_rows] + [0])
  critical_positions = np.full((B, width), -1, np.int32)
  for b, c in enumerate(critical_rows):
    critical_positions[b, : len(c)] = c

  answer_start = np.where(
    batch.answer_start >= 0,
    token_start[np.arange(B), np.maximum(batch.answer_start, 0)],
    -1,
  )
  out = TaskBatch(
    tokens=tokens,
    lengths=lengths.astype(np.int32),
    context_end=np.full(B, target, np.int32),
    answer_start=answer_start.astype(np.int32),
    answer_positions=answer_positions,
    answers=answers,
    loss_mask=loss_mask,
    critical_positions=critical_positions,
    task_ids=np.asarray(batch.task_ids, np.int32).copy(),
  )
  return TextBatch(
    out,
    tuple(encoded[b][0] for b in range(B)),
    token_start,
    token_end,
    int(first_of[UNKNOWN]),
  )


def tokenized_batch(
  batch: TaskBatch, tokenizer: CheckpointTokenizer, **kwargs
) -> TaskBatch:
  """`tokenize(batch, tokenizer, **kwargs).batch`: the batch in the
  checkpoint's ids, for code that takes a generator's batch."""
  return tokenize(batch, tokenizer, **kwargs).batch
