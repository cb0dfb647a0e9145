"""Active support and head consensus of attention probabilities.

Definitions:

* **Active support** of one attention row (one query of one head) at share
  `q`: the size of the smallest set of keys holding at least `q` of the
  row's mass. Keys are sorted by probability, descending; key `i` (in that
  order) belongs to the set iff the mass of the keys ranked before it is
  below `q * total - tol * total`, where `total` is the row's summed mass
  (from the same cumulative sum, so rows need not be exactly normalised)
  and `tol = SUPPORT_TOL` (1e-6) absorbs float32 rounding: a head uniform
  over 10 keys has support exactly 9 at q = 0.9 and 10 at q = 1.0. Keys of
  zero probability never count, so at q = 1.0 the support is the number of
  keys with positive probability, minus a tail of total relative mass below
  `tol`. A row of zero mass (a padding query, or a query with no visible
  key) has support 0. The count does not depend on the order of the slots
  or on how ties are broken. A row holding NaN or inf has no support: on
  concrete inputs `active_support` raises; under `jit` (where it cannot
  raise) the row's count is `NONFINITE_SUPPORT` (-1), never a plausible
  number, and its `active_support_mask` row is all False.
* **Head consensus** of a layer for one query: the number of distinct argmax
  keys across the N query heads, divided by N. 1/N when every head looks at
  the same key, 1 when all differ. With `key_pos` the argmax is compared in
  token-position space (two kv heads may hold different positions in the
  same slot after per-head eviction); ties are broken towards the smallest
  position, so the value does not depend on slot order. Without `key_pos`
  argmaxes are slot indices (ties: first slot). Heads with zero mass on a
  query have no argmax and add nothing to the count (the denominator stays
  N); masked or zero-mass queries get 0. A query where any head's row
  holds NaN or inf raises on concrete inputs and gives NaN under `jit`.

Einsum letters: L layers, B batch, N query heads, K kv heads, T queries,
S cache slots.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SUPPORT_TOL = 1e-6  # relative tolerance on the cumulative mass
NONFINITE_SUPPORT = -1  # the count of a row with NaN/inf, where not raised


# ----------------------------------------------------------------------------
# Argument checks.


def _check_array(
  name: str, x: Any, ndim: int | None = None, min_ndim: int | None = None
) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(
      f"{name} must have {ndim} dims, got shape {tuple(x.shape)}."
    )
  if min_ndim is not None and x.ndim < min_ndim:
    raise ValueError(
      f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}."
    )


def _check_float_array(name: str, x: Any, **kw) -> None:
  _check_array(name, x, **kw)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}.")


def _check_int_array(name: str, x: Any, **kw) -> None:
  _check_array(name, x, **kw)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}.")


def _check_bool_array(name: str, x: Any, **kw) -> None:
  _check_array(name, x, **kw)
  if x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a bool array, got dtype {x.dtype}.")


def check_share(share: Any) -> Any:
  """Returns `share` as a float after checking it lies in (0, 1].

  A traced scalar (under `jit`) cannot be checked and is returned as is.
  """
  if isinstance(share, jax.core.Tracer) and share.shape == ():
    return share
  if (
    hasattr(share, "shape")
    and share.shape == ()
    and jnp.issubdtype(share.dtype, jnp.floating)
  ):
    share = float(share)
  if isinstance(share, bool) or not isinstance(
    share, (int, float, np.floating)
  ):
    raise TypeError(f"share must be a float in (0, 1], got {share!r}.")
  if not 0.0 < float(share) <= 1.0:
    raise ValueError(
      f"share must be in (0, 1] (the fraction of attention "
      f"mass to cover), got {share!r}."
    )
  return float(share)


def _check_valid(valid: Any, lead: tuple[int, ...]) -> None:
  _check_bool_array("valid", valid)
  try:
    out = jnp.broadcast_shapes(tuple(valid.shape), lead)
  except ValueError:
    out = None
  if out != lead:
    raise ValueError(
      f"valid must broadcast to the leading dims {lead} of "
      f"probs, got shape {tuple(valid.shape)}."
    )


# ----------------------------------------------------------------------------
# Active support.


@jax.jit
def _support_counts(probs: Array, share: Array | float) -> tuple[Array, Array]:
  """Counts [...] and the row's probabilities sorted descending [..., S]."""
  ranked = -jnp.sort(-probs.astype(jnp.float32), axis=-1)  # best first
  cum = jnp.cumsum(ranked, axis=-1)
  before = cum - ranked  # mass of the keys ranked before each key
  target = cum[..., -1:] * (share - SUPPORT_TOL)
  counts = jnp.sum(before < target, axis=-1).astype(jnp.int32)
  finite = jnp.all(jnp.isfinite(probs), axis=-1)
  counts = jnp.where(finite, counts, NONFINITE_SUPPORT)
  return counts, ranked


