"""Flash attention over one layer of an L-stacked KV cache (Pallas, TPU and
GPU), and the per-slot attention mass as a second pass against its LSE.

`reference` holds the plain-jnp definitions the kernels are tested against.
"""

from pallas_kernels.flash_attention.ops import (
  flash_attention,
  flash_attention_mass,
)

__all__ = ["flash_attention", "flash_attention_mass"]
