"""Merging, key re-rotation and ThinK vs NVIDIA kvpress 0.5.5 on the `peer`
model (`tests/compress/conftest.py`).

- merging: kept (layer, kv head, position) sets equal kvpress'
  `MergingPress(SnapKVPress)` and the stored (merged) values match.
- key_rerotation: kvpress' cache holds re-rotated keys, so kept sets cannot
  be recovered from its keys by matching; instead the stored keys (slot i of
  each head = re-rotated position i) are compared directly, and so are the
  logits of a question and a greedy decode fed after compression at
  position n (kvpress' pipeline convention).
- think: kvpress zeroes pruned key channels (same shape, no memory saved);
  kvjax stores only the kept channels. The kept channel sets equal the
  complement of kvpress' zeroed channels, kvjax's payload is physically
  smaller, and attention over kvjax's cache (reference and XLA engines)
  equals attention over kvpress' zeroed keys.
"""

import numpy as np
import pytest

kvpress = pytest.importorskip("kvpress", reason="needs the `peers` extra")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

import kvjax  # pylint: disable=g-import-not-at-top
from kvjax import attention as attn_lib  # pylint: disable=g-import-not-at-top
from kvjax.compress import policies  # pylint: disable=g-import-not-at-top
from kvjax.compress import rewrite  # pylint: disable=g-import-not-at-top

RATIOS = (0.5,)  # one ratio here; the core policies run 0.25 and 0.75


def _kvpress_cache(peer, press, tokens=None):
  tokens = peer.tokens if tokens is None else tokens
  cache = transformers.DynamicCache(config=peer.model.config)
  with torch.no_grad(), press(peer.model):
    peer.model(torch.from_numpy(tokens), past_key_values=cache)
  return cache


def _by_position(peer, cache):
  """{(l, h, pos): value [H]} of kvpress' cache, positions recovered from
  its (unchanged) keys."""
  out = {}
  for l, layer in enumerate(cache.layers):
    k, v = layer.keys[0].numpy(), layer.values[0].numpy()
    for h in range(k.shape[0]):
      d = np.abs(k[h][:, None] - peer.full_keys[l][h][None]).max(-1)
      assert d.min(-1).max() < 1e-5
      for i, p in enumerate(d.argmin(-1)):
        out[(l, h, int(p))] = v[h, i]
  return out


@pytest.mark.parametrize("ratio", RATIOS)
def test_merging_kept_and_values_match_kvpress(peer, ratio):
  press = kvpress.MergingPress(
    press=kvpress.SnapKVPress(compression_ratio=ratio)
  )
  theirs = _by_position(peer, _kvpress_cache(peer, press))
  transform = rewrite.merging(policies.snapkv(ratio))
  cache = peer.kvjax_cache(transform)
  pos, valid = np.asarray(cache.pos[:, 0]), np.asarray(cache.valid[:, 0])
  v = np.asarray(cache.v[:, 0], np.float32)
  ours = {
    (l, h, int(pos[l, h, s])): v[l, h, s] for l, h, s in zip(*np.nonzero(valid))
  }
  assert peer.jaccard(set(ours), set(theirs)) >= 0.99
  both = sorted(set(ours) & set(theirs))
  a = np.stack([ours[x] for x in both])
  b = np.stack([theirs[x] for x in both])
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  if ratio != 0.5:
    return
  # The merge really changed values (the test can fail): compare with the
  # plain policy's stored values.
  plain = peer.kvjax_cache(policies.snapkv(ratio))
  changed = np.abs(np.asarray(plain.v) - np.asarray(cache.v)).max()
  assert changed > 1e-3, changed
  # Memory: the same compacted capacity as the wrapped policy.
  assert cache.capacity == plain.capacity < peer.T


def _rerotation_press(ratio):
  return kvpress.KeyRerotationPress(
    press=kvpress.StreamingLLMPress(compression_ratio=ratio)
  )