@jax.jit
def _support_mask(probs: Array, counts: Array, ranked: Array) -> Array:
  """The `counts` largest keys of each row; ties go to the lower slot."""
  p = probs.astype(jnp.float32)
  last = jnp.take_along_axis(
    ranked, jnp.maximum(counts - 1, 0)[..., None], axis=-1
  )  # [..., 1] smallest kept value
  above = p > last
  tie = p == last
  room = counts[..., None] - jnp.sum(above, axis=-1, keepdims=True)
  mask = above | (tie & (jnp.cumsum(tie, axis=-1) <= room))
  return mask & (counts[..., None] > 0)


def active_support(
  probs: Array, share: float = 0.9, valid: Array | None = None
) -> Array:
  """Number of keys in the smallest set holding `share` of each row's mass.

  Args:
    probs: [..., S] attention probabilities (each row sums to ~1, or to 0
      for a padding query), e.g. `aux["attn_probs"]` [L, B, N, T, S].
    share: the fraction of mass to cover, in (0, 1].
    valid: optional bool array broadcastable to `probs.shape[:-1]`; False
      marks rows that are not real queries (their count is 0).

  Returns:
    [...] int32 counts (see the module docstring for the exact definition).
    Under `jit`, a row with NaN or inf among its probabilities (and not
    masked by `valid`) counts `NONFINITE_SUPPORT` (-1).

  Raises:
    TypeError: for a non-float `probs`, a non-bool `valid` or a non-number
      `share`.
    ValueError: for a scalar `probs`, `share` outside (0, 1], a `valid`
      that does not broadcast to the leading dims, or (on concrete inputs)
      rows of `probs` holding NaN or inf that `valid` does not mask.
  """
  counts, _ = _checked_counts(probs, share, valid)
  return counts


def _checked_counts(probs, share, valid):
  """Validated `_support_counts`, zeroed on the rows `valid` marks False."""
  _check_float_array("probs", probs, min_ndim=1)
  share = check_share(share)
  if valid is not None:
    _check_valid(valid, tuple(probs.shape[:-1]))
  counts, ranked = _support_counts(probs, share)
  if valid is not None:
    counts = jnp.where(valid, counts, 0)
  _raise_if_nonfinite(
    counts == NONFINITE_SUPPORT,
    "rows",
    f"leading dims {tuple(counts.shape)}",
    "active support needs finite probabilities (mask "
    "rows that are not real queries with `valid`)",
  )
  return counts, ranked


def _raise_if_nonfinite(bad: Array, what: str, where: str, hint: str):
  """Raises naming how many `what` of concrete `bad` are True (NaN/inf
  input) and the first one's index in `where`; silent under jit (the
  callers return a sentinel there)."""
  if isinstance(bad, jax.core.Tracer):
    return
  num_bad = int(jnp.sum(bad))
  if num_bad:
    first = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
    raise ValueError(
      f"probs holds NaN or inf in {num_bad} of {bad.size} "
      f"{what} (first at index {first} of the {where}); "
      f"{hint}."
    )


