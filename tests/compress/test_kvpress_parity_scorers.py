"""The scorers of `kvjax.compress.scorers` vs NVIDIA kvpress 0.5.5 on the
shared tiny HF Llama (`peer` fixture, `tests/compress/conftest.py`).

For each method and ratio the kept (layer, kv head, position) sets must
match kvpress' (Jaccard >= 0.99; here they are equal). kvpress gathers the
kept entries of one row; kvjax compacts them into a smaller batched cache:
both keep the same entries.

Where kvjax differs by design the test says so:
- NonCausalAttn / Compactor: kvpress pads a short last chunk with zero
  tokens that take part in its softmax; kvjax's default last chunk is just
  shorter. Compared at lengths that are multiples of the chunk (the two
  definitions agree) and with `kvpress_padding=True` elsewhere.
- LagKV: ranks tie across partitions; kvpress leaves ties to `torch.topk`,
  kvjax keeps the earlier entry. Compared exactly away from ties, and
  tie-aware (same entries above the tied score, same count at it) where the
  budget cuts through a tie.
- QFilter: kvpress downloads filters trained offline; kvjax computes them
  from the prompt's queries. kvjax's filters are injected into kvpress'
  press, so the scoring and selection are compared on the same filters.
- LeverageScore / Compactor: kvpress sketches with torch's RNG; with the
  default sketch_dimension (48) >= head_dim (16) the sketch spans the keys'
  column space and kvjax's exact (unsketched) leverage gives the same set.

To stay fast, kvjax's side applies each transform (its prefill phase,
selection and compaction) eagerly to the peer's uncompressed cache and
captures, as `prefill` does after its forward pass, instead of compiling a
prefill per method and ratio; `test_eager_apply_is_what_prefill_keeps`
checks that the two give the same set.
"""

import numpy as np
import pytest

kvpress = pytest.importorskip("kvpress", reason="needs the `peers` extra")
torch = pytest.importorskip("torch", reason="needs the `hf` extra")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

import kvjax  # pylint: disable=g-import-not-at-top
from kvjax.compress import base  # pylint: disable=g-import-not-at-top
from kvjax.compress import scorers  # pylint: disable=g-import-not-at-top

RATIOS = (0.5,)  # one ratio here; the core policies run 0.25 and 0.75

_OBSERVED = {}


def _observed(peer):
  """The peer's uncompressed kvjax cache and prefill context (cached)."""
  if not _OBSERVED:
    T = peer.T
    forward = jax.jit(
      lambda params, tokens, cache: kvjax.forward(
        params,
        tokens,
        cache,
        config=peer.config,
        capture=("q", "attn_mass"),
      )
    )
    _, cache, aux = forward(
      peer.params,
      jnp.asarray(peer.tokens, jnp.int32),
      kvjax.init_cache(peer.config, 1, T),
    )
    ctx = base.CompressContext(
      phase="prefill",
      step=jnp.int32(0),
      q_pos=jnp.arange(T)[None],
      q_mask=jnp.ones((1, T), bool),
      q=aux["q"],
      attn_mass=aux["attn_mass"],
      geometry=peer.config.geometry,
      live_bound=T,
    )
    _OBSERVED.update(cache=cache, ctx=ctx)
  return _OBSERVED["cache"], _OBSERVED["ctx"]


def _kvjax_kept(peer, transform) -> set:
  """(layer, kv head, position) entries kvjax's prefill-phase `apply` keeps
  of the peer's cache (row 0)."""
  cache, ctx = _observed(peer)
  out, _ = transform.apply(cache, transform.init(cache), ctx)
  pos, valid = np.asarray(out.pos[:, 0]), np.asarray(out.valid[:, 0])
  return {(l, h, int(pos[l, h, s])) for l, h, s in zip(*np.nonzero(valid))}


METHODS = {
  "keydiff": (
    lambda r: kvpress.KeyDiffPress(compression_ratio=r),
    lambda r: scorers.keydiff(r),
  ),
  "cur": (
    lambda r: kvpress.CURPress(compression_ratio=r),
    lambda r: scorers.cur(r),
  ),
  "cur_kv_avg_w8": (
    lambda r: kvpress.CURPress(
      compression_ratio=r, leverage_type="kv_avg", local_window_size=8
    ),
    lambda r: scorers.cur(r, leverage_type="kv_avg", local_window_size=8),
  ),
  "lagkv_cross": (
    lambda r: kvpress.LagKVPress(
      compression_ratio=r, lag_size=32, cross_scoring=True
    ),
    lambda r: scorers.lagkv(r, lag_size=32, cross_scoring=True),
  ),
  # T = 256 is a multiple of the default chunk: no padding on either side.
  "non_causal_attn": (
    lambda r: kvpress.NonCausalAttnPress(compression_ratio=r),
    lambda r: scorers.non_causal_attn(r),
  ),
  # 256 = 2.56 chunks: kvpress pads; kvjax reproduces it on request.
  "non_causal_attn_c100_padded": (
    lambda r: kvpress.NonCausalAttnPress(compression_ratio=r, chunk_size=100),
    lambda r: scorers.non_causal_attn(r, chunk_size=100, kvpress_padding=True),
  ),
  "leverage_score": (
    lambda r: kvpress.LeverageScorePress(compression_ratio=r),
    lambda r: scorers.leverage_score(r),
  ),
  # The middle (256 - 8 - 4 = 244 entries) is 4 chunks of 61: no padding.
  "compactor_c61": (
    lambda r: kvpress.CompactorPress(compression_ratio=r, chunk_size=61),
    lambda r: scorers.compactor(r, chunk_size=61),
  ),
  # kvpress' defaults pad the 244-entry middle to 256.
  "compactor_padded": (
    lambda r: kvpress.CompactorPress(compression_ratio=r),
    lambda r: scorers.compactor(r, kvpress_padding=True),
  ),
}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_kept_entries_match_kvpress(peer, method, ratio):
  make_press, make_transform = METHODS[method]
  theirs = peer.kvpress_kept(make_press(ratio))
  ours = _kvjax_kept(peer, make_transform(ratio))
  assert len(ours) == len(theirs), (len(ours), len(theirs))
  assert peer.jaccard(ours, theirs) >= 0.99, peer.jaccard(ours, theirs)


