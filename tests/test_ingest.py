"""kvjax.ingest: reading the context more than once before compression.

The cache keeps exactly the last read (the entries of positions
[(passes - 1) n, passes n) of a row of n tokens), as physically small as a
single read's cache; the question continues after the last read; the
differentiable training path computes the same logits; any transform
chains after it, the reserve holds, and decode runs end to end.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress, ingest

CONFIG = kvjax.get_config("tiny", num_layers=2, d_model=64, mlp_dim=128)
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
T, R = 40, 6
CONTEXT = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)
LENGTHS = jnp.array([40, 29])
QUESTION = jax.random.randint(jax.random.key(2), (2, 4), 1, CONFIG.vocab_size)


def test_repeat_context_repeats_each_row_contiguously():
  many, lengths = ingest.repeat_context(CONTEXT, LENGTHS, 3)
  many, ctx = np.asarray(many), np.asarray(CONTEXT)
  assert many.shape == (2, 3 * T)
  np.testing.assert_array_equal(lengths, [120, 87])
  np.testing.assert_array_equal(many[0], np.tile(ctx[0], 3))
  np.testing.assert_array_equal(many[1, :87], np.tile(ctx[1, :29], 3))
  with pytest.raises(ValueError, match="passes"):
    ingest.repeat_context(CONTEXT, LENGTHS, 0)


def test_one_pass_is_a_plain_prefill():
  got = ingest.reread(
    PARAMS, CONTEXT, config=CONFIG, passes=1, prompt_lengths=LENGTHS
  )
  want = kvjax.prefill(PARAMS, CONTEXT, config=CONFIG, prompt_lengths=LENGTHS)
  for g, w in zip(
    jax.tree.leaves(got.cache), jax.tree.leaves(want.cache), strict=True
  ):
    np.testing.assert_array_equal(g, w)


def test_the_cache_keeps_exactly_the_last_read():
  passes = 3
  out = ingest.reread(
    PARAMS,
    CONTEXT,
    config=CONFIG,
    passes=passes,
    prompt_lengths=LENGTHS,
    reserve=R,
  )
  cache = out.cache
  # Physically one read: the capacity a single read with the reserve has.
  single = kvjax.prefill(
    PARAMS,
    CONTEXT,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    capacity=T + R,
  ).cache
  assert cache.capacity == T + R
  assert kvjax.kv_bytes(cache) == kvjax.kv_bytes(single)
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  for b, n in enumerate(np.asarray(LENGTHS)):
    want = np.arange((passes - 1) * n, passes * n)
    for layer in range(CONFIG.num_layers):
      for k in range(CONFIG.num_kv_heads):
        np.testing.assert_array_equal(
          pos[layer, b, k][valid[layer, b, k]], want
        )
  np.testing.assert_array_equal(cache.length, passes * np.asarray(LENGTHS))
  # The kept entries are the full prefill's: its keys at those positions.
  many, lengths = ingest.repeat_context(CONTEXT, LENGTHS, passes)
  _, full, aux = kvjax.forward(
    PARAMS,
    many,
    kvjax.init_cache(CONFIG, 2, passes * T),
    config=CONFIG,
    token_mask=jnp.arange(passes * T)[None] < lengths[:, None],
    capture=("k",),
  )
  k_row0 = np.asarray(aux["k"])[
    :, 0, (passes - 1) * T : passes * T
  ]  # [L,T,K,H]
  np.testing.assert_allclose(
    np.asarray(cache.k)[:, 0, :, :T], k_row0.transpose(0, 2, 1, 3), atol=1e-5
  )


def test_question_logits_equal_the_training_path():
  """The question continues at passes * n and reads only the last read,
  as the differentiable `reread_logits` computes it."""
  out = ingest.reread(PARAMS, CONTEXT, config=CONFIG, passes=2, reserve=4)
  logits, _, _ = kvjax.forward(PARAMS, QUESTION, out.cache, config=CONFIG)
  train = ingest.reread_logits(
    PARAMS,
    CONTEXT,
    QUESTION,
    jnp.ones(QUESTION.shape, bool),
    config=CONFIG,
    passes=2,
  )
  np.testing.assert_allclose(logits, train, atol=2e-5, rtol=2e-5)
  # Not the single read's answer: the second read computed other entries.
  single = ingest.reread(PARAMS, CONTEXT, config=CONFIG, passes=1, reserve=4)
  one, _, _ = kvjax.forward(PARAMS, QUESTION, single.cache, config=CONFIG)
  assert np.max(np.abs(np.asarray(one) - np.asarray(logits))) > 1e-3


def test_compress_the_last_read_then_question_then_decode(count_compiles):
  """reread -> SnapKV at 0.5 on the last read -> question -> decode; the
  reserve holds exactly, and an equal transform compiles nothing new."""
  run = lambda: ingest.reread(
    PARAMS,
    CONTEXT,
    config=CONFIG,
    passes=2,
    prompt_lengths=LENGTHS,
    transform=compress.snapkv(0.5, window_size=8),
    reserve=R + 3,
  )
  out = run()
  cache = out.cache
  kept = np.asarray(cache.valid).sum(-1)  # [L, B, K]
  np.testing.assert_array_equal(kept[:, 0], 20)
  np.testing.assert_array_equal(kept[:, 1], 14)
  pos = np.asarray(cache.pos)[:, 1][np.asarray(cache.valid)[:, 1]]
  assert (pos >= 29).all() and (pos < 58).all()  # the second read only
  assert cache.capacity - int(np.max(cache.end)) == R + 3
  logits, cache, _ = kvjax.forward(PARAMS, QUESTION, cache, config=CONFIG)
  dec = kvjax.decode(
    PARAMS,
    cache,
    jnp.argmax(logits[:, -1], -1),
    config=CONFIG,
    max_new_tokens=3,
  )
  assert (np.asarray(dec.num_generated) == 3).all()
  # The decoded tokens continue at 2n + 4 (the question took 2n..2n+3).
  np.testing.assert_array_equal(
    dec.cache.length, 2 * np.asarray(LENGTHS) + 4 + 3
  )
  with pytest.raises(ValueError, match="capacity"):
    kvjax.forward(
      PARAMS,
      jnp.ones((2, 4), jnp.int32),
      dec.cache,
      config=CONFIG,
    )
  with count_compiles() as c:
    run()
  assert c["n"] == 0
  assert ingest.last_read(2) == ingest.last_read(2)
  assert hash(ingest.last_read(2)) == hash(ingest.last_read(2))


@pytest.mark.parametrize(
  "policy", [compress.streaming_llm(0.5), compress.expected_attention(0.5)]
)
def test_sinks_after_a_reread_are_the_last_reads_first_positions(policy):
  """Attention sinks are the first positions the cache holds: after two
  reads, the last read's first 4 (positions 0-3 left with the first
  read), so StreamingLLM and Expected Attention keep sinks on a re-read
  context as on a plain one."""
  for passes in (1, 2):
    out = ingest.reread(
      PARAMS,
      CONTEXT,
      config=CONFIG,
      passes=passes,
      transform=policy,
      prompt_lengths=LENGTHS,
    )
    pos, valid = np.asarray(out.cache.pos), np.asarray(out.cache.valid)
    for b, n in enumerate([40, 29]):
      start = (passes - 1) * n
      kept = pos[:, b][valid[:, b]]
      for sink in range(start, start + 4):
        assert np.all(np.sum(pos[:, b] == sink, axis=-1) == 1), (passes, b)
      assert kept.min() == start


def test_bad_arguments():
  with pytest.raises(ValueError, match="passes"):
    ingest.last_read(0)
  with pytest.raises(ValueError, match="reserve"):
    ingest.reread(PARAMS, CONTEXT, config=CONFIG, reserve=-1)
  # H2O's attention mass covers every read's slots: refused, not misread.
  with pytest.raises(ValueError, match="attn_mass"):
    ingest.reread(
      PARAMS, CONTEXT, config=CONFIG, transform=compress.h2o(0.5), reserve=4
    )
  # TOVA's prefill scores come from the last read's queries (its per-slot
  # attention is a decode-time capture over the compressed cache): runs.
  out = ingest.reread(
    PARAMS, CONTEXT, config=CONFIG, transform=compress.tova(0.5), reserve=4
  )
  assert int(np.asarray(out.cache.valid).sum(-1).max()) <= T // 2 + 1
