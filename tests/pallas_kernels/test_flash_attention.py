"""Flash attention kernels (TPU and GPU variants, interpret mode) against the
plain-jnp reference, block skipping, and real compilation for TPU / CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.compile_check import (
  compile_for_tpu,
  have_libtpu,
  lower_for_cuda,
)
from pallas_kernels.flash_attention import (
  flash_attention,
  flash_attention_mass,
  reference,
)

# Small shapes: two query blocks (T = 20 is not a multiple of 16, so the
# last one is padded) and two key blocks of 128 slots; L = 2 so that
# reading the wrong layer shows.
L, B, T, S, H = 2, 2, 20, 256, 16
BLOCKS = {"block_q": 16, "block_k": 128}
LAYER = 1


def _tol(dtype):
  if dtype == jnp.bfloat16:
    return {"atol": 3e-2, "rtol": 3e-2}
  return {"atol": 1e-5, "rtol": 1e-5}


def _inputs(rng, N, K, dtype, pos, valid, q_pos):
  """Random q/k/v; layer LAYER of the cache gets `pos`/`valid` [B, K, S],
  layer 0 random ones (a kernel reading layer 0 would differ)."""
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  k_pos = np.stack([rng.integers(0, 300, (B, K, S)), pos])
  k_valid = np.stack([rng.random((B, K, S)) < 0.5, valid])
  return {
    "q": normal(B, T, N, H),
    "k": normal(L, B, K, S, H),
    "v": normal(L, B, K, S, H),
    "q_pos": jnp.asarray(q_pos, jnp.int32),
    "k_pos": jnp.asarray(k_pos, jnp.int32),
    "k_valid": jnp.asarray(k_valid, bool),
  }


def _ragged(rng, N, K, dtype):
  """Contiguous rows with 200 and 60 live slots; queries are the newest
  positions of each row (row 1's second key block is empty)."""
  pos = np.broadcast_to(np.arange(S), (B, K, S))
  valid = pos < np.array([200, 60])[:, None, None]
  q_pos = np.stack([np.arange(180, 200), np.arange(40, 60)])
  return _inputs(rng, N, K, dtype, pos, valid, q_pos)


def _compacted(rng, N, K, dtype):
  """An evicted cache: per (row, head) shuffled, non-contiguous positions
  with holes; row 1 also has a padding query and one older than every
  entry (both see nothing)."""
  pos = np.stack(
    [np.stack([rng.permutation(400)[:S] for _ in range(K)]) for _ in range(B)]
  )
  valid = rng.random((B, K, S)) < 0.7
  q_pos = np.stack([np.arange(380, 400), rng.permutation(400)[:T]])
  q_pos[1, 3] = -1
  q_pos[1, 7] = int(pos[1].min()) - 1
  return _inputs(rng, N, K, dtype, pos, valid, q_pos)


def _sees_nothing(rng, N, K, dtype):
  """Row 1's layer is empty; row 0 has padding queries and a query older
  than every entry."""
  pos = np.broadcast_to(np.arange(S) + 10, (B, K, S))
  valid = np.stack([np.ones((K, S), bool), np.zeros((K, S), bool)])
  q_pos = np.stack([np.arange(T) + 5, np.arange(T) + 100])
  q_pos[0, -3:] = -1
  return _inputs(rng, N, K, dtype, pos, valid, q_pos)


# name: (builder, N, K, dtype, sliding_window). Cases share static
# configurations where they can: each new one costs a compilation.
WINDOW = 64
CASES = {
  "ragged_gqa": (_ragged, 4, 2, jnp.float32, None),
  "compacted_gqa": (_compacted, 4, 2, jnp.float32, None),
  "sees_nothing": (_sees_nothing, 4, 2, jnp.float32, None),
  "ragged_mha_window": (_ragged, 2, 2, jnp.float32, WINDOW),
  "compacted_mha_window": (_compacted, 2, 2, jnp.float32, WINDOW),
  "bf16_compacted_gqa": (_compacted, 4, 2, jnp.bfloat16, None),
}


def _case(name, seed=0):
  build, N, K, dtype, window = CASES[name]
  return build(np.random.default_rng(seed), N, K, dtype), window, dtype


def _fwd_args(x):
  return x["q"], x["k"], x["v"], x["q_pos"], x["k_pos"], x["k_valid"]


def _mass_args(x):
  return x["q"], x["k"], x["q_pos"], x["k_pos"], x["k_valid"]


@pytest.fixture
def tpu_interpret_params():
  """A strict TPU interpreter, reset after the test (an exception inside it
  leaves state behind)."""
  yield pltpu.InterpretParams()
  pltpu.reset_tpu_interpret_mode_state()


VARIANTS = [("tpu", True), ("gpu", True)]


def _weights(q_pos):
  return jnp.where(q_pos >= 0, 1.0 + 0.1 * jnp.arange(T), 0.0)


def _check(x, window, dtype, target, interpret):
  ref_out, ref_lse = reference.flash_attention(
    *_fwd_args(x), LAYER, sliding_window=window
  )
  out, lse = flash_attention(
    *_fwd_args(x),
    LAYER,
    sliding_window=window,
    target=target,
    interpret=interpret,
    **BLOCKS,
  )
  assert out.dtype == x["q"].dtype and out.shape == x["q"].shape
  assert lse.dtype == jnp.float32 and lse.shape == ref_lse.shape
  assert not jnp.isnan(out).any() and not jnp.isnan(lse).any()
  tol = _tol(dtype)
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **tol
  )
  np.testing.assert_allclose(lse, ref_lse, **tol)
  w = _weights(x["q_pos"])
  ref_mass = reference.flash_attention_mass(
    *_mass_args(x), LAYER, ref_lse, w, sliding_window=window
  )
  mass = flash_attention_mass(
    *_mass_args(x),
    LAYER,
    ref_lse,
    w,
    sliding_window=window,
    target=target,
    interpret=interpret,
    **BLOCKS,
  )
  assert mass.dtype == jnp.float32 and mass.shape == ref_mass.shape
  np.testing.assert_allclose(mass, ref_mass, **_tol(jnp.float32))
  return out, lse


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("target,interpret", VARIANTS)
def test_matches_reference(name, target, interpret):
  x, window, dtype = _case(name)
  _check(x, window, dtype, target, interpret)


