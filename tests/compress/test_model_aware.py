"""Model-aware and decode-time policies (`kvjax.compress.model_aware`):
each definition against a small numpy computation, the model in the
compression context, argument errors, and each method's own contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax.compress import base
from kvjax.compress import model_aware as ma
from kvjax.compress import policies

CONFIG = kvjax.get_config("tiny")
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
T = 64
LENGTHS = jnp.array([64, 45])
TOKENS = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)
_FORWARD = jax.jit(kvjax.forward, static_argnames=("config", "capture"))


def _full_cache(tokens=TOKENS, lengths=LENGTHS, capacity=None):
  return kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    prompt_lengths=lengths,
    capacity=capacity,
  ).cache


def _kept(cache):
  """{(l, b, h, pos)} of a cache's live entries."""
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  return {
    (l, b, h, int(pos[l, b, h, s])) for l, b, h, s in zip(*np.nonzero(valid))
  }


def _top(scores, n):
  """Indices of the n best (ties to the lower index), numpy."""
  return set(np.argsort(-scores, kind="stable")[:n].tolist())


def _np_vnorm(cache, ord_=1):
  v = np.asarray(cache.v, np.float64)  # [L, B, K, S, H]
  wo = np.asarray(PARAMS["layers"]["wo"], np.float64)  # [L, N, H, D]
  L, B, K, S, H = v.shape
  G = wo.shape[1] // K
  out = np.zeros((L, B, K, S))
  for l in range(L):
    for k in range(K):
      for g in range(G):
        p = v[l, :, k] @ wo[l, k * G + g]  # [B, S, D]
        out[l, :, k] += (
          np.abs(p).sum(-1) if ord_ == 1 else np.sqrt((p * p).sum(-1))
        ) / G
  return out


# ----------------------------------------------------------------------------
# The model in the compression context.


def _probe(needs, seen):
  def apply(cache, state, ctx):
    seen.append(ctx)
    return cache, state

  return base.KVTransform(
    init=lambda c: (), apply=apply, keeps=lambda n: n, needs=needs
  )


def test_context_carries_the_model_only_when_asked():
  seen = []
  kvjax.prefill(PARAMS, TOKENS, config=CONFIG, transform=_probe((), seen))
  kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=_probe(("params", "tokens"), seen),
  )
  plain, model = seen
  assert plain.params is None and plain.model_config is None
  assert plain.tokens is None
  assert model.model_config == CONFIG
  assert model.params["layers"]["wo"].shape == PARAMS["layers"]["wo"].shape
  assert model.tokens.shape == TOKENS.shape
  assert base.CompressContext("prefill", 0, None, None).params is None


def test_compress_cache_takes_params_for_model_aware_methods():
  cache = _full_cache()
  t = ma.criticalkv(0.5, scorer="knorm")
  args = dict(
    config=CONFIG,
    observed={},
    positions=jnp.zeros((2, 1), jnp.int32),
    mask=jnp.ones((2, 1), bool),
  )
  with pytest.raises(ValueError, match="needs the model's params"):
    kvjax.compress_cache(cache, t, **args)
  out = kvjax.compress_cache(cache, t, params=PARAMS, **args)
  ref = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS, transform=t
  ).cache
  assert _kept(out) == _kept(ref)


def test_output_value_norm_matches_numpy():
  cache = _full_cache()
  got = np.asarray(ma.output_value_norm(PARAMS, cache))
  np.testing.assert_allclose(got, _np_vnorm(cache), rtol=1e-4, atol=1e-5)
  got2 = np.asarray(ma.output_value_norm(PARAMS, cache, ord=2))
  np.testing.assert_allclose(got2, _np_vnorm(cache, 2), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# CriticalKV / CriticalAdaKV against numpy (knorm base scores).


@pytest.mark.parametrize("ratio", [0.7])
def test_criticalkv_matches_numpy(ratio):
  cache = _full_cache()
  out = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=ma.criticalkv(ratio, scorer="knorm", epsilon=1e-4),
  ).cache
  k = np.asarray(cache.k, np.float64)
  s_all = -np.linalg.norm(k, axis=-1)
  vn = _np_vnorm(cache)
  L, B, K = k.shape[:3]
  want = set()
  for b in range(B):
    live = int(LENGTHS[b])
    n = max(1, int(live * (1 - ratio)))
    n1 = max(1, int((1 - ratio) * live * 0.5))
    for l in range(L):
      for h in range(K):
        s = s_all[l, b, h, :live]
        first = _top(s, n1)
        s2 = (s + 1e-4) * vn[l, b, h, :live]
        s2[list(first)] = np.inf
        want |= {(l, b, h, p) for p in _top(s2, n)}
  assert _kept(out) == want
  assert out.capacity == max(1, int(T * (1 - ratio)))


