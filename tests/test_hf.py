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
    "tiny",
    num_layers=2,
    rope_scaling=kvjax.RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
  ),
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
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(
      np.asarray(a, np.float32), np.asarray(b, np.float32)
    ),
    params,
    loaded,
  )
  assert jax.tree.map(lambda x: x.dtype, loaded) == jax.tree.map(
    lambda x: x.dtype, params
  )


def test_reader_matches_safetensors_package(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  tensors = {
    "a": rng.normal(size=(3, 5)).astype(np.float32),
    "b": rng.integers(0, 9, (7,)).astype(np.int64),
    "c": rng.normal(size=(2, 2, 2)).astype(np.float16),
  }
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
  logits, _, _ = kvjax.forward(
    params,
    jnp.asarray(tokens, jnp.int32),
    kvjax.init_cache(config, 2, 40),
    config=config,
  )
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4)


def test_missing_tensor_raises(tmp_path):
  _, _, path = _export(tmp_path)
  reader = hf.SafetensorsReader([os.path.join(path, "model.safetensors")])
  tensors = {
    k: reader.get(k)
    for k in reader.keys()
    if k != "model.layers.1.mlp.up_proj.weight"
  }
  hf.write_safetensors(os.path.join(path, "model.safetensors"), tensors)
  with pytest.raises(
    ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"
  ):
    hf.load_pretrained(path)


def test_wrong_shape_raises(tmp_path):
  _, _, path = _export(tmp_path)
  reader = hf.SafetensorsReader([os.path.join(path, "model.safetensors")])
  tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros(
    (3, 3), np.float32
  )
  hf.write_safetensors(os.path.join(path, "model.safetensors"), tensors)
  with pytest.raises(
    ValueError,
    match=r"k_proj.weight' has shape \(3, 3\), "
    r"expected \(64, 128\)",
  ):
    hf.load_pretrained(path)


def _rewrite(path, name, value):
  """Rewrites the exported model.safetensors with tensor `name` = value."""
  st = os.path.join(path, "model.safetensors")
  reader = hf.SafetensorsReader([st])
  tensors = {k: np.array(reader.get(k)) for k in reader.keys()}
  tensors[name] = value(tensors[name])
  del reader
  hf.write_safetensors(st, tensors)


@pytest.mark.parametrize(
  "bad,match",
  [
    (np.nan, r"1 NaN and 0 inf values of 49152; weights must be finite"),
    (-np.inf, r"0 NaN and 1 inf values"),
  ],
)
def test_nonfinite_weight_raises(tmp_path, bad, match):
  _, _, path = _export(tmp_path)
  name = "model.layers.1.mlp.up_proj.weight"

  def poison(w):
    w = w.copy()
    w[5, 7] = bad
    return w

  _rewrite(path, name, poison)
  with pytest.raises(
    ValueError,
    match=rf"tensor '{name}' in .*"
    rf"model.safetensors has {match}",
  ):
    hf.load_pretrained(path)


def test_weight_overflowing_the_dtype_raises(tmp_path):
  _, _, path = _export(tmp_path)
  _rewrite(path, "model.norm.weight", lambda w: np.full_like(w, 1e6))
  hf.load_pretrained(path)  # float32 holds 1e6
  with pytest.raises(
    ValueError,
    match=r"'model.norm.weight' .* has 128 "
    r"values beyond the range of float16 \(largest "
    r"magnitude 1e\+06\)",
  ):
    hf.load_pretrained(path, dtype="float16")


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_non_float_weight_raises(tmp_path, dtype):
  _, _, path = _export(tmp_path)
  name = "model.layers.0.self_attn.q_proj.weight"
  _rewrite(path, name, lambda w: w.astype(dtype))
  code = {np.int32: "I32", np.bool_: "BOOL"}[dtype]
  with pytest.raises(
    ValueError,
    match=rf"tensor '{name}' in .* has dtype "
    rf"{code}; model weights must be floating point",
  ):
    hf.load_pretrained(path)


def test_truncated_file_names_file_and_tensor(tmp_path):
  _, _, path = _export(tmp_path)
  st = os.path.join(path, "model.safetensors")
  size = os.path.getsize(st)
  with open(st, "r+b") as f:
    f.truncate(size - 6)
  # The last tensor of the data section (names are sorted) lost 6 bytes.
  with pytest.raises(
    ValueError,
    match=r"model.safetensors: truncated file: "
    r"tensor 'model.norm.weight' needs data bytes "
    r"\[\d+, \d+\) \(512 bytes\), but the data section "
    r"holds \d+ bytes \(506 available to it\)",
  ):
    hf.load_pretrained(path)
  header, start = hf.read_safetensors_header(st)
  with open(st, "r+b") as f:  # Cut inside the data of the first tensor.
    f.truncate(start + 10)
  first = min(header, key=lambda k: header[k]["data_offsets"][0])
  with pytest.raises(
    ValueError,
    match=rf"tensor '{first}' needs data .*"
    r"holds 10 bytes \(10 available to it\)",
  ):
    hf.SafetensorsReader([st]).get(first)
  with open(st, "r+b") as f:  # No data section at all.
    f.truncate(start)
  with pytest.raises(ValueError, match=r"holds 0 bytes \(0 available"):
    hf.SafetensorsReader([st]).get(first)
  with open(st, "r+b") as f:  # Cut inside the header.
    f.truncate(start - 4)
  with pytest.raises(
    ValueError,
    match=r"truncated safetensors file: the "
    rf"header ends at byte {start}",
  ):
    hf.SafetensorsReader([st])


def test_inconsistent_header_entry_raises(tmp_path):
  st = str(tmp_path / "x.safetensors")
  data = np.zeros((3, 4), np.float32).tobytes()
  for entry, match in [
    (
      {"shape": [3, 5]},
      r"tensor 'a' of shape \(3, 5\) and dtype F32 needs "
      r"60 bytes, but its data_offsets \[0, 48\] span 48",
    ),
    ({"data_offsets": [8, 4]}, r"tensor 'a' has a malformed header entry"),
    ({"shape": [3, -4]}, r"malformed header entry"),
  ]:
    raw = json.dumps(
      {"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48], **entry}}
    ).encode()
    with open(st, "wb") as f:
      f.write(len(raw).to_bytes(8, "little") + raw + data)
    with pytest.raises(ValueError, match=match):
      hf.SafetensorsReader([st]).get("a")


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(hidden_act="gelu"), "unsupported hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (
      dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
      "unsupported rope type 'yarn'",
    ),
  ],
)
def test_unsupported_config_raises(tmp_path, update_json, change, match):
  _, _, path = _export(tmp_path)
  update_json(os.path.join(path, "config.json"), change)
  with pytest.raises(ValueError, match=match):
    hf.load_pretrained(path)


def test_not_a_checkpoint_raises(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_pretrained(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"\x01")
  with pytest.raises(ValueError, match="not a safetensors file"):
    hf.SafetensorsReader([str(tmp_path / "model.safetensors")])
