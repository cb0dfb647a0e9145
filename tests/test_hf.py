"""kvjax.hf: reading safetensors, export round trips, and clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kvjax
from kvjax import hf

CONFIGS = {
    "llama3": kvjax.get_config(
        "tiny", num_layers=2,
        rope_scaling=kvjax.RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    "qwen2": kvjax.get_config("tiny", qkv_bias=True, tie_embeddings=True),
    "qwen3": kvjax.get_config("tiny", qk_norm=True, head_dim=64),
    "mistral": kvjax.get_config("tiny", sliding_window=8),
}


def _export(tmp_path, name="llama3", dtype="float32"):
  config = CONFIGS[name].replace(dtype=dtype)
  params = kvjax.init_params(config, jax.random.key(0), std=0.1)
  path = str(tmp_path / name)
  hf.save_pretrained(path, params, config)
  return config, params, path


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_load_round_trip(tmp_path, name, dtype):
  config, params, path = _export(tmp_path, name, dtype)
  loaded_config, loaded = hf.load_pretrained(path)
  assert loaded_config.replace(name=config.name) == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a, np.float32), np.asarray(b, np.float32)), params, loaded)
  assert jax.tree.map(lambda x: x.dtype, loaded) == jax.tree.map(
      lambda x: x.dtype, params)


def test_reader_matches_safetensors_package(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32),
             "b": rng.integers(0, 9, (7,)).astype(np.int64),
             "c": rng.normal(size=(2, 2, 2)).astype(np.float16)}
  save_file(tensors, str(tmp_path / "x.safetensors"))
  reader = hf.SafetensorsReader([str(tmp_path / "x.safetensors")])
  assert reader.keys() == ["a", "b", "c"]
  for k, v in tensors.items():
    np.testing.assert_array_equal(reader.get(k), v)
    assert reader.get(k).dtype == v.dtype


def test_bf16_written_by_torch_reads_exactly(tmp_path):
  torch = pytest.importorskip("torch", reason="needs the `hf` extra")
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  x = torch.randn(4, 6).to(torch.bfloat16)
  save_file({"x": x}, str(tmp_path / "b.safetensors"))
  got = hf.SafetensorsReader([str(tmp_path / "b.safetensors")]).get("x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exported_model_runs_in_transformers_with_same_logits(tmp_path, name):
  torch = pytest.importorskip("torch", reason="needs the `hf` extra")
  transformers = pytest.importorskip("transformers")
  config, params, path = _export(tmp_path, name)
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens)).logits.numpy()
  logits, _, _ = kvjax.forward(params, jnp.asarray(tokens, jnp.int32),
                               kvjax.init_cache(config, 2, 40), config=config)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4)


def test_missing_tensor_raises(tmp_path):
  _, _, path = _export(tmp_path)
  reader = hf.SafetensorsReader([os.path.join(path, "model.safetensors")])
  tensors = {k: reader.get(k) for k in reader.keys()
             if k != "model.layers.1.mlp.up_proj.weight"}
  hf.write_safetensors(os.path.join(path, "model.safetensors"), tensors)
  with pytest.raises(ValueError,
                     match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.load_pretrained(path)


def test_wrong_shape_raises(tmp_path):
  _, _, path = _export(tmp_path)
  reader = hf.SafetensorsReader([os.path.join(path, "model.safetensors")])
  tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 3),
                                                                np.float32)
  hf.write_safetensors(os.path.join(path, "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(3, 3\)"):
    hf.load_pretrained(path)


@pytest.mark.parametrize("change,match", [
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(hidden_act="gelu"), "unsupported hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     "unsupported rope type 'yarn'"),
])
def test_unsupported_config_raises(tmp_path, change, match):
  _, _, path = _export(tmp_path)
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(change)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=match):
    hf.load_pretrained(path)


def test_not_a_checkpoint_raises(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_pretrained(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"\x01")
  with pytest.raises(ValueError, match="not a safetensors file"):
    hf.SafetensorsReader([str(tmp_path / "model.safetensors")])
