"""`kvjax.compress.spkv`: SP-KV's hard write gate as a transform.

The hard gate keeps exactly the entries with u >= tau plus the next
query's window, per (layer, row, kv head); the reserve, the bytes,
composition with codecs, decode-time gating, an end-to-end compress ->
question -> decode, and exactness: gated prefill -> spkv -> a question
(with the cached entries' utility) or decoded tokens compute what one
gated pass over everything computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax import model as model_lib
from kvjax.cache import cache_overflowed, kv_bytes, logical_bytes
from kvjax.compress import base
from kvjax.compress.spkv import SPKVState, cache_utility, kept_counts, spkv
from kvjax.generate import compress_cache

CONFIG = kvjax.get_config("tiny", num_layers=2, d_model=64, mlp_dim=128)
PARAMS = model_lib.add_write_gate(
  kvjax.init_params(CONFIG, jax.random.key(0), std=0.1),
  CONFIG,
  jax.random.key(1),
  open_bias=0.0,
  std=0.3,
)  # u spread around 0.5: about half the entries pass tau = 0.5
B, T, W, TAU, R = 2, 24, 5, 0.5, 4
TOKENS = jax.random.randint(jax.random.key(2), (B, T), 1, CONFIG.vocab_size)
LENGTHS = np.array([24, 17])  # ragged rows (right padding)
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
HARD = model_lib.WriteGate("hard", W, TAU)


@jax.jit
def _prefill(tokens, mask):
  return kvjax.forward(
    PARAMS,
    tokens,
    kvjax.init_cache(CONFIG, B, T),
    config=CONFIG,
    token_mask=mask,
    capture=("write_utility",),
    write_gate=HARD,
  )


PREFILL = _prefill(TOKENS, MASK)
U = np.asarray(PREFILL.aux["write_utility"])  # [L, B, T, K]
POSITIONS = np.cumsum(MASK, axis=1) - 1


def _compress(transform, reserve=R):
  return compress_cache(
    PREFILL.cache,
    transform,
    config=CONFIG,
    observed=PREFILL.aux,
    positions=POSITIONS,
    mask=MASK,
    reserve=reserve,
  )


def _want(l, b, k):
  """The positions the hard gate keeps, by hand."""
  n = LENGTHS[b]
  # The next query (position n) sees positions > n - W unbiased.
  return [t for t in range(n) if U[l, b, t, k] >= TAU or t > n - W]


def _kept(cache, l, b, k):
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  return sorted(pos[l, b, k][valid[l, b, k]].tolist())


def test_hard_gate_writes_exactly_u_above_tau_plus_the_window():
  assert 0.2 < (U >= TAU).mean() < 0.8  # the gate decides something
  counts = kept_counts(U, MASK, TAU, W)
  cap = int(counts.max())
  out = _compress(spkv(TAU, W, capacity=cap))
  L, _, K = counts.shape
  for l in range(L):
    for b in range(B):
      for k in range(K):
        assert _kept(out, l, b, k) == _want(l, b, k), (l, b, k)
        assert counts[l, b, k] == len(_want(l, b, k))
  # Physically smaller: the largest head budget + the reserve.
  assert out.capacity == cap + R < T
  # Variable head budgets: padding is reported, not hidden.
  assert logical_bytes(out) < kv_bytes(out)
  # The state carries each kept entry's utility with it.
  util = np.asarray(out.state.utility)
  pos, valid = np.asarray(out.pos), np.asarray(out.valid)
  l, b, k = 1, 0, 1
  for s in np.flatnonzero(valid[l, b, k]):
    assert util[l, b, k, s] == U[l, b, pos[l, b, k, s], k]


def test_reserve_holds_and_overflow_raises():
  cap = int(kept_counts(U, MASK, TAU, W).max())
  out = _compress(spkv(TAU, W, capacity=cap))
  room = out.capacity - np.asarray(out.end)
  assert room.min() == R  # the fullest row: exactly the reserve
  more = jnp.ones((B, R), jnp.int32)
  kvjax.forward(PARAMS, more, out, config=CONFIG)  # R tokens fit
  with pytest.raises(ValueError):
    kvjax.forward(PARAMS, jnp.ones((B, R + 1), jnp.int32), out, config=CONFIG)
  # A capacity below the largest head budget is an overflow, never a
  # silent cut.
  with pytest.raises(ValueError):
    _compress(spkv(TAU, W, capacity=cap - 1))


def test_bytes_are_exact_and_compose_with_a_codec():
  cap = int(kept_counts(U, MASK, TAU, W).max())
  gate = spkv(TAU, W, capacity=cap)
  out = _compress(gate)
  L, K, H = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim
  kept = int(np.asarray(out.valid).sum())
  assert kept == int(kept_counts(U, MASK, TAU, W).sum())
  assert logical_bytes(out) == kept * 2 * H * 4  # k and v, float32
  assert base.live_counts(out).max() == cap
  payload = 2 * L * B * K * out.capacity * H * 4
  assert kv_bytes(out) > payload  # bookkeeping and the state on top
  # chain(spkv, fp8): the same entries, stored in 8 bits + a float16 scale.
  coded = _compress(compress.chain(gate, compress.fp8()))
  np.testing.assert_array_equal(coded.valid, out.valid)
  np.testing.assert_array_equal(coded.pos, out.pos)
  assert logical_bytes(coded) == kept * 2 * (H + 2)


def test_transform_is_a_value_and_checks_its_arguments():
  assert spkv(0.5, 8) == spkv(0.5, 8) and hash(spkv(0.5, 8)) == hash(
    spkv(0.5, 8)
  )
  assert spkv(0.5, 8) != spkv(0.6, 8)
  assert spkv().needs == ("write_utility",)
  for bad in (
    dict(tau=1.5),
    dict(tau=-0.1),
    dict(window=0),
    dict(capacity=0),
    dict(every=0),
  ):
    with pytest.raises(ValueError):
      spkv(**bad)
  with pytest.raises(ValueError, match="write gates"):
    compress_cache(
      PREFILL.cache,
      spkv(TAU, W),
      config=CONFIG,
      observed={"write_utility": None},
      positions=POSITIONS,
      mask=MASK,
    )


def test_compress_question_decode_end_to_end(count_compiles):
  """Compress the context, feed a question (plain forward: its entries are
  admitted), then decode through the transform: every step records the new
  entry's utility and drops the entries leaving the window below tau; the
  cache never holds an old entry below tau, and decode compiles once."""
  cap = int(kept_counts(U, MASK, TAU, W).max())
  steps, question = 8, TOKENS[:, :3]
  gate = spkv(TAU, W, capacity=cap)
  # Room for the question and the decode steps.
  cache = _compress(gate, reserve=3 + steps)
  _, cache, _ = kvjax.forward(PARAMS, question, cache, config=CONFIG)
  state = cache.state

  @jax.jit
  def step(cache, state, token, i):
    q_pos = cache.length[:, None]
    logits, cache, aux = kvjax.forward(
      PARAMS, token, cache, config=CONFIG, capture=("write_utility",)
    )
    ctx = base.CompressContext(
      phase="decode",
      step=i,
      q_pos=q_pos,
      q_mask=jnp.ones((B, 1), bool),
      write_utility=aux["write_utility"],
    )
    cache, state = gate.apply(cache, state, ctx)
    return jnp.argmax(logits[:, -1], -1)[:, None], cache, state, aux

  token = jnp.ones((B, 1), jnp.int32)
  decoded = {}  # position -> [L, K] utility, per row
  with count_compiles() as c:
    for i in range(steps):
      pos_before = np.asarray(cache.length)
      token, cache, state, aux = step(cache, state, token, jnp.int32(i + 1))
      u_step = np.asarray(aux["write_utility"])  # [L, B, 1, K]
      for b in range(B):
        decoded[(b, int(pos_before[b]))] = u_step[:, b, 0]
  assert c["n"] == 1
  assert isinstance(state, SPKVState)
  assert not bool(np.any(cache_overflowed(cache)))
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  newest = np.asarray(cache.length) - 1
  q_lo = LENGTHS  # the question's first position per row
  for l in range(CONFIG.num_layers):
    for b in range(B):
      for k in range(CONFIG.num_kv_heads):
        kept = set(pos[l, b, k][valid[l, b, k]].tolist())
        for p in range(newest[b] + 1):
          recent = p > newest[b] + 1 - W  # in the next query's window
          if p < LENGTHS[b]:  # context: the prefill's utility
            want = U[l, b, p, k] >= TAU or recent
          elif p < q_lo[b] + 3:  # question: admitted (no utility seen)
            want = True
          else:  # decoded: gated as it leaves the window
            want = decoded[(b, p)][l, k] >= TAU or recent
          assert (p in kept) == want, (l, b, k, p)


def test_generate_through_spkv():
  """`kvjax.generate` with spkv: prefill (ragged rows), compress, decode
  with the decode-time gate. Layer 0's utility depends on the tokens only,
  so its kept context entries are known from the hard prefill's."""
  cap = int(kept_counts(U, MASK, TAU, W).max())
  out = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=6,
    prompt_lengths=jnp.asarray(LENGTHS),
    transform=spkv(TAU, W, capacity=cap),
  )
  cache = out.cache
  assert cache.capacity <= cap + 6
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  util = np.asarray(cache.state.utility)
  newest = np.asarray(cache.length) - 1
  for b in range(B):
    recent = pos[:, b] > newest[b] + 1 - W
    # No entry outside the next query's window below tau survives.
    assert np.all(~valid[:, b] | recent | (util[:, b] >= TAU))
    for k in range(CONFIG.num_kv_heads):
      kept = set(pos[0, b, k][valid[0, b, k]].tolist())
      for p in range(LENGTHS[b]):
        want = U[0, b, p, k] >= TAU or p > newest[b] + 1 - W
        assert (p in kept) == want, (b, k, p)