def test_tpu_strict_interpreter(tpu_interpret_params):
  """pltpu.InterpretParams checks block indices (the clamped key blocks)."""
  x, window, dtype = _case("compacted_mha_window")
  _check(x, window, dtype, "tpu", tpu_interpret_params)


def test_sees_nothing_gives_zero_and_minus_inf():
  x, _, _ = _case("sees_nothing")
  out, lse = flash_attention(
    *_fwd_args(x), LAYER, target="tpu", interpret=True, **BLOCKS
  )
  blind = np.zeros((B, T), bool)
  blind[1] = True  # empty layer row
  blind[0, -3:] = True  # padding queries
  blind[0, :5] = True  # positions 5..9, older than every entry (10..)
  blind_lse = np.broadcast_to(blind[:, None], lse.shape)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), blind_lse)
  assert np.isfinite(np.asarray(lse)[~blind_lse]).all()
  np.testing.assert_array_equal(np.asarray(out)[blind], 0.0)


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_traced_layer_under_jit(target):
  x, _, _ = _case("ragged_gqa")
  run = jax.jit(
    lambda layer: flash_attention(
      *_fwd_args(x), layer, target=target, interpret=True, **BLOCKS
    )
  )
  for layer in (0, 1):
    out, lse = run(jnp.int32(layer))
    ref_out, ref_lse = reference.flash_attention(*_fwd_args(x), layer)
    np.testing.assert_allclose(out, ref_out, **_tol(jnp.float32))
    np.testing.assert_allclose(lse, ref_lse, **_tol(jnp.float32))


def _naive(x, layer, window):
  """Per-query float64 softmax over an explicit list of visible slots."""
  q, k, v = (np.asarray(x[a], np.float64) for a in ("q", "k", "v"))
  pos, valid = np.asarray(x["k_pos"][layer]), np.asarray(x["k_valid"][layer])
  q_pos = np.asarray(x["q_pos"])
  N, K = q.shape[2], k.shape[2]
  out = np.zeros(q.shape)
  lse = np.full((B, N, T), -np.inf)
  probs = np.zeros((B, N, T, S))
  for b in range(B):
    for n in range(N):
      h = n // (N // K)
      for t in range(T):
        p = q_pos[b, t]
        seen = [
          s
          for s in range(S)
          if valid[b, h, s]
          and pos[b, h, s] <= p
          and (window is None or pos[b, h, s] > p - window)
        ]
        if not seen:
          continue
        logits = k[layer, b, h, seen] @ q[b, t, n] / np.sqrt(H)
        e = np.exp(logits - logits.max())
        out[b, t, n] = e @ v[layer, b, h, seen] / e.sum()
        lse[b, n, t] = logits.max() + np.log(e.sum())
        probs[b, n, t, seen] = e / e.sum()
  return out, lse, probs


