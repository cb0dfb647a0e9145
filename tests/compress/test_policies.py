"""Eviction policies: budgets, physical compaction, decode-time eviction,
jit with ragged batches, compile counts, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax.compress import base

CONFIG = kvjax.get_config("tiny")
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
T = 160
LENGTHS = jnp.array([160, 97])
TOKENS = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)

PREFILL_POLICIES = {
  "random": lambda r: compress.random(r),
  "knorm": lambda r: compress.knorm(r),
  "snapkv": lambda r: compress.snapkv(r, window_size=16),
  "expected_attention": lambda r: compress.expected_attention(r),
  "oracle": lambda r: compress.oracle(r),
}
DECODE_POLICIES = {
  "streaming_llm": lambda r: compress.streaming_llm(r),
  "tova": lambda r: compress.tova(r),
  "h2o": lambda r: compress.h2o(r),
}


def _prefill(transform, **kw):
  return kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=transform,
    prompt_lengths=LENGTHS,
    **kw,
  )


def _future_mass():
  return compress.oracle_future_mass(
    PARAMS, TOKENS, config=CONFIG, context_end=T
  )


@pytest.mark.parametrize(
  "name", sorted({**PREFILL_POLICIES, **DECODE_POLICIES})
)
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_budget_per_row_and_physical_size(name, ratio):
  transform = {**PREFILL_POLICIES, **DECODE_POLICIES}[name](ratio)
  extra = {}
  if name == "oracle":
    # Future queries = the whole prompt here (a shape check, not a meaning).
    extra = dict(
      future_mass=jnp.ones((CONFIG.num_layers, 2, CONFIG.num_heads, T))
    )
  _, full = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS)
  _, cache = _prefill(transform, **extra)
  kept = np.asarray(cache.valid.sum(-1))  # [L, B, K]
  for b, n in enumerate(np.asarray(LENGTHS)):
    assert (kept[:, b] == max(1, int(n * (1 - ratio)))).all(), (name, kept)
  every = transform.every
  assert cache.capacity == int(T * (1 - ratio)) + every
  assert kvjax.kv_bytes(cache) < kvjax.kv_bytes(full) * (1 - ratio + 0.05)
  # Kept entries are real entries of the full cache, at their positions.
  pos = np.asarray(cache.pos)
  full_k = np.asarray(full.k)
  for l, b, h, s in zip(*np.nonzero(np.asarray(cache.valid))):
    np.testing.assert_array_equal(
      cache.k[l, b, h, s], full_k[l, b, h, pos[l, b, h, s]]
    )
    if b == 1:
      assert pos[l, b, h, s] < 97  # padding never survives


def test_snapkv_keeps_its_window_and_streaming_keeps_sinks_and_recent():
  _, cache = _prefill(compress.snapkv(0.75, window_size=16))
  pos = np.asarray(cache.pos)
  for b, n in enumerate([160, 97]):
    kept = set(pos[0, b, 0][np.asarray(cache.valid[0, b, 0])].tolist())
    assert set(range(n - 16, n)) <= kept
  _, cache = _prefill(compress.streaming_llm(0.5))
  kept = sorted(
    np.asarray(cache.pos[0, 1, 0])[np.asarray(cache.valid[0, 1, 0])].tolist()
  )
  n = int(97 * 0.5)
  assert kept == [0, 1, 2, 3] + list(range(97 - (n - 4), 97))


def test_oracle_keeps_what_the_future_attends_to():
  context = 120
  mass = _future_mass()[..., :context]
  tokens = TOKENS[:, :context]
  _, cache = kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    transform=compress.oracle(0.75),
    future_mass=mass,
  )
  per_kv = (
    np.asarray(mass)
    .reshape(CONFIG.num_layers, 2, CONFIG.num_kv_heads, -1, context)
    .mean(3)
  )
  for l in range(CONFIG.num_layers):
    top = set(np.argsort(-per_kv[l, 0, 0])[:30].tolist())
    kept = set(
      np.asarray(cache.pos[l, 0, 0])[np.asarray(cache.valid[l, 0, 0])].tolist()
    )
    assert kept == top


@pytest.mark.parametrize("name", sorted(DECODE_POLICIES))
def test_decode_time_policies_hold_their_budget(name):
  transform = DECODE_POLICIES[name](0.5)
  out = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=12,
    prompt_lengths=LENGTHS,
    transform=transform,
  )
  cache = out.cache
  assert cache.capacity == 80 + 1
  kept = np.asarray(cache.valid.sum(-1))
  assert (kept[:, 0] == 80).all() and (kept[:, 1] == 48).all()
  # The newest token (position length - 2: the last one fed) is kept.
  for b, n in enumerate([160, 97]):
    newest = n + 12 - 2
    assert (np.asarray(cache.pos[:, b]) == newest).any(-1).all()
  if name == "streaming_llm":
    kept = sorted(
      np.asarray(cache.pos[0, 1, 0])[np.asarray(cache.valid[0, 1, 0])].tolist()
    )
    assert kept[:4] == [0, 1, 2, 3] and kept[-1] == 97 + 10


def test_h2o_accumulated_attention_moves_with_entries():
  """H2O's accumulator must follow its entries through prefill compaction
  and the decode-time swap-remove: after each step, every live slot's
  accumulated mass equals the attention its token received so far (tracked
  here by original position, independently of slots)."""
  transform = compress.h2o(0.5)
  tokens, T0 = TOKENS[:, :48], 48
  _, full, aux = kvjax.forward(
    PARAMS,
    tokens,
    kvjax.init_cache(CONFIG, 2, T0),
    config=CONFIG,
    capture=("attn_mass",),
  )
  K = CONFIG.num_kv_heads
  G = CONFIG.num_heads // K

  def per_kv(mass):  # [L, B, N, S] -> [L, B, K, S]
    m = np.asarray(mass)
    return m.reshape(m.shape[0], m.shape[1], K, G, -1).mean(3)

  # Expected accumulator by (layer, row, kv head, position).
  want = {}
  m, p, v = (
    per_kv(aux["attn_mass"]),
    np.asarray(full.pos),
    np.asarray(full.valid),
  )
  for idx in zip(*np.nonzero(v)):
    want[idx[:3] + (p[idx],)] = m[idx]
  ctx = compress.CompressContext(
    phase="prefill",
    step=jnp.int32(0),
    q_pos=jnp.broadcast_to(jnp.arange(T0), (2, T0)),
    q_mask=jnp.ones((2, T0), bool),
    attn_mass=aux["attn_mass"],
    reserve=0,
    geometry=CONFIG.geometry,
    live_bound=T0,
  )
  cache, state = transform.apply(full, transform.init(full), ctx)
  cache = cache._replace(state=state)
  token = tokens[:, -1]
  for step in range(1, 5):  # each step writes one entry and evicts one
    _, cache, aux = kvjax.forward(
      PARAMS, token[:, None], cache, config=CONFIG, capture=("attn_mass",)
    )
    m, p, v = (
      per_kv(aux["attn_mass"]),
      np.asarray(cache.pos),
      np.asarray(cache.valid),
    )
    for idx in zip(*np.nonzero(v)):
      key = idx[:3] + (p[idx],)
      want[key] = want.get(key, 0.0) + m[idx]
    ctx = ctx._replace(
      phase="decode",
      step=jnp.int32(step),
      q_pos=cache.length[:, None] - 1,
      q_mask=jnp.ones((2, 1), bool),
      attn_mass=aux["attn_mass"],
    )
    cache, state = transform.apply(cache, cache.state, ctx)
    cache = cache._replace(state=state)
    token = (token + 7) % CONFIG.vocab_size
    acc = state.mass
    acc, p, v = np.asarray(acc), np.asarray(cache.pos), np.asarray(cache.valid)
    assert (v.sum(-1) == 24).all()  # the budget holds
    assert (acc[~v] == 0).all()
    for idx in zip(*np.nonzero(v)):
      np.testing.assert_allclose(
        acc[idx], want[idx[:3] + (p[idx],)], rtol=1e-5, atol=1e-6
      )


def test_adakv_head_budgets_vary_and_sum_to_the_layer_budget():
  transform = compress.adakv("snapkv", 0.75, window_size=16)
  _, cache = _prefill(transform)
  kept = np.asarray(cache.valid.sum(-1))  # [L, B, K]
  for b, n in enumerate([160, 97]):
    per_head = max(1, int(n * 0.25))
    assert (kept[:, b].sum(-1) == CONFIG.num_kv_heads * per_head).all()
    assert (kept[:, b] >= max(1, int(per_head * 0.2))).all()
  assert kvjax.logical_bytes(cache) <= kvjax.cache.payload_bytes(cache)


def test_pyramid_budgets_formula():
  b = np.asarray(compress.pyramid_budgets(jnp.array([4096]), 0.5, 4, 64, 20))
  # max_capacity = 64 + 2048; min = 2048/20 = 102.4; max = 4096 - 102.4.
  np.testing.assert_array_equal(
    b[:, 0], np.round(3993.6 - np.arange(4) * (3993.6 - 102.4) / 3).astype(int)
  )
  assert (compress.pyramid_budgets(jnp.array([100]), 0.5, 4)[:, 0] == 50).all()


@pytest.mark.parametrize(
  "make",
  [
    lambda: compress.snapkv(0.5, window_size=16),
    lambda: compress.h2o(0.5),
    lambda: compress.chain(compress.knorm(0.5), compress.kivi(2, 16, 32)),
    lambda: compress.turboquant(3),
  ],
)
def test_compressed_decode_compiles_once(count_compiles, make):
  transform = make()
  kw = dict(
    config=CONFIG, max_new_tokens=5, prompt_lengths=LENGTHS, transform=transform
  )
  kvjax.generate(PARAMS, TOKENS, **kw)
  other = (TOKENS + 1) % CONFIG.vocab_size
  with count_compiles() as c:
    kvjax.generate(PARAMS, other, **kw)
  assert c["n"] == 0
  if transform.every:
    return  # decode-time methods run inside generate's loop (checked above)
  _, cache = _prefill(transform, capacity=T + 4)
  token, keys = TOKENS[:, 0], [jax.random.key(i) for i in range(4)]
  with count_compiles() as c:
    for key in keys:
      token, _, cache = kvjax.decode_step(
        PARAMS, token, cache, key, config=CONFIG
      )
  assert c["n"] == 1


def test_chain_composes_and_identity_is_a_no_op():
  _, full = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS)
  _, same = _prefill(compress.chain())
  jax.tree.map(np.testing.assert_array_equal, full, same)
  two = compress.chain(
    compress.snapkv(0.5, window_size=16), compress.knorm(0.5)
  )
  _, cache = _prefill(two)
  assert cache.capacity == 40 and two.keeps(160) == 40
  assert two.name == "snapkv+knorm"


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: compress.snapkv(1.0), "ratio must be a float in"),
    (lambda: compress.knorm(-0.1), "ratio must be a float in"),
    (lambda: compress.knorm(ratio=0.5, budget=10), "exactly one of"),
    (lambda: compress.knorm(budget=0), "budget must be an int >= 1"),
    (lambda: compress.streaming_llm(budget=4, n_sink=4), "n_sink"),
    (lambda: compress.adakv("nope", 0.5), "unknown scorer"),
    (lambda: compress.tova(0.5, every=0), "every must be"),
    (lambda: compress.chain(compress.knorm(0.5), "x"), "KVTransform"),
  ],
)
def test_bad_arguments_raise(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_oracle_without_future_mass_raises():
  with pytest.raises(ValueError, match="future_mass"):
    _prefill(compress.oracle(0.5))


def test_snapkv_on_a_1024_token_prompt_keeps_a_quarter_of_the_bytes():
  tokens = jax.random.randint(jax.random.key(5), (2, 1024), 1, 512)
  _, full = kvjax.prefill(PARAMS, tokens, config=CONFIG)
  _, cache = kvjax.prefill(
    PARAMS, tokens, config=CONFIG, transform=compress.snapkv(0.75)
  )
  ratio = kvjax.kv_bytes(cache) / kvjax.kv_bytes(full)
  assert ratio <= 0.27, ratio
  assert base.static_keep(1024, 0.75, None) == cache.capacity == 256


def test_snapkv_window_longer_than_a_row_uses_the_rows_tokens():
  """A row shorter than the window: its padding queries get no weight and
  its whole prompt is the window (everything kept up to the budget)."""
  lengths = jnp.array([160, 10])
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=compress.snapkv(0.5, window_size=16),
    prompt_lengths=lengths,
  )
  kept = sorted(
    np.asarray(cache.pos[0, 1, 0])[np.asarray(cache.valid[0, 1, 0])].tolist()
  )
  assert kept == list(range(5, 10))  # the 5 newest: all in the window
  # A window covering every entry of every row would only keep the newest:
  # refused with the numbers, not run as "SnapKV".
  with pytest.raises(base.Degenerate, match="covers all 8 cached entries"):
    kvjax.prefill(
      PARAMS, TOKENS[:, :8], config=CONFIG, transform=compress.snapkv(0.5)
    )  # w=64 > T=8


@pytest.mark.parametrize("seed", range(4))
def test_evict_one_keeps_what_a_sort_keeps(seed):
  """The O(S) swap-remove (decode-time policies at every=1) must keep
  exactly the entries a sort over the same scores keeps (live - 1 per
  head), with their payloads and positions, and free the last slot."""
  L, B, K, S, H = 2, 3, 2, 12, 4
  rng = np.random.default_rng(seed)
  end = np.array([12, 9, 5])
  valid = np.arange(S)[None, None, None] < end[None, :, None, None]
  valid = np.broadcast_to(valid, (L, B, K, S))
  pos = np.where(valid, rng.permutation(100)[:S][None, None, None], -1)
  k = rng.normal(size=(L, B, K, S, H)).astype(np.float32)
  cache = kvjax.KVCache(
    k=jnp.asarray(k),
    v=jnp.asarray(-k),
    pos=jnp.asarray(pos, jnp.int32),
    valid=jnp.asarray(valid),
    end=jnp.asarray(end),
    length=jnp.asarray(end),
  )
  scores = jnp.asarray(rng.normal(size=(L, B, K, S)), jnp.float32)
  over = jnp.array([True, False, True])
  out, _, _ = base.evict_one(cache, scores, over)
  n = base.live_counts(cache) - over[None, :, None].astype(jnp.int32)
  sorted_keep = np.asarray(base.keep_top(scores, n, cache.valid))
  for l in range(L):
    for b in range(B):
      for h in range(K):
        got = np.asarray(out.pos[l, b, h])[np.asarray(out.valid[l, b, h])]
        want = pos[l, b, h][sorted_keep[l, b, h]]
        assert sorted(got.tolist()) == sorted(want.tolist()), (l, b, h)
        for s_, p_ in enumerate(np.asarray(out.pos[l, b, h])):
          if np.asarray(out.valid[l, b, h, s_]):
            src = int(np.nonzero(pos[l, b, h] == p_)[0][0])
            np.testing.assert_array_equal(out.k[l, b, h, s_], k[l, b, h, src])
  np.testing.assert_array_equal(out.end, end - np.asarray(over))


@pytest.mark.parametrize("name", sorted(DECODE_POLICIES))
def test_decode_eviction_paths_keep_the_budget(name):
  """every=1 (swap-remove) and every=2 (sort and compact at alternate
  steps) both end at each row's budget; StreamingLLM's scores do not depend
  on attention, so both keep the same entries."""
  make = DECODE_POLICIES[name]
  fast = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=9,
    prompt_lengths=LENGTHS,
    transform=make(0.5),
  )
  kept = lambda c, b: sorted(
    np.asarray(c.pos[:, b])[np.asarray(c.valid[:, b])].tolist()
  )
  transform = {
    "streaming_llm": compress.streaming_llm(0.5, every=2),
    "tova": compress.tova(0.5, every=2),
    "h2o": compress.h2o(0.5, every=2),
  }[name]
  slow = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=9,
    prompt_lengths=LENGTHS,
    transform=transform,
  )
  assert slow.cache.capacity == 82
  if name == "streaming_llm":  # scores do not depend on attention
    for b in range(2):
      assert kept(fast.cache, b) == kept(slow.cache, b)
  for b, n in enumerate([80, 48]):
    assert (np.asarray(fast.cache.valid[:, b].sum(-1)) == n).all()


def test_keep_top_ranks_nan_and_minus_inf_last_among_valid():
  # A NaN or -inf score is a valid entry's: it ranks below every finite
  # score, above every invalid slot, so n = the valid count keeps them all.
  scores = jnp.array([1.0, 9.0, jnp.nan, 5.0, -jnp.inf, 0.0, -0.0])
  valid = jnp.array([True, False, True, True, True, True, True])
  scores, valid = scores[None, None, None], valid[None, None, None]
  keep = lambda n: np.asarray(base.keep_top(scores, n, valid))[0, 0, 0]
  assert keep(6).tolist() == [True, False, True, True, True, True, True]
  assert keep(4).tolist() == [True, False, False, True, False, True, True]
  # -0.0 ties with 0.0: the lower slot first.
  assert keep(3).tolist() == [True, False, False, True, False, True, False]
  assert keep(5).sum() == 5 and not keep(5)[4]  # NaN (slot 2) before -inf


def test_compact_keeps_an_earlier_overflow_flagged():
  # A jitted write past capacity left end > capacity; compacting after it
  # (a decode-time eviction) must not clear the flag of the dropped writes.
  k = jax.random.normal(jax.random.key(0), (1, 2, 8, 1, 4))
  cache = kvjax.KVCache.from_dense(k, k, jnp.array([8, 5]), capacity=8)
  cache = cache._replace(end=jnp.array([9, 5], jnp.int32))  # row 0 overflowed
  out, _ = jax.jit(base.compact, static_argnums=2)(cache, cache.valid, 8)
  assert kvjax.cache.cache_overflowed(out)
  assert np.asarray(out.end).tolist()[1] == 5
  # Fewer slots kept: still flagged, past the new capacity.
  keep = cache.valid & (cache.pos < 4)
  out, _ = jax.jit(base.compact, static_argnums=2)(cache, keep, 6)
  assert out.capacity == 6 and np.asarray(out.end)[0] > 6
