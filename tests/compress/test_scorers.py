"""`kvjax.compress.scorers`: each definition against a numpy hand
computation (ragged rows, subsets of slots), argument errors, and the
method-specific contracts (sinks, LagKV's refusal, prefill-only scorers,
fixed Q-filters, batched ragged prefill and decode through a codec)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import KVCache
from kvjax.compress import base
from kvjax.compress import codecs
from kvjax.compress import scorers

CONFIG = kvjax.get_config("tiny")
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
GEOMETRY = CONFIG.geometry
L, K, G, H = CONFIG.num_layers, CONFIG.num_kv_heads, 2, CONFIG.head_dim
T = 140
LENGTHS = np.array([140, 101])


# ----------------------------------------------------------------------------
# Inputs.


def _synthetic(seed=0, shuffle=False):
  """A [L, 2, K, T] cache of random keys/values; row 1 has 101 live slots
  (with `shuffle`, scattered over the slots in a random order)."""
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(L, 2, K, T, H)).astype(np.float32)
  v = rng.normal(size=(L, 2, K, T, H)).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (L, 2, K, T)).copy()
  valid = pos < LENGTHS[None, :, None, None]
  if shuffle:
    for l in range(L):
      for b in range(2):
        for h in range(K):
          perm = rng.permutation(T)
          pos[l, b, h], valid[l, b, h] = (
            pos[l, b, h][perm],
            valid[l, b, h][perm],
          )
          k[l, b, h], v[l, b, h] = k[l, b, h][perm], v[l, b, h][perm]
  pos = np.where(valid, pos, -1)
  cache = KVCache(
    k=jnp.asarray(k),
    v=jnp.asarray(v),
    pos=jnp.asarray(pos, jnp.int32),
    valid=jnp.asarray(valid),
    end=jnp.asarray(LENGTHS, jnp.int32),
    length=jnp.asarray(LENGTHS, jnp.int32),
  )
  return cache


def _ctx(**kw):
  base_kw = dict(
    phase="prefill",
    step=jnp.int32(0),
    q_pos=jnp.broadcast_to(jnp.arange(T), (2, T)),
    q_mask=jnp.arange(T)[None] < jnp.asarray(LENGTHS)[:, None],
    geometry=GEOMETRY,
    live_bound=T,
  )
  base_kw.update(kw)
  return base.CompressContext(**base_kw)


_MODEL = {}
_FORWARD = jax.jit(
  lambda params, tokens, cache, mask: kvjax.forward(
    params,
    tokens,
    cache,
    config=CONFIG,
    token_mask=mask,
    capture=("q", "attn_mass"),
  )
)


def _model_inputs():
  """The tiny model's uncompressed cache, queries and attention mass for a
  ragged batch (cached)."""
  if not _MODEL:
    tokens = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)
    mask = jnp.arange(T)[None] < jnp.asarray(LENGTHS)[:, None]
    _, cache, aux = _FORWARD(
      PARAMS,
      tokens,
      kvjax.init_cache(CONFIG, 2, T),
      mask,
    )
    _MODEL.update(
      cache=cache,
      ctx=_ctx(q=aux["q"], attn_mass=aux["attn_mass"], reserve=3),
      tokens=tokens,
    )
  return _MODEL["cache"], _MODEL["ctx"]


def _live(cache, l, b, h):
  """Live (k, v, pos) of one (layer, row, head) in position order."""
  valid = np.asarray(cache.valid[l, b, h])
  pos = np.asarray(cache.pos[l, b, h])[valid]
  order = np.argsort(pos)
  k = np.asarray(cache.k[l, b, h], np.float64)[valid][order]
  v = np.asarray(cache.v[l, b, h], np.float64)[valid][order]
  return k, v, pos[order]


def _check(cache, got, want_fn, rtol=1e-4, atol=1e-5):
  """got [L, B, K, S] on the live slots == want_fn(l, b) -> [K, n] (in
  position order)."""
  got = np.asarray(got)
  for l in range(L):
    for b in range(2):
      want = want_fn(l, b)
      for h in range(K):
        valid = np.asarray(cache.valid[l, b, h])
        pos = np.asarray(cache.pos[l, b, h])[valid]
        np.testing.assert_allclose(
          got[l, b, h][valid][np.argsort(pos)], want[h], rtol=rtol, atol=atol
        )


def _z(x):  # x: [K, n]; z-score over the (layer, row), torch's unbiased std
  return (x - x.mean()) / max(x.std(ddof=1), 1e-6)


def _pool3(x):
  p = np.pad(x, (1, 1))
  return (p[:-2] + p[1:-1] + p[2:]) / 3


# ----------------------------------------------------------------------------
# Definitions vs numpy.


@pytest.mark.parametrize("shuffle", [False, True])
def test_keydiff_is_negative_cosine_to_the_mean_unit_key(shuffle):
  cache = _synthetic(shuffle=shuffle)
  got = scorers.keydiff_scorer().score(cache, _ctx())

  def want(l, b):
    out = []
    for h in range(K):
      k, _, _ = _live(cache, l, b, h)
      a = (k / np.linalg.norm(k, axis=1, keepdims=True)).mean(0)
      out.append(-(k @ a) / (np.linalg.norm(k, axis=1) * np.linalg.norm(a)))
    return out

  _check(cache, got, want)


def test_keydiff_on_a_subset_is_keydiff_of_the_subset():
  """The block variant: the mean key is over the slots given as valid."""
  cache = _synthetic()
  sub = cache.valid & (cache.pos >= 10) & (cache.pos < 25)
  got = np.asarray(
    scorers.keydiff_scorer().score(cache._replace(valid=sub), _ctx())
  )
  small = cache._replace(
    k=cache.k[:, :, :, 10:25],
    v=cache.v[:, :, :, 10:25],
    pos=cache.pos[:, :, :, 10:25],
    valid=cache.valid[:, :, :, 10:25],
  )
  want = np.asarray(scorers.keydiff_scorer().score(small, _ctx()))
  np.testing.assert_allclose(got[..., 10:25], want, rtol=1e-5, atol=1e-6)


def test_observed_attention_is_mean_attention_over_the_queries_that_see_it():
  cache, ctx = _model_inputs()
  got = scorers.observed_attention_scorer().score(cache, ctx)
  q = np.asarray(ctx.q, np.float64)  # [L, B, T, N, H]

  def want(l, b):
    n = LENGTHS[b]
    out = []
    for h in range(K):
      k, _, _ = _live(cache, l, b, h)
      cols = []
      for g in range(G):
        logits = q[l, b, :n, h * G + g] @ k.T / np.sqrt(H)
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        cols.append(p.sum(0) / np.arange(n, 0, -1))  # n - j queries see j
      out.append(np.mean(cols, 0))
    return out

  _check(cache, got, want, rtol=2e-4, atol=1e-6)


def _lagkv_np(k, v, n_sink, lag, cross):
  n = len(k)
  if n < n_sink + 2 * lag:
    return np.concatenate(
      [np.ones(min(n, n_sink)), np.arange(max(0, n - n_sink)) / (n - n_sink)]
    )
  parts = (n - n_sink) // lag
  out = np.ones(n)

  def stat(x, p):
    cur = x[n_sink + p * lag : n_sink + (p + 1) * lag]
    ref = x[n_sink + (p + 1) * lag : n_sink + (p + 2) * lag]
    lo, hi = ref.min(0), ref.max(0)
    s = ((cur - lo) / (hi - lo)).std(1, ddof=1)
    e = np.exp(s - s.max())
    return e / e.sum()

  for p in range(parts - 1):
    s = (stat(k, p) + stat(v, p)) / 2
    if not cross:
      s = np.argsort(np.argsort(s)) / lag
    out[n_sink + p * lag : n_sink + (p + 1) * lag] = s
  return out


@pytest.mark.parametrize(
  "n_sink,lag,cross,shuffle",
  [(4, 8, False, False), (2, 6, True, True), (4, 50, False, False)],
)
def test_lagkv_scores(n_sink, lag, cross, shuffle):
  """Partitions of the live entries after the sinks, each scored against the
  next; sinks, last full partition and remainder score 1 (lag 50: row 1, 101 <= 104, is
  shorter than n_sink + 2 lag and falls back to sinks + newest)."""
  cache = _synthetic(1, shuffle)
  got = scorers.lagkv_scorer(n_sink, lag, cross).score(cache, _ctx())

  def want(l, b):
    return [
      _lagkv_np(*_live(cache, l, b, h)[:2], n_sink, lag, cross)
      for h in range(K)
    ]

  _check(cache, got, want, rtol=1e-4, atol=1e-5)


def _noncausal_np(q, k, v, chunk):
  """q [G, n, H], k, v [n, H] -> [n] (before the z-score)."""
  n = len(k)
  mass = np.zeros(n)
  for c in range(0, n, chunk):
    for g in range(G):
      logits = q[g, c : c + chunk] @ k[c : c + chunk].T
      p = np.exp(logits - logits.max(1, keepdims=True))
      mass[c : c + chunk] += (p / p.sum(1, keepdims=True)).sum(0) / G
  return _pool3(mass * np.linalg.norm(v, axis=1))


@pytest.mark.parametrize("chunk", [16, 40])
def test_non_causal_attn_scores(chunk):
  cache, ctx = _model_inputs()
  got = scorers.non_causal_attn_scorer(chunk).score(cache, ctx)
  q = np.asarray(ctx.q, np.float64)

  def want(l, b):
    n = LENGTHS[b]
    rows = []
    for h in range(K):
      k, v, _ = _live(cache, l, b, h)
      qg = np.moveaxis(q[l, b, :n, h * G : (h + 1) * G], 1, 0)
      rows.append(_noncausal_np(qg, k, v, chunk))
    return _z(np.array(rows))

  _check(cache, got, want, rtol=2e-3, atol=2e-4)


def test_non_causal_kvpress_padding_only_changes_a_padded_chunk():
  cache, ctx = _model_inputs()
  plain = np.asarray(scorers.non_causal_attn_scorer(20).score(cache, ctx))
  padded = np.asarray(
    scorers.non_causal_attn_scorer(20, True).score(cache, ctx)
  )
  valid = np.asarray(cache.valid)
  # Row 0: 140 = 7 chunks of 20, nothing padded. Row 1: 101 live entries.
  np.testing.assert_allclose(padded[:, 0], plain[:, 0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(padded[:, 1][valid[:, 1]], plain[:, 1][valid[:, 1]])


def _lev_np(x, ridge=1e-2):
  x = x - x.mean(0)
  return np.einsum(
    "si,ij,sj->s", x, np.linalg.inv(x.T @ x + ridge * np.eye(x.shape[1])), x
  )


def _rope(x, pos, sign=1.0):
  inv = kvjax.model.rope_inv_freq(GEOMETRY)
  f = sign * pos[:, None] * inv
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate(
    [x1 * np.cos(f) - x2 * np.sin(f), x2 * np.cos(f) + x1 * np.sin(f)], -1
  )


@pytest.mark.parametrize("shuffle", [False, True])
def test_leverage_scores_of_the_centred_pre_rope_keys(shuffle):
  """The cache holds keys rotated by RoPE; the scores are the (ridge)
  leverage of the keys before RoPE, z-scored over the (layer, row)."""
  cache = _synthetic(2, shuffle)
  got = scorers.leverage_score_scorer().score(cache, _ctx())

  def want(l, b):
    rows = []
    for h in range(K):
      k, _, pos = _live(cache, l, b, h)
      rows.append(_lev_np(_rope(k, pos, -1.0)))
    return _z(np.array(rows))

  # float32 Cholesky vs float64 inverse.
  _check(cache, got, want, rtol=1e-3, atol=2e-3)


def test_leverage_sketch_below_head_dim_is_seeded():
  cache = _synthetic(2)
  a = scorers.leverage_score_scorer(8, seed=1).score(cache, _ctx())
  b = scorers.leverage_score_scorer(8, seed=1).score(cache, _ctx())
  c = scorers.leverage_score_scorer(8, seed=2).score(cache, _ctx())
  exact = scorers.leverage_score_scorer().score(cache, _ctx())
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, exact)


@pytest.mark.parametrize(
  "kind,window,local",
  [("kv_product", 16, True), ("kv_avg", 7, True), ("key", 16, False)],
)
def test_cur_scores(kind, window, local):
  cache = _synthetic(3, shuffle=True)
  got = scorers.cur_scorer(3, kind, False, local, window).score(cache, _ctx())

  def want(l, b):
    rows = []
    for h in range(K):
      k, v, _ = _live(cache, l, b, h)
      k2, v2 = (k**2).sum(1), (v**2).sum(1)
      if local:
        for x in (k2, v2):
          for c in range(0, len(x), window):
            x[c : c + window] /= x[c : c + window].sum()
      s = {"kv_product": k2 * v2, "kv_avg": (k2 + v2) / 2, "key": k2}[kind]
      s = s / s.sum()
      s[:3] = 1.0
      rows.append(s)
    return rows

  _check(cache, got, want)


def test_compactor_blends_leverage_and_non_causal_attention_on_the_middle():
  cache, ctx = _model_inputs()
  blend, chunk = 0.4, 12
  got = scorers.compactor_scorer(blend, 5, 3, chunk).score(cache, ctx)
  q = np.asarray(ctx.q, np.float64)

  def want(l, b):
    n = LENGTHS[b]
    lev, att = [], []
    for h in range(K):
      k, v, pos = _live(cache, l, b, h)
      mid = slice(5, n - 3)
      lev.append(_lev_np(_rope(k[mid], pos[mid], -1.0)))
      qg = np.moveaxis(q[l, b, :n, h * G : (h + 1) * G], 1, 0)[:, mid]
      att.append(_noncausal_np(qg, k[mid], v[mid], chunk))
    middle = blend * _z(np.array(lev)) + _z(np.array(att))
    sinks = np.full((K, 5), scorers._BIG)  # pylint: disable=protected-access
    return np.concatenate([sinks, middle, np.full((K, 3), scorers._BIG)], 1)  # pylint: disable=protected-access

  _check(cache, got, want, rtol=2e-3, atol=5e-4)


def test_qfilter_filters_are_the_signed_dominant_query_direction():
  cache, ctx = _model_inputs()
  filters = np.asarray(scorers.qfilter_filters(ctx.q, ctx.q_mask, K))
  got = scorers.qfilter_scorer().score(cache, ctx)
  q = np.asarray(ctx.q, np.float64)
  for l in range(L):
    for b in range(2):
      for h in range(K):
        fs = []
        for g in range(G):
          Q = q[l, b, : LENGTHS[b], h * G + g]
          u, _, vt = np.linalg.svd(Q, full_matrices=False)
          sign = 1.0 if (u[:, 0] > 0).mean() > 0.5 else -1.0
          fs.append(-sign * vt[0])
        np.testing.assert_allclose(
          filters[l, b, h], np.mean(fs, 0), rtol=1e-3, atol=1e-4
        )

  def want(l, b):
    return [-_live(cache, l, b, h)[0] @ filters[l, b, h] for h in range(K)]

  _check(cache, got, want)


# ----------------------------------------------------------------------------
# Contracts.


def test_lagkv_refuses_a_context_too_short_for_a_reference():
  cache = _synthetic()
  t = scorers.lagkv(0.5, lag_size=70)  # 4 + 2 * 70 > 140
  with pytest.raises(
    base.Degenerate, match=r"140 cached entries.*4 \+ 2 \* 70"
  ):
    t.apply(cache, t.init(cache), _ctx())


@pytest.mark.parametrize("name", ["non_causal_attn", "compactor"])
def test_attention_scorers_need_their_own_queries(name):
  cache, ctx = _model_inputs()
  scorer = scorers.SCORERS[name]()
  with pytest.raises(ValueError, match="prefill only"):
    scorer.score(cache, ctx._replace(phase="decode"))
  few = ctx._replace(
    q=ctx.q[:, :, :8], q_mask=ctx.q_mask[:, :8], q_pos=ctx.q_pos[:, :8]
  )
  # Refused (the sweep records it), not a crash.
  with pytest.raises(
    base.Degenerate, match="8 observed queries cannot cover up to 140"
  ):
    scorer.score(cache, few)


def test_compactor_and_cur_keep_their_sinks():
  cache, ctx = _model_inputs()
  for t, first, last in (
    (scorers.compactor(0.5), 8, 4),  # keeps 70 and 50 of 140 and 101
    (scorers.cur(0.8, num_sinks=3), 3, 0),  # keeps 28 and 20
  ):
    out, _ = t.apply(cache, t.init(cache), ctx)
    for b, n in enumerate(LENGTHS):
      kept = np.asarray(out.pos[:, b])[np.asarray(out.valid[:, b])]
      want = set(range(first)) | set(range(n - last, n))
      for l in range(L):
        for h in range(K):
          got = set(
            np.asarray(out.pos[l, b, h])[np.asarray(out.valid[l, b, h])]
          )
          assert want <= got, (t.name, l, b, h)
      assert kept.max() < n


def test_fixed_qfilters_must_fit_the_cache():
  cache = _synthetic()
  with pytest.raises(ValueError, match="filters has shape"):
    scorers.qfilter_scorer(np.zeros((L, K, H + 2), np.float32)).score(
      cache, _ctx()
    )
  ones = np.ones((L, K, H), np.float32)
  got = scorers.qfilter_scorer(ones).score(cache, _ctx())
  np.testing.assert_allclose(
    got, -np.asarray(cache.k).sum(-1), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
  "make,match",
  [
    (lambda: scorers.keydiff(1.5), "ratio must be a float in"),
    (lambda: scorers.keydiff(0.5, 10), "exactly one of ratio"),
    (lambda: scorers.observed_attention(budget=0), "budget must be an int"),
    (
      lambda: scorers.lagkv(0.5, lag_size=0),
      "lag_size must be an int >= 1, got 0",
    ),
    (
      lambda: scorers.lagkv(0.5, n_sink=-1),
      "n_sink must be an int >= 0, got -1",
    ),
    (
      lambda: scorers.lagkv(0.5, cross_scoring=1),
      "cross_scoring must be a bool",
    ),
    (
      lambda: scorers.non_causal_attn(0.5, chunk_size=0),
      "chunk_size must be an int",
    ),
    (
      lambda: scorers.non_causal_attn(0.5, kvpress_padding="yes"),
      "kvpress_padding must be a bool",
    ),
    (
      lambda: scorers.leverage_score(0.5, sketch_dimension=0),
      "sketch_dimension must be",
    ),
    (lambda: scorers.leverage_score(0.5, ridge=0.0), "ridge must be > 0"),
    (
      lambda: scorers.compactor(0.5, blending=-1.0),
      "blending must be a finite float",
    ),
    (
      lambda: scorers.compactor(0.5, sink_size_start=1.5),
      "sink_size_start must be an int",
    ),
    (lambda: scorers.compactor(None, None), "exactly one of ratio"),
    (
      lambda: scorers.cur(0.5, leverage_type="svd"),
      "leverage_type must be one of",
    ),
    (
      lambda: scorers.cur(0.5, local_window_size=0),
      "local_window_size must be",
    ),
    (
      lambda: scorers.qfilter(0.5, filters=[[1.0]]),
      "filters must be a numpy array",
    ),
  ],
)
def test_bad_arguments_raise(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_factories_are_values_and_names_are_the_registry_keys():
  for name, make in scorers.METHODS.items():
    assert make(0.5) == make(0.5) and hash(make(0.5)) == hash(make(0.5))
    assert make(0.5) != make(0.25)
    assert make(0.5).name == name
    assert scorers.SCORERS[name]().name == name
  assert scorers.compactor(0.5) == scorers.compactor(0.5, blending=None)


WIDE, WIDE_LENGTHS = T, LENGTHS
_wide_inputs = _model_inputs  # pylint: disable=invalid-name


def _check_rows(cache):
  kept = np.asarray(cache.valid.sum(-1))
  for b, n in enumerate(WIDE_LENGTHS):
    assert (kept[:, b] == n // 2).all(), kept[:, b]
    pos = np.asarray(cache.pos[:, b])[np.asarray(cache.valid[:, b])]
    assert pos.max() < n  # padding never survives
  assert cache.capacity == WIDE // 2 + 3  # the budget + the reserve


@pytest.mark.parametrize("name", sorted(scorers.METHODS))
def test_ragged_batch_keeps_each_rows_budget(name):
  """Batch 2, ragged: each row keeps int(n * 0.5) of its own entries, in a
  cache of half the slots + the reserve (the prefill phase, eagerly)."""
  cache, ctx = _wide_inputs()
  transform = scorers.METHODS[name](0.5)
  out, _ = transform.apply(cache, transform.init(cache), ctx)
  _check_rows(out)


@pytest.mark.parametrize("name", ["compactor"])
def test_jitted_prefill_keeps_what_the_eager_apply_keeps(name):
  cache, ctx = _wide_inputs()
  transform = scorers.METHODS[name](0.5)
  eager, _ = transform.apply(cache, transform.init(cache), ctx)
  _, jitted = kvjax.prefill(
    PARAMS,
    _MODEL["tokens"],
    config=CONFIG,
    transform=transform,
    prompt_lengths=jnp.asarray(WIDE_LENGTHS),
    capacity=WIDE + 3,
  )
  _check_rows(jitted)
  np.testing.assert_array_equal(jitted.pos, eager.pos)


def test_evict_then_quantize():
  """chain(compactor, int4): the kept entries, then coded (the decode path
  through `generate` is the registry's generic test)."""
  cache, ctx = _wide_inputs()
  transform = base.chain(scorers.compactor(0.5), codecs.uniform(4))
  out, _ = transform.apply(cache, transform.init(cache), ctx)
  alone, _ = scorers.compactor(0.5).apply(cache, (), ctx)
  _check_rows(out)
  np.testing.assert_array_equal(out.pos, alone.pos)
  assert kvjax.kv_bytes(out) < kvjax.kv_bytes(alone) / 2