@pytest.mark.parametrize("ratio", [0.6])
def test_critical_adakv_matches_numpy_and_reports_padding(ratio):
  cache = _full_cache()
  out = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=ma.critical_adakv(ratio, scorer="knorm"),
  ).cache
  k = np.asarray(cache.k, np.float64)
  s_all = -np.linalg.norm(k, axis=-1)
  vn = _np_vnorm(cache)
  L, B, K = k.shape[:3]
  want = set()
  for b in range(B):
    live = int(LENGTHS[b])
    n = max(1, int(live * (1 - ratio)))
    n_safe = max(1, int(n * 0.2))
    for l in range(L):
      s = s_all[l, b, :, :live].copy()
      for h in range(K):
        s[h, list(_top(s[h], n_safe))] = np.inf
      flat = _top(s.reshape(-1), K * n)
      budgets = [sum(1 for i in flat if i // live == h) for h in range(K)]
      for h in range(K):
        s[h, list(_top(s[h], int(budgets[h] * 0.5)))] = np.inf
        s2 = (s[h] + 1e-4) * vn[l, b, h, :live]
        want |= {(l, b, h, p) for p in _top(s2, budgets[h])}
  assert _kept(out) == want
  n = max(1, int(T * (1 - ratio)))
  assert out.capacity == min(T, 2 * n - max(1, int(n * 0.2)))
  assert kvjax.logical_bytes(out) <= kvjax.kv_bytes(out)


def test_criticalkv_with_snapkv_keeps_the_budget_and_compiles_once(
  count_compiles,
):
  run = lambda: kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=ma.criticalkv(0.5, scorer=policies.snapkv_scorer(16)),
  )
  out = run()
  live = np.asarray(base.live_counts(out.cache))
  assert (live[:, 0] == 32).all() and (live[:, 1] == 22).all()
  with count_compiles() as c:
    run()
  assert c["n"] == 0


# ----------------------------------------------------------------------------
# Finch.


def _np_finch(q, k, valid, pos, q_pos, start, normalize=True):
  """Finch scores of one (layer, row): q [Tq, N, H] (the question), k [K,
  S, H]; context = valid & pos < start; others max + 1."""
  Tq, N, H = q.shape
  K = k.shape[0]
  G = N // K
  s = np.zeros((K, k.shape[1]))
  for h in range(K):
    for g in range(G):
      lg = q[:, h * G + g] @ k[h].T / np.sqrt(H)  # [Tq, S]
      vis = valid[h][None] & (pos[h][None] <= q_pos[:, None])
      lg = np.where(vis, lg, -np.inf)
      p = np.exp(lg - lg.max(-1, keepdims=True))
      p = p / p.sum(-1, keepdims=True)
      if normalize:
        p = p * q_pos[:, None]
      s[h] += p.mean(0) / G
  ctx = valid & (pos < start)
  top = s[ctx].max()
  return np.where(valid, np.where(ctx, s, top + 1.0), -np.inf)


def test_finch_observing_matches_numpy_then_answers_the_question():
  C, Q = 48, 12
  ctx_tokens, question = TOKENS[:, :C], TOKENS[:, C : C + Q]
  cache = kvjax.prefill(
    PARAMS, ctx_tokens, config=CONFIG, capacity=C + Q + 4
  ).cache
  t = ma.finch(0.5)
  out = kvjax.compress_observing(
    PARAMS, cache, question, config=CONFIG, transform=t, reserve=Q + 1
  )
  _, _, aux = _FORWARD(PARAMS, question, cache, config=CONFIG, capture=("q",))
  q = np.asarray(aux["q"], np.float64)
  k = np.asarray(cache.k, np.float64)
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  want = set()
  for l in range(CONFIG.num_layers):
    for b in range(2):
      s = _np_finch(
        q[l, b], k[l, b], valid[l, b], pos[l, b], np.arange(C, C + Q), C
      )
      for h in range(CONFIG.num_kv_heads):
        want |= {(l, b, h, int(pos[l, b, h, i])) for i in _top(s[h], C // 2)}
  assert _kept(out) == want
  assert out.capacity == C // 2 + Q + 1  # the reserve: question + 1 step
  # Then the question, then decode.
  _, out, _ = kvjax.forward(PARAMS, question, out, config=CONFIG)
  gen = kvjax.decode(
    PARAMS, out, question[:, -1], config=CONFIG, max_new_tokens=1
  )
  assert gen.tokens.shape == (2, 1)


def test_finch_prefill_split_by_lengths_or_delimiter_ragged():
  D = 7
  toks = np.asarray(TOKENS).copy()
  toks[toks == D] = 8
  qlen = np.array([10, 6])
  for b in range(2):  # the delimiter right before each row's question
    toks[b, int(LENGTHS[b]) - qlen[b] - 1] = D
  toks = jnp.asarray(toks)
  args = dict(config=CONFIG, prompt_lengths=LENGTHS)
  by_len = kvjax.prefill(
    PARAMS, toks, transform=ma.finch(0.5), question_lengths=qlen, **args
  ).cache
  by_delim = kvjax.prefill(
    PARAMS, toks, transform=ma.finch(0.5, delimiter_token_id=D), **args
  ).cache
  assert _kept(by_len) == _kept(by_delim)
  kept = _kept(by_len)
  for b in range(2):
    live = int(LENGTHS[b])
    qs = range(live - qlen[b], live)
    for l in range(CONFIG.num_layers):
      for h in range(CONFIG.num_kv_heads):
        mine = {p for (ll, bb, hh, p) in kept if (ll, bb, hh) == (l, b, h)}
        assert len(mine) == max(1, int(live * 0.5))
        assert set(qs) <= mine  # the question is always kept
  with pytest.raises(base.Degenerate, match="covers all"):
    kvjax.prefill(PARAMS, toks, transform=ma.finch(0.5), **args)


def test_finch_chunks_keep_each_chunk_share():
  out = kvjax.prefill(
    PARAMS,
    TOKENS[:1],
    config=CONFIG,
    transform=ma.finch(0.5, chunk_length=20, window_size=8),
  ).cache
  for l, b, h in np.ndindex(CONFIG.num_layers, 1, CONFIG.num_kv_heads):
    pos = {p for (ll, bb, hh, p) in _kept(out) if (ll, bb, hh) == (l, b, h)}
    per_chunk = [
      sum(1 for p in pos if c * 20 <= p < c * 20 + 20) for c in range(4)
    ]
    assert per_chunk == [10, 10, 10, 2]
    # The question's entries: kept first in their chunk, newest first.
    assert {56, 57, 58, 59, 62, 63} <= pos
  assert out.capacity == 32


def test_finch_chunks_live_entries_after_an_earlier_eviction():
  """After knorm keeps 16 of 64 entries (positions up to 63), Finch's
  chunks are runs of live entries, not of positions: each chunk of 8 keeps
  its share and the question's window (the newest 4) survives."""
  t = compress.chain(
    compress.knorm(0.75), ma.finch(0.5, chunk_length=8, window_size=4)
  )
  out = kvjax.prefill(PARAMS, TOKENS[:1], config=CONFIG, transform=t).cache
  first = kvjax.prefill(
    PARAMS, TOKENS[:1], config=CONFIG, transform=compress.knorm(0.75)
  ).cache
  for l, h in np.ndindex(CONFIG.num_layers, CONFIG.num_kv_heads):
    before = sorted(p for (ll, _, hh, p) in _kept(first) if (ll, hh) == (l, h))
    kept = {p for (ll, _, hh, p) in _kept(out) if (ll, hh) == (l, h)}
    assert len(before) == 16 and len(kept) == 8, (l, h, kept)
    assert all(len(kept & set(before[c : c + 8])) == 4 for c in (0, 8))
    window = {p for p in before if p >= 60}  # the last 4 positions
    assert window <= kept, (window, kept)


# ----------------------------------------------------------------------------
# KVzip.


def _np_kvzip_row(tokens, live, chunk, prompt, cont, suffix, n_sink, post):
  """KVzip scores [L, K, live] of one row, from an uncompressed forward of
  context + replay per chunk (numpy softmax over sinks, chunk, replay)."""
  L, K = CONFIG.num_layers, CONFIG.num_kv_heads
  G = CONFIG.num_heads // K
  H = CONFIG.head_dim
  ctx = np.asarray(tokens[:live])
  out = np.zeros((L, K, live))
  for start in range(0, live, chunk):
    head = list(prompt if start == 0 else cont)
    if start:
      head += ctx[max(0, start - post) : start].tolist()
    piece = ctx[start : start + chunk].tolist()
    replay = head + list(suffix) + piece
    seq = jnp.asarray([ctx.tolist() + replay], jnp.int32)
    _, _, aux = _FORWARD(
      PARAMS,
      seq,
      kvjax.init_cache(CONFIG, 1, seq.shape[1]),
      config=CONFIG,
      capture=("q", "k"),
    )
    q = np.asarray(aux["q"][:, 0, live:], np.float64)  # [L, R, N, H]
    k = np.asarray(aux["k"][:, 0], np.float64)  # [L, live + R, K, H]
    R = q.shape[1]
    sink = min(n_sink, start)
    cols = list(range(sink)) + list(range(start, start + len(piece)))
    for l in range(L):
      for h in range(K):
        kk = np.concatenate([k[l, cols, h], k[l, live:, h]])  # [c + R, H]
        for g in range(G):
          lg = q[l, :, h * G + g] @ kk.T / np.sqrt(H)  # [R, c + R]
          c = len(cols)
          lg[:, c:] = np.where(
            np.tril(np.ones((R, R), bool)), lg[:, c:], -np.inf
          )
          p = np.exp(lg - lg.max(-1, keepdims=True))
          p /= p.sum(-1, keepdims=True)
          m = p[:, sink:c].max(0)  # the chunk's entries
          sl = slice(start, start + len(piece))
          out[l, h, sl] = np.maximum(out[l, h, sl], m)
  return out


def test_kvzip_scores_match_numpy_per_ragged_row():
  kw = dict(
    n_sink=2,
    chunk_size=32,
    prompt_ids=(5, 6, 7),
    continue_ids=(8,),
    suffix_ids=(9,),
    prev_postfix_size=3,
  )

  def apply(cache, state, ctx):  # the scores come back as the state
    return cache, ma.kvzip_scores(cache, ctx, **kw)

  probe = base.KVTransform(
    init=lambda c: (),
    apply=apply,
    keeps=lambda n: n,
    needs=("params", "tokens"),
  )
  lengths = jnp.array([50, 37])
  got = kvjax.prefill(
    PARAMS,
    TOKENS[:, :50],
    config=CONFIG,
    prompt_lengths=lengths,
    transform=probe,
  ).cache.state
  got = np.asarray(got)
  for b in range(2):
    live = int(lengths[b])
    want = _np_kvzip_row(TOKENS[b], live, 32, (5, 6, 7), (8,), (9,), 2, 3)
    np.testing.assert_allclose(
      got[:, b, :, 2:live], want[..., 2:], rtol=2e-4, atol=1e-6
    )
    assert (got[:, b, :, live:] == 0).all()
  assert (got[..., :2] == got.max()).all()


def test_kvzip_budgets_and_head_cap(layerwise=False):
  r = 0.5
  out = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=ma.kvzip(r, layerwise=layerwise, head_capacity=0.6),
  ).cache
  live = np.asarray(base.live_counts(out))  # [L, B, K]
  L, K = CONFIG.num_layers, CONFIG.num_kv_heads
  for b in range(2):
    n = int(LENGTHS[b])
    if layerwise:
      assert (live[:, b].sum(-1) == K * n - int(K * n * r)).all()
    else:
      assert live[:, b].sum() == L * K * n - int(L * K * n * r)
    assert (live[:, b] <= max(1, math.ceil(0.6 * n))).all()
  assert out.capacity == math.ceil(0.6 * T)  # caps round up
  assert (np.asarray(out.pos[..., :4]) == np.arange(4)).all()  # sinks


def test_kvzip_needs_the_prompt_and_runs_in_compress_cache():
  cache = _full_cache(capacity=T + 8)
  t = ma.kvzip(0.5, head_capacity=0.6)
  with pytest.raises(ValueError, match="replays the prompt"):
    kvjax.compress_observing(
      PARAMS, cache, TOKENS[:, :8], config=CONFIG, transform=t
    )
  # The sweep's path: one prefilled cache, then compress_cache with the
  # prompt's tokens: the same entries as prefill(transform=kvzip).
  got = kvjax.compress_cache(
    cache,
    t,
    config=CONFIG,
    observed={},
    positions=jnp.zeros((2, 1), jnp.int32),
    mask=jnp.ones((2, 1), bool),
    params=PARAMS,
    tokens=TOKENS,
  )
  ref = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS, transform=t
  ).cache
  assert _kept(got) == _kept(ref)


# ----------------------------------------------------------------------------
# Decoding.


def test_decoding_compresses_every_interval_across_calls(count_compiles):
  t = ma.decoding("knorm", compression_interval=4, target_size=40)
  out = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    transform=t,
    capacity=T + 12,
    decode_steps=12,
  )
  cache = out.cache
  assert cache.capacity == 44
  live = lambda c: np.asarray(base.live_counts(c)).max(axis=(0, 2))
  assert live(cache).tolist() == [40, 40]
  token = jnp.argmax(out.logits[:, -1], -1)
  seen = []
  with count_compiles() as c:
    for _ in range(9):
      res = kvjax.decode(
        PARAMS, cache, token, config=CONFIG, max_new_tokens=1, transform=t
      )
      cache, token = res.cache, res.tokens[:, 0]
      seen.append(live(cache).tolist())
  assert c["n"] <= 2  # the first call's program (and its transfer)
  assert [s[0] for s in seen] == [41, 42, 43, 40, 41, 42, 43, 40, 41]
  assert int(cache.state.count) == 1


