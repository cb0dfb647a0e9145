"""kvjax across devices: a named mesh (`data`, `heads`, `seq`), the sharded
cache, attention and eviction over sequence shards, and multi-process
start-up.

Entry points take `mesh=` (`kvjax.prefill`, `generate`, `decode`,
`decode_step`, `compress_observing`) and run their jitted step under it;
code of one's own runs under `jax.set_mesh(mesh)` and gets the same
behaviour from `kvjax.model.forward` and every transform.
"""

from kvjax.parallel.attention import (
  ring_attention,
  sharded_attention,
  sharded_mass,
)
from kvjax.parallel.distributed import initialize
from kvjax.parallel.evict import global_keep_top
from kvjax.parallel.mesh import (
  AXES,
  Sharded,
  cache_specs,
  constrain_cache,
  context_mesh,
  device_bytes,
  make_mesh,
  seq_shards,
  shard_cache,
  to_host,
)

__all__ = [
  "AXES",
  "Sharded",
  "cache_specs",
  "constrain_cache",
  "context_mesh",
  "device_bytes",
  "global_keep_top",
  "initialize",
  "make_mesh",
  "ring_attention",
  "seq_shards",
  "shard_cache",
  "sharded_attention",
  "sharded_mass",
  "to_host",
]
