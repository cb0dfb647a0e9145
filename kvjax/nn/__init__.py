"""kvjax.nn: a Flax NNX face over kvjax's functional core.

- `CachedAttention`: an attention layer for any NNX model, reading and
  writing a kvjax `KVCache` passed in and returned (never module state).
- `Decoder`: kvjax's Llama-family decoder as an NNX module whose state is
  kvjax's params pytree leaf for leaf (`Decoder.from_params`,
  `Decoder.to_params`); calling it is `kvjax.forward`.
- `prefill`, `decode`, `generate`: kvjax's jitted entries (compression
  transforms included) on a `Decoder`.

Needs flax (the `nn` extra: `pip install kvjax[nn]`).
"""

from kvjax.nn.attention import (
  ATTENTION_TAPS,
  CachedAttention,
  CachedAttentionOutput,
)
from kvjax.nn.decoder import DECODER_TAPS, Decoder, DecoderBlock, SwiGLU
from kvjax.nn.generate import decode, generate, prefill