def _rerotation(ratio):
  return rewrite.METHODS["key_rerotation"](ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_key_rerotation_keys_match_kvpress(peer, ratio):
  theirs = _kvpress_cache(peer, _rerotation_press(ratio))
  cache = peer.kvjax_cache(_rerotation(ratio))
  k = np.asarray(cache.k[:, 0], np.float32)  # [L, K, S, H]
  for l, layer in enumerate(theirs.layers):
    tk = layer.keys[0].numpy()  # [K, n, H]
    n = tk.shape[1]
    assert int(np.asarray(cache.valid[l, 0]).sum(-1).max()) == n
    np.testing.assert_array_equal(
      np.asarray(cache.pos[l, 0, :, :n]), np.broadcast_to(np.arange(n), (2, n))
    )
    np.testing.assert_allclose(k[l, :, :n], tk, atol=1e-4, rtol=1e-4)
  assert int(cache.length[0]) == theirs.get_seq_length()
  if ratio != 0.5:
    return
  # the keys really moved: slot n-1 held position T-1 before re-rotation
  plain = peer.kvjax_cache(policies.streaming_llm(ratio))
  assert (
    np.abs(np.asarray(plain.k[:, 0, :, n - 1]) - k[:, :, n - 1]).max() > 1e-3
  )


@pytest.mark.parametrize("ratio", (0.5,))
def test_key_rerotation_question_and_decode_match_kvpress(peer, ratio):
  """Compress the context, feed a question at position n, decode greedily:
  the logits equal kvpress' (its pipeline feeds the question at
  context_length = the compressed length)."""
  rng = np.random.default_rng(1)
  question = rng.integers(0, 256, (1, 8))
  steps = 6
  # kvpress / HF
  cache = _kvpress_cache(peer, _rerotation_press(ratio))
  n = cache.get_seq_length()
  theirs = []
  with torch.no_grad():
    pos = torch.arange(n, n + question.shape[1])[None]
    out = peer.model(
      torch.from_numpy(question), past_key_values=cache, position_ids=pos
    )
    theirs.append(out.logits[0, -1].numpy())
    nxt, p = out.logits[0, -1].argmax(), n + question.shape[1]
    for i in range(steps):
      out = peer.model(
        nxt[None, None],
        past_key_values=cache,
        position_ids=torch.tensor([[p + i]]),
      )
      theirs.append(out.logits[0, -1].numpy())
      nxt = out.logits[0, -1].argmax()
  # kvjax
  _, kc = kvjax.prefill(
    peer.params,
    jnp.asarray(peer.tokens, jnp.int32),
    config=peer.config,
    transform=_rerotation(ratio),
    capacity=peer.T + question.shape[1] + steps,
  )
  assert int(kc.length[0]) == n
  ours = []
  forward = jax.jit(
    lambda t, c: kvjax.forward(peer.params, t, c, config=peer.config)[:2]
  )
  logits, kc = forward(jnp.asarray(question, jnp.int32), kc)
  ours.append(np.asarray(logits[0, -1]))
  for _ in range(steps):
    nxt = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    logits, kc = forward(nxt, kc)
    ours.append(np.asarray(logits[0, -1]))
  np.testing.assert_allclose(np.stack(ours), np.stack(theirs), atol=2e-4)
  assert [int(x.argmax()) for x in ours] == [int(x.argmax()) for x in theirs]


@pytest.mark.parametrize("ratio", RATIOS)
def test_think_channels_and_attention_match_kvpress(peer, ratio):
  press = kvpress.ThinKPress(
    key_channel_compression_ratio=ratio, window_size=32
  )
  theirs = _kvpress_cache(peer, press)
  transform = rewrite.think(ratio, window_size=32)
  cache = peer.kvjax_cache(transform)
  H = peer.config.head_dim
  kept_n = H - int(H * ratio)
  channels = np.asarray(cache.k.shared["channels"][:, 0])  # [L, K, kept]
  assert channels.shape[-1] == kept_n
  assert cache.k.slots["kept"].shape[-1] == kept_n  # stored for real
  # the key payload is physically [.., kept] (+ the channel indices)
  L, K, T = peer.config.num_layers, peer.config.num_kv_heads, peer.T
  assert cache.k.slots["kept"].nbytes == L * K * T * kept_n * 4
  q = jnp.asarray(
    np.random.default_rng(2).normal(size=(1, 3, peer.config.num_heads, H)),
    jnp.float32,
  )
  q_pos = jnp.full((1, 3), peer.T, jnp.int32)
  for l, layer in enumerate(theirs.layers):
    tk = layer.keys[0].numpy()  # [K, T, H], pruned channels zero
    for h in range(tk.shape[0]):
      zeroed = set(np.nonzero(np.all(tk[h] == 0, axis=0))[0].tolist())
      assert zeroed == set(range(H)) - set(channels[l, h].tolist())
    if ratio != 0.5:
      continue
    ref = attn_lib.reference_attention(
      q,
      jnp.asarray(tk)[None],
      jnp.asarray(layer.values.numpy()),
      q_pos=q_pos,
      k_pos=jnp.broadcast_to(jnp.arange(peer.T), (1, tk.shape[0], peer.T)),
      k_valid=jnp.ones((1, tk.shape[0], peer.T), bool),
    )
    for backend in ("reference", "xla"):
      got = attn_lib.cached_attention(q, cache, l, q_pos=q_pos, backend=backend)
      np.testing.assert_allclose(got.out, ref.out, atol=1e-5, rtol=1e-4)
      np.testing.assert_allclose(got.lse, ref.lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target_size", (40,))
def test_cam_kept_and_values_match_kvpress(peer, monkeypatch, target_size):
  """CaM with KnormPress scores: kvpress compresses a pass of
  q_len >= target_size (here the context after its first token) and then
  every `compression_interval` decode steps; kvjax compresses at prefill
  and then likewise. The Bernoulli merge draw is replaced by its
  expectation on both sides (kvpress: torch.bernoulli patched to return
  the probability; kvjax: sample=False), so kept sets, stored values and
  greedy tokens must agree."""
  interval, budget, new = 4, 8, 11
  # A context without repeated tokens: layer 0 keys of one token at two
  # positions have equal norms (RoPE is a rotation), exact knorm ties that
  # torch and XLA may break differently.
  context = np.random.default_rng(5).permutation(peer.T)[None]
  monkeypatch.setattr(torch, "bernoulli", lambda p: p)
  press = kvpress.CAMPress(
    base_press=kvpress.KnormPress(),
    compression_interval=interval,
    target_size=target_size,
    merge_budget=budget,
  )
  # kvjax
  transform = rewrite.cam(
    "knorm",
    compression_interval=interval,
    target_size=target_size,
    merge_budget=budget,
    sample=False,
  )
  out = kvjax.generate(
    peer.params,
    jnp.asarray(context, jnp.int32),
    config=peer.config,
    max_new_tokens=new,
    transform=transform,
  )
  gen = np.asarray(out.tokens)[0]
  # kvpress: token 0 prefills, the rest of the context is one pass, then
  # the generated tokens one at a time.
  cache = transformers.DynamicCache(config=peer.model.config)
  theirs_tokens = []
  with torch.no_grad(), press(peer.model):
    ctx = torch.from_numpy(context)
    peer.model(ctx[:, :1], past_key_values=cache)
    o = peer.model(
      ctx[:, 1:],
      past_key_values=cache,
      position_ids=torch.arange(1, peer.T)[None],
    )
    theirs_tokens.append(int(o.logits[0, -1].argmax()))
    for i in range(new - 1):
      o = peer.model(
        torch.tensor([[theirs_tokens[-1]]]),
        past_key_values=cache,
        position_ids=torch.tensor([[peer.T + i]]),
      )
      theirs_tokens.append(int(o.logits[0, -1].argmax()))
  assert gen.tolist() == theirs_tokens
  # Entries of tokens fed after compression depend on the compressed
  # cache, so kvpress' entries are matched against kvjax's own keys (equal
  # keys = the same token in the same slot history), then positions and
  # values are compared.
  c = out.cache
  pos, valid = np.asarray(c.pos[:, 0]), np.asarray(c.valid[:, 0])
  ck, cv = np.asarray(c.k[:, 0], np.float32), np.asarray(c.v[:, 0], np.float32)
  for l, layer in enumerate(cache.layers):
    k, v = layer.keys[0].numpy(), layer.values[0].numpy()
    for h in range(k.shape[0]):
      live = np.nonzero(valid[l, h])[0]
      assert len(live) == k.shape[1]  # the same number kept
      d = np.abs(k[h][:, None] - ck[l, h, live][None]).max(-1)
      match = live[d.argmin(-1)]
      assert d.min(-1).max() < 1e-4, d.min(-1).max()
      assert len(set(match.tolist())) == len(match)  # one to one
      # kvpress keeps its entries in position order, as kvjax's slots
      np.testing.assert_array_equal(np.diff(pos[l, h, match]) > 0, True)
      np.testing.assert_allclose(cv[l, h, match], v[h], atol=2e-5, rtol=1e-4)
  # the cache is physically at the budget plus the interval's headroom
  assert c.capacity <= target_size + interval + new
