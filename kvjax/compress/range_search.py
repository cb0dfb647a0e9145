"""Range-search attention (Louver's idea), exact by construction.

A query retrieves EVERY key with q.k >= tau (no false negatives), then
attends with an exact softmax over the retrieved keys plus a recent
full-precision buffer (the newest `buffer` slots, always read).

The index groups the keys of each (row, kv head) into clusters of `group`
keys. The order is a PCA k-d split: the keys are sorted by their projection
on the widest principal axis, each half is sorted on the then-widest axis,
and so on until a segment holds one cluster; `order` keeps the key -> slot
mapping. The head dim is split into `subspaces` equal slices; per cluster
and slice the index stores a ball (center c_s = the members' mean, radius
r_s = the largest member distance), so every member k satisfies

  <q, k> = sum_s <q_s, k_s> <= sum_s <q_s, c_s> + r_s ||q_s|| = UB(q, c).

A cluster is pruned iff UB < tau, so no key with q.k >= tau is ever missed.
"Exact" is about the float32 scores this module computes (`scores`): the
retrieved set is {k : scores(q, k) >= tau}, ties at tau included.
Floating point: each stored radius is inflated by a rounding margin
(`_ROUNDING` units of float32 roundoff times the cluster's magnitude,
`||c|| + sum_s r_s`), which bounds the rounding error of both the computed
bound and the computed score, so the computed bound is >= the computed
score of every member (a float32 statement; the einsums here run at
HIGHEST precision so that GPUs/TPUs do not drop to TF32/bf16 passes).

tau comes from a reservoir of `reservoir` keys sampled (uniformly, fixed
seed) from the indexed region when the index is built: the largest sample
score, or the sample score that a `budget` fraction of the sample reaches
(`reservoir_tau`). The retrieved share of keys then tracks the budget; the
share of keys scored (members of unpruned clusters) is what the index
costs on top, and both are reported.

Three ways to run it, one function:
- `range_search` / `range_search_attention(..., capacity=None)`: plain jnp
  over all keys (every bound, every score, masks): the definition, used by
  the tests.
- `range_search_attention(..., capacity=M)`: the fast path. Per (row, kv
  head) the clusters whose bound reaches tau for any of the head's queries
  are gathered into M static cluster slots (a `nonzero` with a static size)
  and only their members are scored. A head whose candidates do not fit in
  M falls back to the dense computation of the same function (a `lax.cond`
  that runs only when some head overflows), so the result is always exact;
  the fallback is counted in the output, never silent.
- `range_search_attention(..., capacity=M, clustered=True, block=b)`: the
  same fast path over keys and values stored in cluster order
  (`cluster_order`, with the index `in_cluster_order`): whole blocks of b
  clusters are read as contiguous rows instead of gathered row by row.

Attention here is decode attention: every query sees every valid slot (no
causal mask); T > 1 queries are searched independently.

Layouts: q [B, T, N, H] with query head n reading kv head n // G; keys and
values [B, K, S, H]; inside, queries are [B, K, M, H] with M = G * T rows
per kv head ((g, t) order), as a codec's `scores` hook takes them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import Codec, CodedKV, TailedKV, is_coded
from kvjax.compress import base

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
# float32 unit roundoff, and how many (dot length) units the radius margin
# holds: 2x the first-order error bounds of the score and of the bound
# together (see `_rounding_margin`).
_U32 = float(np.finfo(np.float32).eps) / 2
_ROUNDING = 4.0
# Principal axes the k-d split may cut along.
_SPLIT_AXES = 16


class RangeIndex(NamedTuple):
  """The ball index of the keys of one layer (C clusters of `group` slots).

  Attributes:
    order: [B, K, C, group] int32 slot (into the indexed keys) of each
      cluster member; a padding member repeats slot 0 with member_valid
      False.
    member_valid: [B, K, C, group] bool: a live key sits at that member.
    cluster_of: [B, K, S] int32 cluster of each slot (the inverse of
      `order`; an invalid slot maps to a cluster where it is not a member).
    centers: [B, K, C, P, H / P] float32 ball centers per subspace.
    radii: [B, K, C, P] float32 ball radii (rounding margin included); -inf
      for a cluster without a live member (its bound is -inf).
    reservoir: [B, K, R] int32 sampled slots for tau.
    reservoir_valid: [B, K, R] bool (False where fewer than R keys live).
  """

  order: Array
  member_valid: Array
  cluster_of: Array
  centers: Array
  radii: Array
  reservoir: Array
  reservoir_valid: Array

  @property
  def num_clusters(self) -> int:
    return self.order.shape[2]

  @property
  def group(self) -> int:
    return self.order.shape[3]

  @property
  def subspaces(self) -> int:
    return self.radii.shape[3]


def index_bytes(index: RangeIndex) -> int:
  """Physical bytes of every leaf of the index."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(index))


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < minimum
  ):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def _check_keys(k, name: str = "k") -> tuple[int, int, int, int]:
  if getattr(k, "ndim", None) != 4:
    raise ValueError(
      f"{name} must be [B, K, S, H], got {getattr(k, 'shape', k)}."
    )
  return tuple(k.shape)


def _check_valid(valid, shape, name="valid"):
  if valid is None:
    return jnp.ones(shape, bool)
  if tuple(valid.shape) != tuple(shape):
    raise ValueError(f"{name} must be {list(shape)}, got {tuple(valid.shape)}.")
  if valid.dtype != jnp.bool_:
    raise TypeError(f"{name} must be bool, got {valid.dtype}.")
  return valid


