"""Bad inputs to the model and generation entries: each gets a clear error.

One small model; most checks raise before anything compiles (asserted by
counting compilations, so inputs are NumPy or built outside the counted
blocks). The shared checks live in `kvjax.checks`; these tests go through
the public entries.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import checks
from kvjax import compress
from kvjax.cache import CodedKV, Codec, TailedKV

CONFIG = kvjax.ModelConfig(
  vocab_size=64,
  d_model=32,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  max_position_embeddings=24,
  name="bad-inputs",
)
V = CONFIG.vocab_size
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
B, T = 2, 8
TOKENS = np.asarray(
  jax.random.randint(jax.random.key(1), (B, T), 1, V), np.int32
)
KEY = jax.random.key(0)
OOV = r"token ids must be in \[0, 64\)"


def _cache(capacity=T + 4, config=CONFIG, batch=B, **kw):
  return kvjax.init_cache(config, batch, capacity, **kw)


CACHE = _cache()


def _generate(**kw):
  kw = dict(config=CONFIG, max_new_tokens=4) | kw
  return kvjax.generate(PARAMS, kw.pop("prompt_tokens", TOKENS), **kw)


# Sliced once here: slicing inside a call would compile a small program,
# which the compile-counting tests would see (when one runs first).
FIRST = TOKENS[:, 0]


def _decode(token=None, **kw):
  kw = dict(config=CONFIG, max_new_tokens=2) | kw
  token = FIRST if token is None else token
  return kvjax.decode(PARAMS, kw.pop("cache", CACHE), token, **kw)


def _decode_step(token=None, rng=None, **kw):
  token = FIRST if token is None else token
  rng = KEY if rng is None else rng
  return kvjax.decode_step(
    PARAMS, token, kw.pop("cache", CACHE), rng, config=CONFIG, **kw
  )


OBSERVE = TOKENS[:, :3]


def _observe(observe=None, transform=None, **kw):
  transform = compress.snapkv(budget=4) if transform is None else transform
  observe = OBSERVE if observe is None else observe
  return kvjax.compress_observing(
    PARAMS,
    kw.pop("cache", CACHE),
    observe,
    config=CONFIG,
    transform=transform,
    **kw,
  )


def _compress_cache(transform, cache=CACHE):
  return kvjax.compress_cache(
    cache,
    transform,
    config=CONFIG,
    observed={},
    positions=np.zeros((B, 3), np.int32),
    mask=np.ones((B, 3), bool),
  )


# ---------------------------------------------------------------------------
# 1, 2: prompts.


def test_generate_rejects_an_empty_batch(count_compiles):
  with count_compiles() as c:
    with pytest.raises(
      ValueError,
      match=r"prompt_tokens must have shape "
      r"\[B, T\] with B >= 1 and T >= 1, got \(0, 8\)",
    ):
      _generate(prompt_tokens=np.zeros((0, T), np.int32))
    with pytest.raises(ValueError, match=r"tokens must have shape"):
      kvjax.prefill(PARAMS, np.zeros((0, T), np.int32), config=CONFIG)
  assert c["n"] == 0


def test_prompt_lengths_as_a_python_list_work():
  lengths = [T, 5]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # within max_position_embeddings: quiet
    want = _generate(prompt_lengths=np.array(lengths, np.int32))
    got = _generate(prompt_lengths=lengths)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.cache.end, want.cache.end)
  with pytest.raises(
    ValueError,
    match=r"prompt_lengths must have shape "
    r"\(2,\)",
  ):
    _generate(prompt_lengths=[T])
  with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 8\]"):
    _generate(prompt_lengths=[T, T + 1])
  with pytest.raises(TypeError, match="prompt_lengths must be an integer"):
    _generate(prompt_lengths=[8.0, 5.0])


# ---------------------------------------------------------------------------
# 3: rng.


def test_rng_must_be_a_prng_key_typed_or_legacy():
  for call in (_generate, _decode):
    with pytest.raises(
      TypeError,
      match=r"rng must be a jax PRNG key: "
      r"jax.random.key\(seed\)",
    ):
      call(rng=0, temperature=1.0)
  with pytest.raises(TypeError, match="rng must be a jax PRNG key"):
    _decode_step(rng=np.zeros(3, np.uint32))
  typed = _generate(rng=jax.random.key(3), temperature=1.0)
  legacy = _generate(rng=jax.random.PRNGKey(3), temperature=1.0)
  np.testing.assert_array_equal(typed.tokens, legacy.tokens)


# ---------------------------------------------------------------------------
# 4: transform.


@pytest.mark.parametrize(
  "entry",
  ["prefill", "generate", "decode", "compress_observing", "compress_cache"],
)
def test_transform_must_be_a_kvtransform(entry, count_compiles):
  call = {
    "prefill": lambda t: kvjax.prefill(
      PARAMS, TOKENS, config=CONFIG, transform=t
    ),
    "generate": lambda t: _generate(transform=t),
    "decode": lambda t: _decode(transform=t),
    "compress_observing": lambda t: _observe(transform=t),
    "compress_cache": _compress_cache,
  }[entry]
  # The entries' earlier argument checks read arrays on the device (small
  # programs, compiled once per process, whichever test runs first): a
  # first refusal compiles those; the refusal itself compiles nothing.
  with pytest.raises(TypeError, match="transform must be"):
    call("snapkv")
  with count_compiles() as c:
    with pytest.raises(
      TypeError,
      match=f"{entry}: transform must be .*"
      "KVTransform.* got 'snapkv' \\(str\\)",
    ):
      call("snapkv")
    with pytest.raises(TypeError, match="transform must be"):
      call(("not", "a", "transform"))
  assert c["n"] == 0


# ---------------------------------------------------------------------------
# 5: params of another config.


@pytest.mark.parametrize(
  "change, leaf, got, want",
  [
    (dict(d_model=48), "['embed']", (64, 48), (64, 32)),
    (dict(num_layers=1), "['layers']['attn_norm']", (1, 32), (2, 32)),
    (dict(vocab_size=80), "['embed']", (80, 32), (64, 32)),
  ],
)
def test_params_of_another_config_fail_before_compiling(
  count_compiles, change, leaf, got, want
):
  other = jax.eval_shape(
    lambda: kvjax.init_params(CONFIG.replace(**change), jax.random.key(0))
  )
  other = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other)
  message = (
    (f"params{leaf} has shape {got}, config 'bad-inputs' .* expects {want}")
    .replace("[", r"\[")
    .replace("]", r"\]")
    .replace("(", r"\(")
    .replace(")", r"\)")
  )
  calls = [
    lambda: kvjax.generate(other, TOKENS, config=CONFIG, max_new_tokens=2),
    lambda: kvjax.prefill(other, TOKENS, config=CONFIG),
    lambda: kvjax.forward(other, TOKENS, CACHE, config=CONFIG),
    # FIRST and OBSERVE are sliced once at import: a slice here would
    # compile a small program the count sees when this test runs first.
    lambda: kvjax.decode(other, CACHE, FIRST, config=CONFIG, max_new_tokens=2),
    lambda: kvjax.decode_step(other, FIRST, CACHE, KEY, config=CONFIG),
    lambda: kvjax.compress_observing(
      other,
      CACHE,
      OBSERVE,
      config=CONFIG,
      transform=compress.snapkv(budget=4),
    ),
  ]
  # forward checks the cache before the params: two small device
  # reductions over CACHE, compiled once per process (whichever test runs
  # first); warmed here, so the count sees only what the refusal compiles.
  checks.check_cache(CACHE, CONFIG, batch=TOKENS.shape[0])
  with count_compiles() as c:
    for call in calls:
      with pytest.raises(ValueError, match=message):
        call()
  assert c["n"] == 0


def test_params_missing_extra_or_of_another_dtype():
  missing = {k: v for k, v in PARAMS.items() if k != "lm_head"}
  with pytest.raises(ValueError, match=r"params\['lm_head'\] is missing"):
    kvjax.prefill(missing, TOKENS, config=CONFIG)
  extra = dict(PARAMS, layers=dict(PARAMS["layers"], bq=PARAMS["embed"]))
  with pytest.raises(
    ValueError,
    match=r"params\['layers'\]\['bq'\] is not a "
    "parameter",
  ):
    kvjax.prefill(extra, TOKENS, config=CONFIG)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  with pytest.raises(
    ValueError,
    match=r"params\['embed'\] has dtype bfloat16"
    ".* expects float32",
  ):
    kvjax.prefill(half, TOKENS, config=CONFIG)


# ---------------------------------------------------------------------------
# 6, 7: sampling settings and special tokens.


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_temperature_must_be_finite_and_non_negative(temperature):
  match = "temperature must be a finite float >= 0"
  for call in (_generate, _decode, _decode_step):
    with pytest.raises(ValueError, match=match):
      call(temperature=temperature)
  with pytest.raises(TypeError, match=match):
    _generate(temperature="hot")


@pytest.mark.parametrize(
  "name, value",
  [("stop_token", V), ("stop_token", -1), ("pad_token", V), ("pad_token", -2)],
)
def test_stop_and_pad_tokens_must_be_in_the_vocabulary(name, value):
  for call in (_generate, _decode):
    with pytest.raises(ValueError, match=rf"{name} must be .*in \[0, 64\)"):
      call(**{name: value})
  with pytest.raises(TypeError, match=f"{name} must be"):
    _generate(**{name: "eos"})


# ---------------------------------------------------------------------------
# 8: past the trained context.


def test_generating_past_max_position_embeddings_warns():
  with pytest.warns(
    UserWarning,
    match=r"prompt length 8 \+ max_new_tokens "
    r"20 = 28 exceeds the model's max_position_embeddings=24",
  ):
    out = _generate(max_new_tokens=20)
  assert out.tokens.shape == (B, 20)  # a warning, not an error


# ---------------------------------------------------------------------------
# 9: cache dtype.


def test_integer_cache_dtype_is_rejected(count_compiles):
  int8_cache = _cache(dtype=jnp.int8)
  with count_compiles() as c:
    for call in (
      lambda: kvjax.prefill(
        PARAMS, TOKENS, config=CONFIG, cache_dtype=jnp.int8
      ),
      lambda: _generate(cache_dtype=jnp.int8),
      lambda: _generate(cache_dtype="int32"),
    ):
      with pytest.raises(
        ValueError,
        match=r"cache_dtype=.* is not "
        r"supported; allowed: None .*'float32', "
        r"'bfloat16', 'float16'",
      ):
        call()
    # A cache built by init_cache(dtype=int8) is caught where it is used.
    with pytest.raises(ValueError, match=r"cache.k has dtype int8"):
      kvjax.forward(PARAMS, TOKENS, int8_cache, config=CONFIG)
  assert c["n"] == 0
  assert checks.check_cache_dtype(jnp.bfloat16) == "bfloat16"
  assert checks.check_cache_dtype(None) is None


# ---------------------------------------------------------------------------
# 10, 11: forward's positions and cache.


def test_forward_rejects_negative_or_float_positions(count_compiles):
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  positions[1, 2] = -3
  with count_compiles() as c:
    with pytest.raises(
      ValueError, match="positions must be >= 0 .* minimum of -3"
    ):
      kvjax.forward(PARAMS, TOKENS, CACHE, config=CONFIG, positions=positions)
    with pytest.raises(TypeError, match="positions must be an integer array"):
      kvjax.forward(
        PARAMS,
        TOKENS,
        CACHE,
        config=CONFIG,
        positions=positions.astype(np.float32),
      )
    with pytest.raises(
      ValueError,
      match=r"positions must have shape "
      r"\(2, 8\)",
    ):
      kvjax.forward(
        PARAMS, TOKENS, CACHE, config=CONFIG, positions=positions[:, :3]
      )
  assert c["n"] == 0


def _coded(cache):
  """The cache with k and v replaced by (empty) coded payloads."""
  L, Bc, K, S = cache.pos.shape
  codec = Codec("fake", None, None)
  code = lambda: CodedKV(
    {"codes": jnp.zeros((L, Bc, K, S, 4), jnp.uint8)}, {}, codec
  )
  return cache._replace(
    k=code(), v=TailedKV(code(), jnp.zeros((L, Bc, K, 2, CONFIG.head_dim)))
  )


@pytest.mark.parametrize(
  "cache, match",
  [
    (
      _cache(config=CONFIG.replace(head_dim=8)),
      r"cache.k has shape \(2, 2, 1, 12, 8\), expected \[L, B, K, S, H\] = "
      r"\(2, 2, 1, 12, 16\) \(config head_dim=16\)",
    ),
    (
      _cache(config=CONFIG.replace(num_kv_heads=2)),
      "cache has 2 kv heads, config has num_kv_heads=1",
    ),
    (
      _cache(config=CONFIG.replace(num_layers=3)),
      "cache has 3 layers, config has num_layers=2",
    ),
    (_cache(dtype=jnp.int8), "cache.k has dtype int8"),
    (_cache()._replace(v=_cache(dtype=jnp.int32).v), "cache.v has dtype int32"),
    (
      _coded(_cache(config=CONFIG.replace(num_kv_heads=2))),
      "cache has 2 kv heads",
    ),
    (_cache(batch=3), "tokens have batch 2, cache has batch 3"),
  ],
)
def test_forward_rejects_a_cache_of_another_config(
  cache, match, count_compiles
):
  with count_compiles() as c:
    with pytest.raises(ValueError, match=match):
      kvjax.forward(PARAMS, TOKENS, cache, config=CONFIG)
  assert c["n"] == 0


def test_coded_payloads_are_checked_through_pos_only():
  coded = _coded(CACHE)
  assert checks.check_cache(coded, CONFIG, batch=B) is coded
  with pytest.raises(TypeError, match="cache must be a kvjax KVCache"):
    kvjax.forward(PARAMS, TOKENS, tuple(CACHE), config=CONFIG)


# ---------------------------------------------------------------------------
# 12, 13: tokens at every entry.


def test_out_of_vocabulary_tokens_are_rejected_by_every_entry(count_compiles):
  bad = TOKENS.copy()
  bad[1, 2] = V
  neg = TOKENS[:, 0].copy()
  neg[0] = -1
  with count_compiles() as c:
    for call in (
      lambda: kvjax.forward(PARAMS, bad, CACHE, config=CONFIG),
      lambda: kvjax.prefill(PARAMS, bad, config=CONFIG),
      lambda: _generate(prompt_tokens=bad),
      lambda: _decode(token=bad[:, 2]),
      lambda: _decode(token=neg),
      lambda: _decode_step(token=neg),  # host data: checked, no sync
      lambda: _decode_step(token=[3, V]),
      lambda: _observe(observe=bad[:, :3]),
    ):
      with pytest.raises(ValueError, match=OOV):
        call()
  assert c["n"] == 0


def test_decode_token_must_be_one_per_row():
  for call in (_decode, _decode_step):
    with pytest.raises(
      ValueError,
      match=r"token must have shape \[B\] = "
      r"\(2,\) .* got \(2, 1\)",
    ):
      call(token=TOKENS[:, :1])
    with pytest.raises(TypeError, match="token must be an integer array"):
      call(token=TOKENS[:, 0].astype(np.float32))
  with pytest.raises(
    ValueError,
    match=r"observe has batch 1, the cache has "
    "batch 2",
  ):
    _observe(observe=TOKENS[:1, :3])


def test_decode_steps_python_list_tokens_are_accepted():
  nxt, logits, cache = _decode_step(token=[3, 4])
  assert nxt.shape == (B,) and logits.shape == (B, V)
  assert cache.end.tolist() == [1, 1]


# ---------------------------------------------------------------------------
# 16: no silent drop from the jitted entries.


def _leaky(mode):
  """A deliberately broken transform: "overrun" marks a write past
  capacity at prefill; "no_room" compacts to the prompt width, ignoring the
  room asked for decoding; "no_evict" claims to keep a budget during
  decode (every step, `bounded`) but never frees a slot."""

  def apply(cache, state, ctx):
    if ctx.phase != "prefill":
      return cache, state
    if mode == "overrun":
      return cache._replace(end=cache.end + cache.capacity), state
    if mode == "no_room":
      cache, _ = compress.compact(cache, cache.valid, ctx.q_mask.shape[1])
    return cache, state

  return compress.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: live,
    every=1 if mode == "no_evict" else 0,
    bounded=mode == "no_evict",
    name=f"leaky_{mode}",
  )


LEAKS = {mode: _leaky(mode) for mode in ("overrun", "no_room", "no_evict")}


def test_prefill_and_compress_raise_on_overflow():
  with pytest.raises(
    ValueError,
    match=r"prefill: cache overflow: rows "
    r"\[0, 1\] ran past the capacity 8 \(write index up to "
    r"16\)",
  ):
    kvjax.prefill(PARAMS, TOKENS, config=CONFIG, transform=LEAKS["overrun"])
  _, cache = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, capacity=T + 3)
  with pytest.raises(ValueError, match="compress_cache: cache overflow"):
    _compress_cache(LEAKS["overrun"], cache)
  with pytest.raises(ValueError, match="compress_observing: cache overflow"):
    _observe(cache=cache, transform=LEAKS["overrun"])


def test_generate_and_decode_raise_on_overflow():
  with pytest.raises(
    ValueError,
    match="generate: cache overflow: rows "
    r"\[0, 1\] ran past the capacity 8 \(write index up to "
    r"11\)",
  ):
    _generate(transform=LEAKS["no_room"])
  leak = LEAKS["no_evict"]
  logits, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, transform=leak, capacity=T + 1
  )
  first = logits[:, -1].argmax(-1).astype(jnp.int32)
  # The up-front check passes (one write fits before the transform acts,
  # which is all a decode-time transform is asked for) ...
  with pytest.raises(
    ValueError,
    match=r"decode: cache overflow: .* capacity "
    "9",
  ):
    kvjax.decode(
      PARAMS, cache, first, config=CONFIG, max_new_tokens=3, transform=leak
    )
  # ... and without room for even one write it fails before running.
  full = cache._replace(end=cache.end + 1)
  with pytest.raises(
    ValueError,
    match="cache capacity exceeded: decoding "
    "with leaky_no_evict .* needs 1 more slots than row 0 "
    r"has \(capacity 9\)",
  ):
    kvjax.decode(
      PARAMS, full, first, config=CONFIG, max_new_tokens=3, transform=leak
    )


def test_decode_step_leaves_the_overflow_flag_to_the_caller():
  cache = _cache(capacity=1)
  token, _, cache = _decode_step(cache=cache)
  token, _, over = _decode_step(token=token, cache=cache)  # no room: dropped
  assert kvjax.cache.cache_overflowed(over)
  # decode_step never reads the device to check (a loop runs ahead) ...
  _decode_step(token=token, cache=over)
  with pytest.raises(ValueError, match="my loop: cache overflow"):
    checks.check_no_overflow(over, "my loop")
  # ... but the entries that do read it refuse a cache that lost writes.
  with pytest.raises(ValueError, match=r"cache \(given\): cache overflow"):
    kvjax.forward(PARAMS, token[:, None], over, config=CONFIG)


def test_an_extra_input_that_reaches_no_transform_is_refused():
  tokens = jnp.ones((2, 8), jnp.int32)
  mass = jnp.ones((CONFIG.num_layers, 2, CONFIG.num_heads, 12))
  with pytest.raises(
    ValueError,
    match=r"\['future_mass'\] reach no "
    r"transform \(snapkv declares none\)",
  ):
    kvjax.prefill(
      PARAMS,
      tokens,
      config=CONFIG,
      capacity=12,
      transform=compress.snapkv(0.5, window_size=2),
      future_mass=mass,
    )
  with pytest.raises(ValueError, match="no transform is given"):
    kvjax.prefill(PARAMS, tokens, config=CONFIG, future_mass=mass)
  _, cache = kvjax.prefill(
    PARAMS,
    tokens,
    config=CONFIG,
    capacity=12,
    transform=compress.oracle(0.5),
    future_mass=mass,
  )
  with pytest.raises(ValueError, match="acts at prefill only"):
    kvjax.decode(
      PARAMS,
      cache,
      jnp.ones((2,), jnp.int32),
      config=CONFIG,
      max_new_tokens=2,
      transform=compress.oracle(0.5),
      future_mass=mass,
    )
