"""The split-K decode kernels against their reference, for every codec's
tile plug-in, in interpret mode; TPU variants compiled for real TPU
generations and GPU variants lowered for CUDA, from this CPU machine."""

import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import compile_check, tiles
from pallas_kernels.decode_attention import (
  Unsupported,
  decode_attention,
  decode_attention_reference,
)

_spec = importlib.util.spec_from_file_location(
  "codec_cases", pathlib.Path(__file__).with_name("codec_cases.py")
)
codec_cases = importlib.util.module_from_spec(_spec)
sys.modules["codec_cases"] = codec_cases
_spec.loader.exec_module(codec_cases)
CASES, payload = codec_cases.CASES, codec_cases.payload

B, T, N, K, S, H, L = 2, 2, 4, 2, 256, 64, 2


def _cache(seed=0, S=S, H=H):
  """Two layers of a compacted cache: holes, shuffled positions, ragged
  rows (row 1 has fewer live slots)."""
  r = np.random.default_rng(seed)
  k = jnp.asarray(r.standard_normal((L, B, K, S, H)), jnp.float32)
  v = jnp.asarray(r.standard_normal((L, B, K, S, H)), jnp.float32)
  pos = jnp.asarray(r.permutation(L * B * K * S).reshape(L, B, K, S) % 300)
  valid = r.random((L, B, K, S)) < 0.7
  valid[:, 1, :, 150:] = False  # row 1: nothing live past slot 150
  return k, v, pos.astype(jnp.int32), jnp.asarray(valid)


def _queries(seed=1):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32)
  q_pos = jnp.asarray([[100, 299], [5, -1]], jnp.int32)  # -1: padding
  return q, q_pos


def _close(got, want, atol=2e-5):
  out, lse = got
  ref_out, ref_lse = want
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=atol)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
  fin = np.isfinite(ref_lse)
  np.testing.assert_allclose(
    np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=atol, rtol=atol
  )


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_codec_matches_the_reference(name):
  """Both variants (interpret mode) against the reference over kvjax's
  decode of the same payload: GQA, batch 2, ragged rows, a compacted cache
  with holes, layer 1 of 2, a padding query."""
  k, v, pos, valid = _cache()
  q, q_pos = _queries()
  kc, vc, kl, vl, ksh, vsh, kd, vd = payload(name, k, v, 1)
  want = decode_attention_reference(q, kd, vd, q_pos, pos[1], valid[1])
  for target in ("tpu", "gpu") if name in GPU_CASES else ("tpu",):
    try:
      got = decode_attention(
        q,
        kl,
        vl,
        q_pos,
        pos,
        valid,
        1,
        ksh,
        vsh,
        k_codec=kc,
        v_codec=vc,
        block_k=128,
        num_splits=2,
        target=target,
        interpret=True,
      )
    except Unsupported:
      assert target == "gpu" and name in TRITON_UNSUPPORTED
      continue
    _close(got, want)
    assert np.all(np.asarray(got[1])[1, :, 1] == -np.inf)  # padding query


@pytest.mark.parametrize("name", ["f32", "int4", "kivi2", "turbo3", "fp8"])
def test_strict_tpu_interpreter(name):
  """`pltpu.InterpretParams()` raises on out-of-bounds block indices: the
  clamped index of skipped blocks (a dead tail, a kv head with nothing
  live, and splits x blocks per split > blocks) must stay in bounds."""
  k, v, pos, valid = _cache(S=384)
  valid = valid.at[:, 0, :, 128:].set(False)  # row 0: last live block 0
  valid = valid.at[:, 1, 0].set(False)  # row 1, kv head 0: nothing live
  q, q_pos = _queries()
  kc, vc, kl, vl, ksh, vsh, kd, vd = payload(name, k, v, 0)
  try:  # 3 blocks in 2 splits of 2: block index 3 does not exist
    got = decode_attention(
      q,
      kl,
      vl,
      q_pos,
      pos,
      valid,
      0,
      ksh,
      vsh,
      k_codec=kc,
      v_codec=vc,
      block_k=128,
      num_splits=2,
      target="tpu",
      interpret=pltpu.InterpretParams(),
    )
  finally:
    pltpu.reset_tpu_interpret_mode_state()
  _close(got, decode_attention_reference(q, kd, vd, q_pos, pos[0], valid[0]))


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_traced_layer_window_and_splits(target):
  k, v, pos, valid = _cache(seed=2)
  q, q_pos = _queries(seed=3)
  f = jax.jit(
    functools.partial(
      decode_attention,
      k_codec=tiles.Plain(),
      v_codec=tiles.Plain(),
      block_k=128,
      sliding_window=64,
      target=target,
      interpret=True,
    ),
    static_argnames=("num_splits",),
  )
  want = decode_attention_reference(
    q, k[1], v[1], q_pos, pos[1], valid[1], sliding_window=64
  )
  for splits in (1, 2):
    got = f(
      q, {"x": k}, {"x": v}, q_pos, pos, valid, jnp.int32(1), num_splits=splits
    )
    _close(got, want)


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_blocks_after_the_last_live_slot_are_not_read(target):
  """NaN entries past every row's last live slot cannot reach the output:
  those blocks are skipped (not loaded on TPU, not computed on either)."""
  k, v, pos, valid = _cache(seed=4)
  valid = valid.at[:, :, :, 128:].set(False)
  k = k.at[:, :, :, 128:].set(jnp.nan)
  v = v.at[:, :, :, 128:].set(jnp.nan)
  q, q_pos = _queries()
  got = decode_attention(
    q,
    {"x": k},
    {"x": v},
    q_pos,
    pos,
    valid,
    0,
    k_codec=tiles.Plain(),
    v_codec=tiles.Plain(),
    block_k=128,
    target=target,
    interpret=True,
  )
  assert np.all(np.isfinite(got[0]))
  want = decode_attention_reference(
    q,
    k[0, :, :, :128],
    v[0, :, :, :128],
    q_pos,
    pos[0, :, :, :128],
    valid[0, :, :, :128],
  )
  _close(got, want)


