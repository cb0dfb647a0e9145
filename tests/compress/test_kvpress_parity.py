"""Eviction policies vs NVIDIA kvpress on the same tiny HF model and input.

For each method and ratio, the set of kept (layer, kv head, position)
entries of kvjax must match kvpress' (Jaccard >= 0.99). kvpress compresses
each layer right after its attention during the prefill forward; kvjax
compresses after the whole prefill; both see the same uncompressed
activations, so the kept sets are comparable. kvpress' kept positions are
recovered by matching its gathered keys against the uncompressed keys.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the `hf` extra")
transformers = pytest.importorskip("transformers", reason="needs `hf` extra")
kvpress = pytest.importorskip("kvpress", reason="needs the `peers` extra")

import kvjax  # pylint: disable=g-import-not-at-top
from kvjax import compress
from kvjax import hf

T = 256
RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
    rope_parameters=dict(
      rope_type="llama3",
      rope_theta=500000.0,
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=64,
    ),
  )
  model = transformers.LlamaForCausalLM(cfg).eval()
  path = str(tmp_path_factory.mktemp("llama"))
  model.save_pretrained(path)
  config, params = hf.load_pretrained(path)
  tokens = np.random.default_rng(0).integers(0, 256, (1, T))
  with torch.no_grad():
    cache = transformers.DynamicCache(config=cfg)
    model(torch.from_numpy(tokens), past_key_values=cache)
  full_keys = [layer.keys[0].numpy() for layer in cache.layers]  # [K, T, H]
  return model, full_keys, config, params, tokens


def kvpress_kept(models, press):
  model, full_keys, _, _, tokens = models
  cache = transformers.DynamicCache(config=model.config)
  with torch.no_grad(), press(model):
    model(torch.from_numpy(tokens), past_key_values=cache)
  kept = set()
  for l, layer in enumerate(cache.layers):
    got = layer.keys[0].numpy()  # [K, n, H]
    for h in range(got.shape[0]):
      d = np.abs(got[h][:, None, :] - full_keys[l][h][None]).max(-1)  # [n, T]
      pos = d.argmin(-1)
      assert d.min(-1).max() < 1e-5, "kept key not found in the full cache"
      kept |= {(l, h, int(p)) for p in pos}
  return kept


def kvjax_kept(models, transform):
  _, _, config, params, tokens = models
  _, cache = kvjax.prefill(
    params, jnp.asarray(tokens, jnp.int32), config=config, transform=transform
  )
  pos, valid = np.asarray(cache.pos[:, 0]), np.asarray(cache.valid[:, 0])
  return {(l, h, int(pos[l, h, s])) for l, h, s in zip(*np.nonzero(valid))}


def jaccard(a, b):
  return len(a & b) / len(a | b)


METHODS = {
  "snapkv": (
    lambda r: kvpress.SnapKVPress(compression_ratio=r),
    lambda r: compress.snapkv(r),
  ),
  "streaming_llm": (
    lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
    lambda r: compress.streaming_llm(r),
  ),
  "knorm": (
    lambda r: kvpress.KnormPress(compression_ratio=r),
    lambda r: compress.knorm(r),
  ),
  "tova": (
    lambda r: kvpress.TOVAPress(compression_ratio=r),
    lambda r: compress.tova(r),
  ),
  "pyramidkv": (
    lambda r: kvpress.PyramidKVPress(compression_ratio=r),
    lambda r: compress.pyramidkv(r),
  ),
  # Small window and beta so that budgets really fall with depth at T=256
  # (with the defaults PyramidKV is uniform below ~2.5k tokens).
  "pyramidkv_w8_beta2": (
    lambda r: kvpress.PyramidKVPress(
      compression_ratio=r, window_size=8, beta=2
    ),
    lambda r: compress.pyramidkv(r, window_size=8, beta=2),
  ),
  "snapkv_w16_k3": (
    lambda r: kvpress.SnapKVPress(
      compression_ratio=r, window_size=16, kernel_size=3
    ),
    lambda r: compress.snapkv(r, window_size=16, kernel_size=3),
  ),
  "expected_attention": (
    lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
    lambda r: compress.expected_attention(r),
  ),
}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_kept_entries_match_kvpress(models, method, ratio):
  make_press, make_transform = METHODS[method]
  theirs = kvpress_kept(models, make_press(ratio))
  ours = kvjax_kept(models, make_transform(ratio))
  assert len(ours) == len(theirs), (len(ours), len(theirs))
  assert jaccard(ours, theirs) >= 0.99, jaccard(ours, theirs)


def test_pyramid_budgets_fall_with_depth(models):
  kept = kvjax_kept(models, compress.pyramidkv(0.5, window_size=8, beta=2))
  per_layer = [sum(1 for l, _, _ in kept if l == i) for i in range(3)]
  assert per_layer[0] > per_layer[1] > per_layer[2], per_layer


def kvpress_adakv_kept(models, ratio):
  """AdaKV in kvpress masks instead of evicting: kept = all - masked."""
  model, full_keys, _, _, tokens = models
  press = kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
  cache = transformers.DynamicCache(config=model.config)
  with torch.no_grad(), press(model):
    model(torch.from_numpy(tokens), past_key_values=cache)
    masked = [
      layer.self_attn.masked_key_indices for layer in model.model.layers
    ]
  kept = set()
  for l, (_, heads, seqs) in enumerate(masked):
    gone = set(zip(heads.tolist(), seqs.tolist()))
    K = full_keys[l].shape[0]
    kept |= {
      (l, h, p) for h in range(K) for p in range(T) if (h, p) not in gone
    }
  return kept


@pytest.mark.parametrize("ratio", RATIOS)
def test_adakv_matches_kvpress_and_saves_memory(models, ratio):
  theirs = kvpress_adakv_kept(models, ratio)
  transform = compress.adakv("snapkv", ratio)
  ours = kvjax_kept(models, transform)
  assert jaccard(ours, theirs) >= 0.99, jaccard(ours, theirs)
  # kvpress keeps every entry in memory; kvjax's cache is physically
  # smaller, with the head-budget padding visible in the logical figure.
  _, _, config, params, tokens = models
  _, cache = kvjax.prefill(
    params, jnp.asarray(tokens, jnp.int32), config=config, transform=transform
  )
  full = kvjax.init_cache(config, 1, T)
  # The static capacity is the largest head budget any head could reach:
  # min(T, K * n - (K - 1) * n_safe). With K = 2 at ratio 0.25 that is T
  # (no physical saving); from ratio 0.5 on the cache is smaller.
  K, n = config.num_kv_heads, int(T * (1 - ratio))
  assert cache.capacity == min(T, K * n - (K - 1) * max(1, int(0.2 * n)))
  if ratio >= 0.5:
    assert kvjax.kv_bytes(cache) < kvjax.kv_bytes(full)
  assert kvjax.logical_bytes(cache) < kvjax.kv_bytes(cache)
