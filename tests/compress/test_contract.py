"""The contract every transform keeps, checked for every exported factory.

- The reserve: after compression with reserve R, exactly R further tokens
  (plus a decode-time policy's `every` slots of headroom) fit, written by
  `forward` or by `decode`; one more raises.
- Value equality: a freshly built equal transform compiles nothing new.
- Eviction policies compose with codecs (prefill + generate, batch 2 with
  ragged rows; decode compiles once), or are refused at construction with
  the reason: each composition path meets every codec, and every policy
  meets several (`PAIRS`).
- Bytes are exact: `kv_bytes` and `logical_bytes` equal a hand computation
  from the stated bits, for plain, coded, windowed (KIVI), rotated and
  evicted-then-coded caches.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax.compress import registry
from kvjax.cache import CodedKV, TailedKV, cache_overflowed, logical_bytes

# One layer keeps the ~100 programs of this file cheap to compile.
CONFIG = kvjax.get_config("tiny", num_layers=1, d_model=64, mlp_dim=128)
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
T, R = 40, 6  # prompt width, reserve
TOKENS = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)
LENGTHS = jnp.array([40, 29])
SHIFTED = (TOKENS + 3) % CONFIG.vocab_size  # other values, same shape
MORE = jax.random.randint(jax.random.key(2), (2, 24), 1, CONFIG.vocab_size)


def _int8(h):
  return compress.int_codec(8, 16, h)


POLICIES = {
  "random": lambda: compress.random(0.5),
  "knorm": lambda: compress.knorm(0.5),
  "snapkv": lambda: compress.snapkv(0.5, window_size=8),
  "expected_attention": lambda: compress.expected_attention(0.5),
  "oracle": lambda: compress.oracle(0.5),
  "streaming_llm": lambda: compress.streaming_llm(0.5),
  "tova": lambda: compress.tova(0.5),
  "h2o": lambda: compress.h2o(0.5),
  "pyramidkv": lambda: compress.pyramidkv(0.5, window_size=8),
  "adakv": lambda: compress.adakv("snapkv", 0.5, window_size=8),
  "scored_policy": lambda: compress.scored_policy(
    compress.knorm_scorer(), budget=12
  ),
}
CODECS = {
  "uniform": lambda: compress.uniform(4),
  "quantize": lambda: compress.quantize(_int8, _int8, name="int8"),
  "fp8": compress.fp8,
  "kivi": lambda: compress.kivi(2, group_size=8, residual=16),
  "windowed_quantize": lambda: compress.windowed_quantize(
    4, 8, 16, "token", "token"
  ),
  "lowrank": lambda: compress.lowrank(8),
  "turboquant": lambda: compress.turboquant(3),
  "qjl": lambda: compress.qjl(64),
  "polarquant": compress.polarquant,
  "range_search_transform": lambda: compress.range_search_transform(
    0.5, buffer=8, reservoir=16
  ),
}
OTHER = {
  "identity": compress.identity,
  "chain": lambda: compress.chain(
    compress.snapkv(0.5, window_size=8), compress.kivi(2, 8, 16)
  ),
}
FACTORIES = {**POLICIES, **CODECS, **OTHER}
# Free slots not exact for the fullest row: a KIVI window holds the pending
# entries (fewer than one block of 16) + R; Ada-KV's capacity is its
# largest possible head budget, the fullest head may keep fewer.
VARIABLE = ("kivi", "windowed_quantize", "chain", "adakv")


# A shape stand-in for each extra input a transform may declare.
EXTRA_INPUTS = {
  # The oracle's future mass over `slots` cache slots.
  "future_mass": lambda slots: jnp.ones(
    (CONFIG.num_layers, 2, CONFIG.num_heads, slots)
  ),
}


def _extra(transform, slots):
  """Stand-ins for the extra inputs `transform` declares."""
  return {name: EXTRA_INPUTS[name](slots) for name in transform.extras}


def test_every_exported_factory_is_covered():
  exported = {
    n
    for n in dir(compress)
    if inspect.isfunction(getattr(compress, n))
    and getattr(getattr(compress, n), "by_value", False)
    and not n.endswith("_scorer")
  }
  # The rest of kvpress' presses run end to end in test_methods.py, under
  # their registry names; SP-KV needs a gated model: its reserve, bytes,
  # value equality and composition are tests/compress/test_spkv.py's.
  assert exported == set(FACTORIES) | set(registry.KVPRESS_NAMES) | {"spkv"}


def _check_reserve(name, transform, cache):
  """Exactly R free slots (+ headroom) for the fullest row; R tokens fit
  through forward, one more than the free slots raises."""
  free = cache.capacity - int(np.max(np.asarray(cache.end)))
  headroom = transform.every if transform.bounded else 0
  if name in VARIABLE:
    assert R <= free <= R + 16, (name, free)
  else:
    assert free == R + headroom, (name, free, R, headroom)
  _, fed, _ = kvjax.forward(PARAMS, MORE[:, :R], cache, config=CONFIG)
  assert not cache_overflowed(fed)
  with pytest.raises(ValueError, match="capacity"):
    kvjax.forward(PARAMS, MORE[:, : free + 1], cache, config=CONFIG)
  return fed


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_reserve_holds_after_prefill_and_decode(name, count_compiles):
  transform = FACTORIES[name]()
  kw = dict(config=CONFIG, capacity=T + R, **_extra(transform, T + R))
  _, cache = kvjax.prefill(PARAMS, TOKENS, transform=transform, **kw)
  with count_compiles() as c:  # an equal transform built anew: no compile
    kvjax.prefill(PARAMS, SHIFTED, transform=FACTORIES[name](), **kw)
  assert c["n"] == 0, name
  _check_reserve(name, transform, cache)
  # The same R tokens written by decode, through the transform (a
  # prefill-only one gets no extra inputs there: they would reach nothing).
  extra = _extra(transform, cache.capacity) if transform.every else {}
  _, num, out = kvjax.decode(
    PARAMS,
    cache,
    MORE[:, 0],
    config=CONFIG,
    max_new_tokens=R,
    transform=transform,
    **extra,
  )
  assert (np.asarray(num) == R).all()
  assert not cache_overflowed(out)
  if transform.bounded:  # a budget-keeping policy decodes on and on
    _, _, out = kvjax.decode(
      PARAMS,
      cache,
      MORE[:, 0],
      config=CONFIG,
      max_new_tokens=3 * R,
      transform=transform,
      **extra,
    )
    assert not cache_overflowed(out)


@pytest.mark.parametrize("name", sorted(POLICIES) + ["kivi", "uniform"])
def test_reserve_holds_after_compress_cache(name):
  transform = FACTORIES[name]()
  _, full, aux = kvjax.forward(
    PARAMS,
    TOKENS,
    kvjax.init_cache(CONFIG, 2, T),
    config=CONFIG,
    capture=("q", "q_pre_rope", "attn_mass"),
  )
  cache = kvjax.compress_cache(
    full,
    transform,
    config=CONFIG,
    observed=aux,
    positions=jnp.broadcast_to(jnp.arange(T), (2, T)),
    mask=jnp.ones((2, T), bool),
    reserve=R,
    **_extra(transform, T),
  )
  _check_reserve(name, transform, cache)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "kivi"])
def test_reserve_holds_after_compress_observing(name):
  transform = FACTORIES[name]()
  _, full = kvjax.prefill(PARAMS, TOKENS, config=CONFIG, capacity=T + 12)
  question = MORE[:, :12]
  cache = kvjax.compress_observing(
    PARAMS, full, question, config=CONFIG, transform=transform, reserve=R
  )
  _check_reserve(name, transform, cache)


# ----------------------------------------------------------------------------
# Every policy x every codec.

DECODE_TIME = ("streaming_llm", "tova", "h2o")
# Codecs with a full-precision window (range search: its recent buffer) a
# decode-time eviction policy cannot precede.
WINDOWED = ("kivi", "windowed_quantize", "range_search_transform")
_PAIR_CODECS = sorted(set(CODECS) - {"quantize"})
# A policy meets a codec through one of three paths: prefill compaction
# (every prefill policy), eviction during decode over the coded payload,
# reading its attention mass (H2O), and per-head variable budgets (Ada-KV).
# The last two meet every codec; every other policy meets two codecs in
# rotation, so each codec also meets one or two prefill policies. Decode-
# time policies are refused with every windowed codec (cheap: at
# construction).
_FULL_ROWS = ("h2o", "adakv")
_OTHERS = sorted(set(POLICIES) - {"scored_policy", *_FULL_ROWS})
PAIRS = sorted(
  {(p, c) for p in _FULL_ROWS for c in _PAIR_CODECS}
  | {
    (p, _PAIR_CODECS[(2 * i + j) % len(_PAIR_CODECS)])
    for i, p in enumerate(_OTHERS)
    for j in range(2)
  }
  | {(p, c) for p in DECODE_TIME for c in WINDOWED}
)


@pytest.mark.parametrize("policy,codec", PAIRS)
def test_policy_then_codec_generates_and_compiles_once(
  policy, codec, count_compiles
):
  make = lambda: compress.chain(POLICIES[policy](), CODECS[codec]())
  if policy in DECODE_TIME and codec in WINDOWED:
    with pytest.raises(ValueError, match="evicts during decode"):
      make()
    return
  transform = make()
  kw = dict(
    config=CONFIG,
    max_new_tokens=4,
    prompt_lengths=LENGTHS,
    **_extra(transform, T + 3),
  )
  out = kvjax.generate(PARAMS, TOKENS, transform=transform, **kw)
  assert (np.asarray(out.num_generated) == 4).all()
  assert not cache_overflowed(out.cache)
  assert np.isfinite(np.asarray(out.prompt_logits)).all()
  # Kept entries are all coded (KIVI: code region + window) and no row
  # keeps padding.
  assert isinstance(out.cache.k, (CodedKV, TailedKV)), (policy, codec)
  pos, valid = np.asarray(out.cache.pos), np.asarray(out.cache.valid)
  assert (pos[:, 1][valid[:, 1]] < 29 + 3).all()
  with count_compiles() as c:
    kvjax.generate(PARAMS, SHIFTED, transform=make(), **kw)
  assert c["n"] == 0, (policy, codec)


# ----------------------------------------------------------------------------
# Bytes.


def _plain_bytes(shape_lbks, h, itemsize):
  return int(np.prod(shape_lbks)) * h * itemsize


def _bookkeeping(cache):
  return (
    cache.pos.size * 4
    + cache.valid.size
    + cache.end.size * 4
    + cache.length.size * 4
  )


def test_plain_cache_bytes():
  _, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, prompt_lengths=LENGTHS
  )
  H = CONFIG.head_dim
  assert kvjax.kv_bytes(cache) == 2 * _plain_bytes(cache.pos.shape, H, 4) + (
    _bookkeeping(cache)
  )
  live = int(np.asarray(cache.valid).sum())
  assert live == (40 + 29) * CONFIG.num_kv_heads
  assert logical_bytes(cache) == 2 * live * H * 4


@pytest.mark.parametrize(
  "name,bits",
  [
    ("uniform", 4 + 32 / 32),  # int4, min and scale per 32 channels
    ("fp8", 8 + 16 / 32),  # e4m3 + a float16 scale per entry
    ("turboquant", (32 * 3 + 16) / 32),  # 3-bit codes + a float16 norm
    # 16 4-bit angles, 8 and 4 2-bit ones, 2 2-bit ones padded to a byte,
    # 2 float16 radii.
    ("polarquant", (4 * 16 + 2 * 8 + 2 * 4 + 8 + 16 * 2) / 32),
  ],
)
def test_entry_codec_bytes_equal_the_stated_bits(name, bits):
  transform = CODECS[name]()
  _, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, transform=transform, prompt_lengths=LENGTHS
  )
  H = CONFIG.head_dim
  assert transform.bits(H) == (bits, bits)
  slots = int(np.prod(cache.pos.shape))
  payload = 2 * slots * H * bits / 8
  assert kvjax.cache.payload_bytes(cache) == payload
  assert kvjax.kv_bytes(cache) == payload + _bookkeeping(cache)
  live = int(np.asarray(cache.valid).sum())
  assert logical_bytes(cache) == 2 * live * H * bits / 8


def test_lowrank_bytes_count_the_basis_once():
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=compress.lowrank(8),
    prompt_lengths=LENGTHS,
  )
  H, L, K = CONFIG.head_dim, CONFIG.num_layers, CONFIG.num_kv_heads
  basis = L * 2 * K * H * 8 * 4  # [L, B, K, H, rank] float32, per tensor
  live = int(np.asarray(cache.valid).sum())
  assert logical_bytes(cache) == 2 * (live * 8 * 2 + basis)


def test_kivi_bytes_count_code_region_and_window_apart():
  """KIVI-2, G = 8, window 16: each coded entry costs 2 + 32/8 bits per
  element (codes + per-channel float16 min and scale per 8 tokens for
  keys, per 8 channels for values), each window entry 32 bits."""
  transform = compress.kivi(2, group_size=8, residual=16)
  _, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, transform=transform, capacity=T + R
  )
  H = CONFIG.head_dim
  assert transform.bits(H) == (6.0, 6.0)
  sc = cache.k.code_slots  # (46 // 16) * 16 = 32
  assert sc == 32 and cache.capacity == sc + 16 + R
  valid = np.asarray(cache.valid)
  coded, window = int(valid[..., :sc].sum()), int(valid[..., sc:].sum())
  assert coded == 32 * 2 * CONFIG.num_kv_heads  # 2 rows, 32 entries each
  assert window == 8 * 2 * CONFIG.num_kv_heads  # the 8 pending entries
  assert logical_bytes(cache) == 2 * (coded * H * 6 / 8 + window * H * 4)
  L, B, K = cache.pos.shape[:3]
  code_bytes = L * B * K * sc * H * 6 / 8
  tail_bytes = L * B * K * (16 + R) * H * 4
  assert kvjax.cache.payload_bytes(cache) == 2 * (code_bytes + tail_bytes)
  assert kvjax.cache.coded_share(cache) == (0.8, 0.8)


def test_evict_then_code_bytes():
  transform = compress.chain(compress.knorm(0.75), compress.uniform(4))
  _, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, transform=transform, prompt_lengths=LENGTHS
  )
  H = CONFIG.head_dim
  live = int(np.asarray(cache.valid).sum())
  assert live == (10 + 7) * CONFIG.num_kv_heads
  assert cache.capacity == 10
  assert logical_bytes(cache) == 2 * live * H * 5 / 8
  assert (
    kvjax.cache.payload_bytes(cache)
    == 2 * int(np.prod(cache.pos.shape)) * H * 5 / 8
  )


# ----------------------------------------------------------------------------
# Refusals instead of silent no-ops.


def test_kivi_that_could_never_quantize_is_refused():
  with pytest.raises(compress.Degenerate, match="never fill"):
    kvjax.prefill(
      PARAMS,
      TOKENS[:, :10],
      config=CONFIG,
      transform=compress.kivi(2, group_size=8, residual=16),
    )
  with pytest.warns(UserWarning, match="nothing is quantized"):
    kvjax.generate(
      PARAMS,
      TOKENS[:, :10],
      config=CONFIG,
      max_new_tokens=12,
      transform=compress.kivi(2, group_size=8, residual=16),
    )


def test_fp8_keeps_tiny_vectors_finite():
  codec = compress.fp8_codec()
  x = (
    jnp.asarray(
      np.random.default_rng(0).normal(size=(1, 2, 3, 32)), jnp.float32
    )
    * jnp.asarray([1e-5, 1e-7, 1.0])[:, None]
  )
  x = x.at[0, 0, 0].set(0.0)
  out = np.asarray(codec.decode(codec.encode(x, {}), {}))
  assert np.isfinite(out).all()
  err = np.abs(out - np.asarray(x)).max(-1)  # [1, 2, 3]
  absmax = np.abs(np.asarray(x)).max(-1)
  # e4m3 keeps 3 mantissa bits (relative error <= 1/16 of the value);
  # below absmax 0.027 the float16 scale floor (6.1e-5) limits the
  # absolute error to half a subnormal step, 2^-10 * 6.1e-5.
  assert (err <= np.maximum(absmax / 16, 2**-10 * 6.11e-5)).all(), err
  big = jnp.full((1, 1, 1, 32), 6e4, jnp.float32)  # near float16's max
  assert np.isfinite(np.asarray(codec.decode(codec.encode(big, {}), {}))).all()


@pytest.mark.parametrize(
  "name,capacity",
  [
    ("h2o", 20 + 1),  # the budget + one slot of headroom: decode evicts
    ("snapkv", 20 + R),  # prefill-only: room for every decode step
    ("kivi", 32 + 16),  # no forward reserve: a bare window; R fits in code
    ("identity", T + R),
  ],
)
def test_prefill_decode_steps_go_through_the_transform(name, capacity):
  """`prefill(decode_steps=R)`: those free slots are for decoding through
  the transform, so a budget-keeping policy needs none of them."""
  transform = FACTORIES[name]()
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=transform,
    capacity=T + R,
    decode_steps=R,
  )
  assert cache.capacity == capacity
  _, num, out = kvjax.decode(
    PARAMS,
    cache,
    MORE[:, 0],
    config=CONFIG,
    max_new_tokens=R,
    transform=transform,
  )
  assert (np.asarray(num) == R).all() and not cache_overflowed(out)
  with pytest.raises(ValueError, match="decode_steps"):
    kvjax.prefill(
      PARAMS,
      TOKENS,
      config=CONFIG,
      transform=transform,
      capacity=T + R,
      decode_steps=R + 1,
    )


def test_replace_makes_a_new_value():
  """A transform, scorer or codec changed with `_replace` never equals the
  one it came from (a jitted entry would reuse the wrong program)."""
  t = compress.snapkv(0.5)
  assert t._replace(name="mine") != t and t._replace(spec=t.spec) == t
  assert compress.h2o(0.5)._replace(every=4) != compress.h2o(0.5)
  s = compress.snapkv_scorer()
  assert s._replace(score=None) != s and s == compress.snapkv_scorer()
  c = compress.fp8_codec()
  assert c._replace(decode=None) != c and c == compress.fp8_codec()
  assert compress.uniform(4) != compress.uniform(2)
  with pytest.raises(ValueError, match="bits=2.0 is not supported"):
    compress.uniform(2.0)


def test_chain_is_bounded_only_if_it_keeps_a_budget_to_the_end():
  h2o, snap = compress.h2o(0.5), compress.snapkv(0.5, window_size=8)
  assert compress.chain(snap, h2o).bounded
  assert compress.chain(h2o, compress.uniform(4)).bounded
  # SnapKV after H2O compacts to its own smaller budget with no decode
  # headroom: decoding needs room for every step.
  assert not compress.chain(h2o, snap).bounded


@pytest.mark.parametrize("name", DECODE_TIME)
def test_decode_time_policy_returns_to_its_budget_after_a_question(name):
  transform = FACTORIES[name]()
  _, cache = kvjax.prefill(
    PARAMS, TOKENS, config=CONFIG, transform=transform, capacity=T + R
  )
  _, fed, _ = kvjax.forward(PARAMS, MORE[:, :R], cache, config=CONFIG)
  assert (np.asarray(fed.valid.sum(-1)) == 20 + R).all()
  _, _, out = kvjax.decode(
    PARAMS,
    fed,
    MORE[:, R],
    config=CONFIG,
    max_new_tokens=3 * R,
    transform=transform,
  )
  assert not cache_overflowed(out)
  assert (np.asarray(out.valid.sum(-1)) == 20).all()  # the budget again


def test_kivi_decode_room_is_its_code_region_and_its_window():
  """Decoding through KIVI fills the free code slots (a block at a time)
  and then the window; `decode` admits exactly that many steps and
  refuses one more before running."""
  transform = compress.kivi(2, group_size=4, residual=4)
  _, cache = kvjax.prefill(
    PARAMS,
    TOKENS[:, :4],
    config=CONFIG,
    transform=transform,
    capacity=8,
    decode_steps=4,
  )
  assert cache.k.code_slots == 8 and cache.capacity == 12
  _, num, out = kvjax.decode(
    PARAMS,
    cache,
    MORE[:, 0],
    config=CONFIG,
    max_new_tokens=8,
    transform=transform,
  )
  assert (np.asarray(num) == 8).all() and not cache_overflowed(out)
  assert (np.asarray(out.valid).sum(-1) == 12).all()  # nothing lost
  with pytest.raises(ValueError, match="needs 1 more slots"):
    kvjax.decode(
      PARAMS,
      cache,
      MORE[:, 0],
      config=CONFIG,
      max_new_tokens=9,
      transform=transform,
    )