def _split(x: Array, subspaces: int) -> Array:
  """[..., H] -> [..., P, H / P]."""
  return x.reshape(x.shape[:-1] + (subspaces, x.shape[-1] // subspaces))


def _kd_order(k: Array, valid: Array, num_clusters: int, group: int) -> Array:
  """[B, K, C * group] int32 slot order: a PCA k-d split of the keys.

  Invalid and padding slots sort last. Level l cuts every segment of
  group * ceil(C / 2**l) positions at its median along the principal axis
  whose remaining width (sqrt(eigenvalue) / 2**cuts so far) is largest.
  """
  B, K, S, H = k.shape
  Sp = num_clusters * group
  x = jnp.pad(k.astype(jnp.float32), [(0, 0), (0, 0), (0, Sp - S), (0, 0)])
  live = jnp.pad(valid, [(0, 0), (0, 0), (0, Sp - S)])
  n = jnp.maximum(jnp.sum(live, -1), 1).astype(jnp.float32)  # [B, K]
  mean = jnp.sum(jnp.where(live[..., None], x, 0.0), 2) / n[..., None]
  xc = jnp.where(live[..., None], x - mean[:, :, None], 0.0)  # [B, K, Sp, H]
  cov = jnp.einsum("bksh,bksd->bkhd", xc, xc, precision=_HIGHEST)
  cov = cov / n[..., None, None]  # [B, K, H, H]
  evals, evecs = jnp.linalg.eigh(cov)  # ascending
  d = min(H, _SPLIT_AXES)
  axes = evecs[..., ::-1][..., :d]  # [B, K, H, d] widest first
  widths = jnp.sqrt(jnp.maximum(evals[..., ::-1][..., :d], 0.0))  # [B, K, d]
  proj = jnp.einsum("bksh,bkhd->bksd", xc, axes, precision=_HIGHEST)
  proj = jnp.where(live[..., None], proj, jnp.inf)  # dead slots sort last
  perm = jnp.broadcast_to(jnp.arange(Sp, dtype=jnp.int32), (B, K, Sp))
  levels = max(1, math.ceil(math.log2(num_clusters))) if num_clusters > 1 else 0
  position = jnp.arange(Sp, dtype=jnp.int32)
  for level in range(levels):
    seg = group * -(-num_clusters // (2**level))
    axis = jnp.argmax(widths, -1)  # [B, K]
    widths = widths.at[
      jnp.arange(B)[:, None], jnp.arange(K)[None, :], axis
    ].multiply(0.5)
    col = jnp.take_along_axis(proj, axis[:, :, None, None], -1)[..., 0]
    vals = jnp.take_along_axis(col, perm, -1)  # [B, K, Sp] in current order
    segment = jnp.broadcast_to(position // seg, (B, K, Sp))
    _, _, perm = jax.lax.sort((segment, vals, perm), dimension=-1, num_keys=2)
  return perm


def _rounding_margin(H: int, subspaces: int, magnitude: Array) -> Array:
  """Radius inflation that covers float32 rounding of scores and bounds.

  A float32 dot of length n errs by at most ~n u |q| |k| (u the unit
  roundoff); the score's error is <= H u ||q|| ||k|| and the bound's <=
  (H + 2P) u ||q|| (||c|| + sum r); with ||k|| <= ||c|| + sum_s r_s both
  are <= (H + 2P + 2) u ||q|| * magnitude. Adding m to every r_s adds
  m sum_s ||q_s|| >= m ||q|| to the bound, so m = _ROUNDING (H + 2P + 2) u
  magnitude covers both with a 2x margin.
  """
  return _ROUNDING * (H + 2 * subspaces + 2) * _U32 * magnitude


def build_index(
  k: Array,  # [B, K, S, H]
  valid: Array | None = None,  # [B, K, S] bool
  *,
  subspaces: int = 4,
  group: int = 4,
  reservoir: int = 256,
  seed: int = 0,
) -> RangeIndex:
  """Builds the ball index of keys k (jit-able: all sizes are static).

  Args:
    k: [B, K, S, H] keys (any float dtype; the index is float32).
    valid: optional [B, K, S] bool liveness; dead slots are never retrieved.
    subspaces: P, how many equal slices of the head dim get their own ball
      (must divide H).
    group: keys per cluster (the last cluster is padded).
    reservoir: R, slots sampled for `reservoir_tau`.
    seed: the reservoir's sampling seed.

  Returns:
    A `RangeIndex` with C = ceil(S / group) clusters.

  Raises:
    ValueError: for a mis-shaped k/valid, or subspaces/group/reservoir that
      are not positive ints, or subspaces not dividing H.
    TypeError: for a non-bool valid.
  """
  B, K, S, H = _check_keys(k)
  subspaces = _check_positive_int(subspaces, "subspaces")
  group = _check_positive_int(group, "group")
  reservoir = _check_positive_int(reservoir, "reservoir")
  if H % subspaces:
    raise ValueError(f"subspaces={subspaces} must divide the head dim H={H}.")
  if S < 1:
    raise ValueError("k must hold at least one slot (S >= 1).")
  valid = _check_valid(valid, (B, K, S))
  C = -(-S // group)
  perm = _kd_order(k, valid, C, group)  # [B, K, C * group]
  in_range = perm < S
  slot = jnp.where(in_range, perm, 0)
  member_valid = in_range & jnp.take_along_axis(valid, slot, -1)
  order = slot.reshape(B, K, C, group)
  member_valid = member_valid.reshape(B, K, C, group)
  # Inverse permutation: cluster of each slot.
  cluster_of = jnp.zeros((B, K, C * group), jnp.int32)
  cluster_of = jax.vmap(
    jax.vmap(
      lambda c, p: c.at[p].set(jnp.arange(C * group, dtype=jnp.int32) // group)
    )
  )(cluster_of, perm)
  cluster_of = cluster_of[..., :S]
  # Balls per subspace.
  members = jnp.take_along_axis(
    k.astype(jnp.float32), order.reshape(B, K, C * group)[..., None], 2
  ).reshape(B, K, C, group, subspaces, H // subspaces)
  w = member_valid[..., None, None].astype(jnp.float32)  # [B, K, C, g, 1, 1]
  count = jnp.sum(member_valid, -1)  # [B, K, C]
  live = count > 0
  centers = jnp.sum(members * w, 3) / jnp.maximum(count, 1)[..., None, None]
  dist = jnp.sqrt(
    jnp.sum(jnp.square(members - centers[:, :, :, None]), -1)
  )  # [B, K, C, group, P]
  radii = jnp.max(jnp.where(member_valid[..., None], dist, 0.0), 3)
  magnitude = jnp.sqrt(jnp.sum(jnp.square(centers), (-1, -2))) + jnp.sum(
    radii, -1
  )  # [B, K, C]
  radii = radii + _rounding_margin(H, subspaces, magnitude)[..., None]
  radii = jnp.where(live[..., None], radii, -jnp.inf)
  centers = jnp.where(live[..., None, None], centers, 0.0)
  # Reservoir: R random live slots (dead slots sort last).
  noise = jax.random.uniform(jax.random.PRNGKey(seed), (B, K, S))
  noise = jnp.where(valid, noise, 2.0)
  R = min(reservoir, S)
  _, res = jax.lax.top_k(-noise, R)  # [B, K, R]
  res = res.astype(jnp.int32)
  res_valid = jnp.take_along_axis(valid, res, -1)
  if R < reservoir:
    pad = [(0, 0), (0, 0), (0, reservoir - R)]
    res, res_valid = jnp.pad(res, pad), jnp.pad(res_valid, pad)
  return RangeIndex(
    order, member_valid, cluster_of, centers, radii, res, res_valid
  )


def _check_queries(q, index: RangeIndex, name="q"):
  B, K = index.order.shape[:2]
  if getattr(q, "ndim", None) != 4 or tuple(q.shape[:2]) != (B, K):
    raise ValueError(
      f"{name} must be [B={B}, K={K}, M, H], got {getattr(q, 'shape', q)}."
    )
  H = index.centers.shape[-1] * index.subspaces
  if q.shape[-1] != H:
    raise ValueError(f"{name} must have head dim H={H}, got {q.shape[-1]}.")


def upper_bounds(q: Array, index: RangeIndex) -> Array:
  """[B, K, M, C] float32 bound sum_s <q_s, c_s> + r_s ||q_s|| per cluster.

  Args:
    q: [B, K, M, H] queries (unscaled).
    index: the keys' `RangeIndex`.

  Returns:
    Bounds >= the (float32) score of every member of each cluster; -inf for
    a cluster without a live member.
  """
  _check_queries(q, index)
  qs = _split(q.astype(jnp.float32), index.subspaces)  # [B, K, M, P, Hs]
  qn = jnp.sqrt(jnp.sum(jnp.square(qs), -1))  # [B, K, M, P]
  center = jnp.einsum(
    "bkmph,bkcph->bkmc", qs, index.centers, precision=_HIGHEST
  )  # [B, K, M, C]
  # radii are -inf for dead clusters; keep -inf * 0 from making NaN.
  live = jnp.isfinite(index.radii[..., 0])  # [B, K, C]
  r = jnp.where(live[..., None], index.radii, 0.0)
  ball = jnp.einsum("bkmp,bkcp->bkmc", qn, r, precision=_HIGHEST)
  return jnp.where(live[:, :, None], center + ball, -jnp.inf)


def scores(q: Array, k: Array) -> Array:
  """[B, K, M, S] float32 q.k (the score the retrieval thresholds)."""
  return jnp.einsum(
    "bkmh,bksh->bkms",
    q.astype(jnp.float32),
    k.astype(jnp.float32),
    precision=_HIGHEST,
  )


def _check_budget(budget) -> None:
  if budget is not None and (
    isinstance(budget, bool)
    or not isinstance(budget, (float, int))
    or not 0.0 < budget <= 1.0
  ):
    raise ValueError(f"budget must be None or in (0, 1], got {budget!r}.")


def reservoir_tau(
  q: Array, k: Array, index: RangeIndex, budget: float | None = None
) -> Array:
  """[B, K, M] tau from the index's reservoir of sampled keys.

  Args:
    q: [B, K, M, H] queries (unscaled).
    k: [B, K, S, H] the indexed keys.
    index: their `RangeIndex`.
    budget: None: the largest sample score (Louver's "sample max"; that
      sampled key sits at tau: whether it is retrieved depends on the
      rounding of its score); a float in (0, 1]: midway between the
      r-th and (r+1)-th best of the n live sample scores, r =
      ceil(budget * n) (the r-th when r = n), so r samples reach tau and
      about that share of keys does.

  Returns:
    float32 thresholds (-inf where the reservoir holds no live key).

  Raises:
    ValueError: for a budget outside (0, 1].
  """
  _check_budget(budget)
  _check_queries(q, index)
  sample = jnp.take_along_axis(k, index.reservoir[..., None], 2)  # [B,K,R,H]
  s = scores(q, sample)  # [B, K, M, R]
  s = jnp.where(index.reservoir_valid[:, :, None], s, -jnp.inf)
  if budget is None:
    return jnp.max(s, -1)
  n = jnp.sum(index.reservoir_valid, -1)  # [B, K]
  rank = jnp.clip(jnp.ceil(budget * n).astype(jnp.int32), 1, None) - 1
  ranked = -jnp.sort(-s, -1)  # descending
  at = lambda r: jnp.take_along_axis(ranked, r[:, :, None, None], -1)[..., 0]
  # Midway to the next sample (when there is one), so that no sampled key
  # sits exactly at tau, where two roundings of its score could disagree.
  nxt = jnp.minimum(rank + 1, jnp.maximum(n - 1, 0))
  return jnp.where(
    (rank + 1 < n)[:, :, None], 0.5 * (at(rank) + at(nxt)), at(rank)
  )


class RangeResult(NamedTuple):
  """What `range_search` finds.

  Attributes:
    retrieved: [B, K, M, S] bool: live keys with q.k >= tau (exactly).
    candidates: [B, K, M, C] bool: clusters whose bound reaches tau.
    scored: [B, K, M] int32 live keys in candidate clusters (the keys a
      search scores).
    scores: [B, K, M, S] float32 q.k of every key (the definition computes
      them all).
  """

  retrieved: Array
  candidates: Array
  scored: Array
  scores: Array


def _tau_rows(tau, shape) -> Array:
  tau = jnp.asarray(tau, jnp.float32)
  try:
    return jnp.broadcast_to(tau, shape)
  except ValueError:
    raise ValueError(
      f"tau must broadcast to {list(shape)}, got {tuple(tau.shape)}."
    ) from None


def range_search(q: Array, k: Array, index: RangeIndex, tau) -> RangeResult:
  """Every live key with q.k >= tau, through the index (plain jnp).

  Args:
    q: [B, K, M, H] queries (unscaled).
    k: [B, K, S, H] the indexed keys.
    index: their `RangeIndex`.
    tau: thresholds broadcastable to [B, K, M] (the keys' liveness is the
      one the index was built with).

  Returns:
    A `RangeResult`; `retrieved` is the candidates' members with q.k >= tau.
  """
  _check_queries(q, index)
  B, K, S, H = _check_keys(k)
  M = q.shape[2]
  tau = _tau_rows(tau, (B, K, M))
  if index.cluster_of.shape != (B, K, S):
    raise ValueError(
      f"index was built over {index.cluster_of.shape[-1]} slots, k has {S}."
    )
  ub = upper_bounds(q, index)  # [B, K, M, C]
  cand = ub >= tau[..., None]
  member = _member_mask(index, S)  # [B, K, S]
  in_cand = (
    jnp.take_along_axis(
      cand, jnp.broadcast_to(index.cluster_of[:, :, None], (B, K, M, S)), -1
    )
    & member[:, :, None]
  )  # [B, K, M, S]
  s = scores(q, k)
  retrieved = in_cand & (s >= tau[..., None])
  scored = jnp.sum(in_cand, -1).astype(jnp.int32)
  return RangeResult(retrieved, cand, scored, s)


def _member_mask(index: RangeIndex, S: int) -> Array:
  """[B, K, S] bool: the slot is a live member of its cluster."""
  B, K, C, g = index.order.shape
  flat = index.order.reshape(B, K, C * g)
  mv = index.member_valid.reshape(B, K, C * g)
  # Padding members repeat slot 0 (not a member): add, never overwrite.
  hits = jax.vmap(
    jax.vmap(lambda o, m: jnp.zeros((S,), jnp.int32).at[o].add(m))
  )(flat, mv.astype(jnp.int32))
  return hits > 0


def _padded_clusters(index: RangeIndex, block: int) -> int:
  return block * -(-index.num_clusters // block)


def cluster_order(x: Array, index: RangeIndex, block: int = 1) -> Array:
  """x [B, K, S, ...] in the index's cluster order: [B, K, C' * group, ...].

  Row c * group + j holds member j of cluster c (zeros for a padding
  member); C' = C rounded up to a multiple of `block` (dead clusters at the
  end). Keys and values stored this way let the fast path read whole
  blocks of clusters as contiguous rows (`range_search_attention(...,
  clustered=True)`); pair it with `in_cluster_order(index, block)`.
  """
  B, K, C, g = index.order.shape
  Cp = _padded_clusters(index, block)
  flat = index.order.reshape(B, K, C * g)
  rows = jnp.take_along_axis(
    x, flat.reshape(flat.shape + (1,) * (x.ndim - 3)), 2
  )  # [B, K, C * g, ...]
  live = index.member_valid.reshape((B, K, C * g) + (1,) * (x.ndim - 3))
  rows = jnp.where(live, rows, jnp.zeros((), x.dtype))
  pad = [(0, 0), (0, 0), (0, (Cp - C) * g)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(rows, pad)


def in_cluster_order(index: RangeIndex, block: int = 1) -> RangeIndex:
  """The same index for keys laid out by `cluster_order(k, index, block)`:
  cluster c's members are rows c * group .. c * group + group - 1."""
  B, K, C, g = index.order.shape
  Cp = _padded_clusters(index, block)
  S = index.cluster_of.shape[-1]
  flat = index.order.reshape(B, K, C * g)
  mv = index.member_valid.reshape(B, K, C * g)
  # Row of each live slot (dead slots: row 0; they are not reservoir slots
  # that count, reservoir_valid masks them).
  row_of = jax.vmap(
    jax.vmap(
      lambda o, m: (
        jnp.zeros((S,), jnp.int32)
        .at[jnp.where(m, o, S)]
        .set(jnp.arange(C * g, dtype=jnp.int32), mode="drop")
      )
    )
  )(flat, mv)
  grow = lambda x, fill: jnp.pad(
    x,
    [(0, 0), (0, 0), (0, Cp - C)] + [(0, 0)] * (x.ndim - 3),
    constant_values=fill,
  )
  order = jnp.broadcast_to(
    jnp.arange(Cp * g, dtype=jnp.int32).reshape(Cp, g), (B, K, Cp, g)
  )
  return RangeIndex(
    order=order,
    member_valid=grow(index.member_valid, False),
    cluster_of=jnp.broadcast_to(
      jnp.arange(Cp * g, dtype=jnp.int32) // g, (B, K, Cp * g)
    ),
    centers=grow(index.centers, 0.0),
    radii=grow(index.radii, -jnp.inf),
    reservoir=jnp.take_along_axis(row_of, index.reservoir, -1),
    reservoir_valid=index.reservoir_valid,
  )


# ----------------------------------------------------------------------------
# Attention.


class RangeAttentionOutput(NamedTuple):
  """What `range_search_attention` returns.

  Attributes:
    out: [B, T, N, H] in q's dtype (zeros for a query that reads nothing).
    lse: [B, N, T] float32 log-sum-exp of the scaled logits read (-inf when
      none).
    retrieved: [B, N, T] int32 indexed keys retrieved (q.k >= tau).
    scored: [B, N, T] int32 indexed keys scored: members of the query's
      candidate clusters (definition path), or of its kv head's gathered
      clusters (fast path; the whole region on a fallback).
    fallback: [B, K] bool: the head's candidates did not fit in `capacity`
      clusters and it ran the dense computation (always False without a
      capacity).
    tau: [B, N, T] float32 the thresholds used.
  """

  out: Array
  lse: Array
  retrieved: Array
  scored: Array
  fallback: Array
  tau: Array


def _softmax_parts(logits: Array, mask: Array, vals: Array):
  """(unnormalised out [..., M, H], max m, sum l) of masked logits
  [..., M, n] over vals [..., n, H]."""
  s = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(s, -1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
  acc = jnp.einsum(
    "bkmn,bknh->bkmh", p, vals.astype(jnp.float32), precision=_HIGHEST
  )
  return acc, m, jnp.sum(p, -1)


def _merge(a, b):
  (acc_a, m_a, l_a), (acc_b, m_b, l_b) = a, b
  m = jnp.maximum(m_a, m_b)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(m_a - m_safe), jnp.exp(m_b - m_safe)  # 0 where -inf
  return (
    wa[..., None] * acc_a + wb[..., None] * acc_b,
    m,
    wa * l_a + wb * l_b,
  )


def _finish(acc, m, l):
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return out, lse


def _dense_part(qm, k, v, index, tau, scale):
  """The definition over the indexed region: ((acc, m, l), retrieved,
  scored), each [B, K, M, ...]."""
  res = range_search(qm, k, index, tau)
  part = _softmax_parts(res.scores * scale, res.retrieved, v)
  return part, jnp.sum(res.retrieved, -1).astype(jnp.int32), res.scored


def _gathered_part(qm, k, v, index, tau, scale, capacity):
  """The fast path over the indexed region: the union over a head's M
  queries of the candidate clusters, gathered into `capacity` slots.
  Returns ((acc, m, l), retrieved, scored, overflow [B, K])."""
  B, K, M, H = qm.shape
  g = index.group
  ub = upper_bounds(qm, index)  # [B, K, M, C]
  cand = jnp.any(ub >= tau[..., None], 2)  # [B, K, C]
  count = jnp.sum(cand, -1)  # [B, K]
  overflow = count > capacity
  sel = jax.vmap(
    jax.vmap(lambda c: jnp.nonzero(c, size=capacity, fill_value=0)[0])
  )(cand).astype(jnp.int32)  # [B, K, capacity]
  sel_valid = jnp.arange(capacity) < count[..., None]  # [B, K, capacity]
  slots = jnp.take_along_axis(index.order, sel[..., None], 2)  # [B,K,cap,g]
  mvalid = jnp.take_along_axis(index.member_valid, sel[..., None], 2)
  mvalid = (mvalid & sel_valid[..., None]).reshape(B, K, capacity * g)
  slots = slots.reshape(B, K, capacity * g)
  kg = jnp.take_along_axis(k, slots[..., None], 2)  # [B, K, cap * g, H]
  vg = jnp.take_along_axis(v, slots[..., None], 2)  # [B, K, cap * g, H]
  s = scores(qm, kg)  # [B, K, M, cap * g]
  hit = mvalid[:, :, None] & (s >= tau[..., None])  # [B, K, M, cap * g]
  part = _softmax_parts(s * scale, hit, vg)
  retrieved = jnp.sum(hit, -1).astype(jnp.int32)
  scored = jnp.broadcast_to(jnp.sum(mvalid, -1)[:, :, None], (B, K, M)).astype(
    jnp.int32
  )
  return part, retrieved, scored, overflow


def _block_part(qm, k, v, index, tau, scale, capacity, block):
  """The fast path over a region stored in cluster order: whole blocks of
  `block` clusters (block * group contiguous rows) whose clusters reach
  tau for any of the head's M queries, `capacity` blocks at most.
  Returns ((acc, m, l), retrieved, scored, overflow [B, K])."""
  B, K, M, H = qm.shape
  C, g = index.num_clusters, index.group
  if C % block or k.shape[2] != C * g:
    raise ValueError(
      f"clustered=True needs k laid out by cluster_order(k, index, "
      f"block={block}) and index=in_cluster_order(index, {block}): "
      f"{k.shape[2]} rows for {C} clusters of {g}."
    )
  nb, rows = C // block, block * g
  ub = upper_bounds(qm, index)  # [B, K, M, C]
  cand = jnp.any(ub >= tau[..., None], 2)  # [B, K, C]
  hit_blocks = jnp.any(cand.reshape(B, K, nb, block), -1)  # [B, K, nb]
  count = jnp.sum(hit_blocks, -1)  # [B, K]
  overflow = count > capacity
  sel = jax.vmap(
    jax.vmap(lambda c: jnp.nonzero(c, size=capacity, fill_value=0)[0])
  )(hit_blocks).astype(jnp.int32)  # [B, K, capacity]
  sel_valid = jnp.arange(capacity) < count[..., None]  # [B, K, capacity]
  take = jax.vmap(jax.vmap(lambda x, i: x[i]))  # contiguous row blocks
  # [B, K, nb * rows, H] -> [B, K, nb, rows, H] -> [B, K, capacity * rows, H]
  kg = take(k.reshape(B, K, nb, rows, H), sel).reshape(B, K, -1, H)
  vg = take(v.reshape(B, K, nb, rows, H), sel).reshape(B, K, -1, H)
  mv = take(index.member_valid.reshape(B, K, nb, rows), sel)
  mv = (mv & sel_valid[..., None]).reshape(B, K, capacity * rows)
  s = scores(qm, kg)  # [B, K, M, capacity * rows]
  hit = mv[:, :, None] & (s >= tau[..., None])
  part = _softmax_parts(s * scale, hit, vg)
  retrieved = jnp.sum(hit, -1).astype(jnp.int32)
  scored = jnp.broadcast_to(jnp.sum(mv, -1)[:, :, None], (B, K, M))
  return part, retrieved, scored.astype(jnp.int32), overflow


def range_search_attention(
  q: Array,  # [B, T, N, H]
  k: Array,  # [B, K, S, H]
  v: Array,  # [B, K, S, H]
  *,
  valid: Array | None = None,  # [B, K, S] bool
  buffer: int = 256,
  tau=None,
  budget: float | None = 0.1,
  index: RangeIndex | None = None,
  capacity: int | None = None,
  clustered: bool = False,
  block: int = 1,
  scale: float | None = None,
  subspaces: int = 4,
  group: int = 4,
  reservoir: int = 256,
  seed: int = 0,
) -> RangeAttentionOutput:
  """Exact softmax over the keys with q.k >= tau plus a recent buffer.

  Slots [0, S - buffer) are the indexed region (searched); slots
  [S - buffer, S) the buffer, always read in full precision. With tau =
  -inf every live key is retrieved and this is dense attention.

  Args:
    q: [B, T, N, H] queries; N a multiple of K.
    k: [B, K, S, H] keys.
    v: [B, K, S, H] values.
    valid: optional [B, K, S] bool liveness. The indexed region is searched
      with the index's own liveness (a prebuilt index must have been built
      with the same `valid[:, :, :S - buffer]`); the buffer uses `valid`.
    buffer: slots at the end always read (0 <= buffer < S).
    tau: thresholds on q.k broadcastable to [B, N, T]; None: from the
      reservoir (`reservoir_tau` with `budget`).
    budget: the reservoir's budget (None: sample max); used when tau is None.
    index: a prebuilt `build_index(k[:, :, :S - buffer], ...)`; None:
      built here (with subspaces, group, reservoir, seed).
    capacity: None: the definition (every key scored, masks). An int: the
      fast path, at most this many clusters gathered per (row, kv head)
      (>= the cluster count: everything fits, never a fallback); a
      head with more candidates falls back to the dense computation
      (exact; reported in `fallback`).
    clustered: the indexed region of k and v is stored in cluster order
      (`cluster_order(x, index, block)`, index `in_cluster_order(index,
      block)`): the fast path then reads whole blocks of `block` clusters
      as contiguous rows, and `capacity` counts blocks.
    block: clusters per block of the clustered fast path.
    scale: logit scale; defaults to 1/sqrt(H).
    subspaces, group, reservoir, seed: index settings when `index` is None.

  Returns:
    A `RangeAttentionOutput`.

  Raises:
    ValueError / TypeError: for mis-shaped inputs, a buffer outside
      [0, S), a capacity that is not a positive int, an index of the wrong
      size.
  """
  if getattr(q, "ndim", None) != 4:
    raise ValueError(f"q must be [B, T, N, H], got {getattr(q, 'shape', q)}.")
  B, K, S, H = _check_keys(k)
  if tuple(v.shape[:3]) != (B, K, S) or v.ndim != 4:
    raise ValueError(f"v must be [B={B}, K={K}, S={S}, H], got {v.shape}.")
  Bq, T, N, Hq = q.shape
  if Bq != B or Hq != H or N % K:
    raise ValueError(
      f"q must be [B={B}, T, N (a multiple of K={K}), H={H}], got {q.shape}."
    )
  G = N // K
  buffer = _check_positive_int(buffer, "buffer", 0)
  if buffer >= S:
    raise ValueError(f"buffer must be < S={S}, got {buffer}.")
  if capacity is not None:
    capacity = _check_positive_int(capacity, "capacity")
  block = _check_positive_int(block, "block")
  if clustered and capacity is None:
    raise ValueError("clustered=True is the fast path: give a capacity.")
  if tau is None:
    _check_budget(budget)
  valid = _check_valid(valid, (B, K, S))
  scale = H**-0.5 if scale is None else scale
  Sr = S - buffer
  kr, vr, validr = k[:, :, :Sr], v[:, :, :Sr], valid[:, :, :Sr]
  if index is None:
    index = build_index(
      kr,
      validr,
      subspaces=subspaces,
      group=group,
      reservoir=reservoir,
      seed=seed,
    )
  elif index.cluster_of.shape != (B, K, Sr):
    raise ValueError(
      f"index must index the {Sr} slots before the buffer ([B={B}, K={K}]), "
      f"got one of {index.cluster_of.shape}."
    )
  M = G * T
  # [B, T, N, H] -> [B, T, K, G, H] -> [B, K, G, T, H] -> [B, K, M, H]
  qm = jnp.moveaxis(q.reshape(B, T, K, G, H), 1, 3).reshape(B, K, M, H)
  qm = qm.astype(jnp.float32)
  if tau is None:
    tau_m = reservoir_tau(qm, kr, index, budget)  # [B, K, M]
  else:
    tau_n = _tau_rows(tau, (B, N, T))
    tau_m = tau_n.reshape(B, K, G * T)  # [B, N, T] -> [B, K, G * T]
  if capacity is None:
    part, retrieved, scored = _dense_part(qm, kr, vr, index, tau_m, scale)
    fallback = jnp.zeros((B, K), bool)
  else:
    if clustered:
      part, retrieved, scored, fallback = _block_part(
        qm, kr, vr, index, tau_m, scale, capacity, block
      )
    else:
      part, retrieved, scored, fallback = _gathered_part(
        qm, kr, vr, index, tau_m, scale, capacity
      )

    def dense(_):
      return _dense_part(qm, kr, vr, index, tau_m, scale)

    def skip(_):
      zeros = jnp.zeros((B, K, M), jnp.float32)
      z = jnp.zeros((B, K, M), jnp.int32)
      return (jnp.zeros((B, K, M, H), jnp.float32), zeros, zeros), z, z

    dpart, dret, dscored = jax.lax.cond(jnp.any(fallback), dense, skip, None)
    pick = lambda a, b: jnp.where(
      fallback.reshape((B, K) + (1,) * (a.ndim - 2)), b, a
    )
    part = jax.tree.map(pick, part, dpart)
    retrieved, scored = pick(retrieved, dret), pick(scored, dscored)
  if buffer:
    sb = scores(qm, k[:, :, Sr:]) * scale  # [B, K, M, buffer]
    bmask = jnp.broadcast_to(valid[:, :, None, Sr:], sb.shape)
    part = _merge(part, _softmax_parts(sb, bmask, v[:, :, Sr:]))
  out, lse = _finish(*part)
  # [B, K, M, H] -> [B, K, G, T, H] -> [B, T, K, G, H] -> [B, T, N, H]
  out = jnp.moveaxis(out.reshape(B, K, G, T, H), 3, 1).reshape(B, T, N, H)
  to_n = lambda x: x.reshape(B, N, T)  # [B, K, G * T] -> [B, N, T]
  return RangeAttentionOutput(
    out.astype(q.dtype),
    to_n(lse),
    to_n(retrieved),
    to_n(scored),
    fallback,
    to_n(tau_m),
  )


# ----------------------------------------------------------------------------
# The cache transform: the model's attention reads the index.


def range_codec(
  head_dim: int, subspaces: int = 4, group: int = 4, budget: float = 0.1
) -> Codec:
  """The codec of a range-search code region (keys in cluster order).

  Per-slot leaves: "codes" [B, K, S, H] float32 keys (the name
  `TailedKV` reads the code region's size from), "centers" [B, K, S / g,
  H] and "radii" [B, K, S / g, P] float32 (one ball per cluster of g
  consecutive slots); shared leaves: "reservoir" [B, K, R, H] sampled keys
  and "reservoir_valid" [B, K, R] float32 (1 live, 0 not). `scores`
  returns q.k where q.k >= tau (tau: the reservoir's `budget` quantile for
  that query, `reservoir_tau`) and -inf elsewhere: attention then reads
  exactly the retrieved keys of this region. The bound prunes clusters
  (their keys get -inf without changing the set); the XLA engine still
  computes every block's scores, so this gives the method's outputs, not
  its speed. The region is written only by `range_search` (no `encode`).
  """
  subspaces = _check_positive_int(subspaces, "subspaces")
  group = _check_positive_int(group, "group")
  _check_budget(budget)
  if budget is None:
    raise ValueError("budget must be in (0, 1] for the codec.")
  if head_dim % subspaces:
    raise ValueError(f"subspaces={subspaces} must divide H={head_dim}.")

  def decode(enc, shared):
    del shared
    return enc["codes"].astype(jnp.float32)

  def scores_fn(q, enc, shared):
    B, K, n, H = enc["codes"].shape
    index = RangeIndex(
      order=jnp.zeros((B, K, n // group, group), jnp.int32),
      member_valid=jnp.ones((B, K, n // group, group), bool),
      cluster_of=jnp.zeros((B, K, n), jnp.int32),
      centers=_split(enc["centers"], subspaces),
      radii=enc["radii"],
      reservoir=jnp.zeros(shared["reservoir_valid"].shape, jnp.int32),
      reservoir_valid=shared["reservoir_valid"] > 0,
    )
    # tau from the reservoir keys themselves (reservoir slots 0..R-1).
    sample = index._replace(
      reservoir=jnp.broadcast_to(
        jnp.arange(index.reservoir.shape[-1], dtype=jnp.int32),
        index.reservoir.shape,
      )
    )
    tau = reservoir_tau(q, shared["reservoir"], sample, budget)  # [B, K, M]
    ub = upper_bounds(q, index)  # [B, K, M, n / g]
    s = scores(q, enc["codes"])  # [B, K, M, n]
    cand = jnp.repeat(ub >= tau[..., None], group, axis=-1)
    return jnp.where(cand & (s >= tau[..., None]), s, -jnp.inf)

  P = subspaces
  return Codec(
    name=f"range/p{P}g{group}b{budget}",
    encode=None,
    decode=decode,
    scores=scores_fn,
    # float32 keys + a float32 center and P radii per cluster of g keys.
    bits=lambda h: 32.0 + 32.0 * (h + P) / (group * h),
    params=("range_search", head_dim, P, group, budget),
    shared_axes=(("reservoir", "bk"), ("reservoir_valid", "bk")),
  )


class RangeSearchState(NamedTuple):
  """State of `range_search` (none: the index is built once, at prefill)."""


def _rows_from(x: Array, start: Array, width: int) -> Array:
  """x [L, B, K, S, ...] -> [L, B, K, width, ...] from slot start[b] on
  (clamped past S; callers mask those)."""
  S = x.shape[3]
  idx = jnp.minimum(start[:, None] + jnp.arange(width), S - 1)  # [B, width]
  idx = jnp.broadcast_to(idx[None, :, None, :], x.shape[:3] + (width,))
  return jnp.take_along_axis(
    x, idx.reshape(idx.shape + (1,) * (x.ndim - 4)), axis=3
  )


@base.by_value
def range_search_transform(
  budget: float = 0.1,
  buffer: int = 256,
  subspaces: int = 4,
  group: int = 4,
  reservoir: int = 256,
  seed: int = 0,
) -> base.KVTransform:
  """Range-search attention as a cache transform (prefill-time index).

  Keeps every entry (no eviction). At the end of prefill each row's
  entries before its newest `buffer` are indexed (`build_index`, per layer,
  row and kv head) and stored in cluster order in a code region read
  through `range_codec`: attention there sees exactly the keys with q.k >=
  tau (tau per query from the reservoir at `budget`). The newest `buffer`
  entries, the reserve and every decoded token stay in a full-precision
  tail that attention always reads in full. Not implemented: Louver's
  re-clustering of the tail every 256 decode steps (decoded tokens stay in
  the tail, sized for them from `decode_steps`).

  Apply it last, after any prefill-time eviction (entries contiguous from
  slot 0, as compaction leaves them); it cannot be compacted afterwards,
  and `chain` refuses a decode-time eviction policy before it. Values are
  kept plain, reordered with their keys; `pos` keeps each entry's original
  position, so causal and window masks are unchanged.

  Args:
    budget: reservoir quantile in (0, 1] giving tau (about this share of
      the indexed keys is retrieved).
    buffer: newest entries kept exact (>= 0).
    subspaces, group, reservoir, seed: the index (`build_index`).

  Raises:
    ValueError: bad arguments; `Degenerate` (at apply) when no entry lies
      before the buffer.
  """
  _check_budget(budget)
  if budget is None:
    raise ValueError("budget must be in (0, 1], got None.")
  buffer = _check_positive_int(buffer, "buffer", 0)
  group = _check_positive_int(group, "group")
  subspaces = _check_positive_int(subspaces, "subspaces")
  reservoir = _check_positive_int(reservoir, "reservoir")
  label = f"range_search{budget:g}"

  def prefill(cache, ctx):
    k, v = cache.k, cache.v
    if is_coded(k) or is_coded(v) or k.ndim != 5:
      raise ValueError(
        "range_search applies to float entries [L, B, K, S, H]; it cannot "
        "follow a codec."
      )
    L, B, K, S, H = k.shape
    if H % subspaces:
      raise ValueError(f"subspaces={subspaces} must divide H={H}.")
    live = base.live_bound(cache, ctx)
    if live <= buffer:
      raise base.Degenerate(
        f"{label}: {live} live entries fit in the {buffer}-entry buffer, "
        "so nothing would be indexed; use a smaller buffer or a longer "
        "context."
      )
    C = -(-(live - buffer) // group)
    sc = C * group  # code slots
    tail = buffer + ctx.reserve + ctx.decode_reserve
    end = cache.end  # [B]
    n = jnp.maximum(end - buffer, 0)  # [B] indexed entries per row
    grow = lambda x: jnp.pad(
      x, [(0, 0)] * 3 + [(0, max(0, sc - S))] + [(0, 0)] * (x.ndim - 4)
    )[:, :, :, :sc]
    in_code = jnp.arange(sc)[None, :] < n[:, None]  # [B, sc]
    code_valid = grow(cache.valid) & in_code[None, :, None, :]
    kf = grow(k).astype(jnp.float32)

    def one_layer(kl, vl, pl, validl):
      index = build_index(
        kl,
        validl,
        subspaces=subspaces,
        group=group,
        reservoir=reservoir,
        seed=seed,
      )
      res = jnp.take_along_axis(kl, index.reservoir[..., None], 2)
      lay = lambda x: cluster_order(x, index)
      return (
        lay(kl),  # [B, K, sc, H]
        index.centers.reshape(B, K, C, H),
        index.radii,
        res,
        index.reservoir_valid.astype(jnp.float32),
        lay(vl),
        jnp.where(lay(validl), lay(pl), -1),
        lay(validl),
      )

    kc, centers, radii, res, res_valid, vc, pos_c, valid_c = jax.lax.map(
      lambda xs: one_layer(*xs),
      (kf, grow(v), grow(cache.pos), code_valid),
    )
    tail_live = (jnp.arange(tail) < (end - n)[:, None])[None, :, None, :]
    tail_valid = _rows_from(cache.valid, n, tail) & tail_live
    tail_pos = jnp.where(tail_valid, _rows_from(cache.pos, n, tail), -1)
    rows = lambda x: jnp.where(
      tail_valid[..., None], _rows_from(x, n, tail), 0
    ).astype(x.dtype)
    codec = range_codec(H, subspaces, group, budget)
    code = CodedKV(
      {"codes": kc, "centers": centers, "radii": radii},
      {"reservoir": res, "reservoir_valid": res_valid},
      codec,
    )
    # More entries than the live bound would fall between the regions:
    # flagged past the capacity instead.
    new_end = jnp.where(end > live, sc + tail + 1, sc + end - n)
    cache = cache._replace(
      k=TailedKV(code, rows(k)),
      v=jnp.concatenate([vc.astype(v.dtype), rows(v)], 3),
      pos=jnp.concatenate([pos_c, tail_pos], -1),
      valid=jnp.concatenate([valid_c, tail_valid], -1),
      end=new_end.astype(jnp.int32),
    )
    return cache, RangeSearchState()

  def apply(cache, state, ctx):
    if ctx.phase == "prefill":
      return prefill(cache, ctx)
    return cache, state

  return base.KVTransform(
    init=lambda cache: RangeSearchState(),
    apply=apply,
    keeps=lambda live: live,
    # A (no-op) decode phase, as KIVI has one: `chain` then refuses a
    # decode-time eviction policy before it (its evictions cannot move
    # entries of the cluster-ordered code region), with the reason.
    every=1,
    bits=lambda h: (range_codec(h, subspaces, group, budget).bits(h), None),
    name=label,
  )