def test_decoding_with_a_query_scorer_in_generate_ragged():
  t = ma.METHODS["decoding"](0.5)
  gen = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    max_new_tokens=24,
    transform=t,
  )
  live = np.asarray(base.live_counts(gen.cache)).max(axis=(0, 2))
  assert (live <= np.array([32, 22]) + 16).all()
  assert gen.cache.capacity == 32 + 16
  st = gen.cache.state
  assert st.q.shape == (CONFIG.num_layers, 2, 32, CONFIG.num_heads, 32)
  assert not kvjax.cache.cache_overflowed(gen.cache)
  # Evict, then quantize: at decode the scorer reads the decoded entries.
  coded = kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    prompt_lengths=LENGTHS,
    max_new_tokens=24,
    transform=base.chain(t, kvjax.compress.uniform(bits=8)),
  )
  assert coded.tokens.shape == (2, 24)
  assert not kvjax.cache.cache_overflowed(coded.cache)


def test_decoding_refuses_a_target_never_reached():
  with pytest.raises(base.Degenerate, match="never exceed"):
    kvjax.prefill(
      PARAMS,
      TOKENS,
      config=CONFIG,
      transform=ma.decoding(target_size=100),
      capacity=T + 8,
      decode_steps=8,
    )


# ----------------------------------------------------------------------------
# Argument errors and value identity.


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: ma.criticalkv(1.5), "ratio"),
    (lambda: ma.criticalkv(0.5, epsilon=-1.0), "epsilon"),
    (lambda: ma.criticalkv(0.5, first_stage_ratio=2.0), "first_stage_ratio"),
    (lambda: ma.criticalkv(0.5, scorer="nope"), "unknown scorer"),
    (lambda: ma.critical_adakv(0.5, alpha_safeguard=-0.1), "alpha_safeguard"),
    (lambda: ma.finch(0.5, chunk_length=0), "chunk_length"),
    (lambda: ma.finch(0.5, window_size=0), "window_size"),
    (lambda: ma.finch(0.5, delimiter_token_id=-1), "delimiter_token_id"),
    (lambda: ma.kvzip(0.5, chunk_size=0), "chunk_size"),
    (lambda: ma.kvzip(0.5, head_capacity=0.3), "head_capacity"),
    (lambda: ma.kvzip(0.5, prompt_ids=[1, 2]), "prompt_ids"),
    (lambda: ma.kvzip(0.5, n_sink=-1), "n_sink"),
    (lambda: ma.decoding(compression_interval=0), "compression_interval"),
    (lambda: ma.decoding(ratio=0.5), "exactly one of target_size"),
    (lambda: ma.decoding(hidden_states_buffer_size=-1), "buffer_size"),
    (lambda: ma.decoding(target_size=0), "budget"),
  ],
)
def test_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_type_errors():
  with pytest.raises(TypeError, match="scorer"):
    ma.criticalkv(0.5, scorer=3)
  with pytest.raises(TypeError, match="normalize_scores"):
    ma.finch(0.5, normalize_scores=1)
  with pytest.raises(TypeError, match="layerwise"):
    ma.kvzip(0.5, layerwise=1)


def test_methods_are_values_named_by_their_key():
  for name, make in ma.METHODS.items():
    assert make(0.5) == make(0.5) and hash(make(0.5)) == hash(make(0.5))
    assert make(0.5).name == name


def test_kvzip_head_cap_at_the_mean_budget_keeps_the_whole_budget():
  """Caps are rounded up: with head_capacity = 1 - ratio the caps never
  sum to less than the budget (41 live entries, ratio 0.5)."""
  tokens = TOKENS[:1, :41]
  out = kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    transform=ma.kvzip(0.5, head_capacity=0.5, chunk_size=32),
  ).cache
  numel = CONFIG.num_layers * CONFIG.num_kv_heads * 41
  assert int(np.asarray(out.valid).sum()) == numel - int(numel * 0.5)