def test_spkv_after_a_prefill_policy_in_a_chain():
  """A policy that compacts first (KNorm at 0.5), then the gate: the gate
  keeps, of KNorm's survivors, exactly those with u >= tau or in the
  window (the chain's state was built on the uncompacted cache)."""
  knorm = compress.knorm(0.5)
  first = _compress(knorm, reserve=0)
  out = _compress(compress.chain(knorm, spkv(TAU, W)))
  for l in range(CONFIG.num_layers):
    for b in range(B):
      for k in range(CONFIG.num_kv_heads):
        survived = set(_kept(first, l, b, k))
        want = sorted(survived & set(_want(l, b, k)))
        assert _kept(out, l, b, k) == want, (l, b, k)


def test_a_gated_model_is_not_exported_without_its_gate(tmp_path):
  from kvjax import hf

  with pytest.raises(ValueError, match="write gate"):
    hf.save_pretrained(str(tmp_path), PARAMS, CONFIG)


# ----------------------------------------------------------------------------
# Exactness: the compressed path computes one gated pass.

CTX, QN = 14, 8  # context and question tokens (the question crosses W = 5)


@jax.jit
def _one_pass(tokens):
  """Logits of one hard-gated pass over all of `tokens`."""
  n = tokens.shape[1]
  return kvjax.forward(
    PARAMS,
    tokens,
    kvjax.init_cache(CONFIG, B, n),
    config=CONFIG,
    write_gate=HARD,
  ).logits


