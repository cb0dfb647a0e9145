"""SP-KV (arXiv 2605.14037): learned write gates as a compression transform.

A model with write gates (`params["write_gate"]`, `kvjax.model.add_write_gate`)
gives every new entry a utility u in (0, 1) per kv head, from the normed
layer input (the "write_utility" tap, [L, B, T, K]). SP-KV's hard gate keeps
an entry only if u >= tau or it lies in the local window (a query sees its
`window - 1` predecessors unbiased); the others are never written to the
long-term cache.

`spkv(tau, window)` does this to a kvjax cache:

* prefill: every observed entry (one the prefill or `compress_observing`
  saw: its utility is in `ctx.write_utility`) is kept iff u >= tau or
  the next query still sees it in its window: pos > newest + 1 - window,
  where newest is the row's most recent position (the window counts the
  query's own entry, as `kvjax.model.WriteGate`: the next query sees its
  `window - 1` predecessors unbiased); entries this pass did not observe
  keep the utility recorded for them before (1, i.e. admitted, when none
  was). The kept entries are compacted
  per (layer, row, kv head): budgets vary by head, the capacity is static
  (`capacity` or the live bound, + the reserve), and the gap to the ragged
  size is reported by `kvjax.cache.logical_bytes` (as Ada-KV).
* decode, every `every` steps: the step's new entry has its utility
  recorded in the state; then every entry the next query no longer sees
  in its window (pos <= newest + 1 - window) with u < tau is dropped and
  the cache compacted in place (same capacity: a jitted decode compiles once), so the freed
  slots are written again. With every > 1 the entries of the steps in
  between have no recorded utility and stay (admitted): nothing is dropped
  on a guess. Entries written by plain `forward` calls after compression
  (a question) are likewise admitted.

Exactly SP-KV's hard gate, end to end: prefill with the same gate on
attention (`forward(..., write_gate=kvjax.model.WriteGate("hard", window,
tau))` or `prefill(..., write_gate=...)`: entries below tau invisible
outside each query's window, as if never written); the transform then
removes exactly the entries no later query can see. Entries below tau
still inside the next query's window stay cached: decode through the
transform (every=1) drops each as it leaves; a multi-token call (a
question) hides them with `forward(..., write_gate=..., cache_utility=
cache_utility(...))`. Then prefill, compression and the question or the
decoded tokens compute what one gated pass over everything would (tested
to float tolerance). Without the gated prefill the transform still keeps
exactly u >= tau plus the window, but the kept entries were computed by
a model that saw every entry.

Einsum letters: L layers, B batch, T observed tokens, K kv heads, S slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCache
from kvjax.compress import base

Array = jax.Array


class SPKVState(NamedTuple):
  """State of `spkv`.

  Attributes:
    utility: [L, B, K, S] float32, the recorded write utility of each
      slot's entry (1 where none was observed: admitted); moves with its
      entry on compaction.
  """

  utility: Array


def observed_utility(
  cache: KVCache, u: Array, q_pos: Array, q_mask: Array, default: Array
) -> tuple[Array, Array]:
  """The utility of each slot's entry from an observed pass.

  Args:
    cache: the cache (pos [L, B, K, S]).
    u: [L, B, T, K] utilities of the pass's tokens.
    q_pos: [B, T] their positions.
    q_mask: [B, T] bool, the tokens that were written.
    default: [L, B, K, S] utility of slots the pass did not write.

  Returns:
    (utility [L, B, K, S] float32, observed [L, B, K, S] bool).
  """
  L, B, K, S = cache.pos.shape
  T = q_pos.shape[1]
  big = jnp.iinfo(jnp.int32).max
  key = jnp.where(q_mask, q_pos, big).astype(jnp.int32)  # [B, T]
  order = jnp.argsort(key, axis=1, stable=True)  # [B, T]
  sorted_pos = jnp.take_along_axis(key, order, axis=1)  # [B, T]
  # For each slot, the first observed token at its position.
  find = jax.vmap(lambda a, v: jnp.searchsorted(a, v))  # over B
  flat = jnp.moveaxis(cache.pos, 1, 0).reshape(B, L * K * S)  # [B, L*K*S]
  j = jnp.minimum(find(sorted_pos, flat), T - 1)  # [B, L*K*S]
  hit = jnp.take_along_axis(sorted_pos, j, axis=1) == flat
  t = jnp.take_along_axis(order, j, axis=1)  # [B, L*K*S] token index
  t = jnp.moveaxis(t.reshape(B, L, K, S), 0, 1)  # [L, B, K, S]
  hit = jnp.moveaxis(hit.reshape(B, L, K, S), 0, 1) & cache.valid
  u_lbks = jnp.moveaxis(u, 3, 2).astype(jnp.float32)  # [L, B, K, T]
  got = jnp.take_along_axis(u_lbks, t, axis=3)  # [L, B, K, S]
  return jnp.where(hit, got, default), hit


def _newest(cache: KVCache) -> Array:
  """[B] the most recent valid position of each row (-1 if empty)."""
  return jnp.max(jnp.where(cache.valid, cache.pos, -1), axis=(0, 2, 3))


def cache_utility(
  cache: KVCache, write_utility: Array, positions: Array, mask: Array
) -> Array:
  """[L, B, K, S] float32: the utility of each cached entry, for
  `kvjax.forward(..., cache_utility=)` after compression.

  Args:
    cache: the (compressed) cache.
    write_utility: [L, B, T, K] the "write_utility" capture of the pass
      that wrote the entries (the gated prefill).
    positions: [B, T] that pass's positions.
    mask: [B, T] bool, its tokens that were written.

  Returns:
    Each valid slot's utility found by its position in that pass; 1
    (admitted) for slots it did not write and for empty slots. So entries
    written after that pass (a question, decoded tokens) count as
    admitted: a later multi-token call is one gated pass only if its
    utilities are merged in (call again with that call's capture).
  """
  ones = jnp.ones(cache.pos.shape, jnp.float32)
  u, _ = observed_utility(
    cache,
    jnp.asarray(write_utility),
    jnp.asarray(positions),
    jnp.asarray(mask, bool),
    ones,
  )
  return u


def gate_keep(cache: KVCache, utility: Array, tau: float, window: int):
  """[L, B, K, S] bool: the valid entries the hard gate keeps (u >= tau or
  inside the next query's window: the `window - 1` most recent positions
  of their row)."""
  newest = _newest(cache)[None, :, None, None]  # [1, B, 1, 1]
  recent = cache.pos > newest + 1 - window
  return cache.valid & ((utility >= tau) | recent)


def kept_counts(
  utility: np.ndarray,
  q_mask: np.ndarray,
  tau: float,
  window: int,
) -> np.ndarray:
  """[L, B, K] entries the hard gate keeps for a fresh prompt, on the host.

  The prompt's tokens are its live (`q_mask`) tokens in order; the last
  `window - 1` of each row (the next query's window) are always kept.
  Use it to pick `spkv(capacity=)` (the largest count) or to report keep
  fractions.

  Args:
    utility: [L, B, T, K] the prefill's "write_utility" capture.
    q_mask: [B, T] bool, the prompt's live tokens.
    tau: the threshold.
    window: the local window.
  """
  u = np.asarray(utility, np.float32)
  m = np.asarray(q_mask, bool)
  rank = np.cumsum(m, axis=1) - 1  # [B, T] position among live tokens
  n = m.sum(axis=1, keepdims=True)  # [B, 1]
  recent = m & (rank > n - window)  # [B, T]: the next query sees them
  keep = (u >= tau) & m[None, :, :, None]  # [L, B, T, K]
  keep |= recent[None, :, :, None]
  return keep.sum(axis=2)


def _check(tau, window, capacity, every):
  tau = base.check_float(tau, "tau", 0.0, 1.0)
  window = base.check_int(window, "window", 1)
  if capacity is not None:
    capacity = base.check_int(capacity, "capacity", 1)
  every = base.check_int(every, "every", 1)
  return tau, window, capacity, every


@base.by_value
def spkv(
  tau: float = 0.5,
  window: int = 128,
  capacity: int | None = None,
  every: int = 1,
) -> base.KVTransform:
  """SP-KV's hard write gate: keep entries with u >= tau plus the window.

  Needs a model with write gates (it reads the "write_utility" tap).

  Args:
    tau: the threshold in [0, 1]; an entry outside the window survives iff
      its utility u >= tau.
    window: the local window (>= 1) as `kvjax.model.WriteGate`'s: a
      query sees the `window - 1` positions before it unbiased, so those
      of the next query are always kept.
    capacity: static entries per (layer, row, kv head) the compacted cache
      holds before the reserve (the largest head budget; pick it with
      `kept_counts`). None: the live bound, so the layout does not shrink
      and only `logical_bytes` shows the saving. A head that keeps more
      than `capacity` entries is an overflow: `compress_cache`/`prefill`
      raise, and under a user's jit `kvjax.cache.cache_overflowed` reports
      it; nothing is dropped silently.
    every: decode steps between decode-time actions (record the new
      entries' utility, drop the ones leaving the window with u < tau,
      compact in place).

  Returns:
    A `KVTransform` with state `SPKVState`, named "spkv" whatever its
    arguments (as "snapkv" is at every ratio; they compare by value).

  Raises:
    ValueError: tau outside [0, 1], window / capacity / every < 1.
  """
  tau, window, capacity, every = _check(tau, window, capacity, every)

  def init(cache):
    return SPKVState(jnp.ones(cache.pos.shape, jnp.float32))

  def gather(x, idx, live, fill):
    return jnp.where(live, jnp.take_along_axis(x, idx, axis=3), fill)

  def apply(cache, state, ctx, **extra):
    if ctx.write_utility is None:
      raise ValueError(
        "spkv reads the 'write_utility' tap: the model needs write gates "
        "(kvjax.model.add_write_gate / a gated checkpoint)."
      )
    # A policy before it in a chain may have compacted the cache after
    # the chain built this state: nothing recorded for those slots yet.
    default = (
      state.utility
      if state.utility.shape == cache.pos.shape
      else jnp.ones(cache.pos.shape, jnp.float32)
    )
    utility, _ = observed_utility(
      cache, ctx.write_utility, ctx.q_pos, ctx.q_mask, default
    )
    keep = gate_keep(cache, utility, tau, window)
    if ctx.phase == "prefill":
      bound = base.live_bound(cache, ctx)
      n = bound if capacity is None else min(capacity, bound)
      cap = n + ctx.reserve + ctx.decode_reserve
      new, idx = base.compact(cache, keep, cap)
      live = new.valid
      most = jnp.max(jnp.sum(keep, axis=-1), axis=(0, 2))  # [B]
      # More kept entries than `capacity` eat the reserve: an overflow.
      # (`compact` may round the capacity up under a mesh: flag past it.)
      new = new._replace(end=jnp.where(most > n, new.capacity + 1, new.end))
      return new, SPKVState(gather(utility, idx, live, 1.0))

    # Decode: the entries that left the window below tau go; compact in
    # place only when some do.
    def drop(c):
      new, idx = base.compact(c, keep, c.capacity)
      return new, gather(utility, idx, new.valid, 1.0)

    new, utility = jax.lax.cond(
      jnp.any(cache.valid & ~keep),
      drop,
      lambda c: (c, utility),
      cache,
    )
    return new, SPKVState(utility)

  return base.KVTransform(
    init=init,
    apply=apply,
    keeps=lambda live: live if capacity is None else min(live, capacity),
    needs=("write_utility",),
    every=every,
    name="spkv",
  )