def test_non_causal_padding_is_a_real_difference(peer):
  """kvjax's default (no padded tokens in the last chunk) keeps another set
  than kvpress when the length is not a multiple of the chunk: the option
  is needed for parity, and the test would notice if it stopped mattering."""
  theirs = peer.kvpress_kept(
    kvpress.NonCausalAttnPress(compression_ratio=0.5, chunk_size=100)
  )
  ours = _kvjax_kept(peer, scorers.non_causal_attn(0.5, chunk_size=100))
  assert peer.jaccard(ours, theirs) < 0.95


def _scores(peer, scorer):
  """kvjax's scores [L, K, T] of the uncompressed peer cache (row 0)."""
  cache, ctx = _observed(peer)
  return np.asarray(scorer.score(cache, ctx))[:, 0]


def test_eager_apply_is_what_prefill_keeps(peer):
  transform = scorers.compactor(0.5, kvpress_padding=True)
  assert peer.kvjax_kept(transform) == _kvjax_kept(peer, transform)


@pytest.mark.parametrize("lag_size", [32, 64])
@pytest.mark.parametrize("ratio", RATIOS)
def test_lagkv_matches_kvpress_up_to_ties(peer, lag_size, ratio):
  """LagKV's non-cross scores are ranks / lag_size, equal in every
  partition, and the sinks and tail all score 1: where the budget cuts
  through a tied score, kvpress' pick is torch.topk's. Above the cut both
  keep the same entries; at it, the same number."""
  theirs = peer.kvpress_kept(
    kvpress.LagKVPress(compression_ratio=ratio, lag_size=lag_size)
  )
  ours = _kvjax_kept(peer, scorers.lagkv(ratio, lag_size=lag_size))
  assert len(ours) == len(theirs)
  s = _scores(peer, scorers.lagkv_scorer(lag_size=lag_size))
  L, K, _ = s.shape
  for l in range(L):
    for h in range(K):
      a = {p for ll, hh, p in ours if (ll, hh) == (l, h)}
      b = {p for ll, hh, p in theirs if (ll, hh) == (l, h)}
      cut = min(s[l, h, p] for p in a)
      above = {p for p in range(s.shape[-1]) if s[l, h, p] > cut}
      assert above <= a and above <= b, (l, h)
      assert {p for p in b if s[l, h, p] < cut} == set(), (l, h)
  if (lag_size, ratio) in ((64, 0.25), (64, 0.5), (32, 0.75)):
    assert ours == theirs  # no tie at the cut


def test_lagkv_short_prompt_is_refused_where_kvpress_falls_back(peer):
  """At T = 256 < n_sink + 2 * 128 kvpress' LagKV keeps sinks + the newest
  entries (StreamingLLM); kvjax refuses instead of silently doing that."""
  theirs = peer.kvpress_kept(kvpress.LagKVPress(compression_ratio=0.5))
  width = peer.T
  assert theirs == {
    (l, h, p)
    for l in range(3)
    for h in range(2)
    for p in list(range(4)) + list(range(width - 124, width))
  }
  with pytest.raises(base.Degenerate, match="fewer than n_sink"):
    _kvjax_kept(peer, scorers.lagkv(0.5))


@pytest.mark.parametrize("ratio", RATIOS)
def test_observed_attention_matches_kvpress_eager(peer, ratio):
  """kvpress needs the eager attention matrix; kvjax reads attn_mass."""
  before = peer.model.config._attn_implementation  # pylint: disable=protected-access
  peer.model.set_attn_implementation("eager")
  try:
    theirs = peer.kvpress_kept(
      kvpress.ObservedAttentionPress(compression_ratio=ratio)
    )
  finally:
    peer.model.set_attn_implementation(before)
  ours = _kvjax_kept(peer, scorers.observed_attention(ratio))
  assert peer.jaccard(ours, theirs) >= 0.99, peer.jaccard(ours, theirs)


class _InjectedQFilterPress(kvpress.QFilterPress):
  """QFilterPress with given filters (no download)."""

  def post_init_from_model(self, model):
    del model


@pytest.mark.parametrize("ratio", RATIOS)
def test_qfilter_matches_kvpress_with_kvjax_filters(peer, ratio):
  _, ctx = _observed(peer)
  filters = scorers.qfilter_filters(ctx.q, ctx.q_mask, peer.config.num_kv_heads)
  press = _InjectedQFilterPress(compression_ratio=ratio)
  press.q_filters = torch.from_numpy(np.array(filters[:, 0]))
  theirs = peer.kvpress_kept(press)
  ours = _kvjax_kept(peer, scorers.qfilter(ratio))
  assert peer.jaccard(ours, theirs) >= 0.99, peer.jaccard(ours, theirs)
  # The same filters passed as fixed filters keep the same set.
  fixed = scorers.qfilter(ratio, filters=np.array(filters[:, 0]))
  assert _kvjax_kept(peer, fixed) == ours
