"""The tokens a sweep feeds the model: kvjax's private task ids, or the task
batches written as text and encoded by the checkpoint's own tokenizer.

`config.tokens` says which:
  auto  "text" for an `hf:PATH` model, "raw" for kvjax-tiny and
        `random:PRESET` (trained on, or made for, the private ids);
  text  every task batch is rendered and tokenized with PATH's
        `tokenizer.json` (`kvjax.tasks.text`): critical positions,
        question spans and answers are mapped through the tokens' offsets,
        and abstention is the first token of the word `unknown`. Only for
        `hf:PATH`;
  raw   the private ids (0..511) as token ids. On a real checkpoint they
        are arbitrary tokens, so this is refused unless asked for
        explicitly, and then logged as a warning and written in every row
        (`"tokens": "raw"`).

An `hf:PATH` model without `tokenizer.json` is refused under "auto" and
"text" before anything runs. The words every private id is written as are
`Words.from_tokenizer` (one token each, chosen from the tokenizer's own
vocabulary), so a text batch has the layout of the private one wherever
the checkpoint uses a BOS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from absl import logging
import numpy as np

from kvjax.tasks import text
from kvjax.tasks import vocab
from kvjax.tasks.generators import TaskBatch
from kvjax.train import data as data_lib

MODES = ("auto", "text", "raw")
RAW, TEXT = "raw", "text"
# The files that decide how a checkpoint tokenizes (its identity).
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
)


def checkpoint_dir(model: str) -> str | None:
  """The directory of an `hf:PATH` model spec; None for any other model."""
  return model[len("hf:") :] if model.startswith("hf:") else None


def resolve(cfg) -> str:
  """The tokens `cfg` runs on, "text" or "raw", checked.

  Raises:
    ValueError: `config.tokens` not one of `MODES`; "text" for a model
      that is not `hf:PATH`; an `hf:PATH` that is no directory; or (under
      "auto" and "text") an `hf:PATH` without `tokenizer.json`.
  """
  mode = cfg.tokens
  if mode not in MODES:
    raise ValueError(f"config.tokens={mode!r}; allowed: {', '.join(MODES)}.")
  path = checkpoint_dir(cfg.model)
  if path is None:
    if mode == TEXT:
      raise ValueError(
        f"config.tokens='text' needs an hf:PATH model (its "
        f"tokenizer.json); config.model={cfg.model!r} reads kvjax's "
        "private task ids: use config.tokens=auto or raw."
      )
    return RAW
  if not os.path.isdir(path):
    raise ValueError(
      f"config.model={cfg.model!r}: {path!r} is not a directory."
    )
  if mode == RAW:
    return RAW
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    hint = ""
    if os.path.exists(os.path.join(path, "tokenizer.model")):
      hint = (
        " (It has a SentencePiece tokenizer.model, which kvjax does "
        "not read: save the fast tokenizer.json with transformers "
        "once.)"
      )
    raise ValueError(
      f"config.model={cfg.model!r}: {path!r} has no tokenizer.json, so "
      "the tasks cannot be written in the checkpoint's vocabulary, and "
      "kvjax's private task ids would be arbitrary tokens to it."
      + hint
      + " Add the checkpoint's tokenizer.json, or pass "
      "--config.tokens=raw to run on the raw ids anyway (every row then "
      "says tokens=raw)."
    )
  return TEXT


def fingerprint(path: str) -> str:
  """A hash of the tokenizer files of checkpoint directory `path` (those of
  `TOKENIZER_FILES` it has): rows computed with another tokenizer, or
  other special tokens, never count as done."""
  digest = hashlib.sha1()
  for name in TOKENIZER_FILES:
    file = os.path.join(path, name)
    if os.path.exists(file):
      digest.update(name.encode())
      with open(file, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class Tokens:
  """How a sweep's task batches become the model's tokens.

  Attributes:
    mode: "text" or "raw" (`config.tokens` resolved).
    tokenizer: the checkpoint's tokenizer ("text"), else None.
    words: the word of every private id ("text"), else None.
    fingerprint: hash of the tokenizer files ("text"), else None.
  """

  mode: str
  tokenizer: text.CheckpointTokenizer | None = None
  words: text.Words | None = None
  fingerprint: str | None = None

  def describe(self) -> str:
    """One line saying what the model reads."""
    if self.mode == TEXT:
      return (
        f"tokens text (tasks rendered as words, encoded by "
        f"{self.tokenizer.path}/tokenizer.json, {self.fingerprint})"
      )
    return "tokens raw (kvjax's private task ids)"

  def row_fields(self) -> dict[str, str]:
    """What every row records of its tokens."""
    if self.mode == TEXT:
      return dict(tokens=TEXT, tokenizer=self.fingerprint)
    return dict(tokens=RAW)


def load(cfg) -> Tokens:
  """The `Tokens` of `cfg`: for "text" the checkpoint's tokenizer and one
  word per private id; raw ids on an `hf:PATH` model log a warning.

  Raises:
    ValueError: a config `resolve` refuses, or a tokenizer with too few
      single-token words to write the tasks with.
  """
  mode = resolve(cfg)
  path = checkpoint_dir(cfg.model)
  if mode == RAW:
    if path is not None:
      logging.warning(
        "config.tokens=raw on %s: kvjax's private task ids 0..%d are fed "
        "as the checkpoint's token ids, which are arbitrary tokens to it. "
        "Accuracy, hallucination and every other number of this sweep "
        "say nothing about how the model reads text; every row says "
        "tokens=raw.",
        cfg.model,
        vocab.VOCAB.size - 1,
      )
    return Tokens(RAW)
  tokenizer = text.load_tokenizer(path)
  try:
    words = text.Words.from_tokenizer(tokenizer)
  except ValueError as e:
    raise ValueError(f"config.model={cfg.model!r}: {e}") from None
  return Tokens(TEXT, tokenizer, words, fingerprint(path))


def _pad(batch: TaskBatch, width: int, pad_id: int) -> TaskBatch:
  """Right-pads tokens (with `pad_id`) and loss_mask to `width`."""
  pad = width - batch.tokens.shape[1]
  return batch._replace(
    tokens=np.pad(batch.tokens, ((0, 0), (0, pad)), constant_values=pad_id),
    loss_mask=np.pad(batch.loss_mask, ((0, 0), (0, pad))),
  )


def prepare(
  tokens: Tokens, batch: TaskBatch, config, width: int
) -> tuple[TaskBatch, int, text.TextBatch | None]:
  """A generator's batch as the model reads it, padded to `width` tokens
  (or its own length if longer).

  Args:
    tokens: from `load`.
    batch: a `TaskBatch` of private ids, from `generators.make_batch`.
    config: the model's `ModelConfig` (vocabulary and context checks).
    width: the padded length every task shares where it can (one shape:
      one compiled program).

  Returns:
    (batch, unknown, text_batch): the batch in the model's ids, the id of
    the abstention answer in them, and the `TextBatch` ("text"; None for
    "raw").

  Raises:
    ValueError: raw ids past the model's vocabulary; for "text", what
      `text.tokenize` refuses (a row longer than the model's context, a
      merge across words, ...) or a token id past the model's vocabulary.
  """
  if tokens.mode == RAW:
    if config.vocab_size < vocab.VOCAB.size:
      raise ValueError(
        f"model vocab_size {config.vocab_size} < the task "
        f"vocabulary {vocab.VOCAB.size}."
      )
    return (
      data_lib.pad_batch(batch, max(width, batch.tokens.shape[1])),
      vocab.UNKNOWN,
      None,
    )
  tb = text.tokenize(
    batch,
    tokens.tokenizer,
    words=tokens.words,
    max_len=config.max_position_embeddings,
  )
  out = tb.batch
  largest = max(int(out.tokens.max()), tb.unknown_id)
  if largest >= config.vocab_size:
    raise ValueError(
      f"the tokenizer gave token id {largest}, past the "
      f"model's vocab_size {config.vocab_size}: "
      "tokenizer.json is not this checkpoint's."
    )
  pad_id = 0 if tokens.tokenizer.pad_id is None else tokens.tokenizer.pad_id
  return (_pad(out, max(width, out.tokens.shape[1]), pad_id), tb.unknown_id, tb)