def active_support_mask(
  probs: Array, share: float = 0.9, valid: Array | None = None
) -> Array:
  """The keys of the set counted by `active_support`, as a mask.

  Ties at the boundary of the set are broken towards the lower slot index.
  Costs one sort per row (XLA's CPU sort is slow: ~2 s for 9M entries).

  Args:
    probs: [..., S] attention probabilities.
    share: the fraction of mass to cover, in (0, 1].
    valid: optional bool mask of real rows, as in `active_support`.

  Returns:
    [..., S] bool, True on the `active_support(probs, share)` keys of each
    row with the highest probabilities; every True key has positive mass.
    Under `jit`, a row holding NaN or inf is all False.

  Raises:
    TypeError / ValueError: as `active_support`.
  """
  counts, ranked = _checked_counts(probs, share, valid)
  return _support_mask(probs, counts, ranked)


# ----------------------------------------------------------------------------
# Summaries (numpy, for tables and plots).


def _real_counts(counts: Any, query_mask: Any) -> np.ndarray:
  """[L, N, M] counts of the M real queries."""
  _check_array("counts", counts, ndim=4)
  _check_array("query_mask", query_mask, ndim=2)
  counts, query_mask = np.asarray(counts), np.asarray(query_mask)
  if query_mask.dtype != np.bool_:
    raise TypeError(
      f"query_mask must be a bool array, got dtype {query_mask.dtype}."
    )
  L, B, N, T = counts.shape
  if query_mask.shape != (B, T):
    raise ValueError(
      f"query_mask must have shape {(B, T)} (counts is "
      f"[L, B, N, T] = {counts.shape}), got {query_mask.shape}."
    )
  if not query_mask.any():
    raise ValueError("query_mask selects no query: nothing to summarise.")
  vals = np.transpose(counts, (0, 2, 1, 3))[:, :, query_mask]  # [L, N, M]
  bad = ~(vals >= 0)  # NaN too
  if bad.any():
    raise ValueError(
      f"counts must be >= 0 on the real queries, got {int(bad.sum())} "
      f"negative or NaN values (e.g. {vals[bad][0]}); "
      f"{NONFINITE_SUPPORT} is what `active_support` under jit gives a "
      "row of probabilities with NaN or inf."
    )
  return vals


def support_summary(counts: Array, query_mask: Array) -> dict[str, Any]:
  """Mean and median active support per head, per layer and overall.

  Args:
    counts: [L, B, N, T] counts from `active_support`.
    query_mask: [B, T] bool, True for the real queries to summarise.

  Returns:
    A dict of numpy values over the real queries:
      "head_mean" [L, N] float64, "head_median" [L, N] float64,
      "layer_median" [L] float64 (over heads and queries), "median" a float
      (over everything), "num_queries" the int number of real queries.

  Raises:
    TypeError / ValueError: for mis-shaped inputs, a non-bool mask, or a
      mask that selects no query.
  """
  vals = _real_counts(counts, query_mask).astype(np.float64)  # [L, N, M]
  L = vals.shape[0]
  return {
    "head_mean": vals.mean(axis=-1),
    "head_median": np.median(vals, axis=-1),
    "layer_median": np.median(vals.reshape(L, -1), axis=-1),
    "median": float(np.median(vals)),
    "num_queries": int(vals.shape[-1]),
  }


