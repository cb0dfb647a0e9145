"""Import Hugging Face Llama-family checkpoints without torch.

`load_pretrained(path)` reads `config.json` and `*.safetensors` (one file, or
shards listed in `model.safetensors.index.json`) and returns a
`(ModelConfig, params)` pair in kvjax's layout. Supported: Llama 2/3/3.1/3.2
(rope scaling "llama3" and "linear"), Mistral (sliding window), Qwen2/2.5
(q/k/v biases), Qwen3 (q/k RMSNorm); tied or untied embeddings; config.json
in the legacy (`rope_theta` + `rope_scaling`) or the current
(`rope_parameters`) form. Anything else raises a ValueError naming it.

Tensors are memory-mapped. The safetensors format (8-byte little-endian
header length, a JSON header, then raw little-endian data) is read directly
because the `safetensors` package's numpy loader cannot represent bfloat16,
the dtype most checkpoints ship in; `ml_dtypes` (a jax dependency) gives
numpy a bfloat16.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kvjax.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
# The safetensors dtypes a model weight may have.
_FLOAT_ST_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


# ----------------------------------------------------------------------------
# safetensors reading.


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """Returns (header dict, byte offset of the data section) of one file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(
        f"{path}: not a safetensors file (shorter than 8 bytes)."
      )
    (n,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: malformed safetensors header ({e}).") from e
  header.pop("__metadata__", None)
  return header, 8 + n


class SafetensorsReader:
  """Memory-mapped access to the tensors of one or more safetensors files."""

  def __init__(self, files: list[str]):
    self._where: dict[str, tuple[np.ndarray, dict[str, Any], str]] = {}
    for path in files:
      header, start = read_safetensors_header(path)
      size = os.path.getsize(path)
      if start > size:
        raise ValueError(
          f"{path}: truncated safetensors file: the header "
          f"ends at byte {start}, the file has {size} bytes."
        )
      if start == size:  # No data section (np.memmap cannot map 0 bytes).
        data = np.zeros((0,), np.uint8)
      else:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
      for name, info in header.items():
        if name in self._where:
          raise ValueError(f"tensor {name!r} appears in more than one shard.")
        self._where[name] = (data, info, path)

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def dtype(self, name: str) -> str:
    """The safetensors dtype code of `name` ("F32", "BF16", "I64", ...)."""
    return self._where[name][1]["dtype"]

  def path(self, name: str) -> str:
    """The file that holds the tensor `name`."""
    return self._where[name][2]

  def get(self, name: str) -> np.ndarray:
    """The tensor `name` as a (memory-mapped, read-only) numpy array.

    Raises:
      ValueError: an unsupported dtype, a malformed header entry, or data
        that the file does not hold in full (a truncated file); the message
        names the file and the tensor.
    """
    data, info, path = self._where[name]
    if info.get("dtype") not in _ST_DTYPES:
      raise ValueError(
        f"{path}: tensor {name!r} has unsupported dtype "
        f"{info.get('dtype')}; supported: "
        f"{sorted(_ST_DTYPES)}."
      )
    dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if (
      not isinstance(shape, list)
      or not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for v in shape + offsets
      )
      or offsets[0] > offsets[1]
    ):
      raise ValueError(
        f"{path}: tensor {name!r} has a malformed header "
        f"entry (shape {shape!r}, data_offsets {offsets!r}); "
        "expected a list of non-negative ints and "
        "[begin, end] with begin <= end."
      )
    lo, hi = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if hi - lo != expected:
      raise ValueError(
        f"{path}: tensor {name!r} of shape {tuple(shape)} "
        f"and dtype {info['dtype']} needs {expected} bytes, "
        f"but its data_offsets [{lo}, {hi}] span {hi - lo}."
      )
    if hi > data.size:
      raise ValueError(
        f"{path}: truncated file: tensor {name!r} needs data "
        f"bytes [{lo}, {hi}) ({expected} bytes), but the "
        f"data section holds {data.size} bytes "
        f"({max(0, data.size - lo)} available to it)."
      )
    return data[lo:hi].view(dtype).reshape(shape)


