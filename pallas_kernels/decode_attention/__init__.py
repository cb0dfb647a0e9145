"""Split-K decode attention over plain or coded caches (codecs as tile
plug-ins)."""

from pallas_kernels import Unsupported
from pallas_kernels.decode_attention.ops import (
  block_size,
  decode_attention,
)
from pallas_kernels.decode_attention.reference import (
  decode_attention_reference,
)

__all__ = [
  "Unsupported",
  "block_size",
  "decode_attention",
  "decode_attention_reference",
]
