"""A Llama-family decoder as pure functions over a plain parameter pytree.

One file, top to bottom: parameters, RMSNorm, rotary embeddings, one decoder
layer, and `forward`, which runs prefill (T > 1) and decode (T = 1) alike.
Layers are stacked on a leading L axis and the decoder is a `lax.scan` over
them, with the KV cache scanned alongside.

Einsum letters: B batch, T query length, S cache slots, L layers, N query
heads, K kv heads, G = N/K, H head dim, D model dim, F MLP dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attention_lib
from kvjax import checks
from kvjax.cache import (
  KVCache,
  host_array,
  is_coded,
  next_entries,
  write_slots,
)
from kvjax.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]
# Params layout (every per-layer leaf has a leading L axis):
#   embed      [V, D]
#   layers:
#     attn_norm [L, D]          mlp_norm [L, D]
#     wq [L, D, N, H]  wk [L, D, K, H]  wv [L, D, K, H]  wo [L, N, H, D]
#     bq [L, N, H]  bk [L, K, H]  bv [L, K, H]       (config.qkv_bias)
#     bo [L, D]                                       (config.o_bias)
#     q_norm [L, H]  k_norm [L, H]                    (config.qk_norm)
#     w_gate [L, D, F]  w_up [L, D, F]  w_down [L, F, D]
#   final_norm [D]
#   lm_head    [D, V]                                 (unless tied)
#   write_gate:                                       (optional, SP-KV)
#     w [L, D, K]  b [L, K]     utility u = sigmoid(norm(x) @ w + b)


class Tap(NamedTuple):
  """A named point of the decoder that can be captured and, where marked,
  replaced (penzai's `SaveIntermediate` and intervention in one list).

  Attributes:
    name: the name `capture=` and `intervene` use.
    shape: the captured array's shape (stacked over layers where L leads).
    doc: what it is.
    replaceable: `intervene(layer, name, value)` may replace it (the
      per-layer points, before anything reads them).
    compress: where a compression transform may read it (`needs`):
      "prefill" (the observed queries of prefill and `compress_observing`,
      and decode), "decode" (decode steps only: one query, cheap), or ""
      (never).
  """

  name: str
  shape: str
  doc: str
  replaceable: bool = False
  compress: str = ""


TAPS = (
  Tap(
    "resid",
    "[L, B, T, D]",
    "residual stream entering each layer",
    replaceable=True,
  ),
  Tap(
    "q_pre_rope",
    "[L, B, T, N, H]",
    "queries before RoPE",
    replaceable=True,
    compress="prefill",
  ),
  Tap(
    "q",
    "[L, B, T, N, H]",
    "queries after RoPE",
    replaceable=True,
    compress="prefill",
  ),
  Tap(
    "k",
    "[L, B, T, K, H]",
    "new keys after RoPE (what the cache stores)",
    replaceable=True,
  ),
  Tap("v", "[L, B, T, K, H]", "new values", replaceable=True),
  Tap(
    "attn_probs",
    "[L, B, N, T, S]",
    "attention probabilities over the cache slots (materialized)",
    compress="decode",
  ),
  Tap(
    "attn_mass",
    "[L, B, N, S]",
    "attention summed over the written (or `mass_mask`) queries, per slot",
    compress="prefill",
  ),
  Tap(
    "attn_out",
    "[L, B, T, D]",
    "attention write into the residual",
    replaceable=True,
  ),
  Tap(
    "mlp_out", "[L, B, T, D]", "MLP write into the residual", replaceable=True
  ),
  Tap("final_hidden", "[B, T, D]", "residual after the last layer"),
  Tap("final_norm", "[B, T, D]", "final normed hidden state (LM head input)"),
)
CAPTURE_NAMES = tuple(t.name for t in TAPS)
INTERVENE_NAMES = tuple(t.name for t in TAPS if t.replaceable)
# Taps that exist only in a model with learned write gates
# (`params["write_gate"]`, SP-KV): `capture` accepts them, and raises when
# the params have no gate. Kept apart from `TAPS` (every model's taps).
GATE_TAPS = (
  Tap(
    "write_utility",
    "[L, B, T, K]",
    "SP-KV write utility u = sigmoid(norm(x) @ w + b) of each new entry, "
    "per kv head (params with a write_gate only)",
    compress="prefill",
  ),
)
GATE_CAPTURE_NAMES = tuple(t.name for t in GATE_TAPS)
# What a compression transform may read (`KVTransform.needs`): the fields
# of `kvjax.compress.CompressContext`, and the subset prefill captures.
COMPRESS_TAPS = tuple(t.name for t in TAPS + GATE_TAPS if t.compress)
PREFILL_TAPS = tuple(
  t.name for t in TAPS + GATE_TAPS if t.compress == "prefill"
)

# intervene(layer, name, value) -> value: a static side input of `forward`
# that may replace any tap of `INTERVENE_NAMES`. `layer` is the [] int32
# layer index (traced inside the layer scan), `name` the tap, `value` its
# per-layer array (e.g. [B, T, D] for "attn_out"); the result must keep
# its shape and dtype.
Intervene = Callable[[Array, str, Array], Array]

# What `forward(write_gate=...)` may ask for.
WRITE_GATE_MODES = ("soft", "hard")


class WriteGate(NamedTuple):
  """How the learned write gates (SP-KV) act on attention in `forward`: a
  static side input (hashable, a value).

  Each new entry j gets a utility u_j in (0, 1) per kv head from
  `params["write_gate"]`. A query at position p sees the entries of the
  last `window` positions (p - pos < window) unchanged; for an older entry
  j written by the same call the logit gets a bias: log(u_j) in "soft"
  mode (training: differentiable, u = 1 is the ungated model), 0 if
  u_j >= tau and -inf otherwise in "hard" mode (inference: the entry is as
  if never written). Entries already in the cache before the call get no
  bias (admitted) unless `forward(cache_utility=...)` gives their recorded
  utility. `kvjax.compress.spkv` removes the entries below tau that the
  next query no longer sees; the ones below tau still inside its window
  stay cached, and a multi-token call after compression (a question)
  hides them as they leave each query's window only with
  `cache_utility` (`kvjax.compress.spkv.cache_utility`): then gated
  prefill, `spkv` and that call compute exactly one gated pass over both.
  Token-by-token decode through `spkv` (every=1) needs none: each step's
  action drops the entries leaving the next query's window.

  Attributes:
    mode: "soft" or "hard".
    window: the local window, always visible (an int >= 1).
    tau: the hard gate's threshold in [0, 1] (ignored by "soft").
  """

  mode: str = "soft"
  window: int = 128
  tau: float = 0.5


def check_write_gate(write_gate) -> WriteGate | None:
  """`write_gate` validated (None passes through).

  Raises:
    TypeError: not a `WriteGate` or None.
    ValueError: an unknown mode, window < 1, or tau outside [0, 1].
  """
  if write_gate is None:
    return None
  if not isinstance(write_gate, WriteGate):
    raise TypeError(
      "write_gate must be None or a kvjax.model.WriteGate, got "
      f"{type(write_gate).__name__}."
    )
  if write_gate.mode not in WRITE_GATE_MODES:
    raise ValueError(
      f"write_gate.mode must be one of {WRITE_GATE_MODES}, got "
      f"{write_gate.mode!r}."
    )
  w = write_gate.window
  if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
    raise ValueError(f"write_gate.window must be an int >= 1, got {w!r}.")
  t = write_gate.tau
  if (
    isinstance(t, bool)
    or not isinstance(t, (int, float, np.floating))
    or not 0.0 <= float(t) <= 1.0
  ):
    raise ValueError(f"write_gate.tau must be a float in [0, 1], got {t!r}.")
  return write_gate


class ForwardOutput(NamedTuple):
  """What `forward` returns (unpacks as `logits, cache, aux`).

  Attributes:
    logits: [B, T, V] float32.
    cache: the updated `KVCache` (same treedef and shapes).
    aux: dict of the captured taps, by name.
  """

  logits: Array
  cache: KVCache
  aux: dict[str, Array]


# ----------------------------------------------------------------------------
# Parameters.


def param_shapes(config: ModelConfig) -> Params:
  """The parameter pytree as `jax.ShapeDtypeStruct`s."""
  c = config
  L, D, N, K, H, F, V = (
    c.num_layers,
    c.d_model,
    c.num_heads,
    c.num_kv_heads,
    c.head_dim,
    c.mlp_dim,
    c.vocab_size,
  )
  s = lambda *shape: jax.ShapeDtypeStruct(shape, c.jnp_dtype)
  layers = {
    "attn_norm": s(L, D),
    "mlp_norm": s(L, D),
    "wq": s(L, D, N, H),
    "wk": s(L, D, K, H),
    "wv": s(L, D, K, H),
    "wo": s(L, N, H, D),
    "w_gate": s(L, D, F),
    "w_up": s(L, D, F),
    "w_down": s(L, F, D),
  }
  if c.qkv_bias:
    layers.update(bq=s(L, N, H), bk=s(L, K, H), bv=s(L, K, H))
  if c.o_bias:
    layers.update(bo=s(L, D))
  if c.qk_norm:
    layers.update(q_norm=s(L, H), k_norm=s(L, H))
  params = {"embed": s(V, D), "layers": layers, "final_norm": s(D)}
  if not c.tie_embeddings:
    params["lm_head"] = s(D, V)
  return params


def write_gate_shapes(config: ModelConfig) -> Params:
  """The optional `params["write_gate"]` subtree as ShapeDtypeStructs:
  w [L, D, K] and b [L, K] (one utility per token and kv head)."""
  c = config
  L, D, K = c.num_layers, c.d_model, c.num_kv_heads
  return {
    "w": jax.ShapeDtypeStruct((L, D, K), c.jnp_dtype),
    "b": jax.ShapeDtypeStruct((L, K), c.jnp_dtype),
  }


def has_write_gate(params: Params) -> bool:
  """Whether `params` carry SP-KV write gates (`params["write_gate"]`)."""
  return isinstance(params, dict) and "write_gate" in params


def add_write_gate(
  params: Params,
  config: ModelConfig,
  rng: Array,
  *,
  open_bias: float = 6.0,
  std: float = 0.02,
) -> Params:
  """`params` plus fresh write gates, initialised open.

  Args:
    params: the model's params (without a gate).
    config: the model config.
    rng: a jax PRNG key for w.
    open_bias: the initial b; sigmoid(6) = 0.9975, so u ~ 1 and the soft
      gate starts as (nearly) the ungated model.
    std: std of the initial w.

  Returns:
    A new params dict with "write_gate" = {"w": [L, D, K], "b": [L, K]}.

  Raises:
    ValueError: params already carry a gate.
  """
  if has_write_gate(params):
    raise ValueError("params already have a write_gate.")
  shapes = write_gate_shapes(config)
  w = (std * jax.random.normal(rng, shapes["w"].shape)).astype(
    shapes["w"].dtype
  )
  b = jnp.full(shapes["b"].shape, open_bias, shapes["b"].dtype)
  return dict(params, write_gate={"w": w, "b": b})


def split_write_gate(params: Params) -> tuple[Params, Params | None]:
  """(the params without the gate, the gate subtree or None)."""
  if not has_write_gate(params):
    return params, None
  base = {k: v for k, v in params.items() if k != "write_gate"}
  return base, params["write_gate"]


def _check_write_gate_params(gate, config: ModelConfig) -> None:
  want = write_gate_shapes(config)
  if not isinstance(gate, dict) or set(gate) != set(want):
    raise ValueError(
      f"params['write_gate'] must be a dict with exactly {sorted(want)}, "
      f"got {type(gate).__name__}"
      f"{sorted(gate) if isinstance(gate, dict) else ''}."
    )
  for name, sds in want.items():
    x = gate[name]
    if tuple(getattr(x, "shape", ())) != sds.shape:
      raise ValueError(
        f"params['write_gate'][{name!r}] has shape "
        f"{tuple(getattr(x, 'shape', ()))}, expected {sds.shape} "
        "([L, D, K] for w, [L, K] for b)."
      )


def write_utility(h: Array, gate: Params) -> tuple[Array, Array]:
  """(u, log u), each [B, T, K] float32, of normed hidden states h
  [B, T, D] under one layer's gate {"w": [D, K], "b": [K]}."""
  z = attention_lib.einsum_f32("btd,dk->btk", h, gate["w"]) + gate["b"].astype(
    jnp.float32
  )  # [B, T, K]
  return jax.nn.sigmoid(z), jax.nn.log_sigmoid(z)


# The matrices that write into the residual stream.
RESIDUAL_OUTPUTS = ("wo", "w_down")


def init_params(
  config: ModelConfig,
  rng: Array,
  std: float = 0.02,
  out_std: float | None = None,
) -> Params:
  """Random parameters: N(0, std) matrices and biases, unit norm weights.

  Args:
    config: the model config.
    rng: a jax PRNG key.
    std: std of every matrix and bias.
    out_std: std of the residual-output matrices `wo` and `w_down` (None:
      `std`; 0: zeros, so every block starts as the identity and the
      residual holds only the embedding at init).
  """
  if out_std is not None and out_std < 0:
    raise ValueError(f"out_std must be >= 0 or None, got {out_std}.")
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten_with_path(shapes)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, sds), key in zip(leaves, keys):
    name = jax.tree_util.keystr(path[-1:])
    if "norm" in name:
      out.append(jnp.ones(sds.shape, sds.dtype))
    elif out_std is not None and name.strip("[]'\"") in RESIDUAL_OUTPUTS:
      out.append(
        (out_std * jax.random.normal(key, sds.shape)).astype(sds.dtype)
      )
    else:
      out.append((std * jax.random.normal(key, sds.shape)).astype(sds.dtype))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Building blocks.


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """RMSNorm over the last axis, computed in float32, weight applied after."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """[H/2] float32 inverse frequencies, with rope scaling applied."""
  H = config.head_dim
  inv_freq = 1.0 / (
    config.rope_theta
    ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H)
  )
  inv_freq = inv_freq.astype(np.float32)
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  if rs.rope_type == "linear":
    return (inv_freq / rs.factor).astype(np.float32)
  # llama3: long wavelengths are slowed by `factor`, short ones kept, and the
  # band in between interpolates smoothly.
  old_len = rs.original_max_position_embeddings
  low_wavelen = old_len / rs.low_freq_factor
  high_wavelen = old_len / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (old_len / wavelen - rs.low_freq_factor) / (
    rs.high_freq_factor - rs.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates x [B, T, heads, H] by positions [B, T] (rotate-half layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
  sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)  # [B, T, heads, H/2] each
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def decoder_layer(
  x: Array,  # [B, T, D]
  p: Params,  # one layer's params (no L axis)
  layer_cache: tuple[Any, Any, Array, Array],  # L-stacked k, v, pos, valid
  *,
  positions: Array,  # [B, T]
  slots: Array,  # [B, T]
  config: ModelConfig,
  inv_freq: np.ndarray,
  backend: attention_lib.Backend | str,
  capture: tuple[str, ...],
  layer: Array | int,  # [] int32 layer index (traced inside the scan)
  intervene: Intervene | None = None,
  mass_weights: Array | None = None,  # [B, T] bool: "attn_mass" queries
  context_parallel: bool = False,
  gate: Params | None = None,  # one layer's write gate: w [D, K], b [K]
  write_gate: WriteGate | None = None,
  cached_utility: Array | None = None,  # [B, K, S] this layer's slots
) -> tuple[Array, tuple[Any, Any, Array, Array], dict[str, Array]]:
  """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x)).

  The cache leaves are the whole model's (L-stacked); the block writes its
  new entries into layer `layer` in place and attends over that layer.
  Every tap of `TAPS` passes through `tap`: `intervene(layer, name,
  value)`, when given, may replace it there, and `capture` records it
  after any replacement. With `gate`, the new entries' write utility is
  computed from the normed input (the "write_utility" tap) and, with
  `write_gate`, biases the logits of the entries this call writes (see
  `WriteGate`), and those of the entries already cached by
  `cached_utility` (the utility recorded for each slot) when given.
  """
  c = config
  captured = {}
  layer = jnp.asarray(layer, jnp.int32)

  def tap(name: str, value: Array) -> Array:
    if intervene is not None:
      new = intervene(layer, name, value)
      if getattr(new, "shape", None) != value.shape or (
        getattr(new, "dtype", None) != value.dtype
      ):
        raise ValueError(
          f"intervene must return the tap's shape and dtype: {name} is "
          f"{value.dtype}{list(value.shape)}, got "
          f"{getattr(new, 'dtype', type(new).__name__)}"
          f"{list(getattr(new, 'shape', ()))}."
        )
      value = new
    if name in capture:
      captured[name] = value
    return value

  x = tap("resid", x)

  # Attention.
  h = rms_norm(x, p["attn_norm"], c.norm_eps)  # [B, T, D]
  q = jnp.einsum("btd,dnh->btnh", h, p["wq"])  # [B, T, N, H]
  k = jnp.einsum("btd,dkh->btkh", h, p["wk"])  # [B, T, K, H]
  v = jnp.einsum("btd,dkh->btkh", h, p["wv"])  # [B, T, K, H]
  if c.qkv_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if c.qk_norm:
    q = rms_norm(q, p["q_norm"], c.norm_eps)
    k = rms_norm(k, p["k_norm"], c.norm_eps)
  q = tap("q_pre_rope", q)
  q = tap("q", apply_rope(q, positions, inv_freq))
  k = tap("k", apply_rope(k, positions, inv_freq))
  v = tap("v", v)
  layer_cache = write_slots(layer_cache, k, v, positions, slots, layer=layer)
  view = attention_lib.LayerView(*layer_cache, layer)
  key_bias = None
  if gate is not None:
    u, log_u = write_utility(h, gate)  # [B, T, K] each
    if "write_utility" in capture:
      captured["write_utility"] = u
    if write_gate is not None:
      if write_gate.mode == "soft":
        gate_bias = lambda u, log_u: log_u
      else:  # hard: below tau, as if never written
        gate_bias = lambda u, log_u: jnp.where(
          u >= write_gate.tau, 0.0, -jnp.inf
        )
      B_, S_ = slots.shape[0], view.pos.shape[-1]
      rows = jnp.broadcast_to(jnp.arange(B_)[:, None], slots.shape)  # [B, T]
      # [B, K, S]: the bias of each slot; entries cached before this call
      # get their recorded utility's, or 0 (admitted) without one.
      if cached_utility is None:
        old_bias = jnp.zeros((B_, c.num_kv_heads, S_), jnp.float32)
      else:
        old_u = cached_utility.astype(jnp.float32)  # [B, K, S]
        old_bias = gate_bias(old_u, jnp.log(old_u))
      bias = old_bias.at[rows, :, slots].set(gate_bias(u, log_u), mode="drop")
      key_bias = attention_lib.KeyBias(bias, int(write_gate.window))
  backend = attention_lib.resolve_backend(backend)
  # The reference materializes probabilities anyway: its mass comes from
  # them; the engine's from a second pass against the LSE.
  want_probs = "attn_probs" in capture or (
    "attn_mass" in capture and backend is attention_lib.Backend.REFERENCE
  )
  ring = None
  if (
    context_parallel
    and not want_probs
    and key_bias is None
    and not is_coded(layer_cache[0])
  ):
    from kvjax import parallel

    mesh = parallel.context_mesh()
    shards = parallel.seq_shards()
    if mesh is not None and shards > 1 and q.shape[1] % shards == 0:
      # The cache held nothing before these tokens: attending over the new
      # entries (as stored) is attending over the cache, so the prompt's
      # shards pass their blocks round the ring instead.
      dt = layer_cache[0].dtype
      ring = parallel.ring_attention(
        q,
        k.astype(dt),
        v.astype(dt),
        q_pos=positions,
        k_pos=positions,
        k_valid=slots < view.pos.shape[-1],
        sliding_window=c.sliding_window,
        backend=backend,
        mesh=mesh,
      )
  att = (
    ring
    if ring is not None
    else attention_lib.cached_attention(
      q,
      view,
      q_pos=positions,
      sliding_window=c.sliding_window,
      backend=backend,
      return_probs=want_probs,
      key_bias=key_bias,
    )
  )
  out, probs = att.out, att.probs  # out [B, T, N, H]
  if "attn_probs" in capture:
    captured["attn_probs"] = probs
  attn_out = jnp.einsum("btnh,nhd->btd", out, p["wo"])  # [B, T, D]
  if c.o_bias:
    attn_out = attn_out + p["bo"]
  x = x + tap("attn_out", attn_out)

  # MLP (SwiGLU).
  h = rms_norm(x, p["mlp_norm"], c.norm_eps)
  gate = jnp.einsum("btd,df->btf", h, p["w_gate"])  # [B, T, F]
  up = jnp.einsum("btd,df->btf", h, p["w_up"])  # [B, T, F]
  mlp_out = jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
  x = x + tap("mlp_out", mlp_out)

  if "attn_mass" in capture:
    # Written queries (padding and dropped writes get slot S), narrowed to
    # `mass_weights` when given.
    q_live = slots < view.pos.shape[-1]  # [B, T]
    if mass_weights is not None:
      q_live &= mass_weights.astype(bool)
    q_live = q_live.astype(jnp.float32)
    if probs is not None:
      captured["attn_mass"] = jnp.einsum("bnts,bt->bns", probs, q_live)
    else:
      captured["attn_mass"] = attention_lib.attention_mass(
        q,
        view,
        att.lse,
        q_live,
        q_pos=positions,
        sliding_window=c.sliding_window,
        backend=backend,
      )
  return x, layer_cache, captured


# ----------------------------------------------------------------------------
# Forward.


def _check_forward_args(
  params, tokens, cache, config, positions, token_mask, capture, intervene=None
):
  """`forward`'s own checks (capture, intervene, mask) around the shared
  ones in `kvjax.checks`; returns tokens as an array."""
  checks.check_config(config)
  tokens = checks.check_tokens(tokens, config)
  B, T = tokens.shape
  checks.check_cache(cache, config, batch=B)
  base, gate = split_write_gate(params)
  checks.check_params(base, config)
  if gate is not None:
    _check_write_gate_params(gate, config)
  checks.check_positions(positions, B, T)
  if token_mask is not None and tuple(token_mask.shape) != (B, T):
    raise ValueError(
      f"token_mask must have shape {(B, T)}, got {tuple(token_mask.shape)}."
    )
  names = CAPTURE_NAMES + GATE_CAPTURE_NAMES
  bad = [n for n in capture if n not in names]
  if bad or not isinstance(capture, tuple):
    raise ValueError(
      f"capture must be a tuple of names from {names}, got {capture!r}."
    )
  if gate is None and any(n in GATE_CAPTURE_NAMES for n in capture):
    raise ValueError(
      f"capture asks for {GATE_CAPTURE_NAMES}, which only a model with "
      "write gates has; these params have no 'write_gate' (see "
      "kvjax.model.add_write_gate)."
    )
  if intervene is not None and not callable(intervene):
    raise TypeError(
      "intervene must be None or a callable (layer, name, "
      f"value) -> value, got {type(intervene).__name__}."
    )
  return tokens


def unembed(params: Params, config: ModelConfig, x: Array) -> Array:
  """Logits [..., V] float32 of final-normed hidden states x [..., D]: the
  LM head, or the embedding when `config.tie_embeddings`."""
  if config.tie_embeddings:
    return attention_lib.einsum_f32("...d,vd->...v", x, params["embed"])
  return attention_lib.einsum_f32("...d,dv->...v", x, params["lm_head"])


def forward(
  params: Params,
  tokens: Array,
  cache: KVCache,
  *,
  config: ModelConfig,
  positions: Array | None = None,
  token_mask: Array | None = None,
  capture: tuple[str, ...] = (),
  backend: attention_lib.Backend | str = attention_lib.Backend.AUTO,
  intervene: Intervene | None = None,
  mass_mask: Array | None = None,
  context_parallel: bool = False,
  write_gate: WriteGate | None = None,
  cache_utility: Array | None = None,
) -> ForwardOutput:
  """Runs the decoder on new tokens, reading and extending the cache.

  The same function does prefill (T > 1, usually on an empty cache) and
  decode (T = 1). New keys/values are written to slots `cache.end[b]`
  onwards, then the queries attend over the whole cache.

  Args:
    params: the parameter pytree (see the layout at the top of this file).
    tokens: [B, T] int token ids.
    cache: the `KVCache` to read and extend.
    config: the model config (static).
    positions: optional [B, T] int positions; defaults to
      `cache.length[b]` onwards, counting only unmasked tokens.
    token_mask: optional [B, T] bool; False marks padding. Padding tokens
      are not written to the cache, advance no counter, and their logits
      are meaningless (finite). Any layout (left or right padding) works.
    capture: static tuple of names from `CAPTURE_NAMES`; each lands in
      `aux` stacked over layers.
    backend: attention backend, a `kvjax.attention.Backend` or its name
      ("auto", "reference", "xla"); AUTO picks by platform.
    intervene: optional static side input (penzai style), a callable
      `intervene(layer, name, value) -> value` applied at every tap of
      `INTERVENE_NAMES` of every layer (the residual entering it, queries
      before and after RoPE, the new keys and values before they are
      written, the attention and MLP writes before they are added to the
      residual; shapes in `TAPS`) and returning its replacement (same
      shape and dtype, else ValueError); it is called for every one of
      those names, so filter on `name` and return `value` unchanged for the
      others. `layer` is
      the [] int32 layer index, a tracer inside the layer scan, so select
      layers with `jnp.where`, not Python `if`; `name` is static, so a
      Python `if` on it is fine. Captured taps are the intervened ones. Under `jax.jit` mark it static (a callable is hashed
      by identity). None (the default) leaves the computation untouched.
      `kvjax.analysis.residual.intervene_writes` builds common ones.
    mass_mask: optional [B, T] bool, the queries whose attention the
      "attn_mass" capture sums (default: every token written to the
      cache; the mask narrows that).
    context_parallel: the cache holds no entry yet (a prefill on a fresh
      cache; raises when it visibly does). Under a mesh with a `seq` axis
      (`jax.set_mesh`) the prompt's attention then runs as ring attention
      (`kvjax.parallel.ring_attention`) when T splits over the shards;
      otherwise, and without a mesh, it changes nothing.
    write_gate: optional static `WriteGate` (SP-KV): with params that carry
      `params["write_gate"]`, biases the attention logits of the entries
      this call writes, outside each query's local window: log(u) ("soft",
      training) or 0 / -inf at `tau` ("hard", inference). Runs on the
      reference backend (AUTO resolves to it; others raise) and without
      ring attention. None (the default) leaves attention untouched; the
      "write_utility" tap is available either way when the params have a
      gate. Params without a gate behave exactly as before.
    cache_utility: optional [L, B, K, S] float utility recorded for the
      entries already in the cache (`kvjax.compress.spkv.cache_utility`;
      1 = admitted), with `write_gate`: those entries get the same bias
      as the ones this call writes once they leave a query's window. A
      gated prefill, `spkv`, then a multi-token call with it computes
      exactly what one gated pass over both would. None: cached entries
      are admitted (unbiased).

  Returns:
    A `ForwardOutput` (unpacks as `logits, cache, aux`): logits [B, T, V]
    float32, the updated cache (same treedef and shapes), and the dict of
    captured taps.

  Raises:
    TypeError / ValueError: (checks shared with the other entries, see
      `kvjax.checks`) for malformed tokens, positions, mask or capture
      names, a cache laid out for another config (layers, kv heads,
      head_dim) or with a non-float payload, params of another config; and,
      when called eagerly, token ids outside the vocabulary, negative
      positions, or a write past the cache's capacity. Under `jit` the
      value checks are skipped: a write past capacity is dropped instead
      and `kvjax.cache.cache_overflowed` reports it.
  """
  tokens = _check_forward_args(
    params, tokens, cache, config, positions, token_mask, capture, intervene
  )
  write_gate = check_write_gate(write_gate)
  gate = params.get("write_gate") if isinstance(params, dict) else None
  if write_gate is not None and gate is None:
    raise ValueError(
      "write_gate is set but params have no 'write_gate' (see "
      "kvjax.model.add_write_gate)."
    )
  if cache_utility is not None:
    if write_gate is None:
      raise ValueError(
        "cache_utility biases cached entries through the write gate: pass "
        "write_gate too."
      )
    want = (config.num_layers, tokens.shape[0], config.num_kv_heads)
    want += (cache.capacity,)
    if tuple(jnp.shape(cache_utility)) != want:
      raise ValueError(
        f"cache_utility must have shape [L, B, K, S] = {list(want)}, got "
        f"{list(jnp.shape(cache_utility))}."
      )
  if write_gate is not None and (
    backend == attention_lib.Backend.AUTO or backend == "auto"
  ):
    # The logit bias lives in the reference path only.
    backend = attention_lib.Backend.REFERENCE
  backend = attention_lib.resolve_backend(backend)
  if not isinstance(context_parallel, bool):
    raise TypeError(
      f"context_parallel must be a bool, got {type(context_parallel).__name__}."
    )
  if (
    context_parallel
    and checks.is_concrete(cache.valid)
    and bool(jnp.any(cache.valid))
  ):
    raise ValueError(
      "context_parallel=True needs an empty cache (a fresh prefill); this "
      "one holds entries."
    )
  B, T = tokens.shape
  S = cache.capacity
  if token_mask is None:
    token_mask = jnp.ones((B, T), bool)
  if mass_mask is not None and tuple(mass_mask.shape) != (B, T):
    raise ValueError(
      f"mass_mask must have shape {(B, T)}, got {tuple(mass_mask.shape)}."
    )
  if checks.is_concrete(token_mask):
    n_host = host_array(token_mask).astype(bool).sum(axis=1)
    checks.check_room(
      cache,
      n_host,
      f"writing {int(n_host.max())} tokens",
      "Build the cache with a larger `capacity` (prompt "
      "length + new tokens) or compress it first.",
    )
  new = next_entries(cache, token_mask, positions)
  positions, slots, n_new = new  # [B, T], [B, T] (S: not written), [B]
  mass_weights = None if mass_mask is None else mass_mask.astype(bool)

  x = params["embed"][tokens].astype(config.jnp_dtype)  # [B, T, D]
  inv_freq = rope_inv_freq(config)

  # The whole cache rides in the scan's carry: each layer writes its new
  # entries in place and reads its own layer (no per-layer copies in or
  # out of the scan).
  def body(carry, xs):
    x, layer_cache = carry
    p, layer_gate, layer_utility, layer = xs
    x, layer_cache, captured = decoder_layer(
      x,
      p,
      layer_cache,
      positions=positions,
      slots=slots,
      config=config,
      inv_freq=inv_freq,
      backend=backend,
      capture=capture,
      layer=layer,
      intervene=intervene,
      mass_weights=mass_weights,
      context_parallel=context_parallel,
      gate=layer_gate,
      write_gate=write_gate,
      cached_utility=layer_utility,
    )
    return (x, layer_cache), captured

  layer_caches = (cache.k, cache.v, cache.pos, cache.valid)
  xs = (
    params["layers"],
    gate,  # None, or {"w": [L, D, K], "b": [L, K]}
    cache_utility,  # None, or [L, B, K, S]
    jnp.arange(config.num_layers, dtype=jnp.int32),
  )
  (x, layer_caches), aux = jax.lax.scan(body, (x, layer_caches), xs)
  if "final_hidden" in capture:
    aux["final_hidden"] = x
  x = rms_norm(x, params["final_norm"], config.norm_eps)
  if "final_norm" in capture:
    aux["final_norm"] = x
  logits = unembed(params, config, x)
  k, v, pos, valid = layer_caches
  cache = cache._replace(
    k=k,
    v=v,
    pos=pos,
    valid=valid,
    end=cache.end + n_new,
    length=cache.length + n_new,
  )
  return ForwardOutput(logits, cache, aux)