def test_a_row_with_no_live_slot():
  k, v, pos, valid = _cache()
  valid = valid.at[:, 0].set(False)
  q, q_pos = _queries()
  out, lse = decode_attention(
    q,
    {"x": k},
    {"x": v},
    q_pos,
    pos,
    valid,
    0,
    k_codec=tiles.Plain(),
    v_codec=tiles.Plain(),
    block_k=128,
    target="tpu",
    interpret=True,
  )
  assert np.all(np.asarray(out)[0] == 0) and np.all(np.isneginf(lse[0]))


def test_the_code_region_and_tail_merge_by_lse():
  """A cache in two storage regions (KIVI codes + full-precision tail),
  attended region by region through `slots=` and merged, equals one pass
  over the decoded whole."""
  from kvjax.attention import AttentionOutput, merge_attention

  k, v, pos, valid = _cache(seed=5)
  q, q_pos = _queries()
  kc, vc, kl, vl, _, _, kd, vd = payload(
    "kivi2", k[:, :, :, :128], v[:, :, :, :128], 0
  )
  parts = [
    decode_attention(
      q,
      kl,
      vl,
      q_pos,
      pos,
      valid,
      0,
      k_codec=kc,
      v_codec=vc,
      block_k=128,
      slots=(0, 128),
      target="tpu",
      interpret=True,
    ),
    decode_attention(
      q,
      {"x": k[:, :, :, 128:]},
      {"x": v[:, :, :, 128:]},
      q_pos,
      pos,
      valid,
      0,
      k_codec=tiles.Plain(),
      v_codec=tiles.Plain(),
      block_k=128,
      slots=(128, 128),
      target="tpu",
      interpret=True,
    ),
  ]
  got = merge_attention(AttentionOutput(*parts[0]), AttentionOutput(*parts[1]))
  kw = jnp.concatenate([kd, k[0, :, :, 128:]], axis=2)
  vw = jnp.concatenate([vd, v[0, :, :, 128:]], axis=2)
  _close(
    got[:2], decode_attention_reference(q, kw, vw, q_pos, pos[0], valid[0])
  )


def test_bad_inputs():
  k, v, pos, valid = _cache()
  q, q_pos = _queries()
  kw = dict(k_codec=tiles.Plain(), v_codec=tiles.Plain(), interpret=True)
  with pytest.raises(ValueError, match="target"):
    decode_attention(
      q, {"x": k}, {"x": v}, q_pos, pos, valid, target="cpu", **kw
    )
  with pytest.raises(ValueError, match="q must be"):
    decode_attention(q[0], {"x": k}, {"x": v}, q_pos, pos, valid, **kw)
  with pytest.raises(ValueError, match="kv heads"):
    decode_attention(q[:, :, :3], {"x": k}, {"x": v}, q_pos, pos, valid, **kw)
  with pytest.raises(ValueError, match="q_pos"):
    decode_attention(q, {"x": k}, {"x": v}, q_pos[:, :1], pos, valid, **kw)
  with pytest.raises(ValueError, match=r"k\['x'\]"):
    decode_attention(q, {"x": k[:, :1]}, {"x": v}, q_pos, pos, valid, **kw)
  with pytest.raises(Unsupported, match="multiple of 128"):
    big = jnp.zeros((L, B, K, 1000), jnp.int32)
    decode_attention(
      q,
      {"x": jnp.zeros((L, B, K, 1000, H))},
      {"x": jnp.zeros((L, B, K, 1000, H))},
      q_pos,
      big,
      big > 0,
      block_k=512,
      **kw,
    )


