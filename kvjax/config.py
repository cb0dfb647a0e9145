"""Model configuration: one frozen dataclass for every supported decoder.

The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3) differs in a
handful of switches: q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), rope scaling
(Llama 3.1+), a sliding window (Mistral), tied embeddings (small Llama 3.2,
Qwen). `ModelConfig` holds them all; it is hashable so it can be a static
argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary-embedding frequency scaling.

  Attributes:
    rope_type: "linear" (positions divided by `factor`) or "llama3"
      (low frequencies divided by `factor`, high ones kept, smooth in between).
    factor: the scaling factor.
    low_freq_factor: llama3 only.
    high_freq_factor: llama3 only.
    original_max_position_embeddings: llama3 only: the pre-scaling context.
  """

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(
        f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
        "allowed: 'linear', 'llama3' (or no scaling)."
      )
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}.")
    if self.rope_type == "llama3" and not (
      0 < self.low_freq_factor < self.high_freq_factor
    ):
      raise ValueError(
        "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
        f"{self.low_freq_factor}, {self.high_freq_factor}."
      )


def _check_attention(cfg, owner: str) -> None:
  """Validates the attention fields of an `AttentionGeometry` or a
  `ModelConfig` (`owner` names it in messages); integer fields become
  Python ints."""
  for field in ("num_heads", "num_kv_heads", "head_dim"):
    value = getattr(cfg, field)
    if (
      not isinstance(value, numbers.Integral)
      or isinstance(value, bool)
      or value <= 0
    ):
      raise ValueError(
        f"{owner}.{field} must be a positive int, got {value!r}."
      )
    object.__setattr__(cfg, field, int(value))
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(
      f"{owner}.num_heads={cfg.num_heads} must be a multiple of "
      f"num_kv_heads={cfg.num_kv_heads} (grouped-query attention)."
    )
  if cfg.head_dim % 2:
    raise ValueError(
      f"{owner}.head_dim={cfg.head_dim} must be even for rotary embeddings."
    )
  window = cfg.sliding_window
  if window is not None and (
    not isinstance(window, numbers.Integral)
    or isinstance(window, bool)
    or window <= 0
  ):
    raise ValueError(
      f"{owner}.sliding_window must be None or a positive int, got {window!r}."
    )
  if (
    not isinstance(cfg.rope_theta, numbers.Real)
    or isinstance(cfg.rope_theta, bool)
    or not cfg.rope_theta > 0
  ):
    raise ValueError(
      f"{owner}.rope_theta must be a positive number, got {cfg.rope_theta!r}."
    )
  if cfg.rope_scaling is not None and not isinstance(
    cfg.rope_scaling, RopeScaling
  ):
    raise TypeError(
      f"{owner}.rope_scaling must be a RopeScaling or None, "
      f"got {type(cfg.rope_scaling).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
  """What the cache, the transforms and the analysis need of a model.

  A model kvjax did not build describes its attention with this alone;
  `ModelConfig.geometry` gives it for kvjax's own decoder. The conventions
  every part of kvjax assumes (`kvjax.cache` checks the cheap ones):

  - keys are stored after RoPE, rotate-half layout (`kvjax.model.apply_rope`:
    the head dimension splits into halves x1, x2 rotated as
    (x1 cos - x2 sin, x2 cos + x1 sin)), queries get the same rotation;
  - query heads are grouped consecutively onto kv heads: query head n
    reads kv head n // G, G = num_heads // num_kv_heads;
  - `pos[l, b, k, s]` is the original token position held by slot s
    (-1 when empty) and `valid[l, b, k, s]` whether it may receive
    attention; a query at position p sees slot s iff valid and pos <= p
    (and p - pos < sliding_window with a window).

  Attributes:
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (N % K == 0).
    head_dim: H (even: RoPE rotates pairs).
    rope_theta: RoPE base (used by methods that rotate, e.g. Expected
      Attention's future queries).
    rope_scaling: optional `RopeScaling`.
    sliding_window: None for full attention.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  sliding_window: int | None = None

  def __post_init__(self):
    _check_attention(self, "AttentionGeometry")

  @property
  def group_size(self) -> int:
    """G = N / K query heads per kv head."""
    return self.num_heads // self.num_kv_heads


def as_geometry(x: "AttentionGeometry | ModelConfig") -> AttentionGeometry:
  """The `AttentionGeometry` of a geometry or a `ModelConfig`.

  Raises:
    TypeError: for anything else.
  """
  if isinstance(x, AttentionGeometry):
    return x
  if isinstance(x, ModelConfig):
    return x.geometry
  raise TypeError(
    "expected a kvjax AttentionGeometry or ModelConfig, got "
    f"{type(x).__name__}."
  )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and architecture of a Llama-family decoder.

  Attributes:
    vocab_size: V.
    d_model: D, the residual width.
    num_layers: L.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (GQA: N % K == 0).
    head_dim: H.
    mlp_dim: F, the SwiGLU hidden width.
    rope_theta: RoPE base.
    rope_scaling: optional `RopeScaling`.
    norm_eps: RMSNorm epsilon.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    o_bias: bias on the output projection (Llama `attention_bias`).
    qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
    tie_embeddings: the LM head is the transposed embedding.
    sliding_window: attend only to the last `sliding_window` positions
      (Mistral); None for full attention.
    max_position_embeddings: the context the model was trained for
      (informational; kvjax does not truncate).
    dtype: parameter and activation dtype ("float32" | "bfloat16" |
      "float16"). Norms, softmax and logits are computed in float32.
    name: a label for logs.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 4096
  dtype: str = "float32"
  name: str = "custom"

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "num_layers", "mlp_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
          f"ModelConfig.{field} must be a positive int, got {value!r}."
        )
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}; allowed: {_DTYPES}.")
    _check_attention(self, "ModelConfig")

  @property
  def group_size(self) -> int:
    """G = N / K query heads per kv head."""
    return self.num_heads // self.num_kv_heads

  @property
  def geometry(self) -> AttentionGeometry:
    """The attention geometry (heads, head dim, RoPE, window)."""
    return AttentionGeometry(
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      rope_theta=self.rope_theta,
      rope_scaling=self.rope_scaling,
      sliding_window=self.sliding_window,
    )

  @property
  def jnp_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"Unknown ModelConfig fields: {sorted(unknown)}.")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


# Presets. The tiny ones are for tests and demos; the named ones record the
# published shapes so that `init_params` can build a model of that size (the
# weights themselves come from `kvjax.hf.load_pretrained`).
PRESETS: dict[str, ModelConfig] = {
  "tiny": ModelConfig(
    vocab_size=512,
    d_model=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    mlp_dim=384,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    name="tiny",
  ),
  "llama-3.2-1b": ModelConfig(
    vocab_size=128256,
    d_model=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
    norm_eps=1e-5,
    tie_embeddings=True,
    max_position_embeddings=131072,
    dtype="bfloat16",
    name="llama-3.2-1b",
  ),
  "llama-3.1-8b": ModelConfig(
    vocab_size=128256,
    d_model=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    norm_eps=1e-5,
    max_position_embeddings=131072,
    dtype="bfloat16",
    name="llama-3.1-8b",
  ),
  "qwen2.5-0.5b": ModelConfig(
    vocab_size=151936,
    d_model=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=4864,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
    max_position_embeddings=32768,
    dtype="bfloat16",
    name="qwen2.5-0.5b",
  ),
  "qwen3-0.6b": ModelConfig(
    vocab_size=151936,
    d_model=1024,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=3072,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    tie_embeddings=True,
    max_position_embeddings=40960,
    dtype="bfloat16",
    name="qwen3-0.6b",
  ),
  "mistral-7b-v0.1": ModelConfig(
    vocab_size=32000,
    d_model=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    rope_theta=10000.0,
    norm_eps=1e-5,
    sliding_window=4096,
    max_position_embeddings=32768,
    dtype="bfloat16",
    name="mistral-7b-v0.1",
  ),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name`, with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; allowed: {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)
