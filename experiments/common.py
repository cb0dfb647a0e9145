"""Helpers shared by the experiment mains."""

from __future__ import annotations

import sys

import jax

import kvjax
from kvjax import hf
from kvjax import pretrained


def load_model(spec: str, dtype: str = "float32"):
  """(config, params) of a shipped model name ("kvjax-tiny"), "hf:PATH" (a
  Hugging Face checkpoint directory) or "random:PRESET" (random weights of a
  `kvjax.config` preset, std 0.1; for plumbing tests).

  Raises:
    ValueError: any other spec.
  """
  if spec.startswith("hf:"):
    return hf.load_pretrained(spec[3:], dtype=dtype)
  if spec.startswith("random:"):
    config = kvjax.get_config(spec[len("random:") :]).replace(dtype=dtype)
    return config, kvjax.init_params(config, jax.random.key(0), std=0.1)
  if spec in pretrained.MODELS:
    return pretrained.load(spec, dtype=dtype)
  raise ValueError(
    f"model={spec!r}; allowed: {list(pretrained.MODELS)}, "
    "'hf:PATH', 'random:PRESET'."
  )


def check_config_overrides(argv: list[str], config) -> None:
  """Exits with one clear line when a `--config.<field>=...` flag names no
  field of `config` (ml_collections would fail deep in flag parsing)."""
  fields = set(config.keys())
  for arg in argv[1:]:
    if arg.startswith("--config."):
      name = arg[len("--config.") :].split("=", 1)[0].split(".", 1)[0]
      if name not in fields:
        sys.exit(
          f"error: --config.{name}: no such config field; allowed: "
          f"{', '.join(sorted(fields))}."
        )