# ----------------------------------------------------------------------------
# Hardware this machine does not have.

# The GPU kernel runs the same tile functions as the TPU kernel; it is run
# (interpreted) on one case of each kind of leaf and load: plain, packed
# codes with folded and grouped scales, per-group statistics, float8 bits,
# per-row scalars, the generic decode, and tiles Triton refuses (all lower
# for CUDA below).
GPU_CASES = {
  "f32",
  "f16",
  "int4",
  "int4_g16",
  "kivi2",
  "fp8",
  "qjl",
  "lowrank",
  "decoded_int4",
  "turbo3",
}
# 3-bit codes and the outlier split give tiles Triton cannot lower.
TRITON_UNSUPPORTED = {"turbo3", "turbo2_outliers", "turbo_prod3"}
# The generic plug-in decodes with the codec's jnp code (uint8 arithmetic):
# interpret mode only.
MOSAIC_UNSUPPORTED = {"decoded_int4"}


@functools.cache
def _compile_args(name):
  Bc, Tc, Nc, Kc, Sc, Hc, Lc = 2, 1, 8, 2, 512, 128, 2
  r = np.random.default_rng(0)
  q = jnp.zeros((Bc, Tc, Nc, Hc), jnp.float32)
  k = jnp.asarray(r.standard_normal((Lc, Bc, Kc, Sc, Hc)), jnp.float32)
  pos = jnp.zeros((Lc, Bc, Kc, Sc), jnp.int32)
  kc, vc, kl, vl, ksh, vsh, _, _ = payload(name, k, k, 1)
  f = functools.partial(
    decode_attention, k_codec=kc, v_codec=vc, block_k=256, num_splits=2
  )
  args = (
    q,
    kl,
    vl,
    jnp.zeros((Bc, Tc), jnp.int32),
    pos,
    pos >= 0,
    jnp.int32(1),
    ksh,
    vsh,
  )
  return f, args


@pytest.mark.parametrize("generation", sorted(compile_check.TPU_TOPOLOGIES))
def test_every_codec_compiles_for_tpu(generation):
  """One program holding the decode kernel of every codec (each
  pallas_call named after its tiles), compiled by Mosaic for a real TPU."""
  pytest.importorskip("libtpu")
  names = sorted(set(CASES) - MOSAIC_UNSUPPORTED)
  fns, arg_lists = zip(*(_compile_args(name) for name in names))

  def every_codec(*arg_lists):
    return [f(*a, target="tpu") for f, a in zip(fns, arg_lists)]

  compiled = compile_check.compile_for_tpu(
    every_codec, *arg_lists, generation=generation
  )
  assert compiled.as_text().count("tpu_custom_call") == len(names)


def test_the_generic_plug_in_does_not_compile_for_tpu():
  """What MOSAIC_UNSUPPORTED says: a codec's own jnp decode (uint8
  arithmetic) is for interpret mode."""
  pytest.importorskip("libtpu")
  f, args = _compile_args("decoded_int4")
  with pytest.raises(Exception, match="Mosaic failed to compile"):
    compile_check.compile_for_tpu(functools.partial(f, target="tpu"), *args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_for_cuda(name):
  f, args = _compile_args(name)
  g = functools.partial(f, target="gpu")
  if name in TRITON_UNSUPPORTED:
    with pytest.raises(Unsupported, match="power-of-2"):
      compile_check.lower_for_cuda(g, *args)
    return
  assert "triton" in compile_check.lower_for_cuda(g, *args)


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_many_query_rows_take_several_row_blocks(target):
  """A long question (G * T rows per kv head) runs in blocks of block_m
  rows, padded, with the same result."""
  k, v, pos, valid = _cache(seed=6)
  r = np.random.default_rng(7)
  q = jnp.asarray(r.standard_normal((B, 21, N, H)), jnp.float32)
  q_pos = jnp.asarray(r.integers(-1, 300, (B, 21)), jnp.int32)
  kc, vc, kl, vl, _, _, kd, vd = payload("int4", k, v, 0)
  got = decode_attention(
    q,
    kl,
    vl,
    q_pos,
    pos,
    valid,
    0,
    k_codec=kc,
    v_codec=vc,
    block_k=128,
    block_m=16,
    target=target,
    interpret=True,
  )
  _close(got, decode_attention_reference(q, kd, vd, q_pos, pos[0], valid[0]))
