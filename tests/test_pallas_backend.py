"""The Pallas backends end to end: prefill (flash attention and its mass
pass), compression, a question fed to the compressed cache and greedy
decoding (the decode kernel reading each codec's payload) agree with the
reference backend, for every codec and policy of the method registry, with
the kernels in interpret mode on this CPU machine."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress, kernels
from kvjax.attention import Backend, resolve_backend
from kvjax.compress import registry

CONFIG = kvjax.get_config("tiny")
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.1)
PROMPT = jax.random.randint(jax.random.key(1), (2, 144), 1, CONFIG.vocab_size)
LENGTHS = jnp.array([144, 131])
QUESTION = jax.random.randint(jax.random.key(2), (2, 4), 1, CONFIG.vocab_size)
# Codecs whose tiles Triton cannot lower (3-bit codes; PolarQuant has no
# tile functions at all): the GPU backend runs them on the XLA engine.
GPU_FALLBACK = {"turboquant3", "polarquant"}
TPU_FALLBACK = {"polarquant"}


def _flow(method, backend):
  """prefill + compress, a 4-token question, 4 greedy steps."""
  if method == "snapkv+kivi2":  # a residual block the evicted cache fills
    tr = compress.chain(
      compress.snapkv(ratio=0.5), compress.kivi(2, group_size=16, residual=32)
    )
  elif method != "none":
    policy, _ = registry.parse(method)
    tr = registry.build(method, ratio=0.5 if policy else None)
  else:
    tr = None
  extra = {}
  if method == "oracle":
    extra["future_mass"] = jax.random.uniform(
      jax.random.key(3), (CONFIG.num_layers, 2, CONFIG.num_heads, 256)
    )
  pre = kvjax.prefill(
    PARAMS,
    PROMPT,
    config=CONFIG,
    transform=tr,
    prompt_lengths=LENGTHS,
    capacity=256,
    backend=backend,
    decode_steps=8,
    **extra,
  )
  logits, cache, _ = kvjax.forward(
    PARAMS, QUESTION, pre.cache, config=CONFIG, backend=backend
  )
  out = kvjax.decode(
    PARAMS,
    cache,
    jnp.argmax(logits[:, -1], -1),
    config=CONFIG,
    max_new_tokens=4,
    backend=backend,
    transform=tr,
  )
  return pre.logits, logits, out.tokens


@functools.cache
def _reference(method):
  return _flow(method, "reference")


def _check(method, target):
  want = _reference(method)
  fallback = GPU_FALLBACK if target == "gpu" else TPU_FALLBACK
  kernels._warn_once.cache_clear()  # each case says it again
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = _flow(method, f"pallas_{target}")
  said = " ".join(str(w.message) for w in caught)
  codec = registry.parse(method)[1] if method != "none" else None
  assert (codec in fallback) == ("XLA engine instead" in said), said
  for g, w in zip(got[:2], want[:2]):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)
  np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("method", ("none",) + registry.CODEC_NAMES)
def test_every_codec_agrees_with_the_reference(method, target):
  _check(method, target)


@pytest.mark.parametrize("method", registry.POLICY_NAMES + ("snapkv+kivi2",))
def test_every_policy_agrees_with_the_reference(method):
  _check(method, "tpu")


def test_auto_picks_the_kernels_on_their_platform(monkeypatch):
  assert resolve_backend("pallas_tpu") is Backend.PALLAS_TPU
  assert resolve_backend("pallas_gpu") is Backend.PALLAS_GPU
  for platform, want in (
    ("cpu", Backend.XLA),
    ("tpu", Backend.PALLAS_TPU),
    ("gpu", Backend.PALLAS_GPU),
  ):
    monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
    assert resolve_backend("auto") is want


def _whole_model_steps(target):
  """prefill (flash attention, T = 128) and a decode step over an int4
  cache (the decode kernel), as one function of arrays."""
  from kvjax.compress import codecs

  tokens = jnp.ones((2, 128), jnp.int32)
  cache = kvjax.init_cache(CONFIG, 2, 256)
  coded = kvjax.prefill(
    PARAMS, tokens, config=CONFIG, capacity=256, transform=codecs.uniform(4)
  ).cache

  def run(params, tokens, cache, coded):
    backend = f"pallas_{target}"
    out = kvjax.forward(params, tokens, cache, config=CONFIG, backend=backend)
    step = kvjax.forward(
      params, tokens[:, :1], coded, config=CONFIG, backend=backend
    )
    return out.logits, step.logits

  return run, (PARAMS, tokens, cache, coded)


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_the_whole_model_compiles_for_tpu(generation):
  """The model's glue around the kernels (layer scan, scalar-prefetched
  layer index, codec tiles) compiles for a real TPU, not only the kernels
  alone."""
  pytest.importorskip("libtpu")
  from pallas_kernels import compile_check

  run, args = _whole_model_steps("tpu")
  with kernels.compiled_kernels():
    compiled = compile_check.compile_for_tpu(run, *args, generation=generation)
  assert compiled.as_text().count("tpu_custom_call") >= 2


def test_the_whole_model_lowers_for_cuda():
  from pallas_kernels import compile_check

  run, args = _whole_model_steps("gpu")
  with kernels.compiled_kernels():
    text = compile_check.lower_for_cuda(run, *args)
  assert "triton" in text
