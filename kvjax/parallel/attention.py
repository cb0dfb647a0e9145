"""Attention over a sequence-sharded cache, and ring attention for prefill.

`sharded_attention`: each `seq` shard attends over the slots it holds with
the chosen backend (the XLA engine or a Pallas kernel, reading codes where
they live) and returns its partial (out, LSE); the partials merge by
log-sum-exp across shards (`pmax`, then `psum` of the weighted outputs).
A shard with nothing visible has LSE -inf and weighs 0. Rows split over
`data` and kv heads over `heads` never communicate.

`ring_attention`: context-parallel prefill on a fresh cache. Queries, keys
and values of the prompt are split along T over `seq`; the key/value
blocks (with their positions and validity) travel round the ring with
`ppermute` inside a scan while each shard folds every visiting block into
its queries' online softmax (`merge_attention`). The engine skips the
blocks a shard's queries cannot see (all later positions), so the causal
half costs no attention work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kvjax import attention as attention_lib
from kvjax.cache import TailedKV
from kvjax.parallel import mesh as mesh_lib

Array = jax.Array


def _specs(mesh):
  d = mesh_lib._axis(mesh, "data")
  h = mesh_lib._axis(mesh, "heads")
  s = mesh_lib._axis(mesh, "seq")
  return d, h, s


def _regions(view: attention_lib.LayerView):
  """([(k region, v region, pos, valid)], layer) of a view: one region, or
  a TailedKV's code region and its tail, sharded apart. `pos` and `valid`
  are laid out over the whole capacity, so a TailedKV's are re-split into
  its regions here: of its one layer only (taken first, with the layer's
  payload; the layer index becomes 0)."""
  if isinstance(view.k, TailedKV):
    layer = view.layer
    one = lambda x: jax.lax.dynamic_slice_in_dim(x, layer, 1, axis=0)
    view = jax.tree.map(one, view._replace(layer=None))
    view = view._replace(layer=jnp.int32(0))
    sc = view.k.code_slots
    return [
      (view.k.code, view.v.code, view.pos[..., :sc], view.valid[..., :sc]),
      (view.k.tail, view.v.tail, view.pos[..., sc:], view.valid[..., sc:]),
    ], view.layer
  return [(view.k, view.v, view.pos, view.valid)], view.layer


def _regions_and_specs(view, mesh):
  B, K = view.pos.shape[1:3]
  regions, layer = _regions(view)
  specs = [
    (
      mesh_lib.payload_specs(k, mesh, B, K),
      mesh_lib.payload_specs(v, mesh, B, K),
      mesh_lib.slot_spec(mesh, 4),
      mesh_lib.slot_spec(mesh, 4),
    )
    for k, v, _, _ in regions
  ]
  return regions, specs, layer


def _check(view, q, mesh, what):
  B, K = view.pos.shape[1], view.pos.shape[2]
  mesh_lib._check_rows_heads(B, K, mesh, what)
  n = mesh_lib.axis_size(mesh, "seq")
  for k, v, pos, _ in _regions(view)[0]:
    for x in (k, v):
      mesh_lib.check_divisible(x, pos.shape[-1], n, what)


def _merge_over_seq(out, lse, axis):
  """Merges per-shard partials out [B, T, N, H] f32, lse [B, N, T] by
  log-sum-exp over `axis` (-inf partials weigh 0)."""
  if axis is None:
    return out, lse
  m = jax.lax.pmax(lse, axis)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)  # [B, N, T]
  total = jax.lax.psum(w, axis)
  wo = jnp.moveaxis(w, 1, 2)[..., None]  # [B, T, N, 1]
  acc = jax.lax.psum(wo * out, axis)
  denom = jnp.moveaxis(total, 1, 2)[..., None]
  out = acc / jnp.where(denom > 0, denom, 1.0)
  lse = jnp.where(
    total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf
  )
  return out, lse


def sharded_attention(
  q: Array,
  view: attention_lib.LayerView,
  *,
  q_pos: Array,
  scale: float,
  sliding_window: int | None,
  backend,
  return_probs: bool,
  key_block: int | None,
  query_block: int,
  mesh,
) -> attention_lib.AttentionOutput:
  """`cached_attention` over a cache sharded on `mesh` (see the module
  docstring); the same contract, `probs` included (each shard's slice
  renormalized by the global LSE)."""
  _check(view, q, mesh, "sharded attention")
  d, h, s = _specs(mesh)
  regions, region_specs, layer = _regions_and_specs(view, mesh)

  def local(q, q_pos, layer, regions):
    parts = []
    for k, v, pos, valid in regions:
      parts.append(
        attention_lib.cached_attention(
          q,
          attention_lib.LayerView(k, v, pos, valid, layer),
          q_pos=q_pos,
          scale=scale,
          sliding_window=sliding_window,
          backend=backend,
          return_probs=return_probs,
          key_block=key_block,
          query_block=query_block,
        )
      )
    res = parts[0]
    for p in parts[1:]:
      res = attention_lib.merge_attention(res, p)
    out, lse = _merge_over_seq(res.out.astype(jnp.float32), res.lse, s)
    probs = ()
    if return_probs:
      # Each part's probabilities are normalized by its own LSE.
      probs = tuple(
        p.probs
        * jnp.where(
          jnp.isfinite(p.lse) & jnp.isfinite(lse), jnp.exp(p.lse - lse), 0.0
        )[..., None]
        for p in parts
      )
    return out.astype(q.dtype), lse, probs

  probs_spec = tuple(P(d, h, None, s) for _ in regions) if return_probs else ()
  out, lse, probs = jax.shard_map(
    local,
    mesh=mesh,
    check_vma=False,  # the engine mixes per-shard and replicated values
    in_specs=(P(d, None, h, None), P(d, None), P(), region_specs),
    out_specs=(P(d, None, h, None), P(d, h, None), probs_spec),
  )(q, q_pos, layer, regions)
  probs = jnp.concatenate(probs, axis=-1) if return_probs else None
  return attention_lib.AttentionOutput(out, lse, probs)


def sharded_mass(
  q: Array,
  view: attention_lib.LayerView,
  lse: Array,
  weights: Array,
  *,
  q_pos: Array,
  scale: float,
  sliding_window: int | None,
  key_block: int | None,
  query_block: int,
  backend,
  mesh,
) -> Array:
  """`attention_mass` over a sharded cache: each shard sums the mass of its
  own slots against the queries' global LSE ([B, N, S], sharded on S)."""
  _check(view, q, mesh, "sharded attention mass")
  d, h, s = _specs(mesh)
  regions, region_specs, layer = _regions_and_specs(view, mesh)

  def local(q, lse, weights, q_pos, layer, regions):
    return tuple(
      attention_lib.attention_mass(
        q,
        attention_lib.LayerView(k, v, pos, valid, layer),
        lse,
        weights,
        q_pos=q_pos,
        scale=scale,
        sliding_window=sliding_window,
        key_block=key_block,
        query_block=query_block,
        backend=backend,
      )
      for k, v, pos, valid in regions
    )

  masses = jax.shard_map(
    local,
    mesh=mesh,
    check_vma=False,  # the engine mixes per-shard and replicated values
    in_specs=(
      P(d, None, h, None),
      P(d, h, None),
      P(d, None),
      P(d, None),
      P(),
      region_specs,
    ),
    out_specs=tuple(P(d, h, s) for _ in regions),
  )(q, lse, weights, q_pos, layer, regions)
  return jnp.concatenate(masses, axis=-1)


