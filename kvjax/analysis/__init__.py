"""Diagnostics of what the cache stores and why compression breaks it.

Pure functions over the arrays `kvjax.forward(..., capture=...)` returns
(and params where a read-out needs them), usable on any model kvjax loads:

  support    active support (keys holding a share of the attention mass),
             summaries and histograms, head consensus.
  graph      eviction of answer tokens (GER), the token-attention graph and
             reachability from the question, token routes and
             `keep_only_route`.
  residual   residual-stream anatomy: norm growth, attention vs MLP writes,
             logit lens, LM-head null-space energy, DCT compressibility,
             layer Jacobian spectra, interventions on the writes.
  drift      cached decode vs full recompute, per dtype.
"""

from kvjax.analysis import drift
from kvjax.analysis import graph
from kvjax.analysis import residual
from kvjax.analysis import support
