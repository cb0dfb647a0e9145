"""`CachedAttention`: an NNX attention layer that reads and writes a kvjax
`KVCache`.

The layer owns its projections (and optional biases and q/k RMSNorm); the
cache is an explicit input and output of `__call__`, never module state, so
any compression transform can act on it between calls and a compacted or
coded cache works unchanged. Conventions (`kvjax.AttentionGeometry`): keys
are stored after RoPE (rotate-half), query heads are grouped consecutively
onto kv heads.

Einsum letters: B batch, T query length, S cache slots, D model dim, N query
heads, K kv heads, H head dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import attention as attention_lib
from kvjax import cache as cache_lib
from kvjax import checks
from kvjax import model as model_lib
from kvjax.cache import KVCache
from kvjax.config import AttentionGeometry, ModelConfig, as_geometry

Array = jax.Array

# The taps `CachedAttention` can capture (`capture=`), per layer; names and
# meanings as in `kvjax.model.TAPS` (there stacked over L).
ATTENTION_TAPS = ("q_pre_rope", "q", "k", "v", "attn_probs", "attn_mass")


# N(0, 0.02) projections, as `kvjax.init_params`.
default_kernel_init = nnx.initializers.normal(0.02)


class CachedAttentionOutput(NamedTuple):
  """What `CachedAttention` returns (unpacks as `out, cache, aux`).

  Attributes:
    out: [B, T, D] the attention write into the residual.
    cache: the cache with this layer's new entries written (counters not
      moved: `kvjax.cache.advance` once after the last layer).
    aux: dict of the captured taps of this layer: "q_pre_rope", "q"
      [B, T, N, H], "k", "v" [B, T, K, H], "attn_probs" [B, N, T, S],
      "attn_mass" [B, N, S].
  """

  out: Array
  cache: KVCache
  aux: dict[str, Array]


def _check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def _payload_head_dim(x) -> int | None:
  """H of a plain payload or of a TailedKV's tail; None for codes (which
  may pack it)."""
  if isinstance(x, cache_lib.TailedKV):
    return x.tail.shape[-1]
  return None if cache_lib.is_coded(x) else x.shape[-1]


def check_capture(capture, allowed: tuple[str, ...]) -> tuple[str, ...]:
  """`capture` must be a tuple of names from `allowed` (ValueError)."""
  if not isinstance(capture, tuple) or any(n not in allowed for n in capture):
    raise ValueError(
      f"capture must be a tuple of names from {allowed}, got {capture!r}."
    )
  return capture


class CachedAttention(nnx.Module):
  """Grouped-query self-attention over a kvjax `KVCache`, as an NNX layer.

  Projections q/k/v/o (optional q/k/v and o biases, optional q/k RMSNorm
  over the head dim as in Qwen3), RoPE on queries and keys, then the new
  keys/values are written into layer `layer` of the cache
  (`kvjax.cache.write`) and the queries attend over that layer with kvjax's
  attention engine (`kvjax.cached_attention`). The same computation as the
  attention half of `kvjax.model.decoder_layer`; the parameters carry its
  names and shapes:

    wq [D, N, H]  wk [D, K, H]  wv [D, K, H]  wo [N, H, D]
    bq [N, H]  bk [K, H]  bv [K, H]          (qkv_bias)
    bo [D]                                   (o_bias)
    q_norm [H]  k_norm [H]                   (qk_norm)

  In a model, call every layer with the same cache counters (each writes
  its own layer at slots `cache.end[b]` onwards), then advance them once:

    for i, block in enumerate(self.blocks):
      y, cache, _ = block.attn(norm(x), cache, layer=i, token_mask=mask)
      ...
    cache = kvjax.cache.advance(cache, mask)

  Attributes:
    d_model: D.
    geometry: the `kvjax.AttentionGeometry` (heads, head dim, RoPE,
      sliding window).
    qkv_bias, o_bias, qk_norm: which optional parameters exist.
    norm_eps: epsilon of the q/k RMSNorm.
  """

  def __init__(
    self,
    d_model: int,
    geometry: AttentionGeometry | ModelConfig,
    *,
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
    norm_eps: float = 1e-6,
    param_dtype: Any = jnp.float32,
    kernel_init: nnx.Initializer = default_kernel_init,
    bias_init: nnx.Initializer = nnx.initializers.zeros,
    rngs: nnx.Rngs,
  ):
    """Builds the layer.

    Args:
      d_model: D, the residual width.
      geometry: a `kvjax.AttentionGeometry`, or a `kvjax.ModelConfig` (its
        `geometry`).
      qkv_bias: biases on the q/k/v projections (Qwen2).
      o_bias: a bias on the output projection.
      qk_norm: RMSNorm over the head dim on q and k before RoPE (Qwen3).
      norm_eps: that RMSNorm's epsilon.
      param_dtype: dtype of the parameters.
      kernel_init: initializer of the projection matrices.
      bias_init: initializer of the biases (norm weights start at one).
      rngs: an `nnx.Rngs` with a "params" stream.

    Raises:
      TypeError: `geometry` is neither an `AttentionGeometry` nor a
        `ModelConfig`.
      ValueError: `d_model` is not a positive int.
    """
    self.d_model = _check_positive_int(d_model, "d_model")
    self.geometry = as_geometry(geometry)
    for name, flag in (
      ("qkv_bias", qkv_bias),
      ("o_bias", o_bias),
      ("qk_norm", qk_norm),
    ):
      if not isinstance(flag, bool):
        raise TypeError(f"{name} must be a bool, got {flag!r}.")
    self.qkv_bias, self.o_bias, self.qk_norm = qkv_bias, o_bias, qk_norm
    self.norm_eps = float(norm_eps)
    g = self.geometry
    D, N, K, H = d_model, g.num_heads, g.num_kv_heads, g.head_dim
    dt = jnp.dtype(param_dtype)
    key = rngs.params
    self.wq = nnx.Param(kernel_init(key(), (D, N, H), dt))
    self.wk = nnx.Param(kernel_init(key(), (D, K, H), dt))
    self.wv = nnx.Param(kernel_init(key(), (D, K, H), dt))
    self.wo = nnx.Param(kernel_init(key(), (N, H, D), dt))
    if qkv_bias:
      self.bq = nnx.Param(bias_init(key(), (N, H), dt))
      self.bk = nnx.Param(bias_init(key(), (K, H), dt))
      self.bv = nnx.Param(bias_init(key(), (K, H), dt))
    if o_bias:
      self.bo = nnx.Param(bias_init(key(), (D,), dt))
    if qk_norm:
      self.q_norm = nnx.Param(jnp.ones((H,), dt))
      self.k_norm = nnx.Param(jnp.ones((H,), dt))

  def _check_call(
    self, x, cache, layer, positions, token_mask, mass_mask, capture
  ):
    if not isinstance(cache, KVCache):
      raise TypeError(
        "cache must be a kvjax KVCache (kvjax.init_cache, "
        f"KVCache.from_dense), got {type(cache).__name__}."
      )
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != self.d_model:
      raise ValueError(
        f"x must be [B, T, D={self.d_model}], got "
        f"{getattr(x, 'shape', type(x).__name__)}."
      )
    B, T, _ = x.shape
    L, b, k, _ = cache.pos.shape
    g = self.geometry
    if b != B or k != g.num_kv_heads:
      raise ValueError(
        f"cache has batch {b} and {k} kv heads; x has batch {B} and the "
        f"layer {g.num_kv_heads} kv heads (cache.pos is [L, B, K, S])."
      )
    h = _payload_head_dim(cache.k)
    if h is not None and h != g.head_dim:
      raise ValueError(
        f"cache holds head_dim {h}, the layer has head_dim {g.head_dim}."
      )
    if not isinstance(layer, jax.core.Tracer):
      if isinstance(layer, bool) or not 0 <= int(layer) < L:
        raise ValueError(
          f"layer must be an int in [0, {L}) (the cache's "
          f"layers), got {layer!r}."
        )
    checks.check_positions(positions, B, T)
    for name, m in (("token_mask", token_mask), ("mass_mask", mass_mask)):
      if m is not None and tuple(getattr(m, "shape", ())) != (B, T):
        raise ValueError(
          f"{name} must be [B={B}, T={T}], got "
          f"{getattr(m, 'shape', type(m).__name__)}."
        )
    check_capture(capture, ATTENTION_TAPS)
    # Eagerly, before any compute (under jit the write drops instead).
    writes = T if token_mask is None else token_mask
    if checks.is_concrete(writes):
      writes = (
        np.asarray(writes).astype(bool).sum(axis=-1)
        if np.ndim(writes)
        else writes
      )
      checks.check_room(
        cache,
        writes,
        f"layer {layer}'s write of {int(np.max(writes))} tokens",
        "Build the cache with a larger `capacity` or compress it first.",
      )

  def __call__(
    self,
    x: Array,  # [B, T, D]
    cache: KVCache,
    *,
    layer: int | Array,
    positions: Array | None = None,
    token_mask: Array | None = None,
    backend: attention_lib.Backend | str = attention_lib.Backend.AUTO,
    capture: tuple[str, ...] = (),
    mass_mask: Array | None = None,
  ) -> CachedAttentionOutput:
    """Attends x's tokens over the cache after writing their keys/values.

    Args:
      x: [B, T, D] the (normed) inputs of the new tokens.
      cache: the model's `KVCache` (all layers; plain, compacted or coded).
      layer: which layer of the cache this attention owns (an int, or a
        [] int32 that may be traced, e.g. inside a scan over layers).
      positions: optional [B, T] int positions (default: `cache.length[b]`
        onwards, counting unmasked tokens, as `kvjax.forward`).
      token_mask: optional [B, T] bool; False tokens (padding) are not
        written and their outputs are meaningless (finite).
      backend: attention backend, a `kvjax.attention.Backend` or its name.
      capture: static tuple of names from `ATTENTION_TAPS`.
      mass_mask: optional [B, T] bool narrowing the queries "attn_mass"
        sums (default: every written query).

    Returns:
      A `CachedAttentionOutput` (out [B, T, D], cache, aux).

    Raises:
      TypeError / ValueError: naming the argument: a cache that is not a
        `KVCache` or whose batch, kv heads or head dim differ from x and
        the layer, x not [B, T, D], a layer outside the cache, mis-shaped
        positions or masks, unknown capture names; and, eagerly, a write
        past the cache's capacity (`kvjax.cache.write`).
    """
    self._check_call(x, cache, layer, positions, token_mask, mass_mask, capture)
    g = self.geometry
    B, T, _ = x.shape
    S = cache.capacity
    mask = (
      jnp.ones((B, T), bool)
      if token_mask is None
      else jnp.asarray(token_mask).astype(bool)
    )
    new = cache_lib.next_entries(cache, mask, positions)
    positions = new.positions  # [B, T]
    inv_freq = model_lib.rope_inv_freq(g)
    captured = {}

    q = jnp.einsum("btd,dnh->btnh", x, self.wq[...])  # [B, T, N, H]
    k = jnp.einsum("btd,dkh->btkh", x, self.wk[...])  # [B, T, K, H]
    v = jnp.einsum("btd,dkh->btkh", x, self.wv[...])  # [B, T, K, H]
    if self.qkv_bias:
      q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
    if self.qk_norm:
      q = model_lib.rms_norm(q, self.q_norm[...], self.norm_eps)
      k = model_lib.rms_norm(k, self.k_norm[...], self.norm_eps)
    captured["q_pre_rope"] = q
    q = model_lib.apply_rope(q, positions, inv_freq)
    k = model_lib.apply_rope(k, positions, inv_freq)
    captured.update(q=q, k=k, v=v)
    layer = jnp.asarray(layer, jnp.int32)
    cache = cache_lib.write(
      cache, k, v, layer=layer, positions=positions, token_mask=mask
    )
    backend = attention_lib.resolve_backend(backend)
    # The reference materializes probabilities anyway: its mass comes from
    # them; the engine's from a second pass against the LSE.
    want_probs = "attn_probs" in capture or (
      "attn_mass" in capture and backend is attention_lib.Backend.REFERENCE
    )
    att = attention_lib.cached_attention(
      q,
      cache,
      layer,
      q_pos=positions,
      sliding_window=g.sliding_window,
      backend=backend,
      return_probs=want_probs,
    )
    out = jnp.einsum("btnh,nhd->btd", att.out, self.wo[...])  # [B, T, D]
    if self.o_bias:
      out = out + self.bo[...]
    captured["attn_probs"] = att.probs
    if "attn_mass" in capture:
      # Written queries (masked tokens get slot S), narrowed by mass_mask.
      q_live = new.slots < S  # [B, T]
      if mass_mask is not None:
        q_live &= jnp.asarray(mass_mask).astype(bool)
      q_live = q_live.astype(jnp.float32)
      if att.probs is not None:
        captured["attn_mass"] = jnp.einsum("bnts,bt->bns", att.probs, q_live)
      else:
        view = attention_lib.LayerView(
          cache.k, cache.v, cache.pos, cache.valid, layer
        )
        captured["attn_mass"] = attention_lib.attention_mass(
          q,
          view,
          att.lse,
          q_live,
          q_pos=positions,
          sliding_window=g.sliding_window,
          backend=backend,
        )
    aux = {name: captured[name] for name in capture}
    return CachedAttentionOutput(out, cache, aux)
