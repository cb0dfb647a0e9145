"""`Decoder`: kvjax's Llama-family decoder as an NNX module.

Its state is kvjax's functional params pytree, leaf for leaf: the layers
are one `DecoderBlock` whose parameters carry a leading L axis (built with
`nnx.vmap`, run with a `lax.scan` over layers, as `kvjax.forward` runs), so
`Decoder.from_params` wraps the very arrays of a params pytree and
`to_params` hands them back, without a copy. The computation is
`kvjax.forward`'s, op for op; the cache is an explicit input and output.

nnx state                     kvjax params
  embed [V, D]                  embed
  layers.attn_norm [L, D]       layers.attn_norm   (mlp_norm likewise)
  layers.attn.<w> [L, ...]      layers.<w>   w in wq wk wv wo bq bk bv bo
                                                  q_norm k_norm
  layers.mlp.<w> [L, ...]       layers.<w>   w in w_gate w_up w_down
  final_norm [D]                final_norm
  lm_head [D, V]                lm_head            (unless tied)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import attention as attention_lib
from kvjax import cache as cache_lib
from kvjax import checks
from kvjax import model as model_lib
from kvjax.cache import KVCache
from kvjax.config import ModelConfig
from kvjax.model import ForwardOutput
from kvjax.nn.attention import ATTENTION_TAPS, CachedAttention, check_capture

Array = jax.Array
Params = dict[str, Any]

# Where each per-layer leaf of the functional params lives in a block.
_ATTN_LEAVES = (
  "wq",
  "wk",
  "wv",
  "wo",
  "bq",
  "bk",
  "bv",
  "bo",
  "q_norm",
  "k_norm",
)
_MLP_LEAVES = ("w_gate", "w_up", "w_down")

# What `Decoder` can capture: every tap of `kvjax.forward` (same names and
# shapes, stacked over L where per layer).
DECODER_TAPS = (
  ("resid",)
  + ATTENTION_TAPS
  + ("attn_out", "mlp_out", "final_hidden", "final_norm")
)


def _block_path(name: str) -> tuple[str, ...]:
  """The path inside a `DecoderBlock` of the per-layer params leaf `name`."""
  if name in _ATTN_LEAVES:
    return ("attn", name)
  if name in _MLP_LEAVES:
    return ("mlp", name)
  return (name,)


class SwiGLU(nnx.Module):
  """The SwiGLU MLP: w_down(silu(x w_gate) * (x w_up)).

  Attributes:
    w_gate: [D, F].  w_up: [D, F].  w_down: [F, D].
  """

  def __init__(
    self,
    d_model: int,
    mlp_dim: int,
    *,
    param_dtype: Any,
    kernel_init: nnx.Initializer,
    rngs: nnx.Rngs,
  ):
    key, dt = rngs.params, jnp.dtype(param_dtype)
    self.w_gate = nnx.Param(kernel_init(key(), (d_model, mlp_dim), dt))
    self.w_up = nnx.Param(kernel_init(key(), (d_model, mlp_dim), dt))
    self.w_down = nnx.Param(kernel_init(key(), (mlp_dim, d_model), dt))

  def __call__(self, x: Array) -> Array:  # [B, T, D] -> [B, T, D]
    gate = jnp.einsum("btd,df->btf", x, self.w_gate[...])  # [B, T, F]
    up = jnp.einsum("btd,df->btf", x, self.w_up[...])  # [B, T, F]
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.w_down[...])


class DecoderBlock(nnx.Module):
  """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x)).

  Attributes:
    attn_norm: [D] RMSNorm weight before attention.
    attn: the `CachedAttention`.
    mlp_norm: [D] RMSNorm weight before the MLP.
    mlp: the `SwiGLU`.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, std: float = 0.02):
    c = config
    dt = c.jnp_dtype
    init = nnx.initializers.normal(std)
    self.norm_eps = c.norm_eps
    self.attn_norm = nnx.Param(jnp.ones((c.d_model,), dt))
    self.attn = CachedAttention(
      c.d_model,
      c.geometry,
      qkv_bias=c.qkv_bias,
      o_bias=c.o_bias,
      qk_norm=c.qk_norm,
      norm_eps=c.norm_eps,
      param_dtype=dt,
      kernel_init=init,
      bias_init=init,
      rngs=rngs,
    )
    self.mlp_norm = nnx.Param(jnp.ones((c.d_model,), dt))
    self.mlp = SwiGLU(
      c.d_model, c.mlp_dim, param_dtype=dt, kernel_init=init, rngs=rngs
    )

  def __call__(
    self,
    x: Array,
    cache: KVCache,
    *,
    layer: int | Array,
    positions: Array,
    token_mask: Array,
    backend: attention_lib.Backend,
    capture: tuple[str, ...] = (),
    mass_mask: Array | None = None,
  ) -> tuple[Array, KVCache, dict[str, Array]]:
    """x [B, T, D] -> (x, cache with this layer written, captured taps)."""
    captured = {"resid": x}
    h = model_lib.rms_norm(x, self.attn_norm[...], self.norm_eps)
    attn_out, cache, aux = self.attn(
      h,
      cache,
      layer=layer,
      positions=positions,
      token_mask=token_mask,
      backend=backend,
      mass_mask=mass_mask,
      capture=tuple(n for n in capture if n in ATTENTION_TAPS),
    )
    x = x + attn_out
    h = model_lib.rms_norm(x, self.mlp_norm[...], self.norm_eps)
    mlp_out = self.mlp(h)
    x = x + mlp_out
    captured.update(aux, attn_out=attn_out, mlp_out=mlp_out)
    return x, cache, {n: captured[n] for n in capture if n in captured}


