"""Range-search attention: the retrieved set is exactly the brute-force set
{k : q.k >= tau}, the ball bound covers every member, and with tau = -inf
the attention is dense attention (definition and fast path)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import attention
from kvjax.cache import payload_bytes
from kvjax.compress import range_search as rs

# Jitted once per static setting (eager op-by-op dispatch costs more here).
_build = jax.jit(
  rs.build_index, static_argnames=("subspaces", "group", "reservoir", "seed")
)
_attend = jax.jit(
  rs.range_search_attention,
  static_argnames=(
    "buffer",
    "capacity",
    "budget",
    "clustered",
    "block",
    "reservoir",
  ),
)
_bounds = jax.jit(rs.upper_bounds)
_scores = jax.jit(rs.scores)
_tau = jax.jit(rs.reservoir_tau, static_argnames=("budget",))


def _data(kind, B, K, G, S, H, seed):
  """(q [B, K, G, H], k [B, K, S, H], valid [B, K, S]) float32 of a kind."""
  rng = np.random.default_rng(seed)
  if kind == "ties":  # small integers: every dot is exact, many equal
    k = rng.integers(-2, 3, (B, K, S, H)).astype(np.float32)
    q = rng.integers(-2, 3, (B, K, G, H)).astype(np.float32)
  else:
    k = rng.normal(size=(B, K, S, H))
    q = rng.normal(size=(B, K, G, H))
    if kind == "large":  # large norms and a shared offset
      k = 1e3 * k + 3e3
      q = 1e2 * q
    elif kind == "outlier":  # a few channels 50x the rest
      ch = rng.choice(H, 3, replace=False)
      k[..., ch] *= 50.0
      q[..., ch] *= 5.0
    elif kind == "clustered":  # near-duplicate keys: radii ~ 0
      centers = rng.normal(size=(B, K, 4, H))
      pick = rng.integers(0, 4, (B, K, S))
      k = np.take_along_axis(centers, pick[..., None], 2)
      k = k + 1e-6 * rng.normal(size=k.shape)
  valid = rng.random((B, K, S)) > 0.15
  f = lambda x: jnp.asarray(x, jnp.float32)
  return f(q), f(k), jnp.asarray(valid)


def _taus(s, valid):
  """Thresholds [n, B, K, G]: -inf, existing scores (ties), quantiles."""
  s = np.where(np.asarray(valid)[:, :, None], np.asarray(s), -np.inf)
  flat = np.sort(s, -1)
  S = s.shape[-1]
  picks = [flat[..., int(S * f)] for f in (0.5, 0.9, 0.97)]
  picks.append(flat[..., -1])  # only the maximum (ties: several)
  picks.append(np.full(s.shape[:-1], -np.inf))
  return [jnp.asarray(t, jnp.float32) for t in picks]


CASES = [  # kind, S, H, subspaces, group, G
  ("normal", 203, 32, 16, 3, 2),
  ("ties", 160, 16, 1, 4, 2),
  ("large", 128, 32, 2, 8, 4),
  ("outlier", 150, 32, 4, 2, 2),
]


@pytest.mark.parametrize("kind,S,H,P,group,G", CASES)
def test_range_search_equals_brute_force(kind, S, H, P, group, G):
  B, K = 2, 2
  q, k, valid = _data(kind, B, K, G, S, H, seed=S + H)
  index = _build(k, valid, subspaces=P, group=group)
  brute = _scores(q, k)  # [B, K, G, S]
  search = jax.jit(rs.range_search)
  for tau in _taus(brute, valid):
    res = search(q, k, index, tau)
    want = (brute >= tau[..., None]) & valid[:, :, None]
    np.testing.assert_array_equal(res.retrieved, want)
    # Scored = live members of candidate clusters: between the two.
    n = np.asarray(want.sum(-1))
    assert (np.asarray(res.scored) >= n).all()
    assert (
      np.asarray(res.scored) <= np.asarray(valid.sum(-1))[..., None]
    ).all()
    if kind == "ties":
      # Ties at tau are in: exact arithmetic, the count of >= is known.
      exact = np.asarray(q, np.float64) @ np.moveaxis(
        np.asarray(k, np.float64), -1, -2
      )
      np.testing.assert_array_equal(
        n, ((exact >= np.asarray(tau)[..., None]) & valid[:, :, None]).sum(-1)
      )


@pytest.mark.parametrize("kind", ["normal", "large", "outlier", "clustered"])
def test_bound_covers_every_member(kind):
  B, K, G, S, H = 1, 2, 3, 120, 32
  q, k, valid = _data(kind, B, K, G, S, H, seed=7)
  index = _build(k, valid, subspaces=4, group=4)
  ub = np.asarray(_bounds(q, index))  # [B, K, G, C]
  order = np.asarray(index.order)  # [B, K, C, g]
  member = np.asarray(index.member_valid)
  s32 = np.asarray(_scores(q, k))
  s64 = np.asarray(q, np.float64) @ np.moveaxis(
    np.asarray(k, np.float64), -1, -2
  )
  for s in (s32, s64):
    at = np.take_along_axis(
      s,
      np.broadcast_to(order.reshape(B, K, 1, -1), (B, K, G, order[0, 0].size)),
      -1,
    ).reshape(ub.shape + (order.shape[-1],))
    ok = (ub[..., None] >= at) | ~member[:, :, None]
    assert ok.all(), kind
  # Every live slot is a member of exactly one cluster, dead slots of none.
  counts = np.zeros((B, K, S), int)
  for b in range(B):
    for h in range(K):
      np.add.at(counts[b, h], order[b, h][member[b, h]], 1)
  np.testing.assert_array_equal(counts, np.asarray(valid).astype(int))
  # Clusters without a live member are pruned for any tau.
  dead = ~member.any(-1)
  assert (ub[np.broadcast_to(dead[:, :, None], ub.shape)] == -np.inf).all()


@jax.jit
def _dense(q, k, v, valid):
  B, K, S, _ = k.shape
  pos = jnp.broadcast_to(jnp.arange(S), (B, K, S))
  T = q.shape[1]
  return attention.reference_attention(
    q, k, v, q_pos=jnp.full((B, T), S), k_pos=pos, k_valid=valid
  )


@pytest.mark.parametrize(
  "capacity,T,N,K,buffer",
  [(None, 1, 4, 2, 8), (64, 2, 4, 1, 0)],
)
def test_tau_minus_inf_is_dense_attention(capacity, T, N, K, buffer):
  B, S, H = 2, 100, 16
  rng = np.random.default_rng(T + N)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = f(B, T, N, H), f(B, K, S, H), f(B, K, S, H)
  valid = jnp.asarray(rng.random((B, K, S)) > 0.2)
  got = _attend(
    q, k, v, valid=valid, tau=-jnp.inf, buffer=buffer, capacity=capacity
  )
  ref = _dense(q, k, v, valid)
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(got.lse, ref.lse, atol=2e-6, rtol=1e-5)
  assert not np.asarray(got.fallback).any()
  live = np.asarray(valid[:, :, : S - buffer].sum(-1))  # [B, K]
  np.testing.assert_array_equal(
    np.asarray(got.retrieved).reshape(B, K, -1),
    np.broadcast_to(live[..., None], (B, K, N // K * T)),
  )


def test_fast_path_mixed_fallback_per_head():
  """One head fits, the other does not: each gets the exact answer."""
  B, N, K, S, H = 1, 2, 2, 256, 16
  rng = np.random.default_rng(5)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = f(B, 1, N, H), f(B, K, S, H), f(B, K, S, H)
  tau = jnp.array([[[-jnp.inf], [1e9]]])  # head 0: everything; 1: nothing
  ref = _attend(q, k, v, tau=tau, buffer=16)
  got = _attend(q, k, v, tau=tau, buffer=16, capacity=8)
  np.testing.assert_array_equal(got.fallback, [[True, False]])
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
  np.testing.assert_array_equal(got.retrieved, ref.retrieved)
  assert int(got.retrieved[0, 1, 0]) == 0 and int(got.scored[0, 1, 0]) == 0


def test_reservoir_tau():
  B, K, G, S, H = 1, 2, 2, 300, 16
  q, k, valid = _data("normal", B, K, G, S, H, seed=1)
  index = _build(k, valid, reservoir=64, seed=3)
  res = np.asarray(index.reservoir)
  assert np.asarray(index.reservoir_valid).all()
  assert np.asarray(valid)[0, 0, res[0, 0]].all()  # live slots only
  assert len(set(res[0, 0].tolist())) == 64  # without replacement
  sample = np.take_along_axis(
    np.asarray(_scores(q, k)),
    np.broadcast_to(res[:, :, None], (B, K, G, 64)),
    -1,
  )
  np.testing.assert_array_equal(_tau(q, k, index), sample.max(-1))
  tau = np.asarray(_tau(q, k, index, 0.1))
  np.testing.assert_array_equal((sample >= tau[..., None]).sum(-1), 7)
  # Fewer live keys than the reservoir: only live ones, the rest flagged.
  few = jnp.zeros((B, K, S), bool).at[:, :, :10].set(True)
  small = _build(k, few, reservoir=64, seed=3)
  assert np.asarray(small.reservoir_valid).sum(-1).tolist() == [[10, 10]]


def test_index_bytes_and_shapes():
  k = jnp.zeros((2, 3, 10, 8))
  index = _build(k, subspaces=2, group=4, reservoir=5)
  assert index.order.shape == (2, 3, 3, 4) and index.centers.shape == (
    2,
    3,
    3,
    2,
    4,
  )
  assert rs.index_bytes(index) == sum(
    x.nbytes for x in jax.tree.leaves(jax.device_get(index))
  )
  # Padding members of the last cluster are not live.
  assert int(index.member_valid.sum()) == 2 * 3 * 10


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(subspaces=3), "subspaces"),
    (dict(group=0), "group"),
    (dict(reservoir=True), "reservoir"),
  ],
)
def test_build_index_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rs.build_index(jnp.zeros((1, 1, 8, 8)), **kwargs)


def test_attention_errors():
  q, k = jnp.zeros((1, 1, 2, 8)), jnp.zeros((1, 1, 16, 8))
  with pytest.raises(ValueError, match="buffer"):
    rs.range_search_attention(q, k, k, buffer=16)
  with pytest.raises(ValueError, match="capacity"):
    rs.range_search_attention(q, k, k, capacity=0, buffer=0)
  with pytest.raises(ValueError, match="budget"):
    rs.range_search_attention(q, k, k, budget=1.5, buffer=0)
  with pytest.raises(TypeError, match="valid"):
    rs.range_search_attention(q, k, k, valid=jnp.ones((1, 1, 16)), buffer=0)
  with pytest.raises(ValueError, match="q must"):
    k2 = jnp.zeros((1, 2, 16, 8))
    rs.range_search_attention(jnp.zeros((1, 1, 3, 8)), k2, k2, buffer=0)
  with pytest.raises(ValueError, match="index"):
    rs.range_search_attention(q, k, k, buffer=4, index=_build(k), budget=None)


def test_fast_paths_equal_definition():
  """The row-gather path and the block path over keys stored in cluster
  order give the definition's outputs; they prune; a block path that does
  not fit falls back (reported) and is still exact."""
  B, N, K, S, H, R, block = 1, 4, 2, 300, 16, 20, 4
  rng = np.random.default_rng(11)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, v = f(B, 1, N, H), f(B, K, S, H)
  # Keys around 8 centers (structure the index can prune).
  centers = 3.0 * rng.normal(size=(B, K, 8, H))
  k = np.take_along_axis(centers, rng.integers(0, 8, (B, K, S, 1)), 2)
  k = jnp.asarray(k + 0.3 * rng.normal(size=k.shape), jnp.float32)
  valid = jnp.asarray(rng.random((B, K, S)) > 0.1)
  index = _build(k[:, :, : S - R], valid[:, :, : S - R])
  # [B, T, N, H] -> [B, K, G, H] rows of the reservoir's tau.
  qm = jnp.moveaxis(q.reshape(B, 1, K, N // K, H), 1, 3).reshape(B, K, -1, H)
  tau = _tau(qm, k[:, :, : S - R], index, 0.1).reshape(B, N, 1)
  lay = jax.jit(
    lambda x: jnp.concatenate(
      [rs.cluster_order(x[:, :, : S - R], index, block), x[:, :, S - R :]], 2
    )
  )
  kc, vc, validc = lay(k), lay(v), lay(valid)
  index_c = jax.jit(rs.in_cluster_order, static_argnums=1)(index, block)
  C, nb = index.num_clusters, index_c.num_clusters // block
  rows = lambda tau, cap: _attend(
    q, k, v, valid=valid, buffer=R, index=index, tau=tau, capacity=cap
  )
  blocks = lambda tau, cap: _attend(
    q,
    kc,
    vc,
    valid=validc,
    buffer=R,
    index=index_c,
    tau=tau,
    capacity=cap,
    clustered=True,
    block=block,
  )
  for t in (tau, jnp.full_like(tau, -jnp.inf)):
    ref = _attend(q, k, v, valid=valid, buffer=R, index=index, tau=t)
    cases = [(rows(t, C), False), (blocks(t, nb), False)]
    if t is not tau:  # everything passes: 2 blocks cannot hold it
      cases.append((blocks(t, 2), True))
    for got, falls in cases:
      assert np.asarray(got.fallback).all() == falls
      np.testing.assert_allclose(got.out, ref.out, atol=2e-6, rtol=1e-5)
      np.testing.assert_allclose(got.lse, ref.lse, atol=2e-6, rtol=1e-5)
      np.testing.assert_array_equal(got.retrieved, ref.retrieved)
      if t is tau:  # clusters were pruned: fewer keys scored than live
        assert (np.asarray(got.scored) < int(valid[:, :, : S - R].sum())).all()
  # Not dense: keys below tau are left out (and the output differs).
  dense = _dense(q, k, v, valid)
  ref = _attend(q, k, v, valid=valid, buffer=R, index=index, tau=tau)
  assert np.abs(np.asarray(ref.out - dense.out)).max() > 1e-4


_TINY = kvjax.get_config("tiny", num_layers=1, d_model=64, mlp_dim=128)
_T, _RESERVE, _BUFFER, _R = 40, 3, 8, 16


@functools.cache
def _transformed():
  """(plain cache, range_search cache, queries [1, 1, N, H]) of one prompt
  (built once for the tests that read it)."""
  params = kvjax.init_params(_TINY, jax.random.key(0), std=0.3)
  tokens = jax.random.randint(jax.random.key(1), (1, _T), 1, _TINY.vocab_size)
  _, plain = kvjax.prefill(params, tokens, config=_TINY)
  t = rs.range_search_transform(budget=0.1, buffer=_BUFFER, reservoir=_R)
  assert t == rs.range_search_transform(
    budget=0.1, buffer=_BUFFER, reservoir=_R
  )
  _, cache = kvjax.prefill(
    params, tokens, config=_TINY, transform=t, capacity=_T + _RESERVE
  )
  q = jax.random.normal(jax.random.key(2), (1, 1, _TINY.num_heads, 32))
  return plain, cache, q


def test_transform_codec_retrieves_the_range_search_set():
  """The code region's scores are finite exactly on the keys
  `range_search` retrieves from the plain cache; the payload holds the
  index leaves; the reserve is exact for the fullest row."""
  plain, cache, q = _transformed()
  assert int(cache.capacity - cache.end[0]) == _RESERVE
  K, H, g, sc = _TINY.num_kv_heads, _TINY.head_dim, 4, _T - _BUFFER
  # [1, 1, N, H] -> [1, K, G, H]
  qm = jnp.moveaxis(q.reshape(1, 1, K, -1, H), 1, 3).reshape(1, K, -1, H)
  code = cache.k.code
  layer0 = lambda d: {n: x[0] for n, x in d.items()}
  s = jax.jit(code.codec.scores)(qm, layer0(code.slots), layer0(code.shared))
  got = np.isfinite(np.asarray(s)) & np.asarray(cache.valid[0, :, :, None, :sc])
  pos = np.asarray(cache.pos[0, :, :, :sc])  # original slot of each code slot
  k0 = plain.k[0, :, :, :sc]
  index = _build(k0, reservoir=_R)
  res = jax.jit(rs.range_search)(qm, k0, index, _tau(qm, k0, index, 0.1))
  want = np.asarray(res.retrieved)
  assert 0 < want.sum() < want.size  # something, not everything
  for h in range(K):
    for m in range(qm.shape[2]):
      np.testing.assert_array_equal(
        np.sort(pos[0, h][got[0, h, m]]), np.flatnonzero(want[0, h, m])
      )
  # Bytes: float32 keys in the code region plus the index leaves.
  index_bytes = 4 * K * (sc // g * (H + 4) + _R * (H + 1))
  assert sorted(code.slots) == ["centers", "codes", "radii"]
  assert payload_bytes(cache) == (
    4 * K * sc * H
    + index_bytes
    + plain.v.dtype.itemsize * K * (_T + _RESERVE) * H
    + cache.k.tail.dtype.itemsize * K * (_BUFFER + _RESERVE) * H
  )


@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_transform_attention_is_range_search_attention(backend):
  """The engine reads the code region through the codec: the model's
  attention over the transformed cache is `range_search_attention`."""
  plain, cache, q = _transformed()
  got = attention.cached_attention(
    q, cache, 0, q_pos=jnp.full((1, 1), _T), backend=backend
  )
  want = _attend(
    q, plain.k[0], plain.v[0], buffer=_BUFFER, budget=0.1, reservoir=_R
  )
  assert np.isfinite(np.asarray(got.out)).all()
  np.testing.assert_allclose(got.out, want.out, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(got.lse, want.lse, atol=2e-6, rtol=1e-5)
