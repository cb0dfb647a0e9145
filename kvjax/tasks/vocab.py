"""The small token vocabulary shared by every synthetic task.

Layout of the ids (default `VOCAB`, size 512)::

  0        PAD       right padding of a batch; never a target
  1        BOS       first token of every sequence
  2        QUERY     marks the start of the question (end of the context)
  3        ARROW     the assignment marker in a fact `key ARROW value`
  4        UNKNOWN   the answer when the queried key is not in the context
  5..7     reserved  (never generated)
  8..135   FILLER    haystack tokens; carry no facts
  136..323 KEY       first half of the key/value ids
  324..511 VALUE     second half of the key/value ids

The special ids (0..7) are fixed whatever the size; `Vocab` only moves the
filler, key and value ranges. Keys and values are two equal, disjoint halves
of the ids above the filler, as Zoology's MQAR draws keys from one half of
the vocabulary and values from the other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD = 0
BOS = 1
QUERY = 2
ARROW = 3
UNKNOWN = 4
NUM_SPECIAL = 8  # ids 5..7 are reserved so new markers keep old ids valid.

_SPECIAL_NAMES = {
  PAD: "<pad>",
  BOS: "<bos>",
  QUERY: "<q>",
  ARROW: "->",
  UNKNOWN: "<unk>",
}


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Id ranges of the synthetic vocabulary.

  Attributes:
    size: total number of ids (the model's V).
    num_filler: number of filler ids, starting right after the specials.
  """

  size: int = 512
  num_filler: int = 128

  def __post_init__(self):
    for name in ("size", "num_filler"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Vocab.{name} must be an int, got {value!r}.")
    if self.num_filler < 1:
      raise ValueError(f"Vocab.num_filler must be >= 1, got {self.num_filler}.")
    minimum = NUM_SPECIAL + self.num_filler + 2
    if self.size < minimum:
      raise ValueError(
        f"Vocab.size={self.size} leaves no key/value ids after "
        f"{NUM_SPECIAL} specials and num_filler={self.num_filler}: "
        f"need size >= {minimum}."
      )

  @property
  def filler_start(self) -> int:
    return NUM_SPECIAL

  @property
  def key_start(self) -> int:
    return NUM_SPECIAL + self.num_filler

  @property
  def num_keys(self) -> int:
    """Number of key ids; equal to the number of value ids."""
    return (self.size - self.key_start) // 2

  @property
  def num_values(self) -> int:
    return self.num_keys

  @property
  def value_start(self) -> int:
    return self.key_start + self.num_keys

  def is_filler(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.filler_start) & (ids < self.key_start)

  def is_key(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.key_start) & (ids < self.value_start)

  def is_value(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    value_end = self.value_start + self.num_values
    return (ids >= self.value_start) & (ids < value_end)

  def token_name(self, token_id: int) -> str:
    """Readable name of one id: `<bos>`, `->`, `K12`, `V3`, `f40`, ...

    Raises:
      ValueError: if `token_id` is outside [0, size).
    """
    token_id = int(token_id)
    if not 0 <= token_id < self.size:
      raise ValueError(
        f"token_id={token_id} is outside the vocabulary [0, {self.size})."
      )
    if token_id in _SPECIAL_NAMES:
      return _SPECIAL_NAMES[token_id]
    if token_id < NUM_SPECIAL:
      return f"<reserved{token_id}>"
    if token_id < self.key_start:
      return f"f{token_id - self.filler_start}"
    if token_id < self.value_start:
      return f"K{token_id - self.key_start}"
    if token_id < self.value_start + self.num_values:
      return f"V{token_id - self.value_start}"
    return f"<unused{token_id}>"


VOCAB = Vocab()


def render(
  token_ids,
  vocab: Vocab = VOCAB,
  *,
  collapse_filler: bool = True,
  strip_padding: bool = True,
) -> str:
  """Turns token ids into readable text for debugging.

  Example: `<bos> {filler x37} K12 -> V3 {filler x80} <q> K12 -> V3`.

  Args:
    token_ids: [T] or [B, T] integer ids.
    vocab: the vocabulary the ids come from.
    collapse_filler: write each run of filler tokens as `{filler xN}`
      instead of one `fI` per token.
    strip_padding: drop trailing PAD tokens.

  Returns:
    One line of space-separated names; for [B, T] input, one line per row.

  Raises:
    ValueError: if the ids are not 1-D or 2-D, or any id is out of range.
  """
  ids = np.asarray(token_ids)
  if ids.ndim == 2:
    return "\n".join(
      render(
        row, vocab, collapse_filler=collapse_filler, strip_padding=strip_padding
      )
      for row in ids
    )
  if ids.ndim != 1:
    raise ValueError(f"token_ids must be [T] or [B, T], got shape {ids.shape}.")
  ids = [int(i) for i in ids]
  if strip_padding:
    while ids and ids[-1] == PAD:
      ids.pop()
  words = []
  filler_run = 0
  for token_id in ids:
    if collapse_filler and vocab.is_filler(token_id):
      filler_run += 1
      continue
    if filler_run:
      words.append(f"{{filler x{filler_run}}}")
      filler_run = 0
    words.append(vocab.token_name(token_id))
  if filler_run:
    words.append(f"{{filler x{filler_run}}}")
  return " ".join(words)