class Decoder(nnx.Module):
  """kvjax's Llama-family decoder (a `ModelConfig`) as an NNX module.

  `Decoder(config, rngs=nnx.Rngs(0))` draws new weights (N(0, 0.02)
  matrices and biases, unit norms, as `kvjax.init_params`);
  `Decoder.from_params(params, config)` wraps existing ones (e.g. from
  `kvjax.hf.load_pretrained`) and `decoder.to_params()` gives them back,
  the same arrays (see the module docstring for the layout). Calling it is
  `kvjax.forward` on those params.

  Attributes:
    config: the `ModelConfig` (static).
    embed: [V, D].
    layers: a `DecoderBlock` whose parameters are stacked on a leading L.
    final_norm: [D].
    lm_head: [D, V] (absent with `config.tie_embeddings`).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, std: float = 0.02):
    """Builds a decoder with freshly drawn weights.

    Args:
      config: the model config.
      rngs: an `nnx.Rngs` with a "params" stream.
      std: std of every matrix and bias.

    Raises:
      TypeError: `config` is not a `ModelConfig`.
    """
    c = self.config = checks.check_config(config)
    dt = c.jnp_dtype
    init = nnx.initializers.normal(std)
    self.embed = nnx.Param(init(rngs.params(), (c.vocab_size, c.d_model), dt))

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_blocks(rngs: nnx.Rngs) -> DecoderBlock:
      return DecoderBlock(c, rngs=rngs, std=std)

    self.layers = stacked_blocks(rngs)
    self.final_norm = nnx.Param(jnp.ones((c.d_model,), dt))
    if not c.tie_embeddings:
      self.lm_head = nnx.Param(
        init(rngs.params(), (c.d_model, c.vocab_size), dt)
      )

  # --------------------------------------------------------------------------
  # Conversion to and from kvjax's functional params.

  @classmethod
  def from_params(cls, params: Params, config: ModelConfig) -> "Decoder":
    """A decoder holding `params` (the arrays themselves, not copies).

    Args:
      params: kvjax params for `config` (`kvjax.init_params`,
        `kvjax.hf.load_pretrained`, a checkpoint).
      config: their `ModelConfig`.

    Returns:
      The `Decoder`.

    Raises:
      TypeError: `config` is not a `ModelConfig`, `params` not a dict.
      ValueError: `params` misses a leaf, has an extra one, or one of
        another shape or dtype than `config` expects (named).
    """
    checks.check_config(config)
    if not isinstance(params, dict) or not isinstance(
      params.get("layers"), dict
    ):
      raise TypeError(
        "params must be kvjax's params dict (with a 'layers' "
        f"dict; see kvjax.model), got {type(params).__name__}."
      )
    checks.check_params(params, config)
    # The NNX way to load weights: an abstract module (shapes only, nothing
    # drawn), its state replaced by the given arrays, merged back.
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    layers = {}
    for name, leaf in params["layers"].items():
      path = _block_path(name)
      node = layers
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = leaf
    nnx.replace_by_pure_dict(state, {**params, "layers": layers})
    return nnx.merge(graphdef, state)

  def to_params(self) -> Params:
    """kvjax's functional params pytree of this decoder: the same arrays,
    in the tree structure of `kvjax.model.param_shapes(self.config)`."""
    shapes = model_lib.param_shapes(self.config)
    layers = {}
    for name in shapes["layers"]:
      node = self.layers
      for part in _block_path(name):
        node = getattr(node, part)
      layers[name] = node[...]
    return {
      name: layers if name == "layers" else getattr(self, name)[...]
      for name in shapes
    }

  # --------------------------------------------------------------------------
  # Forward.

  def __call__(
    self,
    tokens: Array,
    cache: KVCache,
    *,
    positions: Array | None = None,
    token_mask: Array | None = None,
    capture: tuple[str, ...] = (),
    backend: attention_lib.Backend | str = attention_lib.Backend.AUTO,
    mass_mask: Array | None = None,
  ) -> ForwardOutput:
    """Runs the decoder on new tokens, reading and extending the cache.

    Prefill (T > 1) and decode (T = 1) alike, as `kvjax.forward`: new
    keys/values go to slots `cache.end[b]` onwards, then the queries attend
    over the whole cache; `end`/`length` advance by the unmasked tokens.

    Args:
      tokens: [B, T] int token ids.
      cache: the `KVCache` to read and extend (plain, compacted or coded).
      positions: optional [B, T] int positions (default: `cache.length[b]`
        onwards, counting unmasked tokens).
      token_mask: optional [B, T] bool; False marks padding (not written,
        no counter moves, logits meaningless but finite).
      capture: static tuple of names from `DECODER_TAPS` (those of
        `kvjax.forward`), each stacked over layers in `aux`.
      backend: attention backend, a `kvjax.attention.Backend` or its name.
      mass_mask: optional [B, T] bool, the queries "attn_mass" sums.

    Returns:
      A `kvjax.model.ForwardOutput` (unpacks as `logits, cache, aux`):
      logits [B, T, V] float32, the updated cache, the captured taps.

    Raises:
      TypeError / ValueError: as `kvjax.forward`, naming the argument:
        malformed tokens, positions, masks or capture names, a cache laid
        out for another config; eagerly, ids outside the vocabulary or a
        write past the cache's capacity.
    """
    c = self.config
    tokens = checks.check_tokens(tokens, c)
    B, T = tokens.shape
    checks.check_cache(cache, c, batch=B)
    checks.check_positions(positions, B, T)
    for name, m in (("token_mask", token_mask), ("mass_mask", mass_mask)):
      if m is not None and tuple(getattr(m, "shape", ())) != (B, T):
        raise ValueError(
          f"{name} must have shape {(B, T)}, got "
          f"{getattr(m, 'shape', type(m).__name__)}."
        )
    check_capture(capture, DECODER_TAPS)
    backend = attention_lib.resolve_backend(backend)
    mask = (
      jnp.ones((B, T), bool)
      if token_mask is None
      else jnp.asarray(token_mask).astype(bool)
    )
    if checks.is_concrete(mask):
      n_host = np.asarray(mask).sum(axis=1)
      checks.check_room(
        cache,
        n_host,
        f"writing {int(n_host.max())} tokens",
        "Build the cache with a larger `capacity` (prompt "
        "length + new tokens) or compress it first.",
      )
    positions = cache_lib.next_entries(cache, mask, positions).positions

    x = self.embed[...][tokens].astype(c.jnp_dtype)  # [B, T, D]
    # One block with L-stacked parameters, scanned over layers; the whole
    # cache rides in the carry (each layer writes its own layer in place).
    graphdef, stacked = nnx.split(self.layers)

    def body(carry, xs):
      x, cache = carry
      state, layer = xs
      block = nnx.merge(graphdef, state)
      x, cache, captured = block(
        x,
        cache,
        layer=layer,
        positions=positions,
        token_mask=mask,
        backend=backend,
        capture=capture,
        mass_mask=mass_mask,
      )
      return (x, cache), captured

    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    (x, cache), aux = jax.lax.scan(body, (x, cache), (stacked, layer_ids))
    aux = dict(aux)
    if "final_hidden" in capture:
      aux["final_hidden"] = x
    x = model_lib.rms_norm(x, self.final_norm[...], c.norm_eps)
    if "final_norm" in capture:
      aux["final_norm"] = x
    if c.tie_embeddings:
      logits = attention_lib.einsum_f32("btd,vd->btv", x, self.embed[...])
    else:
      logits = attention_lib.einsum_f32("btd,dv->btv", x, self.lm_head[...])
    return ForwardOutput(logits, cache_lib.advance(cache, mask), aux)
