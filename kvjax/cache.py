"""The KV cache: an explicit pytree with static capacity.

One `KVCache` holds every layer, leaves stacked on a leading L axis so the
decoder can `lax.scan` over layers with the cache as a scanned input. Each
(layer, row, kv head) owns S slots. A slot holds a key and a value (as the
codec stores them), the original token position of what it holds, and a
validity bit. Compression may leave different heads holding different
positions (eviction is per head), which is why `pos` and `valid` are per
head.

Writes go to slot `end[b]` onwards for row b; queries get positions
`length[b]` onwards. The two counters differ once a cache is compacted
(slots are reused, positions keep counting).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig

Array = jax.Array


class KVCache(NamedTuple):
  """Key/value cache of a whole model.

  Attributes:
    k: [L, B, K, S, H] keys, post-RoPE (or a codec payload pytree whose
      leaves all start with [L, B, K, S]).
    v: [L, B, K, S, H] values (or a codec payload pytree, same leading axes).
    pos: [L, B, K, S] int32 original token position held by each slot;
      -1 for an empty slot.
    valid: [L, B, K, S] bool; False slots never receive attention.
    end: [B] int32 next slot to write, per row (shared by layers and heads).
    length: [B] int32 tokens seen so far per row: the position of the next
      token.
    state: per-transform state (a pytree; `()` when no transform keeps any).
  """

  k: Any
  v: Any
  pos: Array
  valid: Array
  end: Array
  length: Array
  state: Any = ()

  @property
  def capacity(self) -> int:
    """S, the number of slots per (layer, row, kv head)."""
    return self.pos.shape[-1]

  @property
  def batch_size(self) -> int:
    return self.pos.shape[1]

  @property
  def num_layers(self) -> int:
    return self.pos.shape[0]


def init_cache(
    config: ModelConfig,
    batch_size: int,
    capacity: int,
    dtype: Any = None,
    sharding: Any = None,
) -> KVCache:
  """Returns an empty cache with `capacity` slots per layer, row and kv head.

  Args:
    config: the model's config.
    batch_size: B.
    capacity: S, the static number of slots; prefill plus decode must fit.
    dtype: key/value dtype; defaults to `config.dtype`.
    sharding: optional `jax.sharding.Sharding` (or pytree of them matching
      the cache) to place the empty cache with.

  Raises:
    ValueError: for a non-positive batch size or capacity.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if not isinstance(capacity, (int, np.integer)) or capacity <= 0:
    raise ValueError(f"capacity must be a positive int, got {capacity!r}.")
  dtype = jnp.dtype(dtype or config.dtype)
  L, B, K, S, H = (config.num_layers, batch_size, config.num_kv_heads,
                   capacity, config.head_dim)
  cache = KVCache(
      k=jnp.zeros((L, B, K, S, H), dtype),
      v=jnp.zeros((L, B, K, S, H), dtype),
      pos=jnp.full((L, B, K, S), -1, jnp.int32),
      valid=jnp.zeros((L, B, K, S), bool),
      end=jnp.zeros((B,), jnp.int32),
      length=jnp.zeros((B,), jnp.int32),
  )
  if sharding is not None:
    cache = jax.device_put(cache, sharding)
  return cache


def kv_bytes(cache: KVCache) -> int:
  """Physical bytes of every leaf of the cache (payload, bookkeeping, state).

  This is what the cache occupies in device memory, padding included.
  """
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(cache)))


def payload_bytes(cache: KVCache) -> int:
  """Physical bytes of the key and value payloads only (no bookkeeping)."""
  return kv_bytes(KVCache(cache.k, cache.v, jnp.zeros((0,)), jnp.zeros((0,)),
                          jnp.zeros((0,)), jnp.zeros((0,))))


def logical_bytes(cache: KVCache) -> int:
  """Bytes a ragged layout would need: payload bytes of valid slots only.

  Per-slot payload bytes are the payload bytes divided by the number of
  slots; bookkeeping (`pos`, `valid`, counters) is not counted. The gap
  between `kv_bytes` and this figure is the padding a static layout pays.
  """
  slots = int(np.prod(cache.pos.shape))
  per_slot = payload_bytes(cache) / max(slots, 1)
  return int(round(per_slot * int(jnp.sum(cache.valid))))


def cache_overflowed(cache: KVCache) -> bool:
  """True when a jitted write ran past capacity (those writes were dropped).

  `forward` raises eagerly when a write would not fit; under `jit` the
  counters cannot be checked, so writes past capacity are dropped and this
  function reveals it afterwards.
  """
  return bool(jnp.any(cache.end > cache.capacity))
