"""generate / prefill / decode_step: correctness, sampling, compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax

CONFIG = kvjax.get_config("tiny")
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)


def _tokens(B=2, T=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 1, CONFIG.vocab_size)


def _greedy_by_hand(tokens, n):
  """Greedy decoding by full recompute, no cache reuse."""
  seq = np.asarray(tokens)
  for _ in range(n):
    logits, _, _ = kvjax.forward(
      PARAMS,
      jnp.asarray(seq),
      kvjax.init_cache(CONFIG, seq.shape[0], seq.shape[1]),
      config=CONFIG,
    )
    seq = np.concatenate(
      [seq, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1
    )
  return seq[:, tokens.shape[1] :]


def test_greedy_equals_full_recompute():
  tokens = _tokens()
  out = kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=6)
  np.testing.assert_array_equal(out.tokens, _greedy_by_hand(tokens, 6))
  assert out.num_generated.tolist() == [6, 6]
  assert out.cache.end.tolist() == [12 + 5] * 2


def test_generate_compiles_once_and_decode_step_compiles_once(count_compiles):
  tokens, other, lengths = _tokens(), _tokens(seed=7), jnp.array([12, 5])
  kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=6)
  with count_compiles() as c:
    kvjax.generate(
      PARAMS, other, config=CONFIG, max_new_tokens=6, prompt_lengths=lengths
    )
  assert c["n"] == 0, "second generate call with new values recompiled"
  _, cache = kvjax.prefill(PARAMS, tokens, config=CONFIG, capacity=20)
  token, keys = tokens[:, -1], [jax.random.key(s) for s in range(5)]
  with count_compiles() as c:
    for key in keys:
      token, _, cache = kvjax.decode_step(
        PARAMS, token, cache, key, config=CONFIG
      )
  assert c["n"] == 1, f"decode steps compiled {c['n']} times"


def test_prefill_and_decode_step_match_generate():
  tokens = _tokens()
  out = kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=5)
  logits, cache = kvjax.prefill(PARAMS, tokens, config=CONFIG, capacity=17)
  token = logits[:, -1].argmax(-1).astype(jnp.int32)
  got = [token]
  for _ in range(4):
    token, _, cache = kvjax.decode_step(
      PARAMS, token, cache, jax.random.key(0), config=CONFIG
    )
    got.append(token)
  np.testing.assert_array_equal(np.stack(got, 1), out.tokens)


def test_stop_token_and_padding():
  tokens = _tokens()
  free = kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=8)
  stop = int(free.tokens[0, 3])  # row 0 emits this at step 3
  out = kvjax.generate(
    PARAMS,
    tokens,
    config=CONFIG,
    max_new_tokens=8,
    stop_token=stop,
    pad_token=0,
  )
  row = np.asarray(out.tokens[0])
  first = int(np.argmax(np.asarray(free.tokens[0]) == stop))
  assert int(out.num_generated[0]) == first + 1
  np.testing.assert_array_equal(row[: first + 1], free.tokens[0, : first + 1])
  assert (row[first + 1 :] == 0).all()
  # A stopped row's cache stops growing.
  assert int(out.cache.end[0]) == 12 + first


def test_sampling_is_reproducible_and_respects_top_k():
  tokens = _tokens()
  kw = dict(config=CONFIG, max_new_tokens=8, temperature=1.0, top_k=3)
  a = kvjax.generate(PARAMS, tokens, rng=jax.random.key(1), **kw)
  b = kvjax.generate(PARAMS, tokens, rng=jax.random.key(1), **kw)
  c = kvjax.generate(PARAMS, tokens, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  logits = np.asarray(a.prompt_logits)
  top3 = np.argsort(-logits, axis=-1)[:, :3]
  for row in range(2):
    assert int(a.tokens[row, 0]) in top3[row]
  # top_k=1 is greedy whatever the temperature.
  g = kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=8)
  k1 = kvjax.generate(
    PARAMS, tokens, config=CONFIG, max_new_tokens=8, temperature=2.0, top_k=1
  )
  np.testing.assert_array_equal(g.tokens, k1.tokens)


def test_generate_bad_input():
  tokens = _tokens()
  with pytest.raises(ValueError, match="cache capacity exceeded"):
    kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=8, capacity=15)
  with pytest.raises(ValueError, match="max_new_tokens"):
    kvjax.generate(PARAMS, tokens, config=CONFIG, max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature"):
    kvjax.generate(
      PARAMS, tokens, config=CONFIG, max_new_tokens=2, temperature=-1.0
    )
  with pytest.raises(ValueError, match="top_k"):
    kvjax.generate(
      PARAMS, tokens, config=CONFIG, max_new_tokens=2, temperature=1.0, top_k=0
    )
  with pytest.raises(ValueError, match="prompt_lengths"):
    kvjax.generate(
      PARAMS,
      tokens,
      config=CONFIG,
      max_new_tokens=2,
      prompt_lengths=jnp.array([12, 13]),
    )
  with pytest.raises(ValueError, match="token ids must be in"):
    kvjax.generate(
      PARAMS, tokens.at[0, 0].set(-3), config=CONFIG, max_new_tokens=2
    )
  with pytest.raises(TypeError, match="integer"):
    kvjax.generate(
      PARAMS, tokens.astype(jnp.float32), config=CONFIG, max_new_tokens=2
    )


# SnapKV reads the observed queries, H2O the attention mass (Expected
# Attention reads queries as SnapKV does).
@pytest.mark.parametrize("needs", [None, "snapkv", "h2o"])
def test_chunked_prefill_equals_one_call(needs):
  from kvjax import compress  # pylint: disable=g-import-not-at-top

  transform = {
    None: None,
    "snapkv": compress.snapkv(0.5, window_size=8),
    "expected_attention": compress.expected_attention(0.5),
    "h2o": compress.h2o(0.5),
  }[needs]
  tokens = _tokens(T=50)
  lengths = jnp.array([50, 23])
  one_logits, one = kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    prompt_lengths=lengths,
    transform=transform,
    capacity=60,
  )
  chunked_logits, chunked = kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    prompt_lengths=lengths,
    transform=transform,
    capacity=60,
    prefill_chunk=16,
  )
  valid = np.arange(50)[None] < np.asarray(lengths)[:, None]
  np.testing.assert_allclose(
    np.asarray(chunked_logits)[valid], np.asarray(one_logits)[valid], atol=2e-5
  )
  np.testing.assert_array_equal(chunked.pos, one.pos)
  np.testing.assert_allclose(chunked.k, one.k, atol=2e-5)
  out = kvjax.generate(
    PARAMS,
    tokens,
    config=CONFIG,
    max_new_tokens=4,
    prompt_lengths=lengths,
    prefill_chunk=16,
    transform=transform,
  )
  ref = kvjax.generate(
    PARAMS,
    tokens,
    config=CONFIG,
    max_new_tokens=4,
    prompt_lengths=lengths,
    transform=transform,
  )
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  with pytest.raises(ValueError, match="prefill_chunk"):
    kvjax.prefill(PARAMS, tokens, config=CONFIG, prefill_chunk=0)


def test_decode_continues_a_prefilled_cache_like_generate():
  from kvjax import compress  # pylint: disable=g-import-not-at-top

  tokens = _tokens()
  for transform in (
    None,
    compress.tova(0.5),
    compress.snapkv(0.5, window_size=4),
  ):
    ref = kvjax.generate(
      PARAMS, tokens, config=CONFIG, max_new_tokens=6, transform=transform
    )
    logits, cache = kvjax.prefill(
      PARAMS, tokens, config=CONFIG, transform=transform, capacity=12 + 5
    )
    first = logits[:, -1].argmax(-1).astype(jnp.int32)
    out, num, _ = kvjax.decode(
      PARAMS, cache, first, config=CONFIG, max_new_tokens=5, transform=transform
    )
    np.testing.assert_array_equal(out, ref.tokens[:, 1:])
    assert num.tolist() == [5, 5]
  with pytest.raises(ValueError, match="cache capacity exceeded"):
    kvjax.decode(PARAMS, cache, first, config=CONFIG, max_new_tokens=50)


def _snapkv_keep_by_hand(q, cache, observe_mask, budget, ctx_len):
  """Top-`budget` context positions per (layer, row, kv head) by the mean
  softmax attention of the observed queries over the context (kernel 1)."""
  q = np.asarray(q, np.float64)  # [L, B, T, N, H]
  k = np.asarray(cache.k, np.float64)[:, :, :, :ctx_len]  # [L, B, K, S, H]
  L, B, T, N, H = q.shape
  K = k.shape[2]
  kn = np.repeat(k, N // K, axis=2)
  logits = np.einsum("lbtnh,lbnsh->lbnts", q, kn) / np.sqrt(H)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  m = np.asarray(observe_mask, np.float64)
  mean = np.einsum("lbnts,bt->lbns", p, m) / m.sum(1)[None, :, None, None]
  s = mean.reshape(L, B, K, N // K, ctx_len).mean(3)
  return [
    [
      [set(np.argsort(-s[l, b, h])[:budget].tolist()) for h in range(K)]
      for b in range(B)
    ]
    for l in range(L)
  ]


@pytest.mark.parametrize("observe_all", [True, False])
def test_compress_observing_uses_the_question_queries(observe_all):
  """Question-aware SnapKV: the kept context entries are those the observed
  question queries attend to; the question is not written to the cache."""
  ctx_len, q_len, budget = 16, 5, 6
  tokens = _tokens(B=2, T=ctx_len + q_len, seed=3)
  context, question = tokens[:, :ctx_len], tokens[:, ctx_len:]
  _, cache = kvjax.prefill(
    PARAMS, context, config=CONFIG, capacity=ctx_len + q_len
  )
  observe_mask = np.ones((2, q_len), bool)
  if not observe_all:
    observe_mask[:, 1] = observe_mask[0, 3] = False
  transform = kvjax.compress.snapkv(
    budget=budget, window_size=64, kernel_size=1
  )
  out = kvjax.compress_observing(
    PARAMS,
    cache,
    question,
    config=CONFIG,
    transform=transform,
    observe_mask=jnp.asarray(observe_mask),
  )
  assert out.end.tolist() == [budget] * 2
  assert out.length.tolist() == [ctx_len] * 2
  assert out.capacity == budget + q_len
  _, _, aux = kvjax.forward(
    PARAMS, question, cache, config=CONFIG, capture=("q",)
  )
  want = _snapkv_keep_by_hand(aux["q"], cache, observe_mask, budget, ctx_len)
  pos, valid = np.asarray(out.pos), np.asarray(out.valid)
  for l in range(CONFIG.num_layers):
    for b in range(2):
      for h in range(CONFIG.num_kv_heads):
        got = set(pos[l, b, h][valid[l, b, h]].tolist())
        assert got == want[l][b][h], (l, b, h)


def test_compress_observing_checks_capacity_and_masks():
  tokens = _tokens(B=2, T=12)
  _, cache = kvjax.prefill(PARAMS, tokens[:, :8], config=CONFIG)
  transform = kvjax.compress.snapkv(budget=4)
  with pytest.raises(ValueError, match="capacity"):
    kvjax.compress_observing(
      PARAMS, cache, tokens[:, 8:], config=CONFIG, transform=transform
    )
  _, cache = kvjax.prefill(PARAMS, tokens[:, :8], config=CONFIG, capacity=12)
  with pytest.raises(ValueError, match="observe_mask"):
    kvjax.compress_observing(
      PARAMS,
      cache,
      tokens[:, 8:],
      config=CONFIG,
      transform=transform,
      observe_mask=jnp.ones((2, 3), bool),
    )
  with pytest.raises(ValueError, match="transform"):
    kvjax.compress_observing(
      PARAMS, cache, tokens[:, 8:], config=CONFIG, transform=None
    )


@pytest.mark.parametrize("name", ["snapkv", "h2o", "expected_attention"])
def test_compress_cache_from_captures_equals_prefill_with_transform(name):
  """One forward's captures serve any transform: the same cache as
  prefill(transform=...)."""
  # SnapKV's window must be shorter than the 24-token context (a window
  # covering it all is refused as degenerate).
  kw = dict(window_size=8) if name == "snapkv" else {}
  transform = getattr(kvjax.compress, name)(ratio=0.5, **kw)
  tokens = _tokens(B=2, T=24, seed=5)
  _, want = kvjax.prefill(
    PARAMS, tokens, config=CONFIG, transform=transform, capacity=30
  )
  cache = kvjax.init_cache(CONFIG, 2, 30)
  _, cache, aux = kvjax.forward(
    PARAMS,
    tokens,
    cache,
    config=CONFIG,
    capture=("q", "q_pre_rope", "attn_mass"),
  )
  positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
  got = kvjax.compress_cache(
    cache,
    transform,
    config=CONFIG,
    observed=aux,
    positions=positions,
    mask=jnp.ones((2, 24), bool),
    reserve=6,
  )
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-6
    )
  with pytest.raises(ValueError, match="observed lacks"):
    kvjax.compress_cache(
      cache,
      transform,
      config=CONFIG,
      observed={},
      positions=positions,
      mask=jnp.ones((2, 24), bool),
    )


def test_attn_mass_capture_runs_on_coded_caches():
  """The attention-mass capture counts slots from `pos`, not from the
  payload's array shape (a CodedKV / TailedKV has none)."""
  from kvjax import compress  # pylint: disable=g-import-not-at-top

  tokens = _tokens(T=24)
  # H2O reads the mass at every decode step, here over a CodedKV payload.
  transform = compress.chain(compress.h2o(ratio=0.5), compress.uniform(4))
  out = kvjax.generate(
    PARAMS, tokens, config=CONFIG, max_new_tokens=4, transform=transform
  )
  assert out.tokens.shape == (2, 4)
  assert isinstance(out.cache.k, kvjax.cache.CodedKV)
  # A KIVI cache (a TailedKV payload), captured through forward.
  _, cache = kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    capacity=28,
    transform=compress.kivi(2, group_size=8, residual=16),
  )
  assert isinstance(cache.k, kvjax.cache.TailedKV)
  mask = jnp.array([[True, True], [True, False]])
  _, _, aux = kvjax.forward(
    PARAMS,
    tokens[:, :2],
    cache,
    config=CONFIG,
    token_mask=mask,
    capture=("attn_mass",),
  )
  mass = np.asarray(aux["attn_mass"])
  assert mass.shape == (CONFIG.num_layers, 2, CONFIG.num_heads, cache.capacity)
  # Each live query's attention sums to one; the padding query adds none.
  np.testing.assert_allclose(mass.sum(-1)[:, 0], 2.0, atol=1e-5)
  np.testing.assert_allclose(mass.sum(-1)[:, 1], 1.0, atol=1e-5)


