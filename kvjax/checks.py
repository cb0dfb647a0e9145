"""Eager argument checks shared by the model and generation entries.

`forward`, `prefill`, `generate`, `decode`, `decode_step`,
`compress_observing` and `compress_cache` validate their arguments here, so
each rule (token ids in the vocabulary, a cache that fits the config, a
finite temperature, ...) is written once and reads the same everywhere.

Every check raises `TypeError` (wrong kind of value) or `ValueError`
(right kind, bad value) naming the argument, the value and what is allowed.
Checks of shapes and dtypes are static and run on tracers too; checks that
read values (token ranges, lengths, positions, the overflow flag) run only
on concrete arrays, so under a user's own `jit` they are skipped, as is the
params check. None of them reads more than small index arrays: the params
check compares shapes and dtypes with `kvjax.model.param_shapes(config)`
and never touches the weights.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import (
  KVCache,
  TailedKV,
  cache_overflowed,
  host_array,
  is_coded,
)
from kvjax.config import AttentionGeometry, ModelConfig, as_geometry

Array = jax.Array

# Dtypes a key/value payload stored as plain arrays may have.
CACHE_DTYPES = ("float32", "bfloat16", "float16")


def is_concrete(*xs) -> bool:
  """True when no argument is a tracer (values can be read on the host)."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _describe(x) -> str:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{type(x).__name__} {x.dtype}{list(x.shape)}"
  return f"{x!r} ({type(x).__name__})"


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_array(x):
  """Python scalars and sequences become NumPy arrays; arrays pass."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return x
  if isinstance(x, (list, tuple, numbers.Number)):
    return np.asarray(x)
  return x


# ----------------------------------------------------------------------------
# Config and params.


def check_config(config) -> ModelConfig:
  """`config` must be a `ModelConfig` (TypeError otherwise)."""
  if not isinstance(config, ModelConfig):
    raise TypeError(
      f"config must be a kvjax ModelConfig (e.g. "
      f"kvjax.get_config('tiny')), got {type(config).__name__}."
    )
  return config


@functools.lru_cache(maxsize=32)
def _expected_params(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  # Imported here: kvjax.model imports this module.
  from kvjax import model as model_lib  # pylint: disable=g-import-not-at-top

  flat, _ = jax.tree.flatten_with_path(model_lib.param_shapes(config))
  return {jax.tree_util.keystr(path): sds for path, sds in flat}


@functools.lru_cache(maxsize=32)
def _expected_gate(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  # SP-KV's optional write gate (`kvjax.model.add_write_gate`).
  from kvjax import model as model_lib  # pylint: disable=g-import-not-at-top

  flat, _ = jax.tree.flatten_with_path(
    {"write_gate": model_lib.write_gate_shapes(config)}
  )
  return {jax.tree_util.keystr(path): sds for path, sds in flat}


def check_params(params, config: ModelConfig) -> None:
  """The params pytree must have the leaves, shapes and dtypes of `config`.

  Compares metadata with `kvjax.model.param_shapes(config)` (no weights
  are read). Skipped when any leaf is a tracer.

  Raises:
    ValueError: naming the first leaf that is missing, unexpected, or of
      another shape or dtype than the config expects.
  """
  flat, _ = jax.tree.flatten_with_path(params)
  if not is_concrete(*(x for _, x in flat)):
    return
  expected = _expected_params(config)
  if isinstance(params, dict) and "write_gate" in params:
    expected = {**expected, **_expected_gate(config)}
  got = {jax.tree_util.keystr(path): x for path, x in flat}
  which = (
    f"config {config.name!r} (d_model={config.d_model}, "
    f"num_layers={config.num_layers}, vocab_size={config.vocab_size})"
  )
  for path, want in expected.items():
    if path not in got:
      raise ValueError(
        f"params{path} is missing; {which} expects an array "
        f"of shape {tuple(want.shape)}."
      )
    x = got[path]
    shape = tuple(getattr(x, "shape", ()))
    if shape != tuple(want.shape):
      raise ValueError(
        f"params{path} has shape {shape}, {which} expects "
        f"{tuple(want.shape)}: params and config describe different "
        "models."
      )
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != want.dtype:
      raise ValueError(
        f"params{path} has dtype {dtype}, {which} expects "
        f"{want.dtype}; cast the params or use "
        f"config.replace(dtype=...)."
      )
  extra = [path for path in got if path not in expected]
  if extra:
    raise ValueError(
      f"params{extra[0]} is not a parameter of {which}; "
      f"expected exactly the leaves {sorted(expected)}."
    )


# ----------------------------------------------------------------------------
# Tokens, lengths, positions.


def _check_integer(x, name: str, shape_doc: str):
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
      f"{name} must be an integer array {shape_doc}, got {_describe(x)}."
    )


def check_token_ids(
  x, config: ModelConfig, name: str = "tokens", read_device: bool = True
) -> None:
  """Token ids must lie in [0, config.vocab_size) (concrete values only).

  Args:
    x: an integer array of token ids.
    config: the model config.
    name: the argument's name, for the message.
    read_device: False skips device arrays, checking only host data
      (NumPy, Python), so that the check never waits on the device.
  """
  if not is_concrete(x) or x.size == 0:
    return
  if not read_device and isinstance(x, jax.Array):
    return
  host = np.asarray(x)
  lo, hi = int(host.min()), int(host.max())
  if lo < 0 or hi >= config.vocab_size:
    raise ValueError(
      f"{name}: token ids must be in [0, {config.vocab_size}) "
      f"(the vocabulary), got range [{lo}, {hi}]."
    )


def check_tokens(
  tokens, config: ModelConfig, name: str = "tokens", batch: int | None = None
):
  """A [B, T] integer token array with B, T >= 1 and ids in the vocabulary.

  Python lists are converted to an array, which is returned.

  Args:
    tokens: the token ids.
    config: the model config.
    name: the argument's name, for the message.
    batch: the batch size B it must have (None: any B >= 1).

  Returns:
    `tokens` as an array.
  """
  tokens = _as_array(tokens)
  _check_integer(tokens, name, "[B, T]")
  if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
    raise ValueError(
      f"{name} must have shape [B, T] with B >= 1 and T >= 1, "
      f"got {tuple(tokens.shape)}."
    )
  if batch is not None and tokens.shape[0] != batch:
    raise ValueError(
      f"{name} has batch {tokens.shape[0]}, the cache has "
      f"batch {batch}; they must agree."
    )
  check_token_ids(tokens, config, name)
  return tokens


def check_step_tokens(
  token,
  config: ModelConfig,
  batch: int,
  name: str = "token",
  read_device: bool = True,
):
  """One token per row: a [B] integer array with ids in the vocabulary.

  Returns:
    `token` as an array.
  """
  token = _as_array(token)
  _check_integer(token, name, f"[B={batch}]")
  if tuple(token.shape) != (batch,):
    raise ValueError(
      f"{name} must have shape [B] = ({batch},) (one token "
      f"per row of the cache), got {tuple(token.shape)}."
    )
  check_token_ids(token, config, name, read_device=read_device)
  return token


def check_prompt_lengths(prompt_lengths, batch: int, width: int) -> Array:
  """[B] true prompt lengths in [1, T]; None means every row has T.

  Accepts a Python list. Returns an int32 array [B].
  """
  if prompt_lengths is None:
    return jnp.full((batch,), width, jnp.int32)
  prompt_lengths = _as_array(prompt_lengths)
  _check_integer(prompt_lengths, "prompt_lengths", f"[B={batch}]")
  if tuple(prompt_lengths.shape) != (batch,):
    raise ValueError(
      f"prompt_lengths must have shape ({batch},) (one length "
      f"per prompt row), got {tuple(prompt_lengths.shape)}."
    )
  if is_concrete(prompt_lengths):
    host = np.asarray(prompt_lengths)
    lo, hi = int(host.min()), int(host.max())
    if lo < 1 or hi > width:
      raise ValueError(
        f"prompt_lengths must be in [1, {width}] (the padded "
        f"prompt width), got range [{lo}, {hi}]."
      )
  return jnp.asarray(prompt_lengths, jnp.int32)


def check_positions(positions, batch: int, width: int) -> None:
  """Optional [B, T] integer positions, >= 0 when concrete."""
  if positions is None:
    return
  _check_integer(positions, "positions", f"[B={batch}, T={width}]")
  if tuple(positions.shape) != (batch, width):
    raise ValueError(
      f"positions must have shape {(batch, width)} (one per "
      f"token), got {tuple(positions.shape)}."
    )
  if is_concrete(positions) and positions.size:
    lo = int(np.asarray(positions).min())
    if lo < 0:
      raise ValueError(
        f"positions must be >= 0 (token positions for RoPE "
        f"and the causal mask), got a minimum of {lo}."
      )


# ----------------------------------------------------------------------------
# Cache.


def check_cache_dtype(cache_dtype) -> str | None:
  """None (the model dtype) or a floating dtype from `CACHE_DTYPES`.

  Returns:
    The dtype's name (so equal dtypes share a compile), or None.
  """
  if cache_dtype is None:
    return None
  try:
    name = jnp.dtype(cache_dtype).name
  except TypeError:
    name = None
  if name not in CACHE_DTYPES:
    raise ValueError(
      f"cache_dtype={cache_dtype!r} is not supported; allowed: "
      f"None (the model dtype) or a floating dtype "
      f"{CACHE_DTYPES} (an integer cache would round every "
      "key and value to an integer; quantize with "
      "kvjax.compress instead)."
    )
  return name


def check_geometry(config) -> AttentionGeometry:
  """`config` must be a `ModelConfig` or an `AttentionGeometry` (TypeError
  otherwise); returns the geometry."""
  if not isinstance(config, (ModelConfig, AttentionGeometry)):
    raise TypeError(
      "config must be a kvjax ModelConfig or the "
      "AttentionGeometry of your own model, got "
      f"{_describe(config)}."
    )
  return as_geometry(config)


def check_cache(
  cache,
  config: ModelConfig | AttentionGeometry,
  batch: int | None = None,
  name: str = "cache",
  read_device: bool = True,
) -> KVCache:
  """The cache must be a `KVCache` laid out for `config`.

  Checks the slot bookkeeping `pos` [L, B, K, S] against the config's L
  (not for an `AttentionGeometry`, which has none) and K (and `batch`),
  and plain payloads k / v [L, B, K, S, H] against its
  head_dim and the floating `CACHE_DTYPES`. Coded payloads (`CodedKV`,
  `TailedKV`) are checked through `pos` only. These are static: they run
  under jit too. With `read_device` (and a concrete cache) it also refuses
  a cache that already overflowed; `decode_step` passes False so that a
  step never waits on the device.
  """
  if not isinstance(cache, KVCache):
    raise TypeError(
      f"{name} must be a kvjax KVCache (kvjax.init_cache or "
      f"prefill), got {type(cache).__name__}."
    )
  L = getattr(config, "num_layers", None)  # None: a geometry
  K, H = config.num_kv_heads, config.head_dim
  pos_shape = tuple(getattr(cache.pos, "shape", ()))
  if len(pos_shape) != 4:
    raise ValueError(
      f"{name}.pos must have shape [L, B, K, S], got {pos_shape}."
    )
  l, b, k, s = pos_shape
  if L is not None and l != L:
    raise ValueError(f"{name} has {l} layers, config has num_layers={L}.")
  if k != K:
    raise ValueError(f"{name} has {k} kv heads, config has num_kv_heads={K}.")
  if batch is not None and b != batch:
    raise ValueError(
      f"tokens have batch {batch}, {name} has batch {b}; they must agree."
    )
  if tuple(cache.valid.shape) != pos_shape:
    raise ValueError(
      f"{name}.valid has shape {tuple(cache.valid.shape)}, "
      f"{name}.pos {pos_shape}; they must agree."
    )
  for counter in ("end", "length"):
    shape = tuple(getattr(getattr(cache, counter), "shape", ()))
    if shape != (b,):
      raise ValueError(f"{name}.{counter} must have shape ({b},), got {shape}.")
  for which in ("k", "v"):
    x = getattr(cache, which)
    if is_coded(x):
      continue
    shape = tuple(getattr(x, "shape", ()))
    if shape != (l, b, k, s, H):
      raise ValueError(
        f"{name}.{which} has shape {shape}, expected [L, B, K, S, H] = "
        f"{(l, b, k, s, H)} (config head_dim={H})."
      )
    dtype = jnp.dtype(x.dtype).name
    if dtype not in CACHE_DTYPES:
      raise ValueError(
        f"{name}.{which} has dtype {dtype}; a plain payload "
        f"must be one of {CACHE_DTYPES} (quantized payloads "
        "are CodedKV)."
      )
  # A cache that already lost writes (a user's jitted loop ran past its
  # capacity) must not be compressed or extended as if whole.
  if read_device:
    check_no_overflow(cache, f"{name} (given)")
  return cache


def check_capacity(capacity, need: int, what: str) -> int:
  """`capacity` None (then `need`) or an int >= `need` slots.

  Args:
    capacity: the requested cache capacity.
    need: the least capacity that holds `what`.
    what: what must fit, for the message.

  Returns:
    The capacity as a Python int.
  """
  if capacity is None:
    return need
  if not _is_int(capacity) or capacity < 1:
    raise ValueError(
      f"capacity must be None or a positive int (cache "
      f"slots), got {capacity!r}."
    )
  if capacity < need:
    raise ValueError(
      f"cache capacity exceeded: capacity={capacity} cannot "
      f"hold {what} (needs {need})."
    )
  return int(capacity)


def check_reserve(reserve) -> int:
  """`reserve` (free slots kept after compaction) an int >= 0."""
  if not _is_int(reserve) or reserve < 0:
    raise ValueError(
      f"reserve must be an int >= 0 (free slots left after "
      f"compression), got {reserve!r}."
    )
  return int(reserve)


def check_room(
  cache: KVCache, writes, what: str, hint: str = "", flushing: bool = False
) -> None:
  """Every row must have room for `writes` more entries (concrete only).

  Args:
    cache: the cache written to.
    writes: an int, or [B] per-row counts, of entries written.
    what: what writes them, for the message.
    hint: how to make room, appended to the message.
    flushing: the writes go through a transform that flushes a TailedKV's
      window into its coded region (KIVI's decode): the free code slots
      count as room too.
  """
  if not is_concrete(cache.end, cache.pos, writes):
    return
  end = host_array(cache.end)
  room = cache.capacity - end
  if flushing and isinstance(cache.k, TailedKV):
    sc = cache.k.code_slots
    # Per row, one past the last used code slot over layers and heads:
    # reduced where the slots live, only [B] read back.
    used = cache.pos[..., :sc] >= 0  # [L, B, K, sc]
    last = jnp.max(
      jnp.where(used, jnp.arange(1, sc + 1), 0), axis=(0, 2, 3), initial=0
    )
    room = room + sc - host_array(last)
  short = np.asarray(writes) - room
  if short.max() > 0:
    raise ValueError(
      f"cache capacity exceeded: {what} needs "
      f"{int(short.max())} more slots than row "
      f"{int(np.argmax(short))} has (capacity "
      f"{cache.capacity}). {hint}".rstrip()
    )


def check_no_overflow(cache: KVCache, entry: str) -> None:
  """Raises if a jitted write ran past the cache's capacity (and dropped).

  Called on the host after each jitted public entry returns, so the
  overflow flag `kvjax.cache.cache_overflowed` is never silently ignored.
  """
  if not is_concrete(cache.end) or not cache_overflowed(cache):
    return
  end = host_array(cache.end)
  rows = np.flatnonzero(end > cache.capacity).tolist()
  raise ValueError(
    f"{entry}: cache overflow: rows {rows} ran past the capacity "
    f"{cache.capacity} (write index up to {int(end.max())}), so entries "
    "were dropped. Give a larger capacity, or a transform that keeps the "
    "cache within its capacity."
  )


# ----------------------------------------------------------------------------
# Transforms and sampling.


def check_transform(
  transform, entry: str, required: bool = False, extra: dict | None = None
) -> None:
  """`transform` must be a `KVTransform` (or None unless `required`), and
  every `extra` keyword argument one it declares (`transform.extras`)."""
  # Imported here: kvjax.compress imports kvjax.model, which imports this.
  from kvjax.compress import base  # pylint: disable=g-import-not-at-top

  if not isinstance(transform, base.KVTransform) and not (
    transform is None and not required
  ):
    allowed = "a KVTransform" if required else "None or a KVTransform"
    raise TypeError(
      f"{entry}: transform must be {allowed} built by a "
      "kvjax.compress factory (e.g. "
      "kvjax.compress.snapkv(ratio=0.5)), got "
      f"{_describe(transform)}."
    )
  declared = () if transform is None else transform.extras
  unknown = sorted(set(extra or ()) - set(declared))
  if unknown:
    who = (
      "no transform is given"
      if transform is None
      else f"{transform.name} declares {declared or 'none'}"
    )
    raise ValueError(
      f"{entry}: extra argument(s) {unknown} reach no transform ({who})."
    )


def check_sampling(
  temperature, top_k, config: ModelConfig
) -> tuple[float, int | None]:
  """`temperature` a finite float >= 0; `top_k` None or an int in [1, V].

  Returns:
    (temperature as a float, top_k as an int or None).
  """
  if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
    raise TypeError(
      f"temperature must be a finite float >= 0 (0: greedy), "
      f"got {_describe(temperature)}."
    )
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(
      f"temperature must be a finite float >= 0 (0: greedy), "
      f"got {temperature!r}."
    )
  if top_k is not None and (
    not _is_int(top_k) or not 1 <= top_k <= config.vocab_size
  ):
    raise ValueError(
      f"top_k must be None or an int in [1, "
      f"{config.vocab_size}], got {top_k!r}."
    )
  return float(temperature), None if top_k is None else int(top_k)


def check_special_tokens(
  stop_token, pad_token, config: ModelConfig
) -> tuple[int | None, int]:
  """`stop_token` None or, like `pad_token`, an int in [0, vocab_size).

  Returns:
    (stop_token, pad_token) as Python ints (stop_token may be None).
  """
  V = config.vocab_size
  for name, value, optional in (
    ("stop_token", stop_token, True),
    ("pad_token", pad_token, False),
  ):
    if value is None and optional:
      continue
    allowed = "None or an int" if optional else "an int"
    if not _is_int(value):
      raise TypeError(
        f"{name} must be {allowed} in [0, {V}) (the "
        f"vocabulary), got {_describe(value)}."
      )
    if not 0 <= value < V:
      raise ValueError(
        f"{name} must be {allowed} in [0, {V}) (the vocabulary), got {value!r}."
      )
  return (None if stop_token is None else int(stop_token)), int(pad_token)


def check_max_new_tokens(max_new_tokens) -> int:
  """`max_new_tokens` an int >= 1; returns it as a Python int."""
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(
      f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}."
    )
  return int(max_new_tokens)


def check_prefill_chunk(prefill_chunk) -> int | None:
  """`prefill_chunk` None or an int >= 1."""
  if prefill_chunk is not None and (
    not _is_int(prefill_chunk) or prefill_chunk < 1
  ):
    raise ValueError(
      f"prefill_chunk must be None or an int >= 1, got {prefill_chunk!r}."
    )
  return None if prefill_chunk is None else int(prefill_chunk)


def check_rng(rng, name: str = "rng") -> Array:
  """A jax PRNG key: typed (`jax.random.key`, shape ()) or legacy
  (`jax.random.PRNGKey`, uint32[2]). None becomes `jax.random.key(0)`."""
  if rng is None:
    return jax.random.key(0)
  dtype = getattr(rng, "dtype", None)
  shape = tuple(getattr(rng, "shape", (None,)))
  if dtype is not None:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
      return rng
    if jnp.dtype(dtype) == jnp.uint32 and shape == (2,):
      return rng
  raise TypeError(
    f"{name} must be a jax PRNG key: jax.random.key(seed) (a "
    "typed key of shape ()) or a legacy "
    "jax.random.PRNGKey(seed) (uint32[2]); got "
    f"{_describe(rng)}."
  )


def warn_past_context(positions: int, config: ModelConfig, what: str) -> None:
  """Warns when `positions` exceeds `config.max_position_embeddings`.

  Not an error (RoPE extrapolates), but past the trained context the
  model's outputs are not what it was trained for, which must not pass
  silently.

  Args:
    positions: how many positions the call spans.
    config: the model config.
    what: how `positions` is made up, for the message.
  """
  if positions > config.max_position_embeddings:
    warnings.warn(
      f"{what} = {positions} exceeds the model's max_position_embeddings="
      f"{config.max_position_embeddings}; RoPE extrapolates, but the "
      "model was not trained on positions that far.",
      stacklevel=3,
    )