def test_gated_prefill_spkv_question_equals_one_gated_pass():
  """Prefill the context under the gate, compress with spkv (physically
  smaller), feed the question with the gate and the cached entries'
  utility: its logits are one gated pass's. Without the utility the
  entries below tau still in the window at compression stay visible to
  the later question tokens: the logits differ (the test can fail)."""
  ctx, question = TOKENS[:, :CTX], TOKENS[:, CTX : CTX + QN]
  pre = kvjax.forward(
    PARAMS,
    ctx,
    kvjax.init_cache(CONFIG, B, CTX),
    config=CONFIG,
    capture=("write_utility",),
    write_gate=HARD,
  )
  u = pre.aux["write_utility"]
  ones = np.ones((B, CTX), bool)
  pos = np.broadcast_to(np.arange(CTX), (B, CTX))
  cap = int(kept_counts(np.asarray(u), ones, TAU, W).max())
  cache = compress_cache(
    pre.cache,
    spkv(TAU, W, capacity=cap),
    config=CONFIG,
    observed=pre.aux,
    positions=pos,
    mask=ones,
    reserve=QN,
  )
  assert cache.capacity == cap + QN < CTX + QN
  utility = cache_utility(cache, u, pos, ones)
  # The state carries the same utilities.
  valid = np.asarray(cache.valid)
  np.testing.assert_array_equal(
    np.asarray(utility)[valid], np.asarray(cache.state.utility)[valid]
  )
  want = np.asarray(_one_pass(TOKENS[:, : CTX + QN]))[:, CTX:]
  got = kvjax.forward(
    PARAMS,
    question,
    cache,
    config=CONFIG,
    write_gate=HARD,
    cache_utility=utility,
  ).logits
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
  leaky = kvjax.forward(PARAMS, question, cache, config=CONFIG).logits
  assert np.abs(np.asarray(leaky) - want).max() > 1e-3


