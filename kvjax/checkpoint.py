"""Save and restore (params, config) with orbax-checkpoint.

Layout of a checkpoint directory:
  config.json   the ModelConfig as JSON
  params/       an orbax StandardCheckpointer tree

Restoring builds the abstract parameter tree from the config, so dtypes and
shapes are checked against it and the round trip is exact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from kvjax.config import ModelConfig
from kvjax.model import param_shapes


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
    raise ValueError("params do not match config: expected "
                     f"{expected}, got {got}.")
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params)


def restore(path: str) -> tuple[ModelConfig, Any]:
  """Reads a checkpoint written by `save`; returns (config, params), the
  order of `kvjax.hf.load_pretrained`.

  Raises:
    ValueError: `path` is not a kvjax checkpoint.
  """
  path = os.path.abspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path!r} is not a kvjax checkpoint (no config.json).")
  with open(cfg_path) as f:
    config = ModelConfig.from_dict(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"),
                           param_shapes(config))
  return config, params
