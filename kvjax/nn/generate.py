"""Prefill, decode and generation for a `Decoder`.

These run kvjax's own jitted entries (`kvjax.prefill`, `kvjax.decode`,
`kvjax.generate`) on the decoder's params: `Decoder.to_params` hands over
the decoder's arrays without a copy, and the decoder computes
`kvjax.forward` op for op, so there is one definition of the prompt pass,
the compression (reserve, decode-time transforms) and the decode loop.
Every keyword argument of those entries works here (transform, capacity,
sampling, stop token, backend, ...); a transform is a static, hashable
value, so a freshly built equal one compiles nothing new. The entries only
check on the host what is concrete, so they also run inside a caller's own
`nnx.jit` (then the overflow flag, `kvjax.cache.cache_overflowed`, is the
caller's to read).
"""

from __future__ import annotations

from typing import Any

import jax

# `kvjax.generate` is the function; the module's entries by name:
from kvjax.generate import DecodeOutput, GenerateOutput, PrefillOutput
from kvjax.generate import decode as _decode
from kvjax.generate import generate as _generate
from kvjax.generate import prefill as _prefill
from kvjax.cache import KVCache
from kvjax.nn.decoder import Decoder

Array = jax.Array


def _params_of(decoder, kwargs: dict[str, Any], entry: str):
  if not isinstance(decoder, Decoder):
    raise TypeError(
      f"{entry}: decoder must be a kvjax.nn.Decoder, got "
      f"{type(decoder).__name__}."
    )
  for name in ("params", "config"):
    if name in kwargs:
      raise TypeError(
        f"{entry}: {name} comes from the decoder; do not pass {name}=."
      )
  return decoder.to_params()


def prefill(decoder: Decoder, tokens: Array, **kwargs) -> PrefillOutput:
  """`kvjax.prefill` with the decoder's weights: runs the prompt through an
  empty cache, then compresses it with `transform=` (if given).

  Args:
    decoder: the `Decoder`.
    tokens: [B, T] right-padded prompt tokens.
    **kwargs: the keyword arguments of `kvjax.prefill` (`transform`,
      `prompt_lengths`, `capacity`, `decode_steps`, `backend`, ...).

  Returns:
    A `PrefillOutput` (logits [B, T, V], cache).

  Raises:
    TypeError: `decoder` is not a `Decoder`, or `params`/`config` given;
      and whatever `kvjax.prefill` raises for its arguments.
  """
  params = _params_of(decoder, kwargs, "prefill")
  return _prefill(params, tokens, config=decoder.config, **kwargs)


def decode(
  decoder: Decoder, cache: KVCache, token: Array, **kwargs
) -> DecodeOutput:
  """`kvjax.decode` with the decoder's weights: feeds `token` [B], then
  generates `max_new_tokens=` per row from `cache` (e.g. from `prefill`).

  Raises:
    TypeError: `decoder` is not a `Decoder`, or `params`/`config` given;
      and whatever `kvjax.decode` raises for its arguments.
  """
  params = _params_of(decoder, kwargs, "decode")
  return _decode(params, cache, token, config=decoder.config, **kwargs)


def generate(
  decoder: Decoder, prompt_tokens: Array, **kwargs
) -> GenerateOutput:
  """`kvjax.generate` with the decoder's weights: prefill, compress with
  `transform=` (if given), then a jitted `lax.while_loop` decode.

  Args:
    decoder: the `Decoder`.
    prompt_tokens: [B, T] right-padded prompts.
    **kwargs: the keyword arguments of `kvjax.generate`
      (`max_new_tokens`, `prompt_lengths`, `transform`, `temperature`,
      `stop_token`, `capacity`, `backend`, ...).

  Returns:
    A `kvjax.GenerateOutput`.

  Raises:
    TypeError: `decoder` is not a `Decoder`, or `params`/`config` given;
      and whatever `kvjax.generate` raises for its arguments.
  """
  params = _params_of(decoder, kwargs, "generate")
  return _generate(params, prompt_tokens, config=decoder.config, **kwargs)
