"""Save and restore (params, config) with orbax-checkpoint.

Layout of a checkpoint directory:
  config.json   the ModelConfig as JSON
  params/       an orbax StandardCheckpointer tree
  files.json    size and CRC-32 of every file under params/ (written since
                this file existed; a checkpoint without it restores, with
                the integrity check skipped)

Restoring builds the abstract parameter tree from the stored config, so
dtypes and shapes are checked against it and the round trip is exact. Before
orbax reads anything, `restore` checks on its own that the files are whole
(`files.json`) and that the stored tree matches the config, so a removed,
truncated or altered file, or a config.json that does not describe the
params, raises one ValueError naming the path instead of an error from deep
inside orbax (and the asyncio noise of its abandoned reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from kvjax.config import ModelConfig
from kvjax.model import param_shapes

_MANIFEST = "files.json"
_MANIFEST_FORMAT = 1
# Fields that do not change the model: not compared by `restore(config=...)`.
_LABEL_FIELDS = ("name",)


def save(path: str, params: Any, config: ModelConfig) -> None:
  """Writes params and config to the directory `path` (must not exist).

  Raises:
    ValueError: `path` already exists, or params do not match the config.
  """
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise ValueError(f"checkpoint path {path!r} already exists.")
  expected = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(config))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if expected != got:
    raise ValueError(
      f"params do not match config: expected {expected}, got {got}."
    )
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params)
  # Written once orbax has finished, so it lists every file orbax wrote.
  manifest = {
    "format": _MANIFEST_FORMAT,
    "files": {
      rel: {"bytes": size, "crc32": crc}
      for rel, (size, crc) in _file_digests(path).items()
    },
  }
  with open(os.path.join(path, _MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)


def restore(
  path: str, config: ModelConfig | None = None
) -> tuple[ModelConfig, Any]:
  """Reads a checkpoint written by `save`.

  Args:
    path: the checkpoint directory.
    config: optional ModelConfig the caller expects; every field but `name`
      (a label) must equal the stored one.

  Returns:
    (config, params), the order of `kvjax.hf.load_pretrained`; `config` is
    the stored one.

  Raises:
    TypeError: `config` is not a ModelConfig.
    ValueError: `path` is not a kvjax checkpoint; its config.json is
      unreadable; `config` differs from the stored config (each differing
      field is named); a file under params/ is missing, truncated or altered
      (per files.json); the stored tree does not match config.json; or
      orbax cannot read the params.
  """
  path = os.path.abspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{path!r} is not a kvjax checkpoint (no config.json).")
  try:
    with open(cfg_path) as f:
      stored = ModelConfig.from_dict(json.load(f))
  except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError.
    raise ValueError(
      f"checkpoint {path!r}: config.json is not a valid "
      f"ModelConfig ({type(e).__name__}: {e})."
    ) from None
  if config is not None:
    if not isinstance(config, ModelConfig):
      raise TypeError(
        f"config must be a ModelConfig or None, got {type(config).__name__}."
      )
    diffs = [
      f"{f.name}: saved {getattr(stored, f.name)!r}, given "
      f"{getattr(config, f.name)!r}"
      for f in dataclasses.fields(ModelConfig)
      if f.name not in _LABEL_FIELDS
      and getattr(stored, f.name) != getattr(config, f.name)
    ]
    if diffs:
      raise ValueError(
        f"checkpoint {path!r} was saved with a different "
        f"config; differing fields: {'; '.join(diffs)}."
      )
  params_dir = os.path.join(path, "params")
  if not os.path.isdir(params_dir):
    raise ValueError(
      f"checkpoint {path!r} is incomplete: no params/ directory."
    )
  _check_files(path)
  expected = param_shapes(stored)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      item = ckptr.metadata(params_dir).item_metadata
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
        f"checkpoint {path!r} is corrupt or incomplete: orbax cannot read "
        f"the metadata of params/ ({_short(e)})."
      ) from None
    stored_tree = getattr(item, "tree", None)
    if stored_tree is None:
      raise ValueError(
        f"checkpoint {path!r} is corrupt or incomplete: "
        "params/ has no orbax tree metadata."
      )
    _check_tree(path, stored_tree, expected)
    try:
      params = ckptr.restore(params_dir, expected)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
        f"checkpoint {path!r} is corrupt or incomplete: orbax cannot read "
        f"params/ ({_short(e)})."
      ) from None
  return stored, params


# ----------------------------------------------------------------------------
# Checks run before orbax reads anything.


def _short(e: Exception, limit: int = 200) -> str:
  """The exception's type and first line, for a one-line message."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _file_digests(path: str) -> dict[str, tuple[int, int]]:
  """{path relative to `path`: (bytes, CRC-32)} of every file under params/."""
  out = {}
  root = os.path.join(path, "params")
  for dirpath, _, names in os.walk(root):
    for name in names:
      full = os.path.join(dirpath, name)
      out[os.path.relpath(full, path)] = (os.path.getsize(full), _crc32(full))
  return dict(sorted(out.items()))


def _crc32(filename: str) -> int:
  crc = 0
  with open(filename, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _check_files(path: str) -> None:
  """Compares the files under params/ with files.json (if there is one)."""
  manifest_path = os.path.join(path, _MANIFEST)
  if not os.path.exists(manifest_path):
    return  # Written before files.json existed: nothing to compare with.
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
    fmt = manifest["format"]
    files = {
      rel: (int(v["bytes"]), int(v["crc32"]))
      for rel, v in manifest["files"].items()
    }
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(
      f"checkpoint {path!r}: {_MANIFEST} is unreadable ({_short(e)})."
    ) from None
  if fmt != _MANIFEST_FORMAT:
    raise ValueError(
      f"checkpoint {path!r}: {_MANIFEST} has format {fmt!r}; "
      f"this kvjax reads format {_MANIFEST_FORMAT}."
    )
  problems = []
  for rel, (size, crc) in files.items():
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      problems.append(f"{rel} is missing")
      continue
    got = os.path.getsize(full)
    if got != size:
      problems.append(f"{rel} has {got} bytes, expected {size}")
    elif _crc32(full) != crc:
      problems.append(
        f"{rel} has the right size but different content (CRC-32 mismatch)"
      )
  if problems:
    raise ValueError(
      f"checkpoint {path!r} is corrupt or incomplete: {'; '.join(problems)}."
    )


def _check_tree(path: str, stored_tree: Any, expected: Any) -> None:
  """Compares orbax's stored leaves with the tree config.json implies."""

  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
      jax.tree_util.keystr(p, simple=True, separator="/"): (
        tuple(x.shape),
        str(x.dtype),
      )
      for p, x in leaves
    }

  try:
    got = flat(stored_tree)
  except AttributeError as e:  # A leaf without shape/dtype.
    raise ValueError(
      f"checkpoint {path!r}: params/ holds a tree that is not "
      f"a params tree ({_short(e)})."
    ) from None
  want = flat(expected)
  problems = [f"{k} is missing" for k in want if k not in got]
  problems += [f"{k} is not expected" for k in got if k not in want]
  problems += [
    f"{k} is {got[k][1]}{list(got[k][0])}, config.json implies "
    f"{want[k][1]}{list(want[k][0])}"
    for k in want
    if k in got and got[k] != want[k]
  ]
  if problems:
    raise ValueError(
      f"checkpoint {path!r}: params/ does not match its "
      f"config.json: {'; '.join(problems)}."
    )