def _checkpoint_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return sorted({os.path.join(path, v) for v in weight_map.values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(
    os.path.join(path, f)
    for f in os.listdir(path)
    if f.endswith(".safetensors")
  )
  if not found:
    raise ValueError(f"no *.safetensors files in {path!r}.")
  return found


# ----------------------------------------------------------------------------
# config.json -> ModelConfig.


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  params = hf.get("rope_parameters")
  if params is None:  # Legacy layout.
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  params = dict(params)
  if "default" in params and isinstance(params["default"], dict):
    raise ValueError("per-layer-type rope_parameters are not supported.")
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if rope_type == "default":
    return theta, None
  if rope_type == "linear":
    return theta, RopeScaling("linear", float(params["factor"]))
  if rope_type == "llama3":
    return theta, RopeScaling(
      "llama3",
      float(params["factor"]),
      float(params["low_freq_factor"]),
      float(params["high_freq_factor"]),
      int(params["original_max_position_embeddings"]),
    )
  raise ValueError(
    f"unsupported rope type {rope_type!r}; supported: "
    "'default', 'linear', 'llama3'."
  )


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
  """Builds a ModelConfig from a Hugging Face config.json dict.

  Raises:
    ValueError: unknown model_type, activation, MLP bias, per-layer sliding
      windows or rope type.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"unsupported model_type {model_type!r}; supported: "
      f"{SUPPORTED_MODEL_TYPES}."
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"unsupported hidden_act {act!r}; only 'silu'.")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported.")
  sliding_window = None
  if model_type == "mistral":
    sliding_window = hf.get("sliding_window")
  elif hf.get("use_sliding_window"):
    raise ValueError(
      f"{model_type} with use_sliding_window=True (per-layer "
      "windows) is not supported."
    )
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  theta, scaling = _rope_from_hf(hf)
  attention_bias = bool(hf.get("attention_bias", False))
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=head_dim,
    mlp_dim=hf["intermediate_size"],
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    qkv_bias=model_type == "qwen2" or attention_bias,
    o_bias=attention_bias,
    qk_norm=model_type == "qwen3",
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    sliding_window=sliding_window,
    max_position_embeddings=hf.get("max_position_embeddings", 4096),
    dtype=dtype,
    name=hf.get("_name_or_path") or model_type,
  )


# ----------------------------------------------------------------------------
# Tensors -> params.


def _layer_tensor_map(c: ModelConfig) -> dict[str, tuple[str, Any]]:
  """kvjax layer leaf -> (HF tensor name pattern, converter of [out, in])."""
  D, N, K, H = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
  a = "model.layers.{i}.self_attn."
  m = "model.layers.{i}.mlp."
  out = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", None),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", None),
    # Linear weights are [out, in]; kvjax stores [in, heads, H] etc.
    "wq": (a + "q_proj.weight", lambda w: w.T.reshape(D, N, H)),
    "wk": (a + "k_proj.weight", lambda w: w.T.reshape(D, K, H)),
    "wv": (a + "v_proj.weight", lambda w: w.T.reshape(D, K, H)),
    "wo": (a + "o_proj.weight", lambda w: w.T.reshape(N, H, D)),
    "w_gate": (m + "gate_proj.weight", lambda w: w.T),
    "w_up": (m + "up_proj.weight", lambda w: w.T),
    "w_down": (m + "down_proj.weight", lambda w: w.T),
  }
  if c.qkv_bias:
    out["bq"] = (a + "q_proj.bias", lambda b: b.reshape(N, H))
    out["bk"] = (a + "k_proj.bias", lambda b: b.reshape(K, H))
    out["bv"] = (a + "v_proj.bias", lambda b: b.reshape(K, H))
  if c.o_bias:
    out["bo"] = (a + "o_proj.bias", None)
  if c.qk_norm:
    out["q_norm"] = (a + "q_norm.weight", None)
    out["k_norm"] = (a + "k_norm.weight", None)
  return out


def _hf_shape(c: ModelConfig, leaf: str, kvjax_shape: tuple[int, ...]):
  """The [out, in] shape HF stores for a kvjax layer leaf."""
  if leaf in ("wq", "wk", "wv"):
    return (int(np.prod(kvjax_shape[1:])), kvjax_shape[0])
  if leaf == "wo":
    return (c.d_model, c.num_heads * c.head_dim)
  if leaf in ("w_gate", "w_up", "w_down"):
    return kvjax_shape[::-1]
  if leaf in ("bq", "bk", "bv"):
    return (int(np.prod(kvjax_shape)),)
  return kvjax_shape


def params_from_tensors(
  reader: SafetensorsReader, config: ModelConfig, dtype: Any = None
) -> dict[str, Any]:
  """Assembles kvjax params from HF tensors, checking names and shapes.

  Raises:
    ValueError: a missing tensor, or one of the wrong shape, of a non-float
      dtype, with NaN or inf values (also after the cast to `dtype`), or
      truncated in its file (each named).
  """
  from kvjax.model import param_shapes  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(dtype or config.dtype)
  shapes = param_shapes(config)

  def fetch(name: str, expected: tuple[int, ...], convert=None) -> np.ndarray:
    """The tensor `name`, checked, converted and cast to `dtype`."""
    if name not in reader:
      raise ValueError(f"checkpoint is missing tensor {name!r}.")
    got = reader.shape(name)
    if got != tuple(expected):
      raise ValueError(
        f"tensor {name!r} has shape {got}, expected "
        f"{tuple(expected)} for this config."
      )
    if reader.dtype(name) not in _FLOAT_ST_DTYPES:
      raise ValueError(
        f"tensor {name!r} in {reader.path(name)} has dtype "
        f"{reader.dtype(name)}; model weights must be "
        f"floating point: one of {_FLOAT_ST_DTYPES}."
      )
    raw = reader.get(name)
    with np.errstate(over="ignore"):  # Overflow is reported below.
      w = (convert(raw) if convert else raw).astype(dtype, copy=False)
    finite = np.isfinite(w)
    if not finite.all():
      raw_finite = np.isfinite(raw)
      where = f"tensor {name!r} in {reader.path(name)}"
      if raw_finite.all():  # Finite as stored: the cast overflowed.
        raise ValueError(
          f"{where} has {int((~finite).sum())} values beyond the range of "
          f"{dtype.name} (largest magnitude "
          f"{float(np.abs(raw.astype(np.float64)).max()):.4g}); load it "
          "in a wider dtype."
        )
      raw64 = raw.astype(np.float64)
      raise ValueError(
        f"{where} has {int(np.isnan(raw64).sum())} NaN and "
        f"{int(np.isinf(raw64).sum())} inf values of {raw.size}; "
        "weights must be finite."
      )
    return w

  layers = {}
  for leaf, (pattern, convert) in _layer_tensor_map(config).items():
    per_layer_shape = shapes["layers"][leaf].shape[1:]
    expected = _hf_shape(config, leaf, per_layer_shape)
    stacked = np.empty((config.num_layers,) + per_layer_shape, dtype)
    for i in range(config.num_layers):
      stacked[i] = fetch(pattern.format(i=i), expected, convert)
    layers[leaf] = jnp.asarray(stacked)
  V, D = config.vocab_size, config.d_model
  params = {
    "embed": jnp.asarray(fetch("model.embed_tokens.weight", (V, D))),
    "layers": layers,
    "final_norm": jnp.asarray(fetch("model.norm.weight", (D,))),
  }
  if not config.tie_embeddings:
    params["lm_head"] = jnp.asarray(
      fetch("lm_head.weight", (V, D), lambda w: w.T)
    )
  return params


def load_pretrained(
  path: str, dtype: str | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a Hugging Face checkpoint directory into kvjax.

  Args:
    path: a directory with `config.json` and safetensors weights.
    dtype: parameter dtype ("float32", "bfloat16", "float16"); default: the
      checkpoint's `dtype`/`torch_dtype`.

  Returns:
    (config, params).

  Raises:
    ValueError: unsupported architecture or rope type, a missing file,
      a missing tensor, a tensor of the wrong shape or of a non-float
      dtype, a tensor with NaN or inf values, a truncated file.
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"no config.json in {path!r}.")
  with open(cfg_path) as f:
    hf = json.load(f)
  config = config_from_hf(hf, dtype=dtype)
  reader = SafetensorsReader(_checkpoint_files(path))
  return config, params_from_tensors(reader, config)


# ----------------------------------------------------------------------------
# Export: kvjax -> Hugging Face layout (so that HF-based tools, e.g. peers in
# comparisons, can run a model trained or edited in kvjax).

_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes numpy arrays (bfloat16 included) as one safetensors file."""
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in _NP_TO_ST:
      raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored.")
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    header[name] = {
      "dtype": _NP_TO_ST[arr.dtype],
      "shape": list(arr.shape),
      "data_offsets": [offset, offset + len(data)],
    }
    offset += len(data)
    blobs.append(data)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for data in blobs:
      f.write(data)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The Hugging Face config.json dict for a kvjax config.

  Raises:
    ValueError: a combination no supported HF family expresses.
  """
  c = config
  if c.qk_norm:
    model_type = "qwen3"
  elif c.qkv_bias and not c.o_bias:
    model_type = "qwen2"
  elif c.sliding_window is not None:
    model_type = "mistral"
  else:
    model_type = "llama"
  if c.sliding_window is not None and model_type != "mistral":
    raise ValueError(
      f"a sliding window with {model_type} features "
      "(qk_norm / qkv-only bias) has no HF equivalent."
    )
  if model_type in ("qwen3", "mistral", "llama") and c.qkv_bias != c.o_bias:
    raise ValueError(
      f"{model_type} has biases on q/k/v and o together or "
      f"not at all; got qkv_bias={c.qkv_bias}, "
      f"o_bias={c.o_bias}."
    )
  if model_type == "qwen2" and c.o_bias:
    raise ValueError("qwen2 has no output-projection bias.")
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    rs = c.rope_scaling
    rope.update(rope_type=rs.rope_type, factor=rs.factor)
    if rs.rope_type == "llama3":
      rope.update(
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=(rs.original_max_position_embeddings),
      )
  arch = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
  }
  out = {
    "architectures": [arch[model_type]],
    "model_type": model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.d_model,
    "intermediate_size": c.mlp_dim,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": c.norm_eps,
    "max_position_embeddings": c.max_position_embeddings,
    "tie_word_embeddings": c.tie_embeddings,
    "rope_theta": c.rope_theta,
    "rope_parameters": rope,
    "dtype": c.dtype,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
  }
  if model_type != "qwen2":
    out["attention_bias"] = c.o_bias
  out["sliding_window"] = c.sliding_window
  return out


def to_hf_tensors(
  params: dict[str, Any], config: ModelConfig
) -> dict[str, np.ndarray]:
  """kvjax params -> {HF tensor name: numpy array} (inverse of loading).

  Raises:
    ValueError: params with an SP-KV write gate, which the HF format has
      no tensor for (save those with `kvjax.train.write_gate.save_gated`).
  """
  if "write_gate" in params:
    raise ValueError(
      "params hold an SP-KV write gate ('write_gate'), which the Hugging "
      "Face export would drop: save with kvjax.train.write_gate.save_gated "
      "(the model, plus write_gate.safetensors beside it)."
    )
  D, N, K, H = (
    config.d_model,
    config.num_heads,
    config.num_kv_heads,
    config.head_dim,
  )
  out = {
    "model.embed_tokens.weight": np.asarray(params["embed"]),
    "model.norm.weight": np.asarray(params["final_norm"]),
  }
  if not config.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  invert = {
    "wq": lambda w: w.reshape(D, N * H).T,
    "wk": lambda w: w.reshape(D, K * H).T,
    "wv": lambda w: w.reshape(D, K * H).T,
    "wo": lambda w: w.reshape(N * H, D).T,
    "w_gate": lambda w: w.T,
    "w_up": lambda w: w.T,
    "w_down": lambda w: w.T,
    "bq": lambda b: b.reshape(-1),
    "bk": lambda b: b.reshape(-1),
    "bv": lambda b: b.reshape(-1),
  }
  for leaf, (pattern, _) in _layer_tensor_map(config).items():
    stacked = np.asarray(params["layers"][leaf])
    for i in range(config.num_layers):
      w = stacked[i]
      out[pattern.format(i=i)] = np.ascontiguousarray(
        invert[leaf](w) if leaf in invert else w
      )
  return out


def save_pretrained(
  path: str, params: dict[str, Any], config: ModelConfig
) -> None:
  """Writes config.json + model.safetensors that transformers can load."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  write_safetensors(
    os.path.join(path, "model.safetensors"), to_hf_tensors(params, config)
  )