@pytest.mark.parametrize(
  "name", ["compacted_gqa", "compacted_mha_window", "sees_nothing"]
)
def test_reference_matches_naive_softmax(name):
  """The reference is the definition: check it against an explicit loop
  (and against kvjax's reference attention on the same layer)."""
  from kvjax.attention import reference_attention

  x, window, _ = _case(name)
  out, lse = reference.flash_attention(
    *_fwd_args(x), LAYER, sliding_window=window
  )
  n_out, n_lse, n_probs = _naive(x, LAYER, window)
  np.testing.assert_allclose(out, n_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, n_lse, atol=1e-5, rtol=1e-5)
  w = _weights(x["q_pos"])
  mass = reference.flash_attention_mass(
    *_mass_args(x), LAYER, lse, w, sliding_window=window
  )
  n_mass = np.einsum("bnts,bt->bns", n_probs, np.asarray(w, np.float64))
  np.testing.assert_allclose(mass, n_mass, atol=1e-5, rtol=1e-5)
  kv_out, kv_lse, _ = reference_attention(
    x["q"],
    x["k"][LAYER],
    x["v"][LAYER],
    q_pos=x["q_pos"],
    k_pos=x["k_pos"][LAYER],
    k_valid=x["k_valid"][LAYER],
    sliding_window=window,
  )
  np.testing.assert_allclose(out, kv_out, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(lse, kv_lse, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------
# Block skipping: NaN where no query may look. Masking alone cannot hide a
# NaN value from p @ v (0 * NaN = NaN), nor a NaN query weight from the
# mass (p * w), so these pass only if the blocks are really skipped.


def _poisoned(window):
  """Contiguous positions 0..255; key block `bad` is NaN in k and v."""
  x, _, _ = _case("ragged_gqa" if window is None else "ragged_mha_window")
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (L, B, 2, S))
  x["k_pos"], x["k_valid"] = pos, jnp.ones((L, B, 2, S), bool)
  if window is None:
    # Every query is older than key block 1 (positions 128..255).
    x["q_pos"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + 100, (B, T))
    bad = slice(128, 256)
  else:
    # Key block 0 (positions 0..127) is older than every query's window.
    x["q_pos"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + 236, (B, T))
    bad = slice(0, 128)
  clean = dict(x)
  for a in ("k", "v"):
    x[a] = x[a].at[LAYER, :, :, bad].set(jnp.nan)
    clean[a] = x[a].at[LAYER, :, :, bad].set(0.0)
  return x, clean


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_skipped_key_blocks_are_not_read(target, window):
  x, clean = _poisoned(window)
  out, lse = flash_attention(
    *_fwd_args(x),
    LAYER,
    sliding_window=window,
    target=target,
    interpret=True,
    **BLOCKS,
  )
  ref_out, ref_lse = reference.flash_attention(
    *_fwd_args(clean), LAYER, sliding_window=window
  )
  assert not jnp.isnan(out).any()
  np.testing.assert_allclose(out, ref_out, **_tol(jnp.float32))
  np.testing.assert_allclose(lse, ref_lse, **_tol(jnp.float32))


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_mass_skips_query_blocks(target):
  """Query block 0 (positions 0..15) cannot see key block 1 (128..255): its
  NaN weights must not reach that block's mass."""
  x, _, _ = _case("ragged_gqa")
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (L, B, 2, S))
  x["k_pos"], x["k_valid"] = pos, jnp.ones((L, B, 2, S), bool)
  q_pos = np.concatenate([np.arange(16), np.arange(200, 204)])
  x["q_pos"] = jnp.asarray(np.broadcast_to(q_pos, (B, T)), jnp.int32)
  _, lse = reference.flash_attention(*_fwd_args(x), LAYER)
  w = jnp.where(jnp.arange(T) < 16, jnp.nan, 1.0)
  w = jnp.broadcast_to(w, (B, T))
  mass = flash_attention_mass(
    *_mass_args(x), LAYER, lse, w, target=target, interpret=True, **BLOCKS
  )
  ref = reference.flash_attention_mass(
    *_mass_args(x), LAYER, lse, jnp.where(jnp.isnan(w), 0.0, w)
  )
  assert jnp.isnan(mass[..., :128]).all()  # block 0 does see the NaNs
  np.testing.assert_allclose(mass[..., 128:], ref[..., 128:], atol=1e-5)


