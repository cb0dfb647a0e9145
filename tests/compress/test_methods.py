"""Every method of the registry's kvpress set, end to end, as a user runs it.

For each name of `registry.KVPRESS_NAMES`, built at ratio 0.5 on a 2-layer
model, batch 2 with ragged rows (144 and 100 tokens):

- Memory is real: the payload bytes are the kept entries' bytes plus the
  overhead the layout states: the reserve, and for head- or layer-variable
  budgets the padding up to the largest budget (`kv_bytes` - `logical_bytes`
  is exactly that padding). The capacity is no larger than the fullest head
  needs.
- The kept share is within 10% of 1 - ratio where the method's budget is a
  ratio of the entries (the exceptions are listed with their reason).
- The question is fed after compression (`forward` into the reserve), then
  decode runs; an equal transform built anew compiles nothing new.
- Question-aware compression (`compress_observing`) runs, or is refused
  for the stated reason.
- The method composes with a codec (evict, then quantize): `generate`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax.cache import cache_overflowed, logical_bytes, payload_bytes
from kvjax.compress import registry
from kvjax.compress import scorers

CONFIG = kvjax.get_config("tiny", num_layers=2, d_model=64, mlp_dim=128)
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
T, R = 144, 4  # prompt width, the question's length
N_NEW = 3  # decode steps after the question
SHORT = 100  # the second row's length
LENGTHS = jnp.array([T, SHORT])
TOKENS = jax.random.randint(jax.random.key(1), (2, T), 1, CONFIG.vocab_size)
SHIFTED = (TOKENS + 3) % CONFIG.vocab_size
QUESTION = jax.random.randint(jax.random.key(2), (2, R), 1, CONFIG.vocab_size)
RATIO = 0.5

# Methods whose kept share is not 1 - ratio by definition.
SHARE_EXEMPT = {
  "chunkkv": "the ratio counts whole chunks (kvpress): fewer entries kept",
  "simlayerkv": "lazy layers are found from the data; no ratio",
  "duo_attention": "ratio = share of streaming heads, which keep sinks + "
  "recent: 1 - r (1 - (sink + recent) / T) kept",
  "think": "keeps every entry; the ratio is the share of key channels "
  "pruned (payload 1 - r / 2)",
}
# Question-aware use (`compress_observing`) these methods refuse, and why.
AWARE_REFUSED = {
  "non_causal_attn": "reads the queries of the entries themselves",
  "compactor": "reads the queries of the entries themselves",
  "kvzip": "replays the context's token ids, which the cache does not hold",
}
# Pruning key channels instead of entries: payload share of the full one.
CHANNELS = {"think": 1 - RATIO / 2}
# Decode-time headroom beyond `every` slots: the compression interval.
HEADROOM = {"decoding": 16}
# Layer- or head-variable budgets: the static capacity is the largest
# budget a layer or head may reach, known before tracing; the padding up
# to it is `kv_bytes` - `logical_bytes`. SimLayerKV and DuoAttention find
# their lazy layers and streaming heads from the data: their capacity is
# the whole prompt (no physical saving; the logical bytes show the ragged
# layout's).
VARIABLE = {
  "chunkkv": "whole chunks: a row that keeps the short last chunk keeps "
  "fewer entries than the capacity of whole chunks",
  "per_layer": "layer budgets from per-layer ratios",
  "simlayerkv": "lazy layers keep sinks + recent, the others everything",
  "duo_attention": "streaming heads keep sinks + recent, retrieval heads "
  "everything",
  "critical_adakv": "head budgets from a global top-k per layer (Ada-KV)",
  "kvzip": "a head keeps up to 1.25x the mean budget (head_capacity)",
}


# Plain score-then-top-k policies (`policies.scored_policy`).
SCORED = tuple(scorers.METHODS)


def _bytes_per_entry():
  return 2 * CONFIG.head_dim * jnp.dtype(CONFIG.dtype).itemsize


def test_every_kvpress_name_is_registered():
  assert set(registry.KVPRESS_NAMES) <= set(registry.POLICY_NAMES)


@pytest.mark.parametrize("name", registry.KVPRESS_NAMES)
def test_method_end_to_end(name, count_compiles):
  transform = registry.build(name, RATIO)
  assert transform.name == name
  assert transform == registry.build(name, RATIO)
  reserve = R + N_NEW
  kw = dict(config=CONFIG, prompt_lengths=LENGTHS, capacity=T + reserve)
  _, full = kvjax.prefill(PARAMS, TOKENS, **kw)
  _, cache = kvjax.prefill(PARAMS, TOKENS, transform=transform, **kw)
  assert not cache_overflowed(cache)
  valid = np.asarray(cache.valid)
  live = valid.sum(-1)  # [L, B, K]
  full_live = np.asarray(full.valid).sum(-1)
  assert (live <= full_live).all() and (live >= 1).all(), name
  # The rows keep their own entries only.
  assert (np.asarray(cache.pos)[:, 1][valid[:, 1]] < SHORT).all()

  # Bytes: exactly the kept entries (logical), plus the stated padding.
  per_entry = _bytes_per_entry()
  if name in CHANNELS:  # fewer key channels stored, every entry kept
    share = payload_bytes(cache) / payload_bytes(full)
    assert abs(share - CHANNELS[name]) <= 0.1 * CHANNELS[name], (name, share)
  else:
    assert logical_bytes(cache) == live.sum() * per_entry, name
    assert payload_bytes(cache) == cache.capacity * live.size * per_entry
  headroom = HEADROOM.get(name, transform.every if transform.bounded else 0)
  if name in VARIABLE:
    assert payload_bytes(cache) <= payload_bytes(full), name
  else:
    assert cache.capacity <= live.max() + reserve + headroom, (
      name,
      cache.capacity,
    )
  free = cache.capacity - int(np.asarray(cache.end).max())
  assert free >= reserve, (name, free)
  if name not in SHARE_EXEMPT:
    kept = live.sum() / full_live.sum()
    assert abs(kept - (1 - RATIO)) <= 0.1, (name, kept)

  # The question goes into the reserve, then decode.
  _, fed, _ = kvjax.forward(PARAMS, QUESTION, cache, config=CONFIG)
  assert not cache_overflowed(fed)
  decode_kw = dict(config=CONFIG, max_new_tokens=N_NEW, transform=transform)
  _, num, out = kvjax.decode(PARAMS, fed, QUESTION[:, -1], **decode_kw)
  assert (np.asarray(num) == N_NEW).all()
  assert not cache_overflowed(out)

  # Question-aware: the uncompressed context compressed while observing
  # the question's queries (what the sweep's aware mode does).
  if name in AWARE_REFUSED:
    with pytest.raises(ValueError):
      kvjax.compress_observing(
        PARAMS, full, QUESTION, config=CONFIG, transform=transform
      )
  else:
    aware = kvjax.compress_observing(
      PARAMS, full, QUESTION, config=CONFIG, transform=transform
    )
    assert not cache_overflowed(aware)
    aware_live = np.asarray(aware.valid).sum(-1)
    assert (aware_live <= full_live).all() and (aware_live >= 1).all()

  # An equal transform on other tokens compiles nothing new.
  with count_compiles() as c:
    kvjax.prefill(PARAMS, SHIFTED, transform=registry.build(name, RATIO), **kw)
  assert c["n"] == 0, name


# Composition is per layout: the scorers are `scored_policy`s, whose
# composition with every codec test_contract.py checks (through knorm,
# snapkv, ...); of the methods that lay out their own cache, one of each
# kind composes here: layer-variable budgets (per_layer), head-variable
# budgets (critical_adakv, kvzip), the whole prompt's capacity
# (duo_attention), decode-time compression (decoding), rewritten values
# (merging) and attention state (cam), renumbered positions
# (key_rerotation), its own key layout (think). The rest (chunkkv, chunk,
# block, simlayerkv, criticalkv, finch) leave a uniform compacted cache,
# as a scored policy does.
COMPOSED = (
  "per_layer",
  "critical_adakv",
  "kvzip",
  "duo_attention",
  "decoding",
  "merging",
  "cam",
  "key_rerotation",
  "think",
)


@pytest.mark.parametrize("name", COMPOSED)
def test_method_then_codec_generates(name, count_compiles):
  make = lambda: compress.chain(registry.build(name, RATIO), compress.fp8())
  kw = dict(config=CONFIG, max_new_tokens=3, prompt_lengths=LENGTHS)
  out = kvjax.generate(PARAMS, TOKENS, transform=make(), **kw)
  assert (np.asarray(out.num_generated) == 3).all()
  assert not cache_overflowed(out.cache)
  assert np.isfinite(np.asarray(out.prompt_logits)).all()
  with count_compiles() as c:
    kvjax.generate(PARAMS, SHIFTED, transform=make(), **kw)
  assert c["n"] == 0, name