@pytest.mark.parametrize(
  "make",
  [
    lambda c: c.streaming_llm(ratio=0.5, every=4),
    lambda c: c.h2o(ratio=0.5, every=2),
  ],
  ids=["streaming_llm_every4", "h2o_every2"],
)
def test_decode_accepts_decode_time_policies_acting_every_few_steps(make):
  """decode() needs room for the `every` writes between two evictions (what
  prefill leaves), not for all of max_new_tokens; it decodes as generate."""
  from kvjax import compress  # pylint: disable=g-import-not-at-top

  transform = make(compress)
  tokens = _tokens()
  logits, cache = kvjax.prefill(
    PARAMS, tokens, config=CONFIG, transform=transform
  )
  assert cache.capacity == int(cache.end.max()) + transform.every
  first = logits[:, -1].argmax(-1).astype(jnp.int32)
  out, num, after = kvjax.decode(
    PARAMS, cache, first, config=CONFIG, max_new_tokens=12, transform=transform
  )
  assert out.shape == (2, 12) and num.tolist() == [12, 12]
  assert after.capacity == cache.capacity
  assert not kvjax.cache.cache_overflowed(after)
  ref = kvjax.generate(
    PARAMS, tokens, config=CONFIG, max_new_tokens=13, transform=transform
  )
  np.testing.assert_array_equal(out, ref.tokens[:, 1:])
  # Honest: 2 tokens without an eviction leave room for fewer than `every`
  # further writes, so another decode call (its step count restarts) must
  # fail up front rather than drop writes.
  _, _, part = kvjax.decode(
    PARAMS, cache, first, config=CONFIG, max_new_tokens=2, transform=transform
  )
  if transform.every > 2:
    with pytest.raises(
      ValueError, match="cache capacity exceeded: decoding with streaming_llm"
    ):
      kvjax.decode(
        PARAMS,
        part,
        first,
        config=CONFIG,
        max_new_tokens=12,
        transform=transform,
      )