def test_generate_under_the_gate_decodes_one_gated_pass():
  """`generate(write_gate=, transform=spkv)`: gated prefill, compression,
  then decode steps whose spkv action drops each entry below tau as it
  leaves the next query's window: the greedy tokens and their logits are
  one gated pass's over prompt + generated tokens."""
  n_new = 7
  prompt = TOKENS[:, :CTX]
  cap = int(
    kept_counts(
      np.asarray(PREFILL.aux["write_utility"])[:, :, :CTX],
      np.ones((B, CTX), bool),
      TAU,
      W,
    ).max()
  )
  out = kvjax.generate(
    PARAMS,
    prompt,
    config=CONFIG,
    max_new_tokens=n_new,
    transform=spkv(TAU, W, capacity=cap),
    write_gate=HARD,
  )
  assert out.cache.capacity < CTX + n_new
  seq = jnp.concatenate([prompt, out.tokens[:, : n_new - 1]], axis=1)
  logits = np.asarray(_one_pass(seq))[:, CTX - 1 :]  # predicts each new token
  np.testing.assert_array_equal(np.argmax(logits, -1), np.asarray(out.tokens))
  np.testing.assert_allclose(
    np.asarray(out.prompt_logits), logits[:, 0], atol=2e-5, rtol=1e-5
  )


@pytest.mark.parametrize("codec", ["kivi", "turboquant"])
def test_spkv_then_codec_generates_under_the_gate(codec, count_compiles):
  """The composition contract on a gated model: chain(spkv, codec) through
  generate, ragged rows, no overflow, and an equal transform built anew
  compiles nothing; a windowed codec (KIVI) after it is refused at
  construction, saying why (spkv evicts during decode)."""
  make = {
    "kivi": lambda: compress.kivi(2, group_size=4, residual=8),
    "turboquant": lambda: compress.turboquant(3),
  }[codec]
  cap = int(kept_counts(U, MASK, TAU, W).max())
  chain = lambda: compress.chain(spkv(TAU, W, capacity=cap), make())
  if codec == "kivi":  # its grouped window cannot lose entries one by one
    with pytest.raises(ValueError, match="evicts during decode"):
      chain()
    return
  shifted = (TOKENS + 3) % CONFIG.vocab_size
  kw = dict(
    config=CONFIG,
    max_new_tokens=4,
    prompt_lengths=jnp.asarray(LENGTHS),
    write_gate=HARD,
  )
  out = kvjax.generate(PARAMS, TOKENS, transform=chain(), **kw)
  assert (np.asarray(out.num_generated) == 4).all()
  assert not bool(np.any(cache_overflowed(out.cache)))
  assert out.cache.capacity < T
  with count_compiles() as c:
    kvjax.generate(PARAMS, shifted, transform=chain(), **kw)
  assert c["n"] == 0


def test_gate_arguments_are_checked():
  with pytest.raises(ValueError, match="pass write_gate too"):
    kvjax.forward(
      PARAMS,
      TOKENS[:, :2],
      kvjax.init_cache(CONFIG, B, 4),
      config=CONFIG,
      cache_utility=jnp.ones((CONFIG.num_layers, B, CONFIG.num_kv_heads, 4)),
    )
  with pytest.raises(ValueError, match="cache_utility must have shape"):
    kvjax.forward(
      PARAMS,
      TOKENS[:, :2],
      kvjax.init_cache(CONFIG, B, 4),
      config=CONFIG,
      write_gate=HARD,
      cache_utility=jnp.ones((1, B, 1, 4)),
    )
  with pytest.raises(ValueError, match="prefill_chunk must be None"):
    kvjax.prefill(
      PARAMS, TOKENS, config=CONFIG, write_gate=HARD, prefill_chunk=8
    )
  with pytest.raises(ValueError, match="reference backend"):
    kvjax.prefill(PARAMS, TOKENS, config=CONFIG, write_gate=HARD, backend="xla")
  # Decode steps stay gated only through spkv acting every step.
  for transform in (None, spkv(TAU, W, every=2), compress.snapkv(0.5)):
    with pytest.raises(ValueError, match="every step"):
      kvjax.generate(
        PARAMS,
        TOKENS,
        config=CONFIG,
        max_new_tokens=2,
        write_gate=HARD,
        transform=transform,
      )
  plain = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
  with pytest.raises(ValueError, match="no 'write_gate'"):
    kvjax.generate(
      plain, TOKENS, config=CONFIG, max_new_tokens=2, write_gate=HARD
    )