def support_histogram(
  counts: Array, query_mask: Array, bins: int | Sequence[float] = 20
) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer histograms of active support over heads and real queries.

  Args:
    counts: [L, B, N, T] counts from `active_support`.
    query_mask: [B, T] bool, True for the real queries.
    bins: a positive int (equal-width bins over the range of all layers'
      counts, shared by every layer so the histograms are comparable), or
      a increasing sequence of bin edges.

  Returns:
    (hist [L, nbins] int64, edges [nbins + 1] float64), as `np.histogram`.

  Raises:
    TypeError / ValueError: for mis-shaped inputs or bad `bins`.
  """
  vals = _real_counts(counts, query_mask)  # [L, N, M]
  if isinstance(bins, (bool, np.bool_)):
    raise TypeError(
      f"bins must be a positive int or a sequence of edges, got {bins!r}."
    )
  if isinstance(bins, (int, np.integer)):
    if bins < 1:
      raise ValueError(f"bins must be a positive int, got {bins!r}.")
    edges = np.histogram_bin_edges(vals, bins=int(bins))
  else:
    edges = np.asarray(bins, np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
      raise ValueError(
        f"bins must be an increasing sequence of at least 2 "
        f"edges, got {bins!r}."
      )
  hist = np.stack([np.histogram(v.ravel(), bins=edges)[0] for v in vals])
  return hist.astype(np.int64), edges.astype(np.float64)


# ----------------------------------------------------------------------------
# Head consensus.


@jax.jit
def _consensus(
  probs: Array, key_pos: Array | None, query_mask: Array | None
) -> Array:
  L, B, N, T, S = probs.shape
  p = probs.astype(jnp.float32)
  top = jnp.max(p, axis=-1)  # [L, B, N, T]
  alive = top > 0
  if key_pos is None:
    ids = jnp.argmax(p, axis=-1).astype(jnp.int32)  # [L, B, N, T] slot
  else:
    K = key_pos.shape[2]
    kp = jnp.repeat(key_pos.astype(jnp.int32), N // K, axis=2)  # [L,B,N,S]
    big = jnp.iinfo(jnp.int32).max
    ids = jnp.min(
      jnp.where(p == top[..., None], kp[:, :, :, None, :], big), axis=-1
    )  # [L, B, N, T] smallest argmax position
  ids = jnp.where(alive, ids, -1)
  ids = jnp.sort(ids, axis=2)  # heads sorted: distinct = value changes
  new = jnp.concatenate(
    [
      ids[:, :, :1] >= 0,
      (ids[:, :, 1:] != ids[:, :, :-1]) & (ids[:, :, 1:] >= 0),
    ],
    axis=2,
  )
  out = jnp.sum(new, axis=2).astype(jnp.float32) / N  # [L, B, T]
  finite = jnp.all(jnp.isfinite(p), axis=(2, 4))  # [L, B, T]
  out = jnp.where(finite, out, jnp.nan)
  if query_mask is not None:
    out = jnp.where(query_mask[None], out, 0.0)
  return out


def head_consensus(
  probs: Array, key_pos: Array | None = None, query_mask: Array | None = None
) -> Array:
  """Distinct argmax keys across the query heads of a layer, divided by N.

  Args:
    probs: [L, B, N, T, S] attention probabilities over cache slots.
    key_pos: optional [L, B, K, S] int token position held by each slot
      (`cache.pos`); query head n reads kv head n // (N // K). When given,
      argmaxes are compared as token positions, not slot indices.
    query_mask: optional [B, T] bool; False rows get 0.

  Returns:
    [L, B, T] float32 in {0, 1/N, ..., 1} (see the module docstring).
    Under `jit`, NaN for a query (not masked by `query_mask`) where any
    head's probabilities hold NaN or inf.

  Raises:
    TypeError / ValueError: for mis-shaped or mistyped arguments, or (on
      concrete inputs) probabilities holding NaN or inf on a query that
      `query_mask` does not mask.
  """
  _check_float_array("probs", probs, ndim=5)
  L, B, N, T, S = probs.shape
  if key_pos is not None:
    _check_int_array("key_pos", key_pos, ndim=4)
    kl, kb, K, ks = key_pos.shape
    if (kl, kb, ks) != (L, B, S) or K == 0 or N % K:
      raise ValueError(
        f"key_pos must have shape [L, B, K, S] = [{L}, {B}, K,"
        f" {S}] with K dividing N={N}, got "
        f"{tuple(key_pos.shape)}."
      )
  if query_mask is not None:
    _check_bool_array("query_mask", query_mask)
    if tuple(query_mask.shape) != (B, T):
      raise ValueError(
        f"query_mask must have shape {(B, T)}, got {tuple(query_mask.shape)}."
      )
  out = _consensus(probs, key_pos, query_mask)
  _raise_if_nonfinite(
    jnp.isnan(out),
    "(layer, row, query) triples",
    "[L, B, T] dims",
    "head consensus needs finite "
    "probabilities (mask queries that are not real with "
    "`query_mask`)",
  )
  return out
