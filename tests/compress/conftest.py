"""The kvpress peer: one tiny HF Llama, its uncompressed keys, and the kept
(layer, kv head, position) sets of a kvpress press and of a kvjax transform
on the same input (`tests/compress/test_kvpress_parity*.py`).

kvpress compresses each layer right after its attention during the prefill
forward; kvjax compresses after the whole prefill; both see the same
uncompressed activations, so the kept sets are comparable. kvpress' kept
positions are recovered by matching its gathered keys against the
uncompressed keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

T = 256  # prompt length of the peer input


@dataclasses.dataclass
class Peer:
  """The shared model and input.

  Attributes:
    model: the torch `LlamaForCausalLM` (eval mode).
    full_keys: per layer, [K, T, H] numpy keys of the uncompressed cache.
    config, params: the same weights loaded by `kvjax.hf`.
    tokens: [1, T] int numpy input.
  """

  model: Any
  full_keys: list
  config: Any
  params: Any
  tokens: np.ndarray

  RATIOS = (0.25, 0.75)  # the ratios every parity test runs

  @property
  def T(self) -> int:  # pylint: disable=invalid-name
    return self.tokens.shape[1]

  @staticmethod
  def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0

  def kvpress_kept(self, press, tokens=None) -> set:
    """(layer, kv head, position) entries kvpress keeps after prefilling
    `tokens` (default: the peer input) with `press`."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    tokens = self.tokens if tokens is None else tokens
    full_keys = self.full_keys if tokens is self.tokens else self.keys(tokens)
    cache = transformers.DynamicCache(config=self.model.config)
    with torch.no_grad(), press(self.model):
      self.model(torch.from_numpy(tokens), past_key_values=cache)
    kept = set()
    for l, layer in enumerate(cache.layers):
      got = layer.keys[0].numpy()  # [K, n, H]
      for h in range(got.shape[0]):
        d = np.abs(got[h][:, None, :] - full_keys[l][h][None]).max(-1)
        pos = d.argmin(-1)  # [n]
        assert d.min(-1).max() < 1e-5, "kept key not found in the full cache"
        kept |= {(l, h, int(p)) for p in pos}
    return kept

  def kvpress_masked_kept(self, press, tokens=None) -> set:
    """For presses that mask instead of evicting (AdaKV, DuoAttention …):
    every entry minus the masked ones (`masked_key_indices`)."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    tokens = self.tokens if tokens is None else tokens
    cache = transformers.DynamicCache(config=self.model.config)
    with torch.no_grad(), press(self.model):
      self.model(torch.from_numpy(tokens), past_key_values=cache)
      masked = [
        getattr(layer.self_attn, "masked_key_indices", None)
        for layer in self.model.model.layers
      ]
    kept = set()
    K, width = self.config.num_kv_heads, tokens.shape[1]
    for l, m in enumerate(masked):
      gone = set() if m is None else set(zip(m[1].tolist(), m[2].tolist()))
      kept |= {
        (l, h, p) for h in range(K) for p in range(width) if (h, p) not in gone
      }
    return kept

  def keys(self, tokens) -> list:
    """Uncompressed keys [K, T, H] per layer for `tokens` [1, T]."""
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    cache = transformers.DynamicCache(config=self.model.config)
    with torch.no_grad():
      self.model(torch.from_numpy(tokens), past_key_values=cache)
    return [layer.keys[0].numpy() for layer in cache.layers]

  def kvjax_cache(self, transform, tokens=None, **kwargs):
    """The cache kvjax's `prefill` leaves with `transform`."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    import kvjax  # pylint: disable=g-import-not-at-top

    tokens = self.tokens if tokens is None else tokens
    _, cache = kvjax.prefill(
      self.params,
      jnp.asarray(tokens, jnp.int32),
      config=self.config,
      transform=transform,
      **kwargs,
    )
    return cache

  def kvjax_kept(self, transform, tokens=None, **kwargs) -> set:
    """(layer, kv head, position) entries of row 0 kvjax keeps."""
    cache = self.kvjax_cache(transform, tokens, **kwargs)
    pos, valid = np.asarray(cache.pos[:, 0]), np.asarray(cache.valid[:, 0])
    return {(l, h, int(pos[l, h, s])) for l, h, s in zip(*np.nonzero(valid))}


@pytest.fixture(scope="session")
def peer(tmp_path_factory) -> Peer:
  """A tiny HF Llama (3 layers, 4 query / 2 kv heads, llama3 RoPE) saved
  and loaded by kvjax, with a random [1, 256] input."""
  torch = pytest.importorskip("torch", reason="needs the `hf` extra")
  transformers = pytest.importorskip("transformers", reason="needs `hf`")
  pytest.importorskip("kvpress", reason="needs the `peers` extra")
  from kvjax import hf  # pylint: disable=g-import-not-at-top

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
  peer = Peer(model, [], config, params, tokens)
  peer.full_keys = peer.keys(tokens)
  return peer
