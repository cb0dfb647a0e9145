"""kvjax: a JAX library for the KV cache of language models."""

from kvjax import cache
from kvjax import config
from kvjax import pretrained
from kvjax.attention import (
  AttentionOutput,
  Backend,
  cached_attention,
  reference_attention,
)
from kvjax.cache import KVCache, init_cache, kv_bytes, logical_bytes
from kvjax.config import AttentionGeometry, ModelConfig, RopeScaling, get_config
from kvjax.generate import (
  GenerateOutput,
  compress_cache,
  compress_observing,
  decode,
  decode_step,
  generate,
  prefill,
)
from kvjax.model import forward, init_params

__version__ = "0.1.0"
