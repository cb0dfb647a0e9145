"""Every backend end to end against the reference (the definition):
prefill (the XLA engine, or flash attention and its mass pass), compression,
a question fed to the compressed cache and greedy decoding (the decode
kernel reading each codec's payload) agree for every codec and policy of
the method registry, with the Pallas kernels in interpret mode on this CPU
machine; and the whole model compiles for TPU and lowers for CUDA."""

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
GPU_FALLBACK = {"turboquant3", "polarquant", "range_search0.1"}
# Range search has no tile functions: its pruned scores run on the XLA
# engine on every backend.
TPU_FALLBACK = {"polarquant", "range_search0.1"}


# Every policy and every codec of the registry, each once, as chains (a
# policy evicts, then a codec stores what is kept).
METHODS = (
  "snapkv+kivi2",
  "h2o+int4",
  "streaming_llm+fp8",
  "tova+turboquant3",
  "adakv_snapkv+qjl",
  "pyramidkv+polarquant",
  "knorm+lowrank16",
  "expected_attention+turboquant2",
  "random+kivi4",
  "oracle",  # a policy alone: the plain (uncompressed-bytes) paths
  "think",  # keys stored on their kept channels (its own tile)
  "range_search0.1",  # pruned keys score -inf (an index + a tail)
)
# Range search at the other budgets is the same code path.
OTHER_BUDGETS = {"range_search0.05", "range_search0.2"}
# The rest of kvpress' presses leave a plain compacted payload, as the
# policies above do (their end-to-end runs are tests/compress/
# test_methods.py); ThinK, which stores its own key layout, runs here.
PLAIN_LAYOUT = set(registry.KVPRESS_NAMES) - {"think"}


def test_the_methods_cover_the_registry():
  named = {p for m in METHODS for p in m.split("+")}
  assert named | PLAIN_LAYOUT | OTHER_BUDGETS == set(
    registry.POLICY_NAMES
  ) | set(registry.CODEC_NAMES)


def _transform(method):
  if method == "snapkv+kivi2":  # a residual block the evicted cache fills
    return compress.chain(
      compress.snapkv(ratio=0.5), compress.kivi(2, group_size=16, residual=32)
    )
  if method == "range_search0.1":  # 112 of the 144 indexed
    return compress.range_search_transform(0.1, buffer=32, reservoir=64)
  # KIVI-4's 128-entry residual block needs 129 of the 144 kept.
  return registry.build(method, ratio=0.1 if "kivi4" in method else 0.5)


def _flow(method, backend):
  """prefill + compress, a 4-token question, 4 greedy steps."""
  tr = _transform(method)
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


# pallas_gpu end to end on the paths that differ (its kernels are checked
# per codec in tests/pallas_kernels): flash prefill and plain decode, KIVI's
# two regions, a decode-time policy over int4, a codec Triton cannot take.
GPU_METHODS = ("oracle", "snapkv+kivi2")
# pallas_tpu end to end where the model's glue around the kernels differs:
# flash prefill and plain decode (oracle), KIVI's two regions, a decode-time
# policy reading the mass over int4, head-variable budgets over a rotated
# codec, ThinK's own tile. Every codec's tile is checked against the
# reference in tests/pallas_kernels; the other methods run xla here.
TPU_METHODS = (
  "oracle",
  "snapkv+kivi2",
  "h2o+int4",
  "adakv_snapkv+qjl",
  "think",
)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_agrees_with_the_reference(method):
  """Prompt logits, question logits and greedy tokens on xla (and
  pallas_tpu for TPU_METHODS, pallas_gpu for GPU_METHODS) equal the
  reference backend's."""
  want = _flow(method, "reference")
  codec = method.split("+")[-1]
  backends = [("xla", set())]
  if method in TPU_METHODS:
    backends.append(("pallas_tpu", TPU_FALLBACK))
  if method in GPU_METHODS:
    backends.append(("pallas_gpu", GPU_FALLBACK))
  for backend, fallback in backends:
    kernels._warn_once.cache_clear()  # each case says it again
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      got = _flow(method, backend)
    # Attention the kernels could not take (the mass pass over a coded
    # cache, which H2O reads during decode, is the XLA engine's by design).
    said = [str(w.message) for w in caught if "XLA engine" in str(w.message)]
    fell = [m for m in said if "mass kernel" not in m]
    assert (codec in fallback) == bool(fell), said
    for g, w in zip(got[:2], want[:2]):
      np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("codec", sorted(TPU_FALLBACK | GPU_FALLBACK))
def test_codecs_without_tiles_run_on_the_xla_engine_and_say_so(codec):
  """The kernels refuse a payload they have no tile for (PolarQuant and
  range search: none; 3-bit TurboQuant: none Triton can lower): the layer
  runs on the XLA engine (its end-to-end agreement is the xla flow above)
  and a warning says so; the other target takes it."""
  from kvjax.attention import LayerView

  transform = (
    _transform(codec) if codec.startswith("range") else registry.build(codec)
  )
  cache = kvjax.prefill(
    PARAMS, PROMPT, config=CONFIG, transform=transform, capacity=256
  ).cache
  view = LayerView(cache.k, cache.v, cache.pos, cache.valid, jnp.int32(0))
  q = jnp.ones((2, 1, CONFIG.num_heads, CONFIG.head_dim), jnp.float32)
  for target, fallback in (("tpu", TPU_FALLBACK), ("gpu", GPU_FALLBACK)):
    kernels._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      got = kernels.attention(
        view,
        q,
        q_pos=jnp.full((2, 1), 200),
        scale=CONFIG.head_dim**-0.5,
        sliding_window=None,
        target=target,
      )
    said = any("XLA engine" in str(w.message) for w in caught)
    assert (got is None) == said == (codec in fallback), (target, codec)


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
