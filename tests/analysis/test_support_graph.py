"""Active support, head consensus, eviction of listed tokens, token graphs,
reachability and token routes (kvjax.analysis.support / .graph).

Hand-built attention patterns with known answers, brute-force references,
slot-order invariance, and a tiny model where keeping only a route must
reproduce the answer's logits.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.analysis import graph
from kvjax.analysis import support
from kvjax.compress import base as compress_base

_forward = jax.jit(kvjax.forward, static_argnames=("config", "capture"))


def _scatter_to_slots(probs_pos, key_pos):
  """probs over positions [L, B, N, T, P] -> over slots [L, B, N, T, S].

  key_pos [L, B, K, S] gives the position held by each slot (-1: empty, 0
  probability)."""
  L, B, N, T, _ = probs_pos.shape
  K = key_pos.shape[2]
  kp = np.repeat(key_pos, N // K, axis=2)[:, :, :, None, :]  # [L,B,N,1,S]
  out = np.take_along_axis(probs_pos, np.clip(kp, 0, None).repeat(T, 3), -1)
  return np.where(kp >= 0, out, 0.0).astype(np.float32)


def _permute_slots(rng, key_pos, key_valid, probs=None):
  """Shuffles the slots of every (layer, row, kv head) independently."""
  L, B, K, S = key_pos.shape
  perm = np.argsort(rng.random((L, B, K, S)), axis=-1)
  kp = np.take_along_axis(key_pos, perm, -1)
  kv = np.take_along_axis(key_valid, perm, -1)
  if probs is None:
    return kp, kv
  N, T = probs.shape[2], probs.shape[3]
  pidx = np.repeat(perm, N // K, axis=2)[:, :, :, None, :].repeat(T, 3)
  return kp, kv, np.take_along_axis(probs, pidx, -1)


# ----------------------------------------------------------------------------
# Active support.


def test_uniform_over_ten_keys():
  probs = np.zeros((2, 3, 16), np.float32)
  probs[..., 3:13] = 0.1
  assert np.all(np.asarray(support.active_support(probs, 0.9)) == 9)
  assert np.all(np.asarray(support.active_support(probs, 1.0)) == 10)
  assert np.all(np.asarray(support.active_support(probs, 0.5)) == 5)
  assert np.all(np.asarray(support.active_support(probs, 0.05)) == 1)
  assert support.active_support(probs).dtype == jnp.int32
  # Ties at the boundary go to the lower slots.
  mask = np.asarray(support.active_support_mask(probs, 0.9))
  np.testing.assert_array_equal(
    mask[0, 0], (np.arange(16) >= 3) & (np.arange(16) < 12)
  )


def test_one_hot_zero_rows_and_valid_mask():
  probs = np.zeros((3, 8), np.float32)
  probs[0, 5] = 1.0  # one-hot
  probs[2, :] = 1 / 8  # uniform, masked out below
  for share, uniform in ((0.1, 1), (0.9, 8), (1.0, 8)):
    np.testing.assert_array_equal(
      support.active_support(probs, share), [1, 0, uniform]
    )
  valid = np.array([True, True, False])
  np.testing.assert_array_equal(
    support.active_support(probs, 0.9, valid=valid), [1, 0, 0]
  )


def test_known_row_and_slot_order_invariance():
  p = np.array([0.05, 0.5, 0.15, 0.3], np.float32)  # sorted: .5 .3 .15 .05
  for share, want in (
    (0.5, 1),
    (0.8, 2),
    (0.81, 3),
    (0.95, 3),
    (0.96, 4),
    (1.0, 4),
  ):
    assert int(support.active_support(p, share)) == want, share
    assert int(support.active_support(p[::-1].copy(), share)) == want
  mask = np.asarray(support.active_support_mask(p, 0.8))
  np.testing.assert_array_equal(mask, [False, True, False, True])


def test_support_matches_brute_force():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.full(12, 0.3), size=(40,)).astype(np.float32)
  probs[:, :2] = 0.0  # some zero keys
  probs[probs < 1e-3] = 0.0  # no tail lighter than the tolerance
  probs /= probs.sum(-1, keepdims=True)
  for share in (0.3, 0.9, 0.99):
    got = np.asarray(support.active_support(probs, share))
    ranked = -np.sort(-probs.astype(np.float64), axis=-1)
    want = np.argmax(np.cumsum(ranked, -1) >= share - 1e-9, axis=-1) + 1
    np.testing.assert_array_equal(got, want)
    mask = np.asarray(support.active_support_mask(probs, share))
    np.testing.assert_array_equal(mask.sum(-1), got)
    # The kept keys are the largest ones.
    kept_min = np.where(mask, probs, np.inf).min(-1)
    dropped_max = np.where(mask, -np.inf, probs).max(-1)
    assert np.all(kept_min >= dropped_max)
  # At share 1.0 every key of positive probability counts.
  np.testing.assert_array_equal(
    support.active_support(probs, 1.0), (probs > 0).sum(-1)
  )


def test_support_summary_and_histogram():
  # counts [L=2, B=2, N=2, T=3]; masked queries hold 99 and must not count.
  counts = np.full((2, 2, 2, 3), 99, np.int32)
  mask = np.array([[True, True, False], [True, False, False]])
  counts[0, :, 0][mask] = [1, 2, 3]
  counts[0, :, 1][mask] = [4, 4, 4]
  counts[1, :, 0][mask] = [5, 6, 10]
  counts[1, :, 1][mask] = [7, 8, 9]
  s = support.support_summary(counts, mask)
  np.testing.assert_allclose(s["head_mean"], [[2, 4], [7, 8]])
  np.testing.assert_allclose(s["head_median"], [[2, 4], [6, 8]])
  np.testing.assert_allclose(s["layer_median"], [3.5, 7.5])
  assert s["median"] == 4.5 and s["num_queries"] == 3
  hist, edges = support.support_histogram(counts, mask, bins=[0, 5, 10, 100])
  np.testing.assert_array_equal(hist, [[6, 0, 0], [0, 5, 1]])
  np.testing.assert_array_equal(edges, [0, 5, 10, 100])
  hist, edges = support.support_histogram(counts, mask, bins=3)
  assert hist.shape == (2, 3) and np.all(hist.sum(-1) == 6)
  assert edges[0] == 1 and edges[-1] == 10


def test_head_consensus():
  L, B, N, T, S = 1, 1, 4, 3, 6
  probs = np.zeros((L, B, N, T, S), np.float32)
  probs[0, 0, :, 0, 2] = 1.0  # query 0: every head on slot 2
  for n in range(N):  # query 1: all different
    probs[0, 0, n, 1, n] = 0.7
    probs[0, 0, n, 1, 5] = 0.3
  # query 2: heads 0, 1 on slot 1; heads 2, 3 (second kv head) on slot 4.
  probs[0, 0, :2, 2, 1] = 1.0
  probs[0, 0, 2:, 2, 4] = 1.0
  got = np.asarray(support.head_consensus(probs))
  np.testing.assert_allclose(got, [[[1 / N, 1.0, 2 / N]]])
  # In position space: both kv heads hold position 9 (in slots 1 and 4).
  key_pos = np.array(
    [[[[0, 9, 2, 3, 4, 5], [10, 11, 12, 13, 9, 15]]]], np.int32
  )
  got = np.asarray(support.head_consensus(probs, key_pos=key_pos))
  np.testing.assert_allclose(got, [[[2 / N, 1.0, 1 / N]]])
  # Masked and zero-mass queries give 0; slot order does not matter.
  probs[0, 0, :, 1] = 0.0
  mask = np.array([[False, True, True]])
  np.testing.assert_allclose(
    support.head_consensus(probs, key_pos, mask), [[[0, 0, 1 / N]]]
  )
  kp, _, pp = _permute_slots(
    np.random.default_rng(1), key_pos, np.ones_like(key_pos, bool), probs
  )
  np.testing.assert_allclose(
    support.head_consensus(pp, kp, mask), [[[0, 0, 1 / N]]]
  )


def test_support_bad_arguments():
  probs = np.full((2, 4), 0.25, np.float32)
  for share in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="share"):
      support.active_support(probs, share)
  with pytest.raises(TypeError, match="share"):
    support.active_support(probs, True)
  with pytest.raises(TypeError, match="probs"):
    support.active_support(np.ones((2, 4), np.int32))
  with pytest.raises(ValueError, match="valid"):
    support.active_support(probs, valid=np.ones((3,), bool))
  with pytest.raises(TypeError, match="valid"):
    support.active_support(probs, valid=np.ones((2,), np.int32))
  with pytest.raises(ValueError, match="query_mask"):
    support.support_summary(np.ones((1, 2, 1, 3)), np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="no query"):
    support.support_summary(np.ones((1, 2, 1, 3)), np.zeros((2, 3), bool))
  with pytest.raises(ValueError, match="bins"):
    support.support_histogram(
      np.ones((1, 2, 1, 3)), np.ones((2, 3), bool), bins=[3, 1]
    )
  with pytest.raises(ValueError, match="key_pos"):
    support.head_consensus(
      np.ones((1, 1, 4, 2, 5), np.float32),
      key_pos=np.zeros((1, 1, 3, 5), np.int32),
    )


def test_nonfinite_probs_raise_and_give_a_sentinel_under_jit():
  probs = np.full((4, 8), 1 / 8, np.float32)
  probs[1, 3] = np.nan
  probs[3, 0] = np.inf
  for fn in (support.active_support, support.active_support_mask):
    with pytest.raises(
      ValueError,
      match=r"probs holds NaN or inf in 2 of 4 "
      r"rows \(first at index \(1,\)",
    ):
      fn(probs)
  # Rows masked by `valid` are not queries: no error, count 0.
  valid = np.array([True, False, True, False])
  np.testing.assert_array_equal(
    support.active_support(probs, valid=valid), [8, 0, 8, 0]
  )
  # Under jit nothing can raise: the count is -1, never a plausible count.
  got = jax.jit(support.active_support)(probs)
  np.testing.assert_array_equal(
    got, [8, support.NONFINITE_SUPPORT, 8, support.NONFINITE_SUPPORT]
  )
  mask = np.asarray(jax.jit(support.active_support_mask)(probs))
  np.testing.assert_array_equal(mask.sum(-1), [8, 0, 8, 0])
  # Summaries refuse the sentinel.
  counts = np.asarray(got).reshape(1, 2, 1, 2)
  with pytest.raises(ValueError, match=r"counts must be >= 0.*2 negative"):
    support.support_summary(counts, np.ones((2, 2), bool))
  with pytest.raises(ValueError, match=r"counts must be >= 0"):
    support.support_histogram(counts, np.ones((2, 2), bool))
  assert (
    support.support_summary(counts, np.array([[True, False], [True, False]]))[
      "median"
    ]
    == 8
  )


def test_nonfinite_probs_in_head_consensus():
  probs = np.zeros((1, 1, 2, 3, 4), np.float32)
  probs[..., 0] = 1.0
  probs[0, 0, 1, 2, 1] = np.nan  # query 2 of head 1
  with pytest.raises(
    ValueError,
    match=r"probs holds NaN or inf in 1 of 3 "
    r"\(layer, row, query\) triples \(first at index "
    r"\(0, 0, 2\) of the \[L, B, T\] dims\)",
  ):
    support.head_consensus(probs)
  got = np.asarray(jax.jit(support.head_consensus)(probs))
  assert np.isnan(got[0, 0, 2]) and np.all(got[0, 0, :2] == 0.5)
  mask = np.array([[True, True, False]])
  np.testing.assert_allclose(
    support.head_consensus(probs, query_mask=mask), [[[0.5, 0.5, 0.0]]]
  )


# ----------------------------------------------------------------------------
# Eviction of listed tokens (GER).


def test_global_eviction_ratio_counts_only_tokens_gone_everywhere():
  L, B, K, S = 2, 3, 2, 4
  pos = np.tile(np.arange(S, dtype=np.int32), (L, B, K, 1))
  valid = np.ones((L, B, K, S), bool)
  # Row 0: position 7 (an answer token) held nowhere -> evicted everywhere.
  # Row 1: position 7 held by one kv head of layer 1 only -> not evicted;
  #   position 6 sits in a slot marked invalid -> evicted.
  pos[1, 1, 1, 2] = 7
  pos[0, 1, 0, 3] = 6
  valid[0, 1, 0, 3] = False
  positions = np.array([[7, 1, -1], [7, 6, 2], [-1, -1, -1]], np.int32)
  np.testing.assert_array_equal(
    graph.evicted_everywhere(pos, valid, positions),
    [[True, False, False], [False, True, False], [False, False, False]],
  )
  np.testing.assert_array_equal(
    graph.evicted_per_layer(pos, valid, positions)[:, 1],
    [[True, True, False], [False, True, False]],
  )
  ger = np.asarray(graph.global_eviction_ratio(pos, valid, positions))
  np.testing.assert_allclose(ger, [0.5, 1 / 3, 0.0])
  per_layer = np.asarray(
    graph.global_eviction_ratio(pos, valid, positions, per_layer=True)
  )
  np.testing.assert_allclose(per_layer, [[0.5, 2 / 3, 0], [0.5, 1 / 3, 0]])
  mean, n = graph.mean_over_rows(ger, positions)
  assert int(n) == 2 and np.isclose(float(mean), (0.5 + 1 / 3) / 2)
  mean, n = graph.mean_over_rows(per_layer, positions)
  np.testing.assert_allclose(mean, [(0.5 + 2 / 3) / 2, (0.5 + 1 / 3) / 2])
  mean, n = graph.mean_over_rows(ger[2:], positions[2:])
  assert int(n) == 0 and float(mean) == 0.0
  assert not np.isnan(ger).any()


def test_eviction_after_compaction_and_shuffling():
  rng = np.random.default_rng(0)
  L, B, K, S = 2, 2, 2, 12
  config = kvjax.get_config("tiny", num_layers=L, num_kv_heads=K)
  cache = kvjax.init_cache(config, B, S)
  cache = cache._replace(
    pos=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (L, B, K, S)),
    valid=jnp.ones((L, B, K, S), bool),
  )
  keep = rng.random((L, B, K, S)) < 0.4
  keep[:, :, :, 5] = False  # row 0: position 5 gone everywhere
  keep[1, 1, 1, 5] = True  # row 1: kept by one head of one layer
  capacity = int(keep.sum(-1).max())
  compacted, _ = compress_base.compact(cache, jnp.asarray(keep), capacity)
  assert compacted.capacity < S
  positions = np.array([[5, 0, 3, 11], [5, 2, -1, -1]], np.int32)
  held = np.zeros((B, positions.shape[1]), bool)
  for b in range(B):
    for c, p in enumerate(positions[b]):
      held[b, c] = p >= 0 and keep[:, b, :, p].any()
  want = (positions >= 0) & ~held
  assert want[0, 0] and not want[1, 0]
  got = graph.evicted_everywhere(compacted.pos, compacted.valid, positions)
  np.testing.assert_array_equal(got, want)
  kp, kv = _permute_slots(
    rng, np.asarray(compacted.pos), np.asarray(compacted.valid)
  )
  np.testing.assert_array_equal(
    graph.evicted_everywhere(kp, kv, positions), want
  )
  np.testing.assert_allclose(
    graph.global_eviction_ratio(kp, kv, positions),
    want.sum(-1) / (positions >= 0).sum(-1),
  )


# ----------------------------------------------------------------------------
# Token graphs and reachability.


def test_token_graph_from_known_pattern_any_slot_order():
  L, B, N, K, P = 2, 1, 2, 1, 6
  T = 2  # queries at positions 4 and 5
  query_pos = np.array([[4, 5]], np.int32)
  probs_pos = np.zeros((L, B, N, T, P), np.float32)
  probs_pos[0, 0, 0, 0, [1, 4]] = [0.995, 0.005]  # 4 -> 1 (4 -> 4 below eps)
  probs_pos[0, 0, 1, 0, [2, 3]] = [0.5, 0.5]  # 4 -> 2, 4 -> 3
  probs_pos[0, 0, :, 1, 5] = 1.0  # 5 -> 5
  probs_pos[1, 0, 0, 1, 0] = 1.0  # 5 -> 0 at layer 1
  probs_pos[1, 0, 1, 1, 3] = 1.0  # 5 -> 3 at layer 1
  probs_pos[1, 0, :, 0, 4] = 1.0  # 4 -> 4
  key_pos = np.tile(np.arange(P, dtype=np.int32), (L, B, K, 1))
  key_valid = np.ones_like(key_pos, bool)
  probs = _scatter_to_slots(probs_pos, key_pos)
  want = np.zeros((L, B, P, P), bool)
  for l, i, j in [
    (0, 4, 1),
    (0, 4, 2),
    (0, 4, 3),
    (0, 5, 5),
    (1, 5, 0),
    (1, 5, 3),
    (1, 4, 4),
  ]:
    want[l, 0, i, j] = True
  adj = graph.token_graph(probs, query_pos, key_pos, key_valid, P, eps=0.01)
  np.testing.assert_array_equal(adj, want)
  kp, kv, pp = _permute_slots(
    np.random.default_rng(2), key_pos, key_valid, probs
  )
  np.testing.assert_array_equal(
    graph.token_graph(pp, query_pos, kp, kv, P, eps=0.01), want
  )
  # An invalid slot carries no edge, a padding query row neither.
  kv2 = key_valid.copy()
  kv2[1, 0, 0, 3] = False
  adj2 = graph.token_graph(
    probs, np.array([[-1, 5]], np.int32), key_pos, kv2, P, eps=0.01
  )
  want2 = want.copy()
  want2[:, 0, 4] = False
  want2[1, 0, 5, 3] = False
  np.testing.assert_array_equal(adj2, want2)
  # eps=0: any positive weight is an edge.
  adj0 = graph.token_graph(probs, query_pos, key_pos, key_valid, P, eps=0.0)
  assert bool(adj0[0, 0, 4, 4]) and not bool(adj[0, 0, 4, 4])
  merged = graph.merge_graphs(adj, jnp.asarray(want2).at[0, 0, 0, 0].set(True))
  assert bool(merged[0, 0, 0, 0]) and np.sum(merged) == np.sum(want) + 1


def _chain_graph(edges, L=2, P=6):
  adj = np.zeros((L, 1, P, P), bool)
  for l, i, j in edges:
    adj[l, 0, i, j] = True
  return adj


def test_reachable_chain_direction_and_residual():
  src, tgt = np.array([[5]], np.int32), np.array([[1, 3, 5, 0, -1]], np.int32)
  # 5 reads 3 at layer 1; 3 read 1 at layer 0: 1 reaches 5's top residual.
  got = graph.reachable(_chain_graph([(1, 5, 3), (0, 3, 1)]), src, tgt)
  np.testing.assert_array_equal(got, [[True, True, True, False, False]])
  # Without the layer-0 edge, 1 is cut off (3 still reaches via residual).
  got = graph.reachable(_chain_graph([(1, 5, 3)]), src, tgt)
  np.testing.assert_array_equal(got, [[False, True, True, False, False]])
  # Same edges in the wrong layer order: 3 reads 1 only after 5 read 3.
  got = graph.reachable(_chain_graph([(0, 5, 3), (1, 3, 1)]), src, tgt)
  np.testing.assert_array_equal(got, [[False, True, True, False, False]])
  # Residual self-edges carry a path across layers with no edge: 5 reads 3
  # at layer 0 of a 4-layer model, then nothing.
  got = graph.reachable(_chain_graph([(0, 5, 3)], L=4), src, tgt)
  np.testing.assert_array_equal(got, [[False, True, True, False, False]])
  # A path may stay on a position for layers before hopping: 5 -> 3 at
  # layer 3, 3 -> 1 at layer 0.
  got = graph.reachable(_chain_graph([(3, 5, 3), (0, 3, 1)], L=4), src, tgt)
  np.testing.assert_array_equal(got, [[True, True, True, False, False]])
  # No source: nothing is reachable.
  got = graph.reachable(_chain_graph([(1, 5, 3)]), np.array([[-1]]), tgt)
  assert not np.asarray(got).any()


def _brute_reachable(adj, sources, targets):
  L, B, P, _ = adj.shape
  out = np.zeros(targets.shape, bool)
  for b in range(B):
    ends = set()
    for s in sources[b]:
      if s < 0:
        continue
      for path in itertools.product(range(P), repeat=L):
        # path[l] is the position read at layer l (top layer first below).
        cur, ok = s, True
        for l in reversed(range(L)):
          nxt = path[l]
          if nxt != cur and not adj[l, b, cur, nxt]:
            ok = False
            break
          cur = nxt
        if ok:
          ends.add(cur)
    out[b] = [t >= 0 and t in ends for t in targets[b]]
  return out


def test_reachable_matches_path_enumeration():
  rng = np.random.default_rng(3)
  L, B, P = 3, 3, 6
  adj = rng.random((L, B, P, P)) < 0.15
  sources = np.array([[5, -1], [4, 2], [-1, -1]], np.int32)
  targets = np.tile(np.arange(-1, P, dtype=np.int32), (B, 1))
  got = np.asarray(graph.reachable(adj, sources, targets))
  np.testing.assert_array_equal(got, _brute_reachable(adj, sources, targets))
  assert got.any() and not got.all()


def test_graph_bad_arguments():
  pos = np.zeros((2, 1, 2, 4), np.int32)
  valid = np.ones((2, 1, 2, 4), bool)
  with pytest.raises(ValueError, match="cache_valid"):
    graph.evicted_everywhere(pos, valid[:1], np.zeros((1, 2), np.int32))
  with pytest.raises(TypeError, match="positions"):
    graph.evicted_everywhere(pos, valid, np.zeros((1, 2), np.float32))
  with pytest.raises(ValueError, match="positions"):
    graph.global_eviction_ratio(pos, valid, np.zeros((3, 2), np.int32))
  with pytest.raises(TypeError, match="per_layer"):
    graph.global_eviction_ratio(
      pos, valid, np.zeros((1, 2), np.int32), per_layer=1
    )
  adj = np.zeros((2, 1, 4, 4), bool)
  with pytest.raises(ValueError, match="targets"):
    graph.reachable(adj, np.array([[1]]), np.array([[4]]))
  with pytest.raises(TypeError, match="adj"):
    graph.reachable(adj.astype(np.int32), np.array([[1]]), np.array([[2]]))
  with pytest.raises(ValueError, match="adj"):
    graph.reachable(
      np.zeros((2, 1, 4, 3), bool), np.array([[1]]), np.array([[2]])
    )
  probs = np.zeros((2, 1, 4, 3, 4), np.float32)
  qpos = np.array([[0, 1, 2]], np.int32)
  with pytest.raises(ValueError, match="num_positions"):
    graph.token_graph(probs, qpos, pos, valid, 0)
  with pytest.raises(ValueError, match="eps"):
    graph.token_graph(probs, qpos, pos, valid, 4, eps=1.0)
  with pytest.raises(ValueError, match="query_pos"):
    graph.token_graph(probs, qpos[:, :2], pos, valid, 4)
  with pytest.raises(ValueError, match="key_pos"):
    graph.token_graph(probs, qpos, pos[:, :, :, :3], valid[:, :, :, :3], 4)
  with pytest.raises(ValueError, match="key_pos"):
    graph.token_graph(probs, qpos, pos + 9, valid, 4)
  with pytest.raises(ValueError, match="graphs"):
    graph.merge_graphs(adj, adj[:1])
  with pytest.raises(ValueError, match="answer_query"):
    graph.token_route(probs, qpos, pos, valid, np.array([3]))
  with pytest.raises(ValueError, match="follow"):
    graph.token_route(probs, qpos, pos, valid, np.array([2]), follow="all")
  with pytest.raises(ValueError, match="share"):
    graph.token_route(probs, qpos, pos, valid, np.array([2]), share=0.0)
  with pytest.raises(TypeError, match="cache"):
    graph.keep_only_route(pos, np.zeros((2, 1, 4), bool))


# ----------------------------------------------------------------------------
# Token routes.


def _hand_route_case():
  """Two layers, one kv head, two query heads; queries at positions 5, 6
  (rows 0, 1; row 1 predicts the answer); context positions 0..4."""
  L, B, N, K, T, P = 2, 1, 2, 1, 2, 7
  probs_pos = np.zeros((L, B, N, T, P), np.float32)
  # Top layer, answer row (position 6): head 0 reads 2; head 1 reads
  # question position 5 (0.6) and context 3 (0.4).
  probs_pos[1, 0, 0, 1, 2] = 1.0
  probs_pos[1, 0, 1, 1, [5, 3]] = [0.6, 0.4]
  # Top layer, row 0 (position 5): not needed, must not matter.
  probs_pos[1, 0, :, 0, 0] = 1.0
  # Layer 0, answer row: head 0 reads 1; head 1 reads itself (6).
  probs_pos[0, 0, 0, 1, 1] = 1.0
  probs_pos[0, 0, 1, 1, 6] = 1.0
  # Layer 0, row 0: head 0 reads 4; head 1 reads 0 (0.7) and itself (0.3).
  probs_pos[0, 0, 0, 0, 4] = 1.0
  probs_pos[0, 0, 1, 0, [0, 5]] = [0.7, 0.3]
  key_pos = np.tile(np.array([3, 6, 0, 5, 1, 4, 2], np.int32), (L, B, K, 1))
  key_valid = np.ones_like(key_pos, bool)
  probs = _scatter_to_slots(probs_pos, key_pos)
  return probs, np.array([[5, 6]], np.int32), key_pos, key_valid


def _route_sets(route):
  route = np.asarray(route)
  return [
    set(np.flatnonzero(route[l, 0]).tolist()) for l in range(route.shape[0])
  ]


def test_route_of_known_pattern():
  probs, qpos, key_pos, key_valid = _hand_route_case()
  answer = np.array([1], np.int32)
  cases = {
    # share 0.6: top head 1 follows only question position 5 -> row 0 is
    # needed at layer 0 and brings in 4 and 0 (0.7 >= 0.6).
    (0.6, "share"): [{0, 1, 4}, {2}],
    (0.5, "share"): [{0, 1, 4}, {2}],
    (1.0, "share"): [{0, 1, 4}, {2, 3}],
    (1.0, "visible"): [{0, 1, 4}, {2, 3}],
    # share 0.4: row 0's head 1 keeps only position 0 (0.7).
    (0.4, "visible"): [{0, 1, 4}, {2}],
  }
  for (share, follow), want in cases.items():
    route = graph.token_route(
      probs, qpos, key_pos, key_valid, answer, share=share, follow=follow
    )
    assert route.shape == (2, 1, 7)
    assert _route_sets(route) == want, (share, follow)
  # Following only the top 0.6 of a head that puts 0.6 on context 3 instead:
  # row 0 is then not read, and "share" drops its entries, "visible" keeps
  # them (row 0 is visible to the answer row whatever its weight).
  probs2 = probs.copy()
  slot = {int(p): s for s, p in enumerate(key_pos[0, 0, 0])}
  probs2[1, 0, 1, 1, slot[5]], probs2[1, 0, 1, 1, slot[3]] = 0.4, 0.6
  r_share = graph.token_route(
    probs2, qpos, key_pos, key_valid, answer, share=0.6, follow="share"
  )
  r_vis = graph.token_route(
    probs2, qpos, key_pos, key_valid, answer, share=0.6, follow="visible"
  )
  assert _route_sets(r_share) == [{1}, {2, 3}]
  assert _route_sets(r_vis) == [{0, 1, 4}, {2, 3}]
  # Slot order does not matter; several answer rows take the union.
  kp, kv, pp = _permute_slots(
    np.random.default_rng(4), key_pos, key_valid, probs
  )
  np.testing.assert_array_equal(
    graph.token_route(pp, qpos, kp, kv, answer, share=0.6, follow="share"),
    graph.token_route(
      probs, qpos, key_pos, key_valid, answer, share=0.6, follow="share"
    ),
  )
  both = graph.token_route(
    probs,
    qpos,
    key_pos,
    key_valid,
    np.array([[1, 0]], np.int32),
    share=1.0,
    num_positions=9,
  )
  assert both.shape == (2, 1, 9)
  assert _route_sets(both) == [{0, 1, 4}, {0, 2, 3}]


def test_keep_only_route_invalidates_off_route_entries():
  config = kvjax.get_config("tiny")
  cache = kvjax.init_cache(config, 1, 5)
  L, K = config.num_layers, config.num_kv_heads
  pos = np.array([[3, 0, 1, 2, -1], [4, 1, 0, 9, 2]], np.int32)  # 2 kv heads
  cache = cache._replace(
    pos=jnp.broadcast_to(jnp.asarray(pos), (L, 1, K, 5)),
    valid=jnp.asarray(np.broadcast_to(pos >= 0, (L, 1, K, 5))),
  )
  route = np.zeros((L, 1, 5), bool)
  route[0, 0, [0, 2, 4]] = True
  route[1, 0, [1]] = True
  kept = graph.keep_only_route(cache, jnp.asarray(route))
  np.testing.assert_array_equal(
    kept.valid[0, 0],
    [[False, True, False, True, False], [True, False, True, False, True]],
  )
  np.testing.assert_array_equal(
    kept.valid[1, 0],
    [[False, False, True, False, False], [False, True, False, False, False]],
  )
  np.testing.assert_array_equal(kept.pos, cache.pos)


def _question_run(config, std, B=2, C=16, Q=4):
  """Prefills C context tokens in chunks of Q, then runs a Q-token question.

  Every forward has the same shapes and capture, so one compilation serves
  the whole run (and the reruns)."""
  params = kvjax.init_params(config, jax.random.key(0), std=std)
  tokens = jax.random.randint(
    jax.random.key(1), (B, C + Q), 0, config.vocab_size
  )
  run = lambda toks, cache: _forward(
    params, toks, cache, config=config, capture=("attn_probs",)
  )
  cache0 = kvjax.init_cache(config, B, C + Q)
  chunks = []  # (probs, query positions, cache after the chunk)
  for start in range(0, C, Q):
    _, cache0, aux = run(tokens[:, start : start + Q], cache0)
    qpos = jnp.broadcast_to(
      jnp.arange(start, start + Q, dtype=jnp.int32), (B, Q)
    )
    chunks.append((aux["attn_probs"], qpos, cache0))
  logits, cache1, aux = run(tokens[:, C:], cache0)
  qpos = jnp.broadcast_to(jnp.arange(C, C + Q, dtype=jnp.int32), (B, Q))
  return dict(
    cache0=cache0,
    chunks=chunks,
    logits=logits,
    cache1=cache1,
    probs=aux["attn_probs"],
    qpos=qpos,
    rerun=lambda cache: run(tokens[:, C:], cache)[0],
  )


def test_route_with_sliding_window_is_exact_and_reachability_agrees():
  # Window 6, two layers: the answer row (position 19) reads 14..19 at
  # layer 1; question rows 16..19 read 11..19 at layer 0. At share 1.0 the
  # route is exactly that, a strict subset of the 16 cached positions, and
  # keeping only it reproduces the answer logits.
  config = kvjax.get_config("tiny", sliding_window=6)
  run = _question_run(config, std=0.1)
  B, Q = run["qpos"].shape
  answer = jnp.full((B,), Q - 1, jnp.int32)
  route = graph.token_route(
    run["probs"],
    run["qpos"],
    run["cache1"].pos,
    run["cache1"].valid,
    answer,
    share=1.0,
    num_positions=20,
  )
  want = np.zeros((2, B, 20), bool)
  want[0, :, 11:16] = True
  want[1, :, 14:16] = True
  np.testing.assert_array_equal(route, want)
  kept = graph.keep_only_route(run["cache0"], route)
  assert int(kept.valid.sum()) < int(run["cache0"].valid.sum())
  logits = run["rerun"](kept)
  np.testing.assert_allclose(logits[:, -1], run["logits"][:, -1], atol=1e-5)
  # Reachability on the merged prefill + question graph (eps=0: any weight)
  # reaches exactly positions >= 19 - 2 * 5 from the answer row.
  question_adj = graph.token_graph(
    run["probs"],
    run["qpos"],
    run["cache1"].pos,
    run["cache1"].valid,
    20,
    eps=0.0,
  )
  adj = question_adj
  for probs, qpos, cache in run["chunks"]:
    adj = graph.merge_graphs(
      adj, graph.token_graph(probs, qpos, cache.pos, cache.valid, 20, eps=0.0)
    )
  targets = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (B, 20))
  reach = graph.reachable(adj, jnp.full((B, 1), 19, jnp.int32), targets)
  np.testing.assert_array_equal(
    reach, np.broadcast_to(np.arange(20) >= 9, (B, 20))
  )
  # The question graph alone cannot see past the cache: its edges point into
  # the context, but context-to-context edges come from the prefill only.
  reach_q = graph.reachable(
    question_adj, jnp.full((B, 1), 19, jnp.int32), targets
  )
  np.testing.assert_array_equal(
    reach_q, np.broadcast_to(np.arange(20) >= 11, (B, 20))
  )


def test_route_on_peaked_model_is_sparse_and_keeps_the_answer():
  # Large weights make attention nearly one-hot, so the route at share 1.0
  # (every key of positive float32 probability) is a strict subset of the
  # cache, and at share 0.9 smaller still while the answer survives.
  config = kvjax.get_config("tiny")
  run = _question_run(config, std=1.0)
  B, Q = run["qpos"].shape
  answer = jnp.full((B,), Q - 1, jnp.int32)
  ref = np.asarray(run["logits"][:, -1])
  sizes = []
  for share, rtol in ((1.0, 1e-5), (0.9, 1e-3)):
    route = graph.token_route(
      run["probs"],
      run["qpos"],
      run["cache1"].pos,
      run["cache1"].valid,
      answer,
      share=share,
    )
    kept = graph.keep_only_route(run["cache0"], route)
    sizes.append(int(kept.valid.sum()))
    logits = np.asarray(run["rerun"](kept)[:, -1])
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))
    assert np.abs(logits - ref).max() <= rtol * np.abs(ref).max(), share
  full = int(run["cache0"].valid.sum())
  assert sizes[1] <= sizes[0] < full
  assert sizes[1] < full // 2
