"""Eviction across sequence shards: a global top-k from per-shard proposals.

Scores are computed where the entries live (the transforms' scorers run
under XLA's partitioner on the sharded cache). Selection then never
gathers the scores: each `seq` shard proposes its `m` best slots (m is a
static bound on what any (layer, row, kv head) keeps), the proposals are
all-gathered (n * m values and slot indices per head, not S), and every
shard finds the same global n-th best (value, slot) and keeps its own
slots that rank above it. The order is the one `kvjax.compress.base.
keep_top` defines (higher score first, then the lower slot), so the kept
set is exactly the single-device one. Compaction is `base.compact` under
the mesh: its output capacity is rounded to a multiple of the shards and
constrained to the sharded layout, so every shard holds an equal slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kvjax.parallel import mesh as mesh_lib

Array = jax.Array


def global_keep_top(
  scores: Array, n: Array, valid: Array, max_keep: int | None, mesh
) -> Array:
  """[L, B, K, S] bool: the n best valid slots per (layer, row, kv head)
  of a slot-sharded `scores`, chosen from per-shard proposals.

  Args:
    scores: [L, B, K, S] float, higher is kept first.
    n: int array broadcastable to [L, B, K].
    valid: [L, B, K, S] bool.
    max_keep: a static upper bound on n (None: the shard size, every slot
      proposed); a head asked for more keeps every valid slot, which the
      compaction after it reports as an overflow.
    mesh: the mesh; S must split evenly over its `seq` axis.
  """
  from kvjax.compress import base

  L, B, K, S = scores.shape
  shards = mesh_lib.axis_size(mesh, "seq")
  if S % shards:
    raise ValueError(
      f"global top-k: {S} slots do not split over {shards} seq shards."
    )
  mesh_lib._check_rows_heads(B, K, mesh, "global top-k")
  local_s = S // shards
  bound = S if max_keep is None else max(1, min(int(max_keep), S))
  # A shard holds at most min(n, its slots) of the global n best: that
  # many proposals from each suffice.
  m = min(bound, local_s)
  spec = mesh_lib.slot_spec(mesh, 4)
  d, h = mesh_lib._axis(mesh, "data"), mesh_lib._axis(mesh, "heads")
  n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (L, B, K))

  def local(scores, n, valid):
    me = jax.lax.axis_index("seq")
    slot = me * local_s + jnp.arange(local_s, dtype=jnp.int32)  # global
    s = base.rank_scores(scores, valid)
    # lax.top_k puts the lower index first among equal values.
    best, at = jax.lax.top_k(s, m)  # [L, B, K, m]
    cand_v = jax.lax.all_gather(best, "seq", axis=3, tiled=True)
    cand_i = jax.lax.all_gather(slot[at], "seq", axis=3, tiled=True)
    # Shard order is slot order, so among equal values the earlier
    # candidate is the lower slot: top_k again keeps the global order.
    top_v, top_at = jax.lax.top_k(cand_v, bound)
    top_i = jnp.take_along_axis(cand_i, top_at, axis=-1)
    k = jnp.clip(n, 1, bound)[..., None] - 1
    thr_v = jnp.take_along_axis(top_v, k, axis=-1)  # [L, B, K, 1]
    thr_i = jnp.take_along_axis(top_i, k, axis=-1)
    above = (s > thr_v) | ((s == thr_v) & (slot <= thr_i))
    keep = above & (n > 0)[..., None]
    # n above the bound: keep every valid slot, so that compaction sees
    # more entries than its capacity and flags the overflow, as it does on
    # one device (never a silent cut to the bound).
    return jnp.where((n > bound)[..., None], True, keep) & valid

  return jax.shard_map(
    local,
    mesh=mesh,
    check_vma=False,  # the engine mixes per-shard and replicated values
    in_specs=(spec, P(None, d, h), spec),
    out_specs=spec,
  )(scores, n, valid)
