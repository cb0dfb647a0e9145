"""The compression-transform interface, `chain`, and physical compaction.

A transform follows optax: a NamedTuple of pure functions built by a
factory. `init(cache) -> state`; `apply(cache, state, ctx, *, <extras>) ->
(cache, state)`. Besides the functions it carries static facts the caller
needs before tracing: which taps of the forward pass it reads (`needs`),
whether it also acts during decode (`every`, in decode steps; 0 = prefill
only), and `slots`, the static number of entries per (layer, row, head) it
may keep given how many were live before (so the compacted cache has a
static shape and a jitted decode compiles once).

Eviction (a *policy*) scores every slot, keeps the top entries per (layer,
row, kv head) under a budget, and `compact`s them into a physically smaller
cache: kept entries first, in position order, then the free slots the
context asks for (`reserve` for `forward`, decode steps or a decode-time
policy's headroom; see `KVTransform`). Memory is saved for real: the
returned arrays are smaller.

Transforms are values: `by_value` factories give equal, equally hashed
transforms for equal arguments, so a jitted entry compiles once for both.
A transform that would compress nothing for its input raises `Degenerate`.
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import model as model_lib
from kvjax.cache import CodedKV, KVCache, is_coded, replace_dropping

Array = jax.Array

# Names a transform may list in `needs`: the taps of `kvjax.model.TAPS` a
# transform may read. Prefill/decode fill the matching fields of
# `CompressContext` (others stay None).
CONTEXT_FIELDS = model_lib.COMPRESS_TAPS
# Names a transform may list in `needs` besides taps: the model itself.
# "params" fills `CompressContext.params` and `.model_config` (for methods
# that read weights or run the model: CriticalKV's W_o, KVzip's replay);
# "tokens" fills `.tokens`, the prompt's token ids (prefill, or given to
# `compress_cache`).
MODEL_NEEDS = ("params", "tokens")

_CONTEXT_FIELDS = (
  ("phase", None),
  ("step", None),
  ("q_pos", None),
  ("q_mask", None),
  *((name, None) for name in CONTEXT_FIELDS),
  ("rng", None),
  ("reserve", 0),
  ("geometry", None),
  ("live_bound", None),
  ("decode_reserve", 0),
  ("params", None),
  ("model_config", None),
  ("tokens", None),
)


class CompressContext(
  collections.namedtuple(
    "CompressContext",
    [n for n, _ in _CONTEXT_FIELDS],
    defaults=[d for _, d in _CONTEXT_FIELDS[4:]],
  )
):
  """What a transform may read when it is applied.

  Its tap fields are `kvjax.model.TAPS` readable by transforms
  (`CONTEXT_FIELDS`), so a tap added there reaches transforms here.

  Attributes:
    phase: "prefill" or "decode" (a Python string: static).
    step: int32 scalar, decode steps taken so far (0 at prefill).
    q_pos: [B, T] positions of the tokens of this forward pass.
    q_mask: [B, T] bool, False for padding tokens.
    q: [L, B, T, N, H] queries after RoPE (if needed).
    q_pre_rope: [L, B, T, N, H] queries before RoPE (if needed).
    attn_probs: [L, B, N, T, S] attention probabilities (decode only, if
      needed).
    attn_mass: [L, B, N, S] attention of this pass's queries summed over
      queries, per slot (if needed).
    rng: a PRNG key.
    reserve: free slots to leave after compression for entries written by
      `forward` without this transform seeing them (the question), a
      Python int: static. Every transform leaves at least this many, and
      exactly this many for the fullest row where its layout allows (see
      `KVTransform`).
    geometry: the model's `kvjax.AttentionGeometry` (static; heads, RoPE).
    live_bound: static upper bound on the live entries per (layer, row, kv
      head) of the cache being compressed (the prompt width at prefill);
      compacted capacities are computed from it. None: the capacity.
    decode_reserve: decode steps the caller will run *through this
      transform's decode phase* after compression (`generate`'s loop): a
      decode-time policy that keeps a budget needs no room for them, a
      codec that flushes a window into a coded region does.
    params: the model parameters (a pytree of arrays), only when the
      transform lists "params" in `needs`; None otherwise.
    model_config: the `kvjax.ModelConfig` (static), with `params`.
    tokens: [B, T] int32 token ids of the prompt at prefill (aligned with
      `q_pos` / `q_mask`), only when the transform lists "tokens" in
      `needs`; given to `compress_cache(tokens=...)`; None elsewhere
      (`compress_observing`, decode).
  """

  __slots__ = ()


def live_bound(cache: KVCache, ctx: CompressContext) -> int:
  """Static upper bound on live entries per head of `cache` under `ctx`."""
  if ctx.live_bound is None:
    return cache.capacity
  return min(int(ctx.live_bound), cache.capacity)


class Degenerate(ValueError):
  """A transform that would store nothing compressed (or more than the
  uncompressed cache) for this input: refused instead of silently running.

  Raised while tracing, with the numbers; the sweep records such units as
  refused rather than as compressed results.
  """


def _freeze(value: Any) -> Hashable:
  """A hashable stand-in for a factory argument (lists become tuples,
  dicts sorted item tuples, numpy arrays their bytes); a transform, scorer
  or codec stands for itself (they compare by value)."""
  if type(value) in (list, tuple):  # not NamedTuples: they hash themselves
    return tuple(_freeze(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, np.ndarray):
    return ("ndarray", value.shape, str(value.dtype), value.tobytes())
  if isinstance(value, jax.Array):
    raise TypeError(
      "transform factories take static arguments; got a jax "
      f"array of shape {value.shape}. Pass arrays at apply time "
      "(as extra keyword arguments)."
    )
  hash(value)  # raises TypeError for anything else unhashable
  return value


def _spec_eq(self, other) -> bool:
  if type(other) is not type(self):
    return NotImplemented
  if self.spec is None or other.spec is None:
    return self is other
  return self.spec == other.spec


def _spec_ne(self, other) -> bool:
  eq = _spec_eq(self, other)
  return eq if eq is NotImplemented else not eq


def _spec_hash(self) -> int:
  return hash(self.spec) if self.spec is not None else id(self)


def by_value(factory: Callable[..., Any]) -> Callable[..., Any]:
  """Makes `factory`'s results compare and hash by value.

  The result (a `KVTransform` or a `kvjax.compress.Scorer`) gets `spec` =
  (the factory's module and name, its bound arguments with defaults), so
  two calls with equal arguments build equal, equally hashed values: a
  jitted entry that takes the transform as a static argument compiles
  once for both. Arguments that are callables compare by identity.
  """
  sig = inspect.signature(factory)

  @functools.wraps(factory)
  def make(*args, **kwargs):
    out = factory(*args, **kwargs)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    spec = (
      factory.__module__,
      factory.__qualname__,
      _freeze(dict(bound.arguments)),
    )
    return out._replace(spec=spec)

  make.by_value = True  # marks the factories (tests walk them)
  return make


class KVTransform(NamedTuple):
  """A KV-cache compression transform.

  Attributes:
    init: (cache) -> state.
    apply: (cache, state, ctx, *, <extras>) -> (cache, state); it receives
      exactly the keyword arguments named in `extras`.
    keeps: (live) -> upper bound on live entries per (layer, row, head)
      after `apply`, given `live` before (a Python int). `chain` passes it
      on as the next member's `ctx.live_bound`, so it must never
      under-count (a KIVI after it flags the overflow if it does).
    needs: names from `CONTEXT_FIELDS` the transform reads, and from
      `MODEL_NEEDS` ("params": the model's weights and config; "tokens":
      the prompt's ids).
    extras: names of the extra keyword-only inputs `apply` takes (the
      oracle's `future_mass`); the entries pass each transform only the
      ones it declares and refuse one that no transform declares.
    every: act at decode every `every` steps (0: prefill only).
    bits: (head_dim) -> (key bits, value bits) stored per element, overhead
      included (None for a tensor kept in full precision), or None for
      policies (they do not change how an entry is stored).
    name: a label for logs and tables.
    bounded: True when the decode phase keeps each row's live entries
      within the prefill budget (an evicting decode-time policy), so
      decoding through it needs only `every` slots of headroom.
    spec: the value identity (factory and arguments) set by `by_value`;
      equal specs make equal, equally hashed transforms. None: identity.

  The reserve contract: after the prefill-phase `apply` with
  `ctx.reserve = R`, every row has at least R free slots that `forward`
  can fill; the fullest row exactly R (+ `ctx.decode_reserve` for a
  prefill-only policy, + `every` slots of headroom for a decode-time
  policy's own step, written before it evicts), except where a layout
  rounds up: Ada-KV's capacity is its largest possible head budget, KIVI's
  window holds the pending entries of an unfinished block. A transform
  that cannot honour it raises.
  """

  init: Callable[[KVCache], Any]
  apply: Callable[..., tuple[KVCache, Any]]
  keeps: Callable[[int], int]
  needs: tuple[str, ...] = ()
  every: int = 0
  bits: Callable[[int], float] | None = None
  name: str = "transform"
  bounded: bool = False
  extras: tuple[str, ...] = ()
  spec: Hashable = None

  __eq__ = _spec_eq
  __ne__ = _spec_ne
  __hash__ = _spec_hash


KVTransform._replace = replace_dropping("spec")


def extras_for(transform: KVTransform, extra: dict[str, Any]) -> dict[str, Any]:
  """The entries of `extra` that `transform` declares in `extras`."""
  return {name: extra[name] for name in transform.extras if name in extra}


@by_value
def identity() -> KVTransform:
  """A transform that changes nothing (the uncompressed baseline)."""
  return KVTransform(
    init=lambda cache: (),
    apply=lambda cache, state, ctx: (cache, state),
    keeps=lambda live: live,
    name="identity",
  )


@by_value
def chain(*transforms: KVTransform) -> KVTransform:
  """Applies transforms in order (e.g. evict, then quantize).

  The state is the tuple of the members' states; each extra keyword
  argument reaches the members that declare it (`extras`). Each member
  sees the context's `live_bound` narrowed by the members before it.
  """
  for t in transforms:
    if not isinstance(t, KVTransform):
      raise TypeError(f"chain takes KVTransforms, got {type(t).__name__}.")
  for i, t in enumerate(transforms):
    for later in transforms[i + 1 :]:
      # A policy acting at decode evicts then (a bounded one, or SP-KV's
      # gate dropping what leaves the window).
      evicts_in_decode = t.bounded or (t.every and t.bits is None)
      if evicts_in_decode and later.every and not later.bounded:
        raise ValueError(
          f"chain({t.name}, ..., {later.name}): {t.name} evicts during "
          f"decode, but {later.name} re-lays the slots into a coded region "
          "and a full-precision window whose grouped entries cannot be "
          "evicted one at a time. Use a prefill-time policy before it, or "
          "a per-entry codec (uniform, fp8, turboquant) after "
          f"{t.name}."
        )
  if not transforms:
    return identity()

  def init(cache):
    return tuple(t.init(cache) for t in transforms)

  def apply(cache, state, ctx, **extra):
    new_state = []
    for t, s in zip(transforms, state):
      bound = live_bound(cache, ctx)
      if ctx.phase == "decode" and t.every > 1:  # each at its own cadence
        cache, s = jax.lax.cond(
          ctx.step % t.every == 0,
          lambda c, s_, t=t: t.apply(c, s_, ctx, **extras_for(t, extra)),
          lambda c, s_: (c, s_),
          cache,
          s,
        )
      else:
        cache, s = t.apply(cache, s, ctx, **extras_for(t, extra))
      new_state.append(s)
      ctx = ctx._replace(live_bound=t.keeps(bound))
    return cache, tuple(new_state)

  def keeps(live):
    for t in transforms:
      live = t.keeps(live)
    return live

  def bits(head_dim):
    out = None
    for t in transforms:
      if t.bits is not None:
        out = t.bits(head_dim)  # the last codec decides how entries are stored
    return out

  has_bits = any(t.bits is not None for t in transforms)
  needs = tuple(sorted({n for t in transforms for n in t.needs}))
  everies = [t.every for t in transforms if t.every]
  every = math.gcd(*everies) if everies else 0
  # Bounded only if a member keeps a budget at decode and everything after
  # the first such member keeps one too or only re-codes entries (a later
  # prefill-only policy would compact to a smaller budget without the
  # decode headroom).
  first = next((i for i, t in enumerate(transforms) if t.bounded), None)
  bounded = (
    first is not None
    and all(
      t.bounded or (t.bits is not None and not t.every) or t == identity()
      for t in transforms[first:]
    )
    and all(t.bounded for t in transforms if t.every)
  )
  extras = tuple(sorted({n for t in transforms for n in t.extras}))
  return KVTransform(
    init=init,
    apply=apply,
    keeps=keeps,
    needs=needs,
    every=every,
    bits=bits if has_bits else None,
    name="+".join(t.name for t in transforms),
    bounded=bounded,
    extras=extras,
  )


# ----------------------------------------------------------------------------
# Budgets.


def check_int(value, name: str, minimum: int) -> int:
  """`value` as an int >= `minimum` (bools refused), or ValueError."""
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or (value < minimum)
  ):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def check_float(
  value, name: str, low: float, high: float | None = None, *, high_open=False
) -> float:
  """`value` as a finite float in [low, high] ([low, high) with
  `high_open`; no upper bound when high is None), or ValueError."""
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float, np.integer, np.floating))
    or not np.isfinite(value)
    or value < low
    or (high is not None and (value >= high if high_open else value > high))
  ):
    if high is None:
      allowed = f">= {low}"
    else:
      allowed = f"in [{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be a finite float {allowed}, got {value!r}.")
  return float(value)


def check_ratio(ratio: float, name: str = "ratio") -> float:
  if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
    raise ValueError(
      f"{name} must be a float in [0, 1) (the fraction of "
      f"entries removed), got {ratio!r}."
    )
  return float(ratio)


def check_budget(ratio, budget) -> None:
  """Exactly one of ratio / budget (an absolute entries-per-head size)."""
  if (ratio is None) == (budget is None):
    raise ValueError(
      "give exactly one of ratio (fraction removed, in [0, 1)) "
      f"or budget (entries kept per head); got ratio={ratio!r}, "
      f"budget={budget!r}."
    )
  if ratio is not None:
    check_ratio(ratio)
  elif not isinstance(budget, int) or budget < 1:
    raise ValueError(
      f"budget must be an int >= 1 (entries kept per head), got {budget!r}."
    )


def n_keep(
  live: Array, ratio: float | None, budget: int | None, max_live: int
) -> Array:
  """Entries to keep given `live` entries (an int array, each <= max_live).

  With a ratio: max(1, int(live * (1 - ratio))) in float64, exactly as
  kvpress' `compute_n_kept` (a table over 0..max_live, so no float32
  rounding under jit); with a budget: min(budget, live).
  """
  if ratio is not None:
    table = np.array(
      [static_keep(n, ratio, None) for n in range(max_live + 1)], np.int32
    )
    return jnp.asarray(table)[jnp.clip(live, 0, max_live)]
  return jnp.minimum(live, budget).astype(jnp.int32)


def static_keep(live: int, ratio: float | None, budget: int | None) -> int:
  """`n_keep` on a Python int, for static capacities."""
  if ratio is not None:
    return max(1, int(live * (1.0 - ratio))) if live > 0 else 0
  return min(live, budget)


# ----------------------------------------------------------------------------
# Selection and compaction.


def rank_scores(scores: Array, valid: Array) -> Array:
  """float32 scores in the one order every selection path uses: -0.0 is
  0.0; a valid NaN or -inf score ranks below every finite one (as
  -finfo.max) but above every invalid slot (-inf), so asking for as many
  slots as are valid keeps all of them."""
  s = scores.astype(jnp.float32)
  low = jnp.isnan(s) | (s == -jnp.inf)
  s = jnp.where(low, -jnp.finfo(jnp.float32).max, jnp.where(s == 0, 0.0, s))
  return jnp.where(valid, s, -jnp.inf)


def keep_top(
  scores: Array, n: Array, valid: Array, max_keep: int | None = None
) -> Array:
  """[L, B, K, S] bool: the n highest-scoring valid slots per (l, b, k).

  Ties go to the lower slot; scores rank as `rank_scores` orders them (a
  NaN or -inf score lowest among the valid ones). Under a mesh that splits the slots (`jax.
  set_mesh`, `prefill(mesh=...)`), the selection is a global top-k from
  per-shard proposals (`kvjax.parallel.global_keep_top`): the same set.

  Args:
    scores: [L, B, K, S] float, higher is kept first.
    n: int array broadcastable to [L, B, K]: how many to keep.
    valid: [L, B, K, S] bool; invalid slots are never kept.
    max_keep: optional static upper bound on n (how many each shard
      proposes under a mesh; None: all its slots).

  Scores that a mesh's axes do not split (AdaKV's [L, B, 1, K * S] over a
  `heads` axis) are ranked by XLA's partitioner instead: the same set.
  """
  from kvjax import parallel

  s = rank_scores(scores, valid)  # one order on every path
  mesh = parallel.context_mesh()
  L, B, K, S = scores.shape
  if (
    mesh is not None
    and parallel.seq_shards() > 1
    and S % parallel.seq_shards() == 0
    and B % parallel.mesh.axis_size(mesh, "data") == 0
    and K % parallel.mesh.axis_size(mesh, "heads") == 0
  ):
    return parallel.global_keep_top(s, n, valid, max_keep, mesh)
  order = jnp.argsort(-s, axis=-1, stable=True)  # best first
  rank = jnp.argsort(order, axis=-1, stable=True)  # rank of each slot
  return (rank < jnp.asarray(n)[..., None]) & valid


def _gather_slots(x, idx):
  """x [L, B, K, S, ...] gathered along S with idx [L, B, K, S']."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 4))
  return jnp.take_along_axis(x, idx, axis=3)


def compact(
  cache: KVCache, keep: Array, capacity: int
) -> tuple[KVCache, Array]:
  """Gathers kept entries into a cache with `capacity` slots.

  Kept entries come first in each (layer, row, head), in position order; the
  rest are empty. `end` becomes, per row, the largest kept count over layers
  and heads (heads that keep fewer leave invalid padding before it).

  Args:
    cache: the cache (payload leaves must have leading [L, B, K, S]).
    keep: [L, B, K, S] bool.
    capacity: static slot count of the result; must hold every kept entry
      (checked eagerly when possible). Under a mesh that splits the slots
      it is rounded up to a multiple of the shards.

  Returns:
    (the compacted cache, idx [L, B, K, capacity] source slot of each new
    slot, for transforms that keep per-slot state).
  """
  from kvjax import parallel

  S = cache.capacity
  # Under a mesh that splits the slots the result must split evenly too:
  # the capacity is rounded up to a multiple of the shards (empty slots).
  asked, capacity = (
    capacity,
    parallel.mesh.round_up(capacity, parallel.seq_shards()),
  )
  key = jnp.where(keep, cache.pos, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=-1, stable=True)  # kept first, by position
  counts = jnp.sum(keep, axis=-1)  # [L, B, K]
  if not isinstance(counts, jax.core.Tracer):
    most = int(jnp.max(counts)) if counts.size else 0
    if most > asked:
      raise ValueError(
        f"compact: {most} kept entries do not fit in capacity={asked}."
      )
  if capacity <= S:
    idx = order[..., :capacity]
  else:  # more room than before: pad with (empty) copies of slot 0
    pad = jnp.zeros(order.shape[:-1] + (capacity - S,), order.dtype)
    idx = jnp.concatenate([order, pad], axis=-1)
  # Under jit a count above `capacity` cannot raise: the excess entries are
  # cut, and `end` (the unclipped count) exceeds the capacity, which
  # `kvjax.cache.cache_overflowed` and every public entry report.
  live = jnp.arange(capacity) < counts[..., None]  # [L, B, K, capacity]
  gather = lambda leaf: _gather_slots(leaf, idx)
  k, v = (
    x.gather(idx) if is_coded(x) else gather(x) for x in (cache.k, cache.v)
  )
  pos = jnp.where(live, gather(cache.pos), -1)
  end = jnp.max(counts, axis=(0, 2)).astype(jnp.int32)  # [B]
  # More than the asked capacity is an overflow even where the rounding
  # made room: flagged past the capacity, as without a mesh.
  # And a cache that had overflowed already stays flagged.
  end = jnp.where(
    (end > asked) | (cache.end > S), jnp.maximum(end, capacity + 1), end
  )
  out = cache._replace(k=k, v=v, pos=pos, valid=live, end=end)
  return parallel.constrain_cache(out), idx


def evict(
  cache: KVCache, scores: Array, n: Array, capacity: int
) -> tuple[KVCache, Array]:
  """Keeps the top-n valid slots per (layer, row, head) and compacts."""
  return compact(cache, keep_top(scores, n, cache.valid, capacity), capacity)


def live_counts(cache: KVCache) -> Array:
  """[L, B, K] number of valid slots."""
  return jnp.sum(cache.valid, axis=-1).astype(jnp.int32)


def evict_one(
  cache: KVCache, scores: Array, over: Array
) -> tuple[KVCache, Array, Array]:
  """Drops the lowest-scoring valid entry per (layer, head) of rows `over`.

  O(S) per step (no sort): the entry in slot end - 1 (the newest write) is
  moved into the evicted slot and `end` moves back by one, so the next
  write reuses the freed slot. Every head of a row must hold entries in
  slots [0, end) (true for uniform decode-time budgets).

  Args:
    cache: the cache; payloads must be plain arrays or `CodedKV`.
    scores: [L, B, K, S], higher is kept.
    over: [B] bool, rows that exceed their budget by one entry.

  Returns:
    (cache, evicted slot [L, B, K], moved-from slot [B]); rows not `over`
    are unchanged.
  """
  L, B, K, S = cache.pos.shape
  e = jnp.argmin(
    jnp.where(cache.valid, scores.astype(jnp.float32), jnp.inf), axis=-1
  )  # [L, B, K]
  last = jnp.maximum(cache.end - 1, 0)  # [B]
  act = jnp.broadcast_to(over[None, :, None], (L, B, K))
  e = jnp.where(act, e, S)  # S: out of range, the write is dropped
  li, bi, ki = jnp.meshgrid(
    jnp.arange(L), jnp.arange(B), jnp.arange(K), indexing="ij"
  )
  src = jnp.broadcast_to(last[None, :, None], (L, B, K))

  def move(leaf):
    moved = leaf[li, bi, ki, src]  # [L, B, K, ...]
    return leaf.at[li, bi, ki, e].set(moved, mode="drop")

  def move_payload(x):
    if isinstance(x, CodedKV):
      return CodedKV(
        {n: move(v) for n, v in x.slots.items()}, x.shared, x.codec
      )
    if is_coded(x):
      raise ValueError(
        "decode-time eviction cannot move entries of a cache "
        "with a residual window; quantize after evicting."
      )
    return move(x)

  clear = jnp.where(act, src, S)
  pos = move(cache.pos).at[li, bi, ki, clear].set(-1, mode="drop")
  valid = move(cache.valid).at[li, bi, ki, clear].set(False, mode="drop")
  cache = cache._replace(
    k=move_payload(cache.k),
    v=move_payload(cache.v),
    pos=pos,
    valid=valid,
    end=jnp.where(over, cache.end - 1, cache.end),
  )
  return cache, e, last