def ring_attention(
  q: Array,  # [B, T, N, H]
  k: Array,  # [B, T, K, H]
  v: Array,  # [B, T, K, H]
  *,
  q_pos: Array,  # [B, T]
  k_pos: Array,  # [B, T]
  k_valid: Array,  # [B, T]
  scale: float | None = None,
  sliding_window: int | None = None,
  backend=attention_lib.Backend.XLA,
  mesh,
) -> attention_lib.AttentionOutput:
  """Attention of T queries over T keys/values of the same pass, all split
  along T over the mesh's `seq` axis, the key/value blocks passed round the
  ring (see the module docstring). Equal to `attention` over the whole
  arrays (probabilities are not returned).

  Raises:
    ValueError: T not a multiple of the `seq` shards, or a batch / head
      count the `data` / `heads` axes do not divide.
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  n = mesh_lib.axis_size(mesh, "seq")
  if T % n:
    raise ValueError(
      f"ring attention: T={T} is not a multiple of the {n} seq shards."
    )
  mesh_lib._check_rows_heads(B, K, mesh, "ring attention")
  d, h, s = _specs(mesh)
  scale = H**-0.5 if scale is None else scale
  if n == 1:  # no ring: the arrays are whole on each device
    pos = jnp.broadcast_to(k_pos[:, None], (B, K, T))
    res = attention_lib.attention(
      q,
      jnp.moveaxis(k, 1, 2),
      jnp.moveaxis(v, 1, 2),
      q_pos=q_pos,
      k_pos=pos,
      k_valid=jnp.broadcast_to(k_valid[:, None], (B, K, T)),
      scale=scale,
      sliding_window=sliding_window,
      backend=backend,
    )
    return attention_lib.AttentionOutput(res.out, res.lse)
  perm = [(i, (i + 1) % n) for i in range(n)]

  def local(q, k, v, q_pos, k_pos, k_valid):
    kb = jnp.moveaxis(k, 1, 2)  # [B, K, Tl, H]
    vb = jnp.moveaxis(v, 1, 2)
    Kl = kb.shape[1]
    Bl, Tl = k_pos.shape
    posb = jnp.broadcast_to(k_pos[:, None, :], (Bl, Kl, Tl))
    validb = jnp.broadcast_to(k_valid[:, None, :], posb.shape)

    def attend(blk):
      kb, vb, posb, validb = blk
      return attention_lib.attention(
        q,
        kb,
        vb,
        q_pos=q_pos,
        k_pos=posb,
        k_valid=validb,
        scale=scale,
        sliding_window=sliding_window,
        backend=backend,
      )

    blk = (kb, vb, posb, validb)
    res = attend(blk)
    out = res.out.astype(jnp.float32)

    def step(carry, _):
      out, lse, blk = carry
      blk = jax.tree.map(lambda x: jax.lax.ppermute(x, s, perm), blk)
      part = attend(blk)
      merged = attention_lib.merge_attention(
        attention_lib.AttentionOutput(out, lse),
        attention_lib.AttentionOutput(part.out.astype(jnp.float32), part.lse),
      )
      return (merged.out, merged.lse, blk), None

    (out, lse, _), _ = jax.lax.scan(
      step, (out, res.lse, blk), None, length=n - 1
    )
    return out.astype(q.dtype), lse

  out, lse = jax.shard_map(
    local,
    mesh=mesh,
    check_vma=False,  # the engine mixes per-shard and replicated values
    in_specs=(
      P(d, s, h, None),
      P(d, s, h, None),
      P(d, s, h, None),
      P(d, s),
      P(d, s),
      P(d, s),
    ),
    out_specs=(P(d, s, h, None), P(d, h, s)),
  )(q, k, v, q_pos, k_pos, k_valid)
  return attention_lib.AttentionOutput(out, lse)
