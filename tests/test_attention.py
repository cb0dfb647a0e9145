"""The attention engine: the blockwise XLA backend against the reference
(the definition), its LSE and merge, the mass pass, the typed backend
choice, and the compiled decode step (in place, no whole-buffer copies)."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import attention as A
from kvjax import compress
from kvjax.cache import Codec, CodedKV

generate_lib = importlib.import_module("kvjax.generate")


def _random_layer(
  seed, B=2, T=9, N=8, K=2, S=40, H=16, scrambled=True, live=0.8
):
  """Queries and one layer of slots with scrambled positions and per-head
  ragged liveness (as eviction leaves them)."""
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
  k = jnp.asarray(r.normal(size=(B, K, S, H)), jnp.float32)
  v = jnp.asarray(r.normal(size=(B, K, S, H)), jnp.float32)
  order = np.stack(
    [
      np.stack(
        [r.permutation(S) if scrambled else np.arange(S) for _ in range(K)]
      )
      for _ in range(B)
    ]
  )
  pos = jnp.asarray(order, jnp.int32)
  valid = jnp.asarray(r.random((B, K, S)) < live)
  q_pos = r.integers(0, S + 4, (B, T))
  q_pos[0, 0] = -1  # a query that sees no slot
  return q, k, v, pos, valid, jnp.asarray(q_pos, jnp.int32)


def _lse_close(a, b):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
  fin = np.isfinite(b)
  np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "key_block,query_block",
  [
    (None, 512),  # the defaults (one block at these sizes)
    (8, 4),  # many blocks; 40 slots divide by 8
    (7, 5),  # 40 = 5 * 7 + 5: the last block shifts back, masked
    (16, 2),  # 40 = 2 * 16 + 8
    (64, 3),  # a block larger than the cache
  ],
)
@pytest.mark.parametrize("window", [None, 6])
def test_blockwise_matches_reference(key_block, query_block, window):
  q, k, v, pos, valid, q_pos = _random_layer(0)
  ref = A.reference_attention(
    q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid, sliding_window=window
  )
  got = A.cached_attention(
    q,
    A.layer_view(k, v, pos, valid),
    q_pos=q_pos,
    sliding_window=window,
    backend="xla",
    key_block=key_block,
    query_block=query_block,
    return_probs=True,
  )
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6)
  _lse_close(got.lse, ref.lse)
  np.testing.assert_allclose(got.probs, ref.probs, atol=2e-6)
  assert np.isinf(np.asarray(ref.lse)).any()  # the empty query is covered


@pytest.mark.parametrize("window", [None, 5, 40])
def test_contiguous_causal_blocks_seen_in_full(window):
  """A fresh prefill's layout (positions = slots, all live): most blocks
  take the unmasked branch; batch rows at other offsets."""
  q, k, v, pos, _, _ = _random_layer(7, T=33, S=48, scrambled=False)
  valid = jnp.ones(pos.shape, bool)
  q_pos = jnp.stack([jnp.arange(15, 48), jnp.arange(0, 33)]).astype(jnp.int32)
  ref = A.reference_attention(
    q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid, sliding_window=window
  )
  got = A.cached_attention(
    q,
    A.layer_view(k, v, pos, valid),
    q_pos=q_pos,
    sliding_window=window,
    key_block=8,
    query_block=4,
  )
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6)
  _lse_close(got.lse, ref.lse)


@pytest.mark.parametrize(
  "dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)]
)
def test_many_queries_per_block_in_each_dtype(dtype, atol):
  """G * tq > 64: the softmax denominator comes out of the PV dot (a ones
  column); with a bf16 cache the dot stays bf16 x bf16 -> f32."""
  q, k, v, pos, valid, q_pos = _random_layer(9, T=40, S=96)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  ref = A.reference_attention(q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid)
  got = A.cached_attention(
    q, A.layer_view(k, v, pos, valid), q_pos=q_pos, key_block=32
  )
  assert got.out.dtype == dtype
  np.testing.assert_allclose(
    np.asarray(got.out, np.float32), np.asarray(ref.out, np.float32), atol=atol
  )
  fin = np.isfinite(np.asarray(ref.lse))
  np.testing.assert_allclose(
    np.asarray(got.lse)[fin], np.asarray(ref.lse)[fin], atol=10 * atol
  )


def test_block_sizes_follow_batch_heads_and_the_caller():
  assert A._tiles(None, 512, 8192, 1, 8) == (512, 512)
  kb, tq = A._tiles(None, 512, 512, 8, 8)  # a batch: smaller, square tiles
  assert kb * tq * 8 * 8 <= A.SCORE_TILE and kb < 512 and tq < 512
  assert A._tiles(None, 512, 1, 8, 8) == (A.DECODE_KEY_BLOCK, 1)
  assert A._tiles(None, 4, 9, 1, 8)[1] == 4  # query_block is a maximum
  assert A._tiles(64, 512, 1000, 1, 8) == (64, 512)
  with pytest.raises(ValueError, match="key_block"):
    A._tiles(0, 512, 10, 1, 8)


def test_query_that_sees_nothing_gives_zero_and_minus_inf():
  q, k, v, pos, valid, _ = _random_layer(1, T=3)
  q_pos = jnp.full((2, 3), -1, jnp.int32)  # before every slot
  got = A.attention(
    q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid, backend="xla"
  )
  assert np.all(np.asarray(got.out) == 0)
  assert np.all(np.isneginf(np.asarray(got.lse)))


def test_decode_query_and_batch_rows_with_different_lengths():
  q, k, v, pos, _, _ = _random_layer(2, B=3, T=1, S=300, scrambled=False)
  ends = jnp.array([300, 17, 0])  # full, short, empty
  valid = jnp.broadcast_to(
    jnp.arange(300)[None, None] < ends[:, None, None], (3, 2, 300)
  )
  q_pos = ends[:, None] - 1
  ref = A.reference_attention(q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid)
  got = A.attention(
    q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid, backend="xla"
  )
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6)
  _lse_close(got.lse, ref.lse)


def test_merge_of_disjoint_parts_is_the_whole():
  q, k, v, pos, valid, q_pos = _random_layer(3)
  whole = A.reference_attention(q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid)
  part = lambda s: A.attention(
    q,
    k[:, :, s],
    v[:, :, s],
    q_pos=q_pos,
    k_pos=pos[:, :, s],
    k_valid=valid[:, :, s],
    backend="xla",
  )
  merged = A.merge_attention(part(slice(0, 13)), part(slice(13, None)))
  np.testing.assert_allclose(merged.out, whole.out, atol=2e-6)
  _lse_close(merged.lse, whole.lse)
  # An empty part (LSE -inf everywhere) weighs nothing.
  none = A.attention(
    q,
    k,
    v,
    q_pos=q_pos,
    k_pos=pos,
    k_valid=jnp.zeros_like(valid),
    backend="xla",
  )
  merged = A.merge_attention(whole, none)
  np.testing.assert_allclose(merged.out, whole.out, atol=1e-6)


@pytest.mark.parametrize("key_block,query_block", [(None, 512), (7, 4)])
def test_attention_mass_from_lse_equals_summed_probabilities(
  key_block, query_block
):
  q, k, v, pos, valid, q_pos = _random_layer(4)
  weights = jnp.asarray(np.random.default_rng(5).random((2, 9)), jnp.float32)
  ref = A.reference_attention(q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid)
  view = A.layer_view(k, v, pos, valid)
  lse = A.cached_attention(q, view, q_pos=q_pos, backend="xla").lse
  mass = A.attention_mass(
    q,
    view,
    lse,
    weights,
    q_pos=q_pos,
    key_block=key_block,
    query_block=query_block,
  )
  np.testing.assert_allclose(
    mass, jnp.einsum("bnts,bt->bns", ref.probs, weights), atol=2e-6
  )


def test_mass_mask_selects_the_queries_whose_mass_is_summed():
  config = kvjax.get_config("tiny", num_layers=2)
  params = kvjax.init_params(config, jax.random.key(0), std=0.1)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 1, 64)
  token_mask = jnp.arange(12)[None] < jnp.array([[12], [9]])
  chosen = jnp.asarray(np.random.default_rng(8).random((2, 12)) < 0.5)
  cache = kvjax.init_cache(config, 2, 16)
  _, _, aux = kvjax.forward(
    params,
    tokens,
    cache,
    config=config,
    token_mask=token_mask,
    mass_mask=chosen,
    capture=("attn_mass", "attn_probs"),
  )
  want = jnp.einsum(
    "lbnts,bt->lbns",
    aux["attn_probs"],
    (chosen & token_mask).astype(jnp.float32),
  )
  np.testing.assert_allclose(aux["attn_mass"], want, atol=2e-6)
  _, _, plain = kvjax.forward(
    params,
    tokens,
    cache,
    config=config,
    token_mask=token_mask,
    capture=("attn_mass",),
  )
  assert not np.allclose(plain["attn_mass"], aux["attn_mass"])
  with pytest.raises(ValueError, match="mass_mask"):
    kvjax.forward(params, tokens, cache, config=config, mass_mask=chosen[:, :5])


CODED = {
  "int4": lambda: compress.uniform(4),
  "kivi": lambda: compress.kivi(2, group_size=4, residual=8),
  "turboquant": lambda: compress.turboquant(3),
  "lowrank": lambda: compress.lowrank(8),
  "snapkv+kivi": lambda: compress.chain(
    compress.snapkv(0.5, window_size=8), compress.kivi(2, 4, 8)
  ),
}


# Blocks aligned with the codecs' groups (8) and not (12); each codec once
# (int4 both ways).
@pytest.mark.parametrize(
  "name,key_block",
  [
    ("int4", 8),
    ("int4", 12),
    ("kivi", 12),
    ("turboquant", 12),
    ("lowrank", 8),
    ("snapkv+kivi", 12),
  ],
)
def test_coded_layers_read_block_by_block(name, key_block):
  """A coded layer (codec scores, per-group statistics, a code region and
  a full-precision tail) read in many blocks, shifted last blocks
  included, matches the reference; so does the mass pass."""
  config = kvjax.get_config("tiny", num_layers=2)
  params = kvjax.init_params(config, jax.random.key(0), std=0.1)
  prompt = jax.random.randint(jax.random.key(1), (2, 60), 1, 64)
  _, cache = kvjax.prefill(
    params,
    prompt,
    config=config,
    capacity=66,
    transform=CODED[name](),
    prompt_lengths=jnp.array([60, 45]),
  )
  layer = jnp.int32(1)
  view = A.LayerView(cache.k, cache.v, cache.pos, cache.valid, layer)
  N, H = config.num_heads, config.head_dim
  q = jax.random.normal(jax.random.key(3), (2, 7, N, H))
  q_pos = jnp.array([[60] * 7, [44] * 7]) - jnp.arange(7)[::-1]
  one = jax.tree.map(lambda x: x[1], cache)
  ref = A.reference_attention(
    q, one.k, one.v, q_pos=q_pos, k_pos=one.pos, k_valid=one.valid
  )
  got = A.cached_attention(
    q, view, q_pos=q_pos, key_block=key_block, query_block=3
  )
  np.testing.assert_allclose(got.out, ref.out, atol=2e-5)
  _lse_close(got.lse, ref.lse)
  w = jnp.ones((2, 7))
  mass = A.attention_mass(
    q, view, got.lse, w, q_pos=q_pos, key_block=key_block, query_block=3
  )
  np.testing.assert_allclose(
    mass, jnp.einsum("bnts,bt->bns", ref.probs, w), atol=2e-5
  )


def test_backend_is_one_typed_choice():
  assert A.resolve_backend("xla") is A.Backend.XLA
  assert A.resolve_backend(A.Backend.REFERENCE) is A.Backend.REFERENCE
  assert A.resolve_backend("auto") in (A.Backend.XLA,)  # CPU: the engine
  with pytest.raises(ValueError, match="backend must be one of"):
    A.resolve_backend("pallas")
  with pytest.raises(TypeError, match="backend"):
    A.resolve_backend(3)
  config = kvjax.get_config("tiny", num_layers=1)
  params = kvjax.init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match="backend"):
    kvjax.prefill(
      params, jnp.ones((1, 4), jnp.int32), config=config, backend="flash"
    )


def test_auto_name_and_member_share_one_compile(count_compiles):
  config = kvjax.get_config("tiny", num_layers=1)
  params = kvjax.init_params(config, jax.random.key(0))
  tokens = jnp.ones((1, 8), jnp.int32)
  kvjax.prefill(params, tokens, config=config, backend="auto")
  with count_compiles() as c:
    kvjax.prefill(params, tokens, config=config, backend=A.Backend.XLA)
    kvjax.prefill(params, tokens, config=config, backend="xla")
    kvjax.prefill(params, tokens, config=config)
  assert c["n"] == 0


def test_prefill_with_mass_allocates_no_scores_over_the_cache():
  """H2O needs the attention mass of every prompt query: the engine's
  compiled prefill holds no [T, S] array (the reference's does)."""
  # More queries and slots than one block holds; sizes no other shape has.
  T = A.QUERY_BLOCK + 88
  S = max(T, A.KEY_BLOCK) + 40
  config = kvjax.get_config("tiny", num_layers=1)
  params = kvjax.init_params(config, jax.random.key(0))
  tokens = jnp.ones((1, T), jnp.int32)

  def hlo(backend):
    return (
      generate_lib._prefill.lower(
        params,
        tokens,
        jnp.array([T]),
        compress.h2o(0.5),
        {},
        config=config,
        capacity=S,
        cache_dtype=None,
        backend=backend,
        prefill_chunk=None,
        decode_steps=0,
        write_gate=None,
      )
      .compile()
      .as_text()
    )

  # Scores over the whole cache: a float array [..., X, S] with X >= 16
  # rows (the engine's blocks hold at most KEY_BLOCK < S slots; the cache's
  # own [.., K, S] bookkeeping has K rows).
  def whole_scores(text):
    return [
      m.group(0)
      for m in re.finditer(rf"f32\[[0-9,]*?(\d+),{S}\]", text)
      if int(m.group(1)) >= 16
    ]

  assert whole_scores(hlo(A.Backend.REFERENCE))  # the check can fail
  assert not whole_scores(hlo(A.Backend.XLA))


def _whole_buffer_ops(text, shapes):
  """(computation, opcode) of every instruction that writes a whole cache
  buffer other than in place (a copy, a fresh fill, a select or
  concatenation of the whole): in-place updates are dynamic-update-slice
  fusions."""
  found, comp = [], None
  for line in text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      comp = line.split(" ")[0]
    m = re.match(r"\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* ([\w-]+)\((.*)", line)
    if not m or m.group(1) not in shapes:
      continue
    op = m.group(2)
    if op in (
      "parameter",
      "get-tuple-element",
      "tuple",
      "bitcast",
      "dynamic-update-slice",
      "scatter",
    ):
      continue
    if op == "fusion" and "dynamic-update-slice" in line.split("calls=")[0]:
      continue  # named after its in-place root
    found.append((comp, op, line.strip()[:160]))
  return found


def test_compiled_decode_updates_the_cache_in_place():
  """The decode loop writes one slot per layer and step: no instruction in
  it copies, fills or rebuilds a whole cache buffer (the entry copies the
  caller's cache once, as it is not donated)."""
  config = kvjax.get_config("tiny", num_layers=2)
  params = kvjax.init_params(config, jax.random.key(0))
  S = 2 * A.DECODE_KEY_BLOCK + 48  # several key blocks, one shifted
  cache = kvjax.init_cache(config, 1, S)
  text = (
    generate_lib._decode.lower(
      params,
      cache,
      jnp.zeros((1,), jnp.int32),
      jax.random.key(0),
      None,
      {},
      config=config,
      max_new_tokens=4,
      temperature=0.0,
      top_k=None,
      stop_token=None,
      pad_token=0,
      backend=A.Backend.XLA,
    )
    .compile()
    .as_text()
  )
  L, K, H = config.num_layers, config.num_kv_heads, config.head_dim
  shapes = {
    f"f32[{L},1,{K},{S},{H}]",
    f"s32[{L},1,{K},{S}]",
    f"pred[{L},1,{K},{S}]",
  }
  ops = _whole_buffer_ops(text, shapes)
  inside = [o for o in ops if not o[0].startswith("ENTRY")]
  assert not inside, inside
  # The check sees whole-buffer writes: the entry's copies of the input.
  assert [o[1] for o in ops].count("copy") == 4, ops
  # Donated, the cache is decoded into the caller's buffers: no copy at all.
  donated = (
    generate_lib._decode_donating.lower(
      params,
      cache,
      jnp.zeros((1,), jnp.int32),
      jax.random.key(0),
      None,
      {},
      config=config,
      max_new_tokens=4,
      temperature=0.0,
      top_k=None,
      stop_token=None,
      pad_token=0,
      backend=A.Backend.XLA,
    )
    .compile()
    .as_text()
  )
  assert not _whole_buffer_ops(donated, shapes)


def test_donated_decode_writes_into_the_callers_buffers():
  config = kvjax.get_config("tiny", num_layers=1)
  params = kvjax.init_params(config, jax.random.key(0), std=0.1)
  prompt = jax.random.randint(jax.random.key(3), (2, 12), 1, config.vocab_size)
  logits, cache = kvjax.prefill(params, prompt, config=config, capacity=24)
  first = jnp.argmax(logits[:, -1], -1)
  want = kvjax.decode(params, cache, first, config=config, max_new_tokens=5)
  got = kvjax.decode(
    params, cache, first, config=config, max_new_tokens=5, donate_cache=True
  )
  np.testing.assert_array_equal(got[0], want[0])
  assert cache.k.is_deleted()  # donated: the input is gone
  token, _, step = kvjax.decode_step(
    params, first, got[2], jax.random.key(0), config=config, donate_cache=True
  )
  assert got[2].k.is_deleted() and not step.k.is_deleted()
  with pytest.raises(TypeError, match="donate_cache"):
    kvjax.decode_step(
      params, first, step, jax.random.key(0), config=config, donate_cache=1
    )


def test_blocks_no_query_sees_are_not_read():
  """A probe codec counts the key/value blocks the engine decodes: of
  eight blocks only the two holding live entries are read; a causal prefill
  reads only the blocks at or below each query block's diagonal."""
  reads = []

  def decode(enc, shared):
    del shared
    jax.debug.callback(lambda: reads.append(1))
    return enc["x"]

  probe = Codec("probe", None, decode, params=("probe",))
  B, N, K, H, S, n = 1, 4, 2, 8, 8 * 16, 20
  r = np.random.default_rng(6)
  kv = lambda: CodedKV(
    {"x": jnp.asarray(r.normal(size=(B, K, S, H)), jnp.float32)}, {}, probe
  )
  k, v = kv(), kv()
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, K, S))
  valid = pos < n
  q = jnp.asarray(r.normal(size=(B, 1, N, H)), jnp.float32)
  view = A.layer_view(k, v, pos, valid)
  got = A.cached_attention(q, view, q_pos=jnp.full((B, 1), n), key_block=16)
  jax.block_until_ready(got.out)
  assert len(reads) == 2 * 2  # slots 0-19 lie in two blocks: keys, values
  ref = A.reference_attention(
    q,
    k.decode(),
    v.decode(),
    q_pos=jnp.full((B, 1), n),
    k_pos=pos,
    k_valid=valid,
  )
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6)
  # Causal prefill over all S slots in blocks of 16: 8 query blocks see
  # 1 + 2 + ... + 8 = 36 key blocks, not 64.
  reads.clear()
  qs = jnp.asarray(r.normal(size=(B, S, N, H)), jnp.float32)
  view = A.layer_view(k, v, pos, jnp.ones_like(valid))
  got = A.cached_attention(
    qs, view, q_pos=pos[:, 0], key_block=16, query_block=16
  )
  jax.block_until_ready(got.out)
  assert len(reads) == 2 * 36
  # 28 of those blocks are seen in full (no mask): the values still agree.
  ref = A.reference_attention(
    qs,
    k.decode(),
    v.decode(),
    q_pos=pos[:, 0],
    k_pos=pos,
    k_valid=jnp.ones_like(valid),
  )
  np.testing.assert_allclose(got.out, ref.out, atol=2e-6)
  _lse_close(got.lse, ref.lse)


def test_decode_in_a_larger_cache_gives_the_same_tokens():
  """The same 40-token context decodes to the same tokens in a cache of
  48 slots and in one of several thousand (the empty blocks skipped)."""
  config = kvjax.get_config("tiny", num_layers=1)
  params = kvjax.init_params(config, jax.random.key(0), std=0.1)
  prompt = jax.random.randint(jax.random.key(3), (1, 40), 1, config.vocab_size)
  outs = []
  for capacity in (48, 48 + 8 * A.DECODE_KEY_BLOCK):
    logits, cache = kvjax.prefill(
      params, prompt, config=config, capacity=capacity
    )
    first = jnp.argmax(logits[:, -1], -1)
    outs.append(
      kvjax.decode(params, cache, first, config=config, max_new_tokens=6)[0]
    )
  np.testing.assert_array_equal(outs[0], outs[1])
