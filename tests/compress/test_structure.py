"""Structure wrappers (`kvjax.compress.structure`): each definition against a
small numpy computation, argument errors, and each method's own contract
(whole chunks, per-chunk shares, lazy layers, streaming heads, padding).
Parity with kvpress: `test_kvpress_parity_structure.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import model
from kvjax.cache import logical_bytes, payload_bytes
from kvjax.compress import base, codecs, policies, scorers, structure

CONFIG = kvjax.get_config("tiny", num_layers=3, d_model=64, mlp_dim=128)
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
T = 96
LENGTHS = (96, 70)  # ragged rows
TOKENS = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)


def _prefill(transform, lengths=LENGTHS, capacity=None):
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=transform,
    prompt_lengths=jnp.array(lengths),
    capacity=capacity,
  )
  return cache


@pytest.fixture(scope="module")
def keys():
  """[L, B, K, T, H] numpy keys of the uncompressed ragged prefill."""
  return np.asarray(_prefill(None).k[..., :T, :], np.float64)


def _kept(cache):
  """{(l, b, k): sorted kept positions}."""
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  L, B, K, _ = pos.shape
  return {
    (l, b, k): sorted(pos[l, b, k][valid[l, b, k]].tolist())
    for l in range(L)
    for b in range(B)
    for k in range(K)
  }


def _top(scores, n):
  """Indices of the n highest scores, ties to the lower index."""
  return sorted(np.argsort(-scores, kind="stable")[:n].tolist())


def _keep(n, ratio):
  return max(1, int(n * (1 - ratio))) if n else 0


def _knorm(k):
  return -np.linalg.norm(k, axis=-1)


def _keydiff(k):
  unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
  a = unit.mean(0)
  return -(k @ a) / np.maximum(
    np.linalg.norm(k, axis=-1) * np.linalg.norm(a), 1e-8
  )


def test_chunkkv_keeps_top_chunks_by_mean_head_summed_score(keys):
  ratio, cs = 0.5, 16
  got = _kept(_prefill(structure.chunkkv(policies.knorm(ratio), cs)))
  L, B, K = keys.shape[:3]
  for l in range(L):
    for b in range(B):
      n = LENGTHS[b]
      s = _knorm(keys[l, b, :, :n]).sum(0)  # summed over kv heads
      bounds = [(c, min(c + cs, n)) for c in range(0, n, cs)]
      chunk_scores = np.array([s[a:e].mean() for a, e in bounds])
      top = _top(chunk_scores, _keep(len(bounds), ratio))
      want = sorted(p for c in top for p in range(*bounds[c]))
      for k in range(K):
        assert got[(l, b, k)] == want, (l, b, k)


def test_chunkkv_keeps_whole_chunks_and_falls_back_below_one_chunk():
  cs = 20
  cache = _prefill(structure.chunkkv(policies.snapkv(0.5, window_size=8), cs))
  for (l, b, k), kept in _kept(cache).items():
    chunks = {p // cs for p in kept}
    for c in chunks:  # every kept chunk is complete (the last may be short)
      assert set(range(c * cs, min((c + 1) * cs, LENGTHS[b]))) <= set(kept)
  # A row shorter than one chunk: the wrapped policy's own top entries.
  cache = _prefill(structure.chunkkv(policies.knorm(0.5), 80), (96, 40))
  plain = _kept(_prefill(policies.knorm(0.5), (96, 40)))
  got = _kept(cache)
  for l in range(3):
    for k in range(2):
      assert got[(l, 1, k)] == plain[(l, 1, k)]
      assert len(got[(l, 0, k)]) in (80, 16)  # one of two chunks, whole


def test_chunkkv_budget_keeps_whole_chunks_within_it():
  cache = _prefill(structure.chunkkv(policies.knorm(budget=50), 16))
  assert cache.capacity == 48  # 3 chunks of 16
  assert max(len(v) for v in _kept(cache).values()) == 48


def test_chunk_scores_each_chunk_on_its_own(keys):
  # KeyDiff's anchor is the mean key of what the scorer sees: per chunk.
  ratio, cs = 0.5, 32
  got = _kept(_prefill(structure.chunk(scorers.keydiff(ratio), cs)))
  L, B, K = keys.shape[:3]
  for l in range(L):
    for b in range(B):
      for k in range(K):
        want = []
        for a in range(0, LENGTHS[b], cs):
          kc = keys[l, b, k, a : min(a + cs, LENGTHS[b])]
          want += [a + i for i in _top(_keydiff(kc), _keep(len(kc), ratio))]
        assert got[(l, b, k)] == sorted(want), (l, b, k)


def test_block_iterates_kept_plus_block(keys):
  ratio, bs = 0.5, 24
  got = _kept(_prefill(structure.block(scorers.keydiff(ratio), bs)))
  L, B, K = keys.shape[:3]
  for l in range(L):
    for b in range(B):
      n = LENGTHS[b]
      n_kept = _keep(n, ratio)
      for k in range(K):
        kept = list(range(n_kept))
        for i in range(n_kept, n, bs):
          cand = kept + list(range(i, min(i + bs, n)))
          s = _keydiff(keys[l, b, k, cand])
          kept = [cand[j] for j in _top(s, n_kept)]
        assert got[(l, b, k)] == sorted(kept), (l, b, k)


def test_per_layer_ratios_and_padding():
  ratios = (0.25, 0.5, 0.75)
  cache = _prefill(structure.per_layer(policies.knorm(0.5), ratios))
  got = _kept(cache)
  # The scorer's own float32 scores (the test is about the layer budgets).
  full = _prefill(None)
  scores = np.asarray(policies.knorm_scorer().score(full, None))
  for (l, b, k), kept in got.items():
    s = scores[l, b, k, : LENGTHS[b]]
    assert kept == _top(s, _keep(LENGTHS[b], ratios[l])), (l, b, k)
  assert cache.capacity == _keep(T, 0.25)  # the largest layer budget
  assert logical_bytes(cache) < payload_bytes(cache)
  # linear=(first, last): the same ratios interpolated over the 3 layers.
  same = _prefill(structure.per_layer(policies.knorm(0.5), linear=(0.25, 0.75)))
  assert _kept(same) == got


def test_simlayerkv_lazy_layers_keep_initial_and_recent():
  # lazy_threshold=0: every layer whose initial + recent share is > 0 is
  # lazy; the short row (20 <= 4 + 20 + 1) is not compressed.
  cache = _prefill(structure.simlayerkv(0.0, 1, 20, 4), (96, 20))
  for (l, b, k), kept in _kept(cache).items():
    n = (96, 20)[b]
    if b == 0:
      assert kept == list(range(4)) + list(range(n - 19, n))
    else:
      assert kept == list(range(n))
  # Capacity: the static bound (a lazy layer is known only at run time);
  # the padding shows in the logical bytes.
  assert cache.capacity == T
  assert logical_bytes(cache) < payload_bytes(cache)
  # Above every share: no layer is lazy, everything is kept.
  cache = _prefill(structure.simlayerkv(0.999, 1, 20, 4))
  assert all(len(v) == LENGTHS[b] for (_, b, _), v in _kept(cache).items())


def test_simlayerkv_scores_the_keys_before_the_last_queries():
  """kvpress' lazy score: the last n_last queries' attention, averaged over
  heads and queries, on the first n_initial keys and the n_recent keys
  just before the window (the window's own keys are not counted). Layer 0
  is lazy exactly when the threshold is below that score."""
  n_initial, n_recent, n_last = 4, 20, 1
  tokens = TOKENS[:1]
  _, cache, aux = kvjax.forward(
    PARAMS,
    tokens,
    kvjax.init_cache(CONFIG, 1, T),
    config=CONFIG,
    capture=("q",),
  )
  ctx = base.CompressContext(
    phase="prefill",
    step=jnp.int32(0),
    q_pos=jnp.arange(T)[None],
    q_mask=jnp.ones((1, T), bool),
    q=aux["q"],
    geometry=CONFIG.geometry,
    live_bound=T,
  )
  probs, _ = policies.window_attention(cache, ctx, n_last)
  mean = np.asarray(probs[:, 0]).mean(axis=(1, 2))  # [L, S]
  newest = T - 1
  span = np.zeros(T, bool)
  span[:n_initial] = True
  span[newest - n_last - n_recent + 1 : newest - n_last + 1] = True
  score = mean[0, :T][span].sum()
  for threshold, lazy in ((score - 1e-4, True), (score + 1e-4, False)):
    t = structure.simlayerkv(float(threshold), n_last, n_recent, n_initial)
    out, _ = t.apply(cache, t.init(cache), ctx)
    kept = int(np.asarray(out.valid[0, 0, 0]).sum())
    assert kept == (n_initial + n_recent - n_last if lazy else T), (
      threshold,
      score,
      kept,
    )


def test_duo_attention_streaming_heads_and_memory():
  L, K = CONFIG.num_layers, CONFIG.num_kv_heads
  cache = _prefill(structure.duo_attention(0.5, sink_size=4, recent_size=16))
  got = _kept(cache)
  for b, n in enumerate(LENGTHS):
    stream = [
      (l, k)
      for l in range(L)
      for k in range(K)
      if got[(l, b, k)] == list(range(4)) + list(range(n - 16, n))
    ]
    full = [
      (l, k) for l in range(L) for k in range(K) if len(got[(l, b, k)]) == n
    ]
    assert len(stream) == round(L * K * 0.5) and len(full) == L * K - len(
      stream
    )
  assert cache.capacity == T  # a retrieval head keeps all: padding
  assert logical_bytes(cache) < payload_bytes(cache)
  # Every head streaming: the cache is physically sink + recent.
  cache = _prefill(structure.duo_attention(1.0, sink_size=4, recent_size=16))
  assert cache.capacity == 20
  assert payload_bytes(cache) == logical_bytes(cache)


def test_duo_head_scores_numpy():
  tokens = TOKENS[:1]
  _, cache, aux = model.forward(
    PARAMS,
    tokens,
    kvjax.init_cache(CONFIG, 1, T),
    config=CONFIG,
    capture=("q_pre_rope", "k"),
  )
  ctx = base.CompressContext(
    phase="prefill",
    step=0,
    q_pos=jnp.arange(T)[None],
    q_mask=jnp.ones((1, T), bool),
    q_pre_rope=aux["q_pre_rope"],
    geometry=CONFIG.geometry,
  )
  got = np.asarray(structure.duo_head_scores(cache, ctx, 50))[:, 0]
  # By hand: pre-RoPE keys recomputed from the cached (rotated) keys.
  inv = model.rope_inv_freq(CONFIG).astype(np.float64)
  H = CONFIG.head_dim

  def rot(x, p):
    a = p * inv
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return np.concatenate(
      [x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1
    )

  k = np.asarray(cache.k[:, 0], np.float64)  # [L, K, T, H]
  q = np.asarray(aux["q_pre_rope"][:, 0], np.float64)  # [L, T, N, H]
  G = CONFIG.num_heads // CONFIG.num_kv_heads
  for l in range(CONFIG.num_layers):
    for kv in range(CONFIG.num_kv_heads):
      mk = np.mean([rot(k[l, kv, t], -t) for t in range(T)], 0)
      keys_p = np.stack([rot(mk, j) for j in range(50)])
      s = []
      for g in range(G):
        ql = rot(q[l, :, kv * G + g].mean(0), 49)
        z = keys_p @ ql / np.sqrt(H)
        p = np.exp(z - z.max())
        p /= p.sum()
        s.append(np.cumsum(p).mean())
      np.testing.assert_allclose(got[l, kv], np.mean(s), rtol=1e-4)


def test_reserve():
  # After compression with R reserved slots the fullest row has at least R
  # free slots, exactly R where the layout allows (the registry's generic
  # tests check every METHODS name, with a codec, batch 2 ragged, decode).
  R = 3
  free = lambda c: c.capacity - int(np.max(np.asarray(c.end)))
  # Whole chunks: a row keeping the short last chunk has up to a chunk more.
  cache = _prefill(structure.chunkkv(policies.knorm(0.5), 20), capacity=T + R)
  assert R <= free(cache) < R + 20
  # A retrieval head keeps all: exact.
  cache = _prefill(
    structure.duo_attention(0.5, sink_size=4, recent_size=16), capacity=T + R
  )
  assert free(cache) == R
  # No layer lazy: exact; every layer lazy: the static capacity (a lazy
  # layer is known only at run time) leaves the lazy layers' entries free.
  cache = _prefill(structure.simlayerkv(0.999, 1, 20, 4), capacity=T + R)
  assert free(cache) == R
  cache = _prefill(structure.simlayerkv(0.0, 1, 20, 4), capacity=T + R)
  assert free(cache) == T + R - 23


def test_refusals():
  with pytest.raises(TypeError, match="scored policy"):
    structure.chunkkv(policies.streaming_llm(0.5))
  with pytest.raises(TypeError, match="scored policy"):
    structure.block(policies.adakv("snapkv", 0.5))
  with pytest.raises(TypeError, match="scored policy"):
    structure.chunk(codecs.uniform(4))
  with pytest.raises(TypeError, match="scored policy"):
    structure.per_layer(policies.knorm_scorer(), (0.5,) * 3)
  with pytest.raises(TypeError, match="scored policy"):
    structure.chunkkv(structure.chunkkv(policies.knorm(0.5)))
  with pytest.raises(ValueError, match="chunk_length"):
    structure.chunkkv(policies.knorm(0.5), chunk_length=0)
  with pytest.raises(ValueError, match="budget=10"):
    structure.chunkkv(policies.knorm(budget=10), chunk_length=20)
  with pytest.raises(ValueError, match="budget=10"):
    structure.chunk(policies.knorm(budget=10))
  with pytest.raises(ValueError, match="block_size"):
    structure.block(policies.knorm(0.5), block_size=-1)
  with pytest.raises(ValueError, match="budget=10"):
    structure.per_layer(policies.knorm(budget=10), (0.5,))
  with pytest.raises(ValueError, match=r"compression_ratios\[1\]"):
    structure.per_layer(policies.knorm(0.5), (0.5, 1.0))
  with pytest.raises(ValueError, match="exactly one"):
    structure.per_layer(policies.knorm(0.5), (0.5,), linear=(0.1, 0.2))
  with pytest.raises(ValueError, match="linear"):
    structure.per_layer(policies.knorm(0.5), linear=(0.1, 0.2, 0.3))
  with pytest.raises(ValueError, match="lazy_threshold"):
    structure.simlayerkv(1.5)
  with pytest.raises(ValueError, match="n_recent"):
    structure.simlayerkv(0.5, n_last=8, n_recent=8)
  with pytest.raises(ValueError, match="head_compression_ratio"):
    structure.duo_attention(-0.1)
  with pytest.raises(ValueError, match="recent_size"):
    structure.duo_attention(0.5, recent_size=0)
  # Scorer wrapped explicitly: accepted, same value as the factory's.
  a = structure.chunkkv(policies.scored_policy(policies.knorm_scorer(), 0.5))
  assert a.name == "chunkkv" and a == structure.chunkkv(
    policies.scored_policy(policies.knorm_scorer(), 0.5)
  )


def test_degenerate_and_trace_time_errors():
  with pytest.raises(base.Degenerate, match="lazy_threshold=1.0"):
    _prefill(structure.simlayerkv())  # kvpress' default: never lazy
  with pytest.raises(base.Degenerate, match="sink_size"):
    _prefill(structure.duo_attention(0.5))  # 128 + 256 >= 96 entries
  with pytest.raises(base.Degenerate, match="0 heads"):
    _prefill(structure.duo_attention(0.0, sink_size=4, recent_size=8))
  with pytest.raises(base.Degenerate, match="chunkkv"):
    _prefill(structure.chunkkv(policies.knorm(0.5), chunk_length=96))
  with pytest.raises(ValueError, match="3 layers"):
    _prefill(structure.per_layer(policies.knorm(0.5), (0.5, 0.5)))


def test_methods_names_and_values():
  for name, make in structure.METHODS.items():
    t = make(0.5)
    assert t.name == name and t == make(0.5) and hash(t) == hash(make(0.5))
