"""Pallas kernels for kvjax: one folder per op with kernel, reference, ops;
codecs plug into them as tile functions (`tiles`)."""


class Unsupported(ValueError):
  """A kernel cannot take this input on this target (a capacity with no
  block size, a tile shape Triton cannot lower); callers may fall back to
  another implementation and say so."""
