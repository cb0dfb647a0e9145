"""Models shipped inside the package, loadable without any network.

  config, params = kvjax.pretrained.load("kvjax-tiny")

`kvjax-tiny` is a small Llama-architecture decoder trained by
`experiments/train.py` on the synthetic task suite (`kvjax.tasks`); its
directory (`kvjax/assets/kvjax-tiny/`) holds Hugging Face `config.json` +
`model.safetensors` and `training.json`, the record of how it was trained
(command, config, steps, machine, wall time, held-out accuracy).
"""

from __future__ import annotations

import json
import os
from typing import Any

from kvjax import hf
from kvjax.config import ModelConfig

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# kvjax-tiny-spkv: kvjax-tiny fine-tuned with SP-KV write gates
# (`kvjax.compress.spkv`); its gate is `write_gate.safetensors`.
MODELS = ("kvjax-tiny", "kvjax-tiny-spkv")
GATE_FILE = "write_gate.safetensors"


def path(name: str) -> str:
  """The directory of shipped model `name`.

  Raises:
    ValueError: unknown name, or its files are missing from the install.
  """
  if name not in MODELS:
    raise ValueError(f"unknown pretrained model {name!r}; available: {MODELS}.")
  model_dir = os.path.join(ASSETS_DIR, name)
  if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
    raise ValueError(
      f"pretrained model {name!r} has no weights at "
      f"{model_dir!r}; is the package data installed?"
    )
  return model_dir


def load(
  name: str = "kvjax-tiny", dtype: str | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a shipped model; no network access.

  Args:
    name: one of `MODELS`.
    dtype: parameter dtype; default: the stored one (float32).

  Returns:
    (config, params), as `kvjax.hf.load_pretrained`; `config.name` is `name`.
    A gated model's params also hold its SP-KV gate, `params["write_gate"]`.

  Raises:
    ValueError: unknown name or missing files.
  """
  model_dir = path(name)
  config, params = hf.load_pretrained(model_dir, dtype=dtype)
  if os.path.exists(os.path.join(model_dir, GATE_FILE)):
    from kvjax.train import write_gate  # pylint: disable=g-import-not-at-top

    _, gated = write_gate.load_gated(model_dir)
    gate = {
      k: v.astype(config.jnp_dtype) for k, v in gated["write_gate"].items()
    }
    params = dict(params, write_gate=gate)
  return config.replace(name=name), params


def training_record(name: str = "kvjax-tiny") -> dict[str, Any]:
  """The `training.json` of a shipped model: how it was trained and scored.

  Raises:
    ValueError: unknown name or missing files.
  """
  with open(os.path.join(path(name), "training.json")) as f:
    return json.load(f)
