"""kvjax.forward / generate vs Hugging Face transformers on the same weights.

Tiny random models of each supported family are built with transformers,
saved as safetensors to a temp dir, loaded with `kvjax.hf.load_pretrained`
(no torch involved), and compared: logits over a 64-token prompt within
1e-4 (float32), and 32 greedy tokens through the cache identical to
`transformers`' `generate`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the `hf` extra (torch)")
transformers = pytest.importorskip(
  "transformers", reason="needs the `hf` extra"
)

import kvjax  # pylint: disable=g-import-not-at-top
from kvjax import hf

VOCAB = 256
PROMPT = 64
NEW = 32

_COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  initializer_range=0.1,
  eos_token_id=None,
  bos_token_id=None,
  pad_token_id=None,
)

# name -> (config class, model class, extra config kwargs)
FAMILIES = {
  # Llama 3.1-style rope scaling; original context 16 so that the scaled
  # band matters inside a 64-token prompt.
  "llama3": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      )
    ),
  ),
  "qwen2_tied": (
    "Qwen2Config",
    "Qwen2ForCausalLM",
    dict(
      tie_word_embeddings=True,
      rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
  ),
  # head_dim 32 != hidden/heads = 16, as in real Qwen3 checkpoints.
  "qwen3": (
    "Qwen3Config",
    "Qwen3ForCausalLM",
    dict(
      head_dim=32,
      rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
  ),
  # A sliding window shorter than the prompt so the window mask matters.
  "mistral": (
    "MistralConfig",
    "MistralForCausalLM",
    dict(
      sliding_window=24,
      rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
  ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_model(request, tmp_path_factory):
  cfg_cls, model_cls, extra = FAMILIES[request.param]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(**_COMMON, **extra)
  model = getattr(transformers, model_cls)(cfg).eval()
  if request.param == "qwen2_tied":
    # Random biases (HF initializes them to zero) so that they are tested.
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (
          layer.self_attn.q_proj,
          layer.self_attn.k_proj,
          layer.self_attn.v_proj,
        ):
          proj.bias.normal_(0.0, 0.1)
  path = str(tmp_path_factory.mktemp(request.param))
  # Small shards so that the sharded (index.json) path is exercised too.
  model.save_pretrained(path, max_shard_size="100KB")
  return request.param, model, path


def _prompts(batch=2, length=PROMPT, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def test_load_reads_config(hf_model):
  name, _, path = hf_model
  config, params = hf.load_pretrained(path)
  assert config.dtype == "float32"
  assert config.tie_embeddings == (name == "qwen2_tied")
  assert config.qkv_bias == (name == "qwen2_tied")
  assert config.qk_norm == (name == "qwen3")
  assert (config.sliding_window == 24) == (name == "mistral")
  assert (config.rope_scaling is not None) == (name == "llama3")
  assert ("lm_head" in params) == (name != "qwen2_tied")
  if name == "qwen3":
    assert config.head_dim == 32
  files = os.listdir(path)
  assert "model.safetensors.index.json" in files  # sharded checkpoint


def test_logits_match_transformers(hf_model):
  _, model, path = hf_model
  config, params = hf.load_pretrained(path)
  tokens = _prompts()
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens)).logits.numpy()
  cache = kvjax.init_cache(config, tokens.shape[0], PROMPT)
  logits, _, _ = jax.jit(kvjax.forward, static_argnames="config")(
    params, jnp.asarray(tokens, jnp.int32), cache, config=config
  )
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(hf_model):
  _, model, path = hf_model
  config, params = hf.load_pretrained(path)
  tokens = _prompts(seed=1)
  with torch.no_grad():
    ref = model.generate(
      torch.from_numpy(tokens),
      max_new_tokens=NEW,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )[:, PROMPT:].numpy()
  out = kvjax.generate(
    params, jnp.asarray(tokens, jnp.int32), config=config, max_new_tokens=NEW
  )
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_ragged_batch_generation_matches_rows_alone(hf_model):
  _, model, path = hf_model
  config, params = hf.load_pretrained(path)
  lengths = [PROMPT, 37, 50]
  tokens = _prompts(batch=3, seed=2)
  for b, n in enumerate(lengths):
    tokens[b, n:] = 0  # right padding
  out = kvjax.generate(
    params,
    jnp.asarray(tokens, jnp.int32),
    config=config,
    max_new_tokens=16,
    prompt_lengths=jnp.asarray(lengths),
  )
  for b, n in enumerate(lengths):
    with torch.no_grad():
      ref = model.generate(
        torch.from_numpy(tokens[b : b + 1, :n]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )[0, n:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref)


def test_legacy_config_json_rope_scaling(hf_model, tmp_path):
  """Real checkpoints store `rope_theta` + `rope_scaling`, not rope_parameters."""
  name, _, path = hf_model
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  rp = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rp.pop("rope_theta")
  if rp.get("rope_type") != "default":
    cfg["rope_scaling"] = rp
  new = hf.config_from_hf(cfg)
  assert new == hf.load_pretrained(path)[0]


@pytest.mark.parametrize(
  "family,feature",
  [
    ("llama3", dict(rope_scaling=None)),
    ("mistral", dict(sliding_window=None)),
    ("qwen3", dict(qk_norm=False)),
  ],
)
def test_parity_is_sensitive_to_each_feature(family, feature, tmp_path):
  """Turning the family's feature off breaks parity: the tests above see it."""
  cfg_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(
    getattr(transformers, cfg_cls)(**_COMMON, **extra)
  ).eval()
  model.save_pretrained(str(tmp_path))
  config, params = hf.load_pretrained(str(tmp_path))
  if family == "qwen3":
    params["layers"].pop("q_norm"), params["layers"].pop("k_norm")
  config = config.replace(**feature)
  tokens = _prompts()
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens)).logits.numpy()
  logits, _, _ = kvjax.forward(
    params,
    jnp.asarray(tokens, jnp.int32),
    kvjax.init_cache(config, 2, PROMPT),
    config=config,
  )
  assert np.abs(np.asarray(logits) - ref).max() > 1e-3
