"""Eviction policies vs NVIDIA kvpress on the same tiny HF model and input.

For each method and ratio, the set of kept (layer, kv head, position)
entries of kvjax must match kvpress' (Jaccard >= 0.99). The shared model,
input and kept-set extraction are the `peer` fixture
(`tests/compress/conftest.py`).
"""

import pytest

kvpress = pytest.importorskip("kvpress", reason="needs the `peers` extra")

import kvjax  # pylint: disable=g-import-not-at-top
from kvjax import compress

RATIOS = (0.25, 0.75)  # as every parity test (`Peer.RATIOS`)

METHODS = {
  "snapkv": (
    lambda r: kvpress.SnapKVPress(compression_ratio=r),
    lambda r: compress.snapkv(r),
  ),
  "streaming_llm": (
    lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
    lambda r: compress.streaming_llm(r),
  ),
  "knorm": (
    lambda r: kvpress.KnormPress(compression_ratio=r),
    lambda r: compress.knorm(r),
  ),
  "tova": (
    lambda r: kvpress.TOVAPress(compression_ratio=r),
    lambda r: compress.tova(r),
  ),
  "pyramidkv": (
    lambda r: kvpress.PyramidKVPress(compression_ratio=r),
    lambda r: compress.pyramidkv(r),
  ),
  # Small window and beta so that budgets really fall with depth at T=256
  # (with the defaults PyramidKV is uniform below ~2.5k tokens).
  "pyramidkv_w8_beta2": (
    lambda r: kvpress.PyramidKVPress(
      compression_ratio=r, window_size=8, beta=2
    ),
    lambda r: compress.pyramidkv(r, window_size=8, beta=2),
  ),
  "snapkv_w16_k3": (
    lambda r: kvpress.SnapKVPress(
      compression_ratio=r, window_size=16, kernel_size=3
    ),
    lambda r: compress.snapkv(r, window_size=16, kernel_size=3),
  ),
  "expected_attention": (
    lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
    lambda r: compress.expected_attention(r),
  ),
}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_kept_entries_match_kvpress(peer, method, ratio):
  make_press, make_transform = METHODS[method]
  theirs = peer.kvpress_kept(make_press(ratio))
  ours = peer.kvjax_kept(make_transform(ratio))
  assert len(ours) == len(theirs), (len(ours), len(theirs))
  assert peer.jaccard(ours, theirs) >= 0.99, peer.jaccard(ours, theirs)


def test_pyramid_budgets_fall_with_depth(peer):
  kept = peer.kvjax_kept(compress.pyramidkv(0.5, window_size=8, beta=2))
  per_layer = [sum(1 for l, _, _ in kept if l == i) for i in range(3)]
  assert per_layer[0] > per_layer[1] > per_layer[2], per_layer


@pytest.mark.parametrize("ratio", RATIOS)
def test_adakv_matches_kvpress_and_saves_memory(peer, ratio):
  theirs = peer.kvpress_masked_kept(
    kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
  )
  transform = compress.adakv("snapkv", ratio)
  ours = peer.kvjax_kept(transform)
  assert peer.jaccard(ours, theirs) >= 0.99, peer.jaccard(ours, theirs)
  # kvpress keeps every entry in memory; kvjax's cache is physically
  # smaller, with the head-budget padding visible in the logical figure.
  config = peer.config
  cache = peer.kvjax_cache(transform)
  T = peer.T
  full = kvjax.init_cache(config, 1, T)
  # The static capacity is the largest head budget any head could reach:
  # min(T, K * n - (K - 1) * n_safe). With K = 2 at ratio 0.25 that is T
  # (no physical saving); from ratio 0.5 on the cache is smaller.
  K, n = config.num_kv_heads, int(T * (1 - ratio))
  assert cache.capacity == min(T, K * n - (K - 1) * max(1, int(0.2 * n)))
  if ratio >= 0.5:
    assert kvjax.kv_bytes(cache) < kvjax.kv_bytes(full)
  assert kvjax.logical_bytes(cache) < kvjax.kv_bytes(cache)
