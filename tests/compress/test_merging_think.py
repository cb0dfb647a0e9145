"""merging, cam, key_rerotation and think (`kvjax.compress.rewrite`):
definitions against small numpy hand computations, argument errors and
each method's own contract (kvpress parity:
`test_kvpress_parity_merging.py`)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import attention as attn_lib
from kvjax import config as config_lib
from kvjax import model as model_lib
from kvjax.compress import base
from kvjax.compress import codecs
from kvjax.compress import policies
from kvjax.compress import rewrite

CONFIG = config_lib.get_config(
  "tiny", num_layers=2, vocab_size=64, dtype="float32"
)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CONFIG, jax.random.key(0), std=0.2)


def _tokens(B=2, T=48, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, 64)


# ----------------------------------------------------------------------------
# merging


def _np_merge(k, v, kept, evicted, thr, frac):
  """kvpress MergingPress.merge on one head, in numpy."""
  ki, ei = np.nonzero(kept)[0], np.nonzero(evicted)[0]
  unit = lambda x: (
    x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  )
  sim = unit(k[ei]) @ unit(k[ki]).T
  best, target = sim.max(-1), sim.argmax(-1)
  ok = best >= thr
  if frac < 1.0:
    t = np.quantile(np.where(ok, best, -np.inf), 1 - frac)
    ok &= best >= t
  vk, ve = v[ki], v[ei]
  w = np.maximum(best, 0) * ok
  en, tn = np.linalg.norm(ve, axis=-1), np.linalg.norm(vk, axis=-1)[target]
  w = w * en / (en + tn + 1e-6)
  acc, ws = np.zeros_like(vk), np.zeros(len(ki))
  for j in range(len(ei)):
    acc[target[j]] += w[j] * ve[j]
    ws[target[j]] += w[j]
  out = v.copy()
  out[ki] = np.where((ws > 0)[:, None], (vk + acc) / (1 + ws)[:, None], vk)
  return out


@pytest.mark.parametrize("thr,frac", [(0.0, 1.0), (0.2, 1.0), (0.0, 0.5)])
def test_merge_values_matches_hand_computation(thr, frac):
  rng = np.random.default_rng(0)
  S, H = 9, 4
  k = rng.normal(size=(S, H)).astype(np.float32)
  v = rng.normal(size=(S, H)).astype(np.float32)
  valid = np.ones(S, bool)
  valid[-1] = False  # an invalid slot takes no part
  kept = np.zeros(S, bool)
  kept[[0, 3, 5]] = True
  evicted = valid & ~kept
  got = rewrite.merge_values(
    jnp.asarray(k),
    jnp.asarray(v),
    jnp.asarray(kept),
    jnp.asarray(evicted),
    thr,
    frac,
  )
  want = _np_merge(k, v, kept, evicted, thr, frac)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.abs(want[kept] - v[kept]).max() > 1e-3  # something merged


def test_merging_keeps_the_wrapped_selection(params):
  tokens, lens = _tokens(), jnp.array([48, 33])
  inner = policies.snapkv(0.5, window_size=8)
  plain = kvjax.prefill(
    params, tokens, config=CONFIG, transform=inner, prompt_lengths=lens
  )[1]
  merged = kvjax.prefill(
    params,
    tokens,
    config=CONFIG,
    transform=rewrite.merging(inner),
    prompt_lengths=lens,
  )[1]
  for name in ("pos", "valid", "end", "length"):
    np.testing.assert_array_equal(getattr(plain, name), getattr(merged, name))
  np.testing.assert_array_equal(plain.k, merged.k)  # keys untouched
  assert merged.capacity == plain.capacity < 48
  assert np.abs(np.asarray(merged.v) - np.asarray(plain.v)).max() > 1e-3


def test_merging_arguments():
  inner = policies.snapkv(0.5)
  with pytest.raises(TypeError, match="press="):
    rewrite.merging("snapkv")
  with pytest.raises(ValueError, match="codec"):
    rewrite.merging(codecs.fp8())
  with pytest.raises(ValueError, match="key_rerotation"):
    rewrite.merging(rewrite.key_rerotation(inner))
  with pytest.raises(ValueError, match="similarity_threshold"):
    rewrite.merging(inner, similarity_threshold=1.5)
  with pytest.raises(ValueError, match="merge_fraction"):
    rewrite.merging(inner, merge_fraction=0.0)
  assert rewrite.merging(inner) == rewrite.merging(policies.snapkv(0.5))
  assert hash(rewrite.merging(inner)) == hash(rewrite.merging(inner))


# ----------------------------------------------------------------------------
# key_rerotation


def test_rerotate_moves_keys_to_contiguous_positions():
  """Keys R(p) x at kept positions p become R(i) x, i their rank."""
  rng = np.random.default_rng(0)
  L, B, K, S, H = 1, 2, 2, 6, 8
  inv = model_lib.rope_inv_freq(CONFIG.replace(head_dim=H))
  x = rng.normal(size=(B, S, K, H)).astype(np.float32)
  pos = np.array([[0, 2, 3, 7, 9, 11], [1, 4, 6, 8, -1, -1]])
  valid = pos >= 0
  k = model_lib.apply_rope(jnp.asarray(x), jnp.asarray(np.maximum(pos, 0)), inv)
  cache = kvjax.KVCache(
    k=jnp.swapaxes(k, 1, 2)[None],
    v=jnp.zeros((L, B, K, S, H)),
    pos=jnp.asarray(np.broadcast_to(pos[None, :, None], (L, B, K, S))),
    valid=jnp.asarray(np.broadcast_to(valid[None, :, None], (L, B, K, S))),
    end=jnp.array([6, 4]),
    length=jnp.array([12, 9]),
  )
  out = rewrite.rerotate(cache, inv)
  rank = np.where(valid, np.cumsum(valid, axis=1) - 1, -1)
  want = model_lib.apply_rope(
    jnp.asarray(x), jnp.asarray(np.maximum(rank, 0)), inv
  )
  want = np.swapaxes(np.asarray(want), 1, 2)  # [B, K, S, H]
  got = np.asarray(out.k[0])
  for b in range(B):
    n = valid[b].sum()
    np.testing.assert_allclose(got[b, :, :n], want[b, :, :n], atol=1e-5)
  np.testing.assert_array_equal(out.pos[0, :, 0], rank)
  np.testing.assert_array_equal(out.length, [6, 4])


def test_key_rerotation_decode_keeps_positions_contiguous(params):
  """Wrapping a decode-time StreamingLLM: after every decode eviction the
  kept keys are re-rotated again (StreamingLLM's positions in the cache)
  and each new token is written at position n."""
  tokens, lens = _tokens(), jnp.array([48, 37])
  transform = rewrite.key_rerotation(policies.streaming_llm(0.5))
  out = kvjax.generate(
    params,
    tokens,
    config=CONFIG,
    max_new_tokens=6,
    prompt_lengths=lens,
    transform=transform,
  )
  c = out.cache
  pos, valid = np.asarray(c.pos), np.asarray(c.valid)
  for b, n in enumerate([24, 18]):
    assert (valid[:, b].sum(-1) == n).all()
    got = np.sort(np.where(valid[:, b], pos[:, b], 10**6), axis=-1)[..., :n]
    np.testing.assert_array_equal(got, np.broadcast_to(np.arange(n), got.shape))
    assert int(c.length[b]) == n


def test_key_rerotation_arguments_and_chain(params):
  with pytest.raises(TypeError, match="press="):
    rewrite.key_rerotation(policies.snapkv_scorer())
  with pytest.raises(ValueError, match="codec"):
    rewrite.key_rerotation(codecs.fp8())
  t = rewrite.METHODS["key_rerotation"](0.5)
  assert t.name == "key_rerotation" and t == rewrite.METHODS["key_rerotation"](
    0.5
  )
  # evict + re-rotate, then quantize: the codec stores the rotated keys
  cache = kvjax.prefill(
    params, _tokens(), config=CONFIG, transform=base.chain(t, codecs.fp8())
  )[1]
  assert int(cache.length[0]) == 24
  # a decode-time policy re-rotates at decode: its keys must stay float
  with pytest.raises(ValueError, match="re-rotates the keys"):
    kvjax.generate(
      params,
      _tokens(),
      config=CONFIG,
      max_new_tokens=3,
      transform=base.chain(
        rewrite.key_rerotation(policies.streaming_llm(0.5)), codecs.fp8()
      ),
    )


# ----------------------------------------------------------------------------
# cam


def _np_cam_merge(scores, keep, valid, pos, attn, v, k_merge, budget):
  """kvpress CAMPress.compress's merge for one row, in numpy (slots in
  position order)."""
  evict = np.nonzero(valid & ~keep)[0]
  kept = np.nonzero(keep)[0]
  es = scores[evict]
  order = np.argsort(-es[::-1], kind="stable")[:k_merge]
  merge = np.sort(evict[len(evict) - 1 - order])
  out = v.copy()
  for m in merge:
    start = np.searchsorted(kept, m, side="right")
    win = kept[start : start + budget]
    a = len(win)
    if a == 0:
      continue
    for h in range(v.shape[0]):
      mean = attn[h, win].sum() / a
      p = attn[h, m] / mean if mean > 0 else (1.0 if attn[h, m] > 0 else 0.0)
      p = min(max(p, 0.0), 1.0)
      out[h, win] += v[h, m] * p / a
  return out


def test_cam_merge_matches_hand_computation():
  rng = np.random.default_rng(3)
  K, S, H = 2, 14, 3
  scores = rng.normal(size=S).astype(np.float32)
  scores[[4, 9]] = 5.0  # a tie among evicted entries: the later wins
  valid = np.ones(S, bool)
  valid[-1] = False
  keep = np.zeros(S, bool)
  keep[[0, 2, 3, 6, 7, 11, 12]] = True
  attn = rng.uniform(size=(K, S)).astype(np.float32)
  attn[0, 1] = 0.0  # p = 0 for head 0 of entry 1
  v = rng.normal(size=(K, S, H)).astype(np.float32)
  pos = np.arange(S)
  for k_merge in (1, 3, 6):
    got = rewrite.cam_merge(
      jnp.asarray(scores),
      jnp.asarray(keep),
      jnp.asarray(valid),
      jnp.asarray(pos),
      jnp.asarray(attn),
      jnp.asarray(v),
      jnp.int32(k_merge),
      2,
      None,
    )
    want = _np_cam_merge(scores, keep, valid, pos, attn, v, k_merge, 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.abs(want - v).max() > 1e-3


def test_cam_compacts_ragged_rows_and_samples(params):
  tokens, lens = _tokens(), jnp.array([48, 37])
  make = lambda sample: rewrite.cam(
    "knorm",
    compression_interval=3,
    target_size=None,
    ratio=0.5,
    merge_budget=4,
    sample=sample,
  )
  # the Bernoulli draw changes the merged values, not the selection
  pre = [
    kvjax.prefill(
      params, tokens, config=CONFIG, prompt_lengths=lens, transform=make(s)
    )[1]
    for s in (False, True)
  ]
  np.testing.assert_array_equal(pre[0].pos, pre[1].pos)
  assert np.abs(np.asarray(pre[0].v) - np.asarray(pre[1].v)).max() > 0
  # compacted to the budget + reserve (0) + the interval's headroom (3)
  assert pre[0].capacity == 24 + 3
  live = np.asarray(pre[0].valid).sum(-1)  # [L, B, K]
  assert (live[:, 0] == 24).all() and (live[:, 1] == 18).all()


def test_cam_arguments():
  with pytest.raises(ValueError, match="target_size"):
    rewrite.cam("knorm", ratio=0.5)  # target_size defaults to 2048
  with pytest.raises(ValueError, match="unknown scorer"):
    rewrite.cam("nope")
  with pytest.raises(ValueError, match="compression_interval"):
    rewrite.cam(compression_interval=0)
  with pytest.raises(ValueError, match="merge_budget"):
    rewrite.cam(merge_budget=0)
  with pytest.raises(TypeError, match="sample"):
    rewrite.cam(sample=1)
  assert rewrite.cam() == rewrite.cam("knorm")


# ----------------------------------------------------------------------------
# think


def test_think_channels_match_hand_computation():
  rng = np.random.default_rng(0)
  L, B, T, N, K, S, H = 1, 2, 6, 4, 2, 5, 8
  q = rng.normal(size=(L, B, T, N, H)).astype(np.float32)
  k = rng.normal(size=(L, B, K, S, H)).astype(np.float32)
  q_mask = np.ones((B, T), bool)
  q_mask[1, 4:] = False  # row 1: 4 queries, window = its last 3
  valid = np.ones((L, B, K, S), bool)
  valid[:, 1, :, 3:] = False
  got = np.asarray(
    rewrite.think_channels(
      jnp.asarray(q),
      jnp.asarray(q_mask),
      jnp.asarray(k),
      jnp.asarray(valid),
      3,
      5,
    )
  )
  for b, (qs, ks) in enumerate([(slice(3, 6), 5), (slice(1, 4), 3)]):
    qn = (q[0, b, qs] ** 2).mean(0).reshape(K, N // K, H).mean(1)  # [K, H]
    kn = (k[0, b, :, :ks] ** 2).mean(1)  # [K, H]
    pruned = np.argsort(qn * kn, axis=-1)[:, : H - 5]
    for h in range(K):
      assert set(got[0, b, h]) == set(range(H)) - set(pruned[h])


def test_think_stores_fewer_channels_and_decodes(params):
  tokens, lens = _tokens(), jnp.array([48, 30])
  full = kvjax.prefill(
    params, tokens, config=CONFIG, prompt_lengths=lens, capacity=56
  )[1]
  t = rewrite.think(0.5, window_size=8)
  cache = kvjax.prefill(
    params,
    tokens,
    config=CONFIG,
    transform=t,
    prompt_lengths=lens,
    capacity=56,
  )[1]
  H = CONFIG.head_dim
  assert cache.k.slots["kept"].shape[-1] == H // 2
  assert cache.k.slots["kept"].dtype == full.k.dtype
  ch = cache.k.shared["channels"]
  # bytes: the key payload halves; the channel indices are stated overhead
  want = kvjax.kv_bytes(full) - full.k.nbytes // 2 + ch.nbytes
  assert kvjax.kv_bytes(cache) == want
  # q.k on the kept channels = attention over zeroed keys
  dense = np.asarray(cache.k.decode_layers())  # zeros where pruned
  kf = np.asarray(full.k)
  for l, b, h in [(0, 0, 0), (1, 1, 1)]:
    kept = np.asarray(ch[l, b, h])
    np.testing.assert_array_equal(dense[l, b, h][:, kept], kf[l, b, h][:, kept])
    assert (np.delete(dense[l, b, h], kept, axis=-1) == 0).all()
  q = jax.random.normal(jax.random.key(2), (2, 1, CONFIG.num_heads, H))
  q_pos = jnp.full((2, 1), 48)
  for l in range(CONFIG.num_layers):
    ref = attn_lib.reference_attention(
      q,
      jnp.asarray(dense[l]),
      full.v[l],
      q_pos=q_pos,
      k_pos=full.pos[l],
      k_valid=full.valid[l],
    )
    got = attn_lib.cached_attention(q, cache, l, q_pos=q_pos, backend="xla")
    np.testing.assert_allclose(got.out, ref.out, atol=1e-5)
  # the Pallas kernels read the pruned keys themselves (ThinkTile; no
  # fallback warning; interpret mode off their platform)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = attn_lib.cached_attention(
      q, cache, 1, q_pos=q_pos, backend="pallas_tpu"
    )
  np.testing.assert_allclose(got.out, ref.out, atol=1e-5)
  # tokens fed afterwards are stored on the same kept channels
  _, fed, _ = kvjax.forward(params, tokens[:, :3], cache, config=CONFIG)
  new = np.asarray(fed.k.decode_layers())
  for b, n in enumerate([48, 30]):
    assert np.asarray(fed.valid[0, b, 0, n : n + 3]).all()
    kept = np.asarray(ch[0, b, 0])
    assert (np.delete(new[0, b, 0, n : n + 3], kept, axis=-1) == 0).all()
    assert (new[0, b, 0, n : n + 3][:, kept] != 0).all()


def test_think_then_codec(params):
  """chain(think, codec): the codec stores the kept channels, through
  decode (new keys are pruned and coded as they are written)."""
  tokens, lens = _tokens(), jnp.array([48, 30])
  t = base.chain(rewrite.think(0.5, window_size=8), codecs.fp8())
  c = kvjax.generate(
    params,
    tokens,
    config=CONFIG,
    max_new_tokens=4,
    prompt_lengths=lens,
    transform=t,
  ).cache
  k = c.k
  assert k.codec.name == "think16/32+fp8_e4m3"
  assert k.slots["codes"].shape[-1] == 16  # stored on 16 of 32 channels
  dense = np.asarray(k.decode_layers())
  ch = np.asarray(k.shared["channels"])
  for b, n in enumerate([51, 33]):  # prompt + 3 fed tokens
    assert int(c.valid[0, b, 0].sum()) == n
    assert (np.delete(dense[0, b, 0, :n], ch[0, b, 0], axis=-1) == 0).all()
  q = jax.random.normal(jax.random.key(2), (2, 1, CONFIG.num_heads, 32))
  q_pos = jnp.full((2, 1), 60)
  v = c.v.decode_layers()[1] if hasattr(c.v, "decode_layers") else c.v[1]
  ref = attn_lib.reference_attention(
    q,
    jnp.asarray(dense[1]),
    v,
    q_pos=q_pos,
    k_pos=c.pos[1],
    k_valid=c.valid[1],
  )
  got = attn_lib.cached_attention(q, c, 1, q_pos=q_pos, backend="xla")
  np.testing.assert_allclose(got.out, ref.out, atol=1e-4)


def test_think_arguments(params):
  with pytest.raises(ValueError, match="key_channel_compression_ratio"):
    rewrite.think(1.0)
  with pytest.raises(ValueError, match="window_size"):
    rewrite.think(0.5, window_size=0)
  with pytest.raises(ValueError, match="shared leaves"):
    from kvjax.compress import rotated  # pylint: disable=g-import-not-at-top

    kvjax.prefill(
      params,
      _tokens(),
      config=CONFIG,
      transform=base.chain(rewrite.think(0.5), rotated.turboquant(3)),
    )
  with pytest.raises(ValueError, match="think keeps 16 of the 32"):
    kvjax.prefill(
      params,
      _tokens(),
      config=CONFIG,
      transform=base.chain(rewrite.think(0.5), codecs.uniform(4)),
    )
  with pytest.raises(base.Degenerate, match="prunes"):
    kvjax.prefill(
      params, _tokens(), config=CONFIG, transform=rewrite.think(0.01)
    )
  assert rewrite.METHODS["think"](0.5).name == "think"
