"""Eviction of answer tokens, token-attention graphs, reachability, routes.

Everything here works in TOKEN POSITION space: a cache slot is only a place;
what it holds is `cache.pos` [L, B, K, S] when `cache.valid` is True. After
compression slots hold arbitrary positions in any order, and different
(layer, kv head) pairs hold different positions, so every function maps
slots to positions before comparing anything. Query head n reads kv head
n // (N // K).

Definitions:

* **Evicted everywhere**: a real position (>= 0) is evicted everywhere when
  no (layer, kv head) holds it in a valid slot; **evicted at layer l** when
  no kv head of layer l holds it. Padding positions (-1) are never evicted.
* **Global Eviction Ratio** of a row: evicted-everywhere positions / real
  positions. A token kept by at least one head of one layer does not count.
  A row with no real position gets 0 (so the result has no NaN); average
  over rows with `mean_over_rows`, which skips such rows and reports how
  many rows it used. The per-layer variant uses "evicted at layer l".
* **Token-attention graph** of a forward pass: `adj[l, b, i, j]` is True
  when some query head of layer l puts probability > eps on a valid slot
  holding position j from the query at position i. The graph of the
  context's prefill (full attention) and of the question run over a
  compressed cache combine with `merge_graphs` (logical or).
* **Reachability**: the residual at position i after layer l depends on
  the residual entering layer l at i (the residual connection) and at every
  j with `adj[l, i, j]`. Going down from the sources at the top,
  `reach |= reach @ adj[l]` for l = L-1, ..., 0; a target is reachable when
  it is in `reach` at the input, i.e. when the input token at the target can
  influence a source's final residual through attention edges.
* **Token route** of a question run: the (layer, position) cache entries
  whose keys/values the answer reads, following only the top `share` of
  each head's mass (`support.active_support_mask`). The answer row needs its
  own attention at every layer (its residual sums every layer's write). A
  needed row's selected keys at layer l that are cached (context) positions
  join the route at layer l. A question position (a query row of the same
  forward, self included) read at layer l makes that row needed at every
  layer below l, because its key/value at layer l were computed from its
  residual entering layer l. Which question rows count as read is
  `follow`: "share" follows only the rows among the selected keys (the
  information-flow route proper); "visible" (the default) follows every
  question row the needed row can see causally (position <= its own),
  whatever its weight (causal only: under a sliding window this follows a
  few rows too many, never too few). Context entries off the route are
  removed by `keep_only_route`, but question rows are recomputed, and a
  question row of ~0 weight (even exactly 0 after float32 underflow) whose
  key changed because its own context was removed can capture the
  attention; only "visible" rules that out. Layers are processed top
  down, so a row's needs are complete when its layer is reached. With
  follow="visible" and share = 1.0 (every key of positive probability)
  keeping only the route leaves the answer's logits unchanged up to float
  rounding and the tail mass below `support.SUPPORT_TOL`. The route itself
  only lists context positions; question rows are never in it.

Einsum letters: L layers, B batch, N query heads, K kv heads, T queries,
S cache slots, C / Q listed positions, P positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis import support as support_lib
from kvjax.cache import KVCache

Array = jax.Array

# Argument checks shared with support.py.
# pylint: disable=protected-access
_check_array = support_lib._check_array
_check_int_array = support_lib._check_int_array
_check_bool_array = support_lib._check_bool_array
_check_float_array = support_lib._check_float_array
# pylint: enable=protected-access


# ----------------------------------------------------------------------------
# Argument checks.


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_cache_arrays(
  cache_pos, cache_valid, pos_name="cache_pos", valid_name="cache_valid"
) -> tuple[int, ...]:
  _check_int_array(pos_name, cache_pos, ndim=4)
  _check_bool_array(valid_name, cache_valid, ndim=4)
  if tuple(cache_valid.shape) != tuple(cache_pos.shape):
    raise ValueError(
      f"{valid_name} must have the shape of {pos_name} "
      f"{tuple(cache_pos.shape)} ([L, B, K, S]), got "
      f"{tuple(cache_valid.shape)}."
    )
  return tuple(cache_pos.shape)


def _check_positions(
  name: str, positions, B: int, num_positions: int | None = None
) -> None:
  _check_int_array(name, positions, ndim=2)
  if positions.shape[0] != B:
    raise ValueError(
      f"{name} must have shape [B={B}, _], got {tuple(positions.shape)}."
    )
  if num_positions is not None and _is_concrete(positions) and positions.size:
    hi = int(np.max(np.asarray(positions)))
    lo = int(np.min(np.asarray(positions)))
    if lo < -1 or hi >= num_positions:
      raise ValueError(
        f"{name} must hold positions in [0, {num_positions}) "
        f"or -1 (padding), got range [{lo}, {hi}]."
      )


def _check_num_positions(num_positions) -> int:
  if (
    isinstance(num_positions, bool)
    or not isinstance(num_positions, (int, np.integer))
    or num_positions < 1
  ):
    raise ValueError(
      f"num_positions must be a positive int (P, one more "
      f"than the largest position), got {num_positions!r}."
    )
  return int(num_positions)


def _check_eps(eps) -> float:
  if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
    raise TypeError(f"eps must be a float in [0, 1), got {eps!r}.")
  if not 0.0 <= float(eps) < 1.0:
    raise ValueError(
      f"eps must be in [0, 1) (edge when probability > eps), got {eps!r}."
    )
  return float(eps)


def _check_probs_against(
  probs, query_pos, key_pos, key_valid
) -> tuple[int, ...]:
  _check_float_array("probs", probs, ndim=5)
  L, B, N, T, S = probs.shape
  kl, kb, K, ks = _check_cache_arrays(
    key_pos, key_valid, "key_pos", "key_valid"
  )
  if (kl, kb, ks) != (L, B, S) or K == 0 or N % K:
    raise ValueError(
      f"key_pos must have shape [L, B, K, S] = [{L}, {B}, K, "
      f"{S}] (probs is [L, B, N, T, S] = {tuple(probs.shape)})"
      f" with K dividing N, got {tuple(key_pos.shape)}."
    )
  _check_int_array("query_pos", query_pos, ndim=2)
  if tuple(query_pos.shape) != (B, T):
    raise ValueError(
      f"query_pos must have shape [B, T] = {(B, T)}, got "
      f"{tuple(query_pos.shape)}."
    )
  return L, B, N, T, S, K


def _infer_num_positions(num_positions, *arrays) -> int:
  if num_positions is not None:
    return _check_num_positions(num_positions)
  if not _is_concrete(*arrays):
    raise ValueError(
      "num_positions must be given under jit (it is a static "
      "size); None infers it from concrete arrays only."
    )
  hi = max(int(np.max(np.asarray(a))) if a.size else -1 for a in arrays)
  return max(hi + 1, 1)


def _check_keys_in_range(key_pos, key_valid, num_positions) -> None:
  if _is_concrete(key_pos, key_valid):
    kp = np.asarray(key_pos)[np.asarray(key_valid)]
    if kp.size and (kp.min() < 0 or kp.max() >= num_positions):
      raise ValueError(
        f"valid slots of key_pos must hold positions in [0, "
        f"{num_positions}), got range [{kp.min()}, "
        f"{kp.max()}]; raise num_positions."
      )


# ----------------------------------------------------------------------------
# Eviction of listed positions.


@jax.jit
def _evicted_per_layer(cache_pos, cache_valid, positions):
  def layer(xs):
    pos, valid = xs  # [B, K, S]
    hit = (pos[:, None] == positions[:, :, None, None]) & valid[:, None]
    return ~jnp.any(hit, axis=(2, 3))  # [B, C]

  gone = jax.lax.map(layer, (cache_pos.astype(jnp.int32), cache_valid))
  return gone & (positions >= 0)[None]  # [L, B, C]


def evicted_per_layer(
  cache_pos: Array, cache_valid: Array, positions: Array
) -> Array:
  """Which listed positions no kv head of each layer holds.

  Args:
    cache_pos: [L, B, K, S] int positions held by each slot (`cache.pos`).
    cache_valid: [L, B, K, S] bool live slots (`cache.valid`).
    positions: [B, C] int positions to look for (e.g. a TaskBatch's
      `critical_positions`), -1 for padding.

  Returns:
    [L, B, C] bool, True where the position is real and not held by any
    valid slot of any kv head of that layer.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments.
  """
  L, B, K, S = _check_cache_arrays(cache_pos, cache_valid)
  _check_positions("positions", positions, B)
  return _evicted_per_layer(cache_pos, cache_valid, positions)


def evicted_everywhere(
  cache_pos: Array, cache_valid: Array, positions: Array
) -> Array:
  """Which listed positions no (layer, kv head) holds.

  Args:
    cache_pos: [L, B, K, S] int positions held by each slot.
    cache_valid: [L, B, K, S] bool live slots.
    positions: [B, C] int positions, -1 for padding.

  Returns:
    [B, C] bool, True where the position is real (>= 0) and held by no valid
    slot of any layer and kv head.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments.
  """
  return jnp.all(evicted_per_layer(cache_pos, cache_valid, positions), axis=0)


def global_eviction_ratio(
  cache_pos: Array,
  cache_valid: Array,
  positions: Array,
  per_layer: bool = False,
) -> Array:
  """Share of each row's real positions evicted from every head (GER).

  Args:
    cache_pos: [L, B, K, S] int positions held by each slot.
    cache_valid: [L, B, K, S] bool live slots.
    positions: [B, C] int positions (e.g. answer-critical tokens), -1 pad.
    per_layer: if True, the ratio of positions evicted from every kv head
      of each layer separately.

  Returns:
    [B] float32 (or [L, B] with `per_layer`) in [0, 1]. A row without real
    positions gets 0; `mean_over_rows` averages over the rows that have
    some.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments.
  """
  if not isinstance(per_layer, (bool, np.bool_)):
    raise TypeError(f"per_layer must be a bool, got {per_layer!r}.")
  gone = evicted_per_layer(cache_pos, cache_valid, positions)  # [L, B, C]
  if not per_layer:
    gone = jnp.all(gone, axis=0)  # [B, C]
  n_real = jnp.sum(positions >= 0, axis=-1)  # [B]
  n_gone = jnp.sum(gone, axis=-1).astype(jnp.float32)
  return n_gone / jnp.maximum(n_real, 1).astype(jnp.float32)


def mean_over_rows(values: Array, positions: Array) -> tuple[Array, Array]:
  """Mean of per-row values over the rows that list at least one position.

  Args:
    values: [..., B] per-row values, e.g. `global_eviction_ratio` ([B] or
      [L, B]).
    positions: [B, C] int positions, -1 pad (the ones the values came from).

  Returns:
    (mean [...] float32, num_rows [] int32): the mean over rows with at least
    one real position, and how many rows that is. The mean is 0 when no row
    has a position (e.g. an abstention batch): check `num_rows`.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments.
  """
  _check_array("values", values, min_ndim=1)
  _check_int_array("positions", positions, ndim=2)
  if values.shape[-1] != positions.shape[0]:
    raise ValueError(
      f"values [..., B] and positions [B, C] disagree on B: "
      f"{tuple(values.shape)} vs {tuple(positions.shape)}."
    )
  rows = jnp.any(positions >= 0, axis=-1)  # [B]
  n = jnp.sum(rows).astype(jnp.int32)
  total = jnp.sum(jnp.where(rows, values.astype(jnp.float32), 0.0), axis=-1)
  return total / jnp.maximum(n, 1).astype(jnp.float32), n


# ----------------------------------------------------------------------------
# Token-attention graph.


def _to_positions(x: Array, pos: Array, num_positions: int) -> Array:
  """x [..., S] scattered along S to positions pos [S] (or by `or`).

  Entries with pos outside [0, P) are dropped.
  """
  out = jnp.zeros(x.shape[:-1] + (num_positions,), jnp.int8)
  pos = jnp.where(pos >= 0, pos, num_positions)
  return out.at[..., pos].max(x.astype(jnp.int8), mode="drop") > 0


def _slot_to_position_edges(
  strong: Array, key_pos: Array, key_valid: Array, num_positions: int
) -> Array:
  """strong [B, K, T, S] bool per kv head -> [B, T, P] bool (any head)."""
  kpos = jnp.where(key_valid, key_pos, -1)  # [B, K, S]
  per_head = jax.vmap(
    jax.vmap(functools.partial(_to_positions, num_positions=num_positions))
  )(strong, kpos)
  return jnp.any(per_head, axis=1)  # [B, T, P]


@functools.partial(jax.jit, static_argnames=("num_positions", "eps"))
def _token_graph(probs, query_pos, key_pos, key_valid, *, num_positions, eps):
  L, B, N, T, S = probs.shape
  K = key_pos.shape[2]
  P = num_positions

  def layer(xs):
    p, kp, kv = xs  # [B, N, T, S], [B, K, S], [B, K, S]
    strong = jnp.any((p > eps).reshape(B, K, N // K, T, S), axis=2)
    edges = _slot_to_position_edges(strong & kv[:, :, None], kp, kv, P)
    rows = jnp.where(query_pos >= 0, query_pos, P)  # [B, T]
    return jax.vmap(
      lambda e, r: (
        jnp.zeros((P, P), jnp.int8).at[r].max(e.astype(jnp.int8), mode="drop")
        > 0
      )
    )(edges, rows)  # [B, P, P]

  return jax.lax.map(layer, (probs, key_pos.astype(jnp.int32), key_valid))


def token_graph(
  probs: Array,
  query_pos: Array,
  key_pos: Array,
  key_valid: Array,
  num_positions: int,
  eps: float = 0.01,
) -> Array:
  """Token-attention graph of one forward pass, in position space.

  Args:
    probs: [L, B, N, T, S] attention probabilities (`aux["attn_probs"]`).
    query_pos: [B, T] int position of each query row, -1 for padding rows.
    key_pos: [L, B, K, S] int position held by each slot: the `pos` of the
      cache returned by that forward (it includes the pass's own tokens).
    key_valid: [L, B, K, S] bool, that cache's `valid`.
    num_positions: P, static; every real position must be < P.
    eps: edge threshold in [0, 1): an edge needs probability > eps.

  Returns:
    adj [L, B, P, P] bool: adj[l, b, i, j] when some head of layer l puts
    more than eps on a valid slot holding position j from the query at
    position i.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments, or (for
      concrete arrays) positions outside [0, P).
  """
  _check_probs_against(probs, query_pos, key_pos, key_valid)
  P = _check_num_positions(num_positions)
  eps = _check_eps(eps)
  _check_positions("query_pos", query_pos, query_pos.shape[0], P)
  _check_keys_in_range(key_pos, key_valid, P)
  return _token_graph(
    probs, query_pos, key_pos, key_valid, num_positions=P, eps=eps
  )


def merge_graphs(a: Array, b: Array) -> Array:
  """Edge-wise or of two graphs [L, B, P, P] (e.g. prefill + question)."""
  _check_bool_array("a", a, ndim=4)
  _check_bool_array("b", b, ndim=4)
  if a.shape != b.shape:
    raise ValueError(
      f"graphs must have the same shape, got {tuple(a.shape)} "
      f"and {tuple(b.shape)}."
    )
  return a | b


# ----------------------------------------------------------------------------
# Reachability.


def _onehot_positions(positions: Array, num_positions: int) -> Array:
  """[B, C] positions (-1 pad) -> [B, P] bool."""
  B = positions.shape[0]
  idx = jnp.where(positions >= 0, positions, num_positions)
  return (
    jnp.zeros((B, num_positions), bool)
    .at[jnp.arange(B)[:, None], idx]
    .set(True, mode="drop")
  )


@jax.jit
def _reachable(adj, sources, targets):
  L, B, P, _ = adj.shape
  reach = _onehot_positions(sources, P)  # [B, P]

  def down(reach, a):  # a [B, P, P] one layer, visited top first
    # float32 0/1 products are exact (sums < 2**24).
    hop = (
      jnp.einsum("bi,bij->bj", reach.astype(jnp.float32), a.astype(jnp.float32))
      > 0
    )
    return reach | hop, None

  reach, _ = jax.lax.scan(down, reach, adj, reverse=True)
  idx = jnp.clip(targets, 0, P - 1)
  hit = jnp.take_along_axis(reach, idx, axis=1)
  return hit & (targets >= 0)


def reachable(adj: Array, sources: Array, targets: Array) -> Array:
  """Whether each target's input token can reach a source's top residual.

  Args:
    adj: [L, B, P, P] bool token-attention graph (`token_graph`,
      `merge_graphs`).
    sources: [B, Q] int positions whose final residual matters (e.g. the
      question's positions), -1 pad.
    targets: [B, C] int positions to test (e.g. `critical_positions`), -1
      pad.

  Returns:
    [B, C] bool, True when a target is real and reachable (see the module
    docstring); padding targets are False.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments, or (for
      concrete arrays) positions >= P.
  """
  _check_bool_array("adj", adj, ndim=4)
  L, B, P, P2 = adj.shape
  if P != P2:
    raise ValueError(f"adj must be [L, B, P, P], got {tuple(adj.shape)}.")
  _check_positions("sources", sources, B, P)
  _check_positions("targets", targets, B, P)
  return _reachable(adj, sources, targets)


# ----------------------------------------------------------------------------
# Token routes.


FOLLOW_MODES = ("visible", "share")


@functools.partial(jax.jit, static_argnames=("num_positions", "follow"))
def _token_route(
  probs,
  query_pos,
  key_pos,
  key_valid,
  answer_query,
  *,
  num_positions,
  share,
  follow,
):
  L, B, N, T, S = probs.shape
  K = key_pos.shape[2]
  P = num_positions
  sel = support_lib.active_support_mask(probs, share)  # [L, B, N, T, S]
  kpos = jnp.repeat(
    jnp.where(key_valid, key_pos.astype(jnp.int32), -1), N // K, axis=2
  )  # [L, B, N, S]
  # Row of the forward holding each position (-1: a cached context entry).
  real = query_pos >= 0  # [B, T]
  qidx = jnp.where(real, query_pos, P)
  bidx = jnp.arange(B)[:, None]
  row_of = (
    jnp.full((B, P), -1, jnp.int32)
    .at[bidx, qidx]
    .set(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), mode="drop")
  )
  is_query = row_of >= 0  # [B, P]
  answer = (
    jnp.zeros((B, T), bool)
    .at[bidx, jnp.where(answer_query >= 0, answer_query, T)]
    .set(True, mode="drop")
  )  # [B, T]
  # visible[b, t, j]: row t can see question row j (causal, both real).
  visible = (
    real[:, :, None]
    & real[:, None, :]
    & (query_pos[:, None, :] <= query_pos[:, :, None])
  )  # [B, T, T]

  def layer(below, xs):
    s, kp = xs  # [B, N, T, S], [B, N, S]
    needed = answer | below  # rows whose attention at this layer matters
    hit = jnp.any(s & needed[:, None, :, None], axis=2)  # [B, N, S]
    hit_pos = jax.vmap(functools.partial(_to_positions, num_positions=P))(
      hit.reshape(B, N * S), kp.reshape(B, N * S)
    )  # [B, P]
    route = hit_pos & ~is_query
    rows = jnp.where(hit_pos & is_query, row_of, T)  # question rows read
    new = jnp.zeros((B, T), bool).at[bidx, rows].set(True, mode="drop")
    if follow == "visible":
      new |= jnp.any(needed[:, :, None] & visible, axis=1)
    return below | new, route

  _, route = jax.lax.scan(
    layer, jnp.zeros((B, T), bool), (sel, kpos), reverse=True
  )
  return route  # [L, B, P]


def token_route(
  probs: Array,
  query_pos: Array,
  key_pos: Array,
  key_valid: Array,
  answer_query: Array,
  share: float = 0.9,
  num_positions: int | None = None,
  follow: str = "visible",
) -> Array:
  """The cached (layer, position) entries the answer reads in a question run.

  Args:
    probs: [L, B, N, T, S] attention probabilities of the question run
      (`forward(..., capture=("attn_probs",))` over the context's cache).
    query_pos: [B, T] int positions of the question rows, -1 for padding.
    key_pos: [L, B, K, S] int `pos` of the cache returned by that run (it
      holds the question's own entries too).
    key_valid: [L, B, K, S] bool `valid` of that cache.
    answer_query: [B] (or [B, A], -1 pad) int row index into T of the
      query row(s) whose logits predict the answer.
    share: fraction of each head's mass followed, in (0, 1].
    num_positions: P, static; None infers max position + 1 from concrete
      arrays (required under jit).
    follow: which question rows a needed row makes needed below: "visible"
      (every one it can see causally; makes `keep_only_route` exact at
      share = 1.0) or "share" (only those among its top-share keys). See
      the module docstring.

  Returns:
    route [L, B, P] bool: True at the cached context positions (never rows
    of this run) on the route at each layer.

  Raises:
    TypeError / ValueError: for mistyped or mis-shaped arguments, rows
      outside [0, T), positions outside [0, P) or an unknown `follow`.
  """
  L, B, N, T, S, K = _check_probs_against(probs, query_pos, key_pos, key_valid)
  share = support_lib.check_share(share)
  if follow not in FOLLOW_MODES:
    raise ValueError(f"follow must be one of {FOLLOW_MODES}, got {follow!r}.")
  _check_int_array("answer_query", answer_query)
  if answer_query.ndim == 1:
    answer_query = answer_query[:, None]
  if answer_query.ndim != 2 or answer_query.shape[0] != B:
    raise ValueError(
      f"answer_query must have shape [B] or [B, A] with B={B},"
      f" got {tuple(answer_query.shape)}."
    )
  if _is_concrete(answer_query) and answer_query.size:
    aq = np.asarray(answer_query)
    if aq.min() < -1 or aq.max() >= T:
      raise ValueError(
        f"answer_query must hold row indices in [0, {T}) or "
        f"-1 (padding), got range [{aq.min()}, {aq.max()}]."
      )
  P = _infer_num_positions(
    num_positions, query_pos, jnp.where(key_valid, key_pos, -1)
  )
  _check_positions("query_pos", query_pos, B, P)
  _check_keys_in_range(key_pos, key_valid, P)
  return _token_route(
    probs,
    query_pos,
    key_pos,
    key_valid,
    answer_query,
    num_positions=P,
    share=share,
    follow=follow,
  )


def keep_only_route(cache: KVCache, route: Array) -> KVCache:
  """The cache with every entry off the route made invalid.

  A position on the route at layer l stays valid in every kv head of layer
  l that holds it; everything else (including positions >= P) becomes
  invalid. Payload, positions and counters are untouched, so the question
  can be rerun on the result.

  Apply it to the cache the question run started from (the context's
  prefill cache): the question's own entries are not on the route.

  Args:
    cache: a `KVCache` (typically the context's prefill cache).
    route: [L, B, P] bool from `token_route`.

  Returns:
    The cache with `valid` narrowed to the route.

  Raises:
    TypeError / ValueError: for a non-cache or a mis-shaped route.
  """
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}.")
  _check_bool_array("route", route, ndim=3)
  L, B = cache.pos.shape[:2]
  if tuple(route.shape[:2]) != (L, B):
    raise ValueError(
      f"route must have shape [L, B, P] with L={L}, B={B}, "
      f"got {tuple(route.shape)}."
    )
  P = route.shape[2]
  idx = jnp.clip(cache.pos, 0, P - 1)  # [L, B, K, S]
  on = jnp.take_along_axis(
    route[:, :, None, :], idx.reshape(L, B, 1, -1), axis=-1
  )
  on = on.reshape(cache.pos.shape) & (cache.pos >= 0) & (cache.pos < P)
  return cache._replace(valid=cache.valid & on)