# ----------------------------------------------------------------------------
# Real compilation.


def _aot_args(dtype, L=2, B=2, T=256, N=4, K=2, S=512, H=128):
  sd = jax.ShapeDtypeStruct
  return (
    sd((B, T, N, H), dtype),
    sd((L, B, K, S, H), dtype),
    sd((L, B, K, S, H), dtype),
    sd((B, T), jnp.int32),
    sd((L, B, K, S), jnp.int32),
    sd((L, B, K, S), jnp.bool_),
    sd((), jnp.int32),
  )


def _forward_and_mass(q, k, v, q_pos, k_pos, k_valid, layer, **kw):
  out, lse = flash_attention(q, k, v, q_pos, k_pos, k_valid, layer, **kw)
  w = (q_pos >= 0).astype(jnp.float32)
  mass = flash_attention_mass(q, k, q_pos, k_pos, k_valid, layer, lse, w, **kw)
  return out, lse, mass


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_compiles_for_tpu(generation, dtype):
  pytest.importorskip("libtpu")
  assert have_libtpu()
  # The bf16 build also takes the sliding-window path.
  window = 128 if dtype == jnp.bfloat16 else None
  fn = functools.partial(_forward_and_mass, sliding_window=window)
  compile_for_tpu(fn, *_aot_args(dtype), generation=generation)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_cuda_with_triton(dtype):
  fn = functools.partial(_forward_and_mass, target="gpu", sliding_window=64)
  text = lower_for_cuda(fn, *_aot_args(dtype))
  assert "triton" in text


# ----------------------------------------------------------------------------
# Bad inputs.


def _bad(change):
  x, _, _ = _case("ragged_gqa")
  args = dict(zip(("q", "k", "v", "q_pos", "k_pos", "k_valid"), _fwd_args(x)))
  kw = {"target": "tpu", "interpret": True, **BLOCKS}
  change(args, kw)
  return args, kw


BAD = {
  "q rank": (lambda a, kw: a.update(q=a["q"][0]), "q must be"),
  "N % K": (lambda a, kw: a.update(q=a["q"][:, :, :3]), "multiple of kv heads"),
  "k shape": (
    lambda a, kw: a.update(k=a["k"][..., :8]),
    "k \\[L, B, K, S, H\\]",
  ),
  "v shape": (lambda a, kw: a.update(v=a["v"][:, :1]), "v must match k"),
  "k dtype": (
    lambda a, kw: a.update(k=a["k"].astype(jnp.bfloat16)),
    "k dtype",
  ),
  "q_pos shape": (lambda a, kw: a.update(q_pos=a["q_pos"][:1]), "q_pos"),
  "k_pos shape": (lambda a, kw: a.update(k_pos=a["k_pos"][0]), "k_pos"),
  "k_valid dtype": (
    lambda a, kw: a.update(k_valid=a["k_valid"].astype(jnp.int32)),
    "k_valid",
  ),
  "layer range": (lambda a, kw: kw.update(layer=2), "layer"),
  "capacity": (
    lambda a, kw: (
      a.update(k=a["k"][..., :200, :], v=a["v"][..., :200, :]),
      a.update(k_pos=a["k_pos"][..., :200], k_valid=a["k_valid"][..., :200]),
    ),
    "S=200",
  ),
  "target": (lambda a, kw: kw.update(target="cuda"), "target"),
  "interpret": (
    lambda a, kw: kw.update(target="gpu", interpret=pltpu.InterpretParams()),
    "interpret",
  ),
  "block_q": (lambda a, kw: kw.update(block_q=24), "block_q"),
  "window": (lambda a, kw: kw.update(sliding_window=0), "sliding_window"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise(name):
  change, match = BAD[name]
  args, kw = _bad(change)
  layer = kw.pop("layer", LAYER)
  with pytest.raises(ValueError, match=match):
    flash_attention(*args.values(), layer, **kw)


def test_bad_mass_inputs_raise():
  x, _, _ = _case("ragged_gqa")
  lse = jnp.zeros((B, 4, T))
  w = jnp.ones((B, T))
  with pytest.raises(ValueError, match="lse"):
    flash_attention_mass(*_mass_args(x), LAYER, lse[:, :2], w)
  with pytest.raises(ValueError, match="weights"):
    flash_attention_mass(*_mass_args(x), LAYER, lse, w[:, :5])
