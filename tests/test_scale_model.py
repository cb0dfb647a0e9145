"""benchmarks/scale_model.py: the abstract byte count equals kvjax's count of
a real cache, the per-chip split, the rows and the table."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import kvjax
from benchmarks import scale_model as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = kvjax.get_config("tiny", num_layers=1)


def test_eval_shape_bytes_equal_a_real_prefill():
  # SnapKV at 0.5 keeps 144 of 288 entries: one KIVI block coded at
  # prefill, the rest in its window; 288 + 13 slots padded to 304 for 8
  # chips, so the transforms also leave a reserve.
  checked = sm.check_accounting(
    TINY, batch=2, context=288, decode_steps=13, chips=8, ratio=0.5
  )
  assert [c["method"] for c in checked] == [
    "none",
    "snapkv+kivi2 @ 0.5",
    "turboquant3",
  ]
  assert {c["capacity"] for c in checked} == {304}
  none, snap_kivi, turbo = (c["bytes"] for c in checked)
  assert snap_kivi < none and turbo < none


def test_a_different_real_cache_fails_the_check(monkeypatch):
  # The check can fail: a "real" cache one chip's padding larger.
  def bigger(config, method, ratio, *, batch, capacity, **kw):
    del method, ratio, kw
    return kvjax.init_cache(config, batch, capacity + 8)

  monkeypatch.setattr(sm, "real_cache", bigger)
  with pytest.raises(AssertionError, match="eval_shape gives"):
    sm.check_accounting(
      TINY,
      batch=1,
      context=100,
      decode_steps=4,
      chips=8,
      methods=((sm.BASELINE, False),),
    )


def test_uncompressed_bytes_match_the_geometry():
  # Llama-3.1-8B at 128k, B=1, shapes only: k and v bf16, int32 positions,
  # bool validity per slot, two [B] int32 counters.
  config = kvjax.get_config("llama-3.1-8b")
  L, K, H = config.num_layers, config.num_kv_heads, config.head_dim
  S = sm.capacity_for(131072, 256, 256)
  assert S == 131072 + 256
  cache = sm.cache_shapes(
    config,
    sm.BASELINE,
    None,
    batch=1,
    context=131072,
    decode_steps=256,
    capacity=S,
  )
  per_slot = L * K * (2 * H * 2 + 4 + 1)
  assert kvjax.kv_bytes(cache) == S * per_slot + 2 * 4
  assert sm.per_chip_bytes(cache, 256) == S // 256 * per_slot + 2 * 4
  # Weights: Llama-3.1-8B has 8.03e9 parameters, 2 bytes each.
  assert sm.weight_bytes(config) == pytest.approx(16.06e9, rel=1e-3)


@pytest.mark.parametrize(
  "method,ratio", [("snapkv+kivi2", 0.9), ("turboquant3", None)]
)
def test_per_chip_split_pads_each_slot_axis(method, ratio):
  cache = sm.cache_shapes(
    TINY, method, ratio, batch=2, context=1500, decode_steps=40, capacity=1540
  )
  total = kvjax.kv_bytes(cache)
  assert sm.per_chip_bytes(cache, 1) == total
  slot_leaves = sm._slot_leaves(cache)
  replicated = total - sum(sm._leaf_bytes(x) for x in slot_leaves)
  for chips in (3, 8):
    want = replicated + sum(
      sm._leaf_bytes(x) // x.shape[3] * math.ceil(x.shape[3] / chips)
      for x in slot_leaves
    )
    assert sm.per_chip_bytes(cache, chips) == want
    assert sm.per_chip_bytes(cache, chips) * chips >= total


def test_rows_and_table():
  weights = sm.weight_bytes(TINY)
  # HBM that holds the weights and the compressed caches, not the
  # uncompressed one at B=2.
  hw = sm.Hardware("toy-4", 4, weights + 150_000, 1e9)
  rows = sm.scale_rows(
    models=[TINY],
    hardware=[hw],
    contexts=[2048],
    batches=[1, 2],
    decode_steps=64,
  )
  assert len(rows) == 6
  for r in rows:
    assert r["capacity"] == 2112 and r["chips"] == 4
    assert r["free_per_chip"] == hw.hbm_bytes - weights - r["cache_per_chip"]
    assert r["read_per_step_per_chip"] == r["cache_per_chip"] + weights
    assert r["step_s_lower_bound"] == r["read_per_step_per_chip"] / 1e9
  by = {(r["batch"], r["method"]): r for r in rows}
  assert by[2, "none"]["free_per_chip"] < 0
  assert by[2, "snapkv+kivi2 @ 0.9"]["free_per_chip"] >= 0
  assert by[1, "none"]["cache_vs_none"] == 1.0
  assert 0 < by[1, "turboquant3"]["cache_vs_none"] < 1
  table = sm.markdown(rows, [hw], decode_steps=64)
  assert "room for 64 decode steps" in table
  lines = [ln for ln in table.splitlines() if ln.startswith("| 2k |")]
  assert len(lines) == 6
  for ln, r in zip(lines, rows):
    free = r["free_per_chip"]
    assert ("**no**" in ln) == (free < 0)
    assert ("marginal" in ln) == (0 <= free < sm.HEADROOM)


def test_script_runs():
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.scale_model",
      "--nocheck",
      "--models=llama-3.2-1b",
      "--contexts=131072",
      "--batches=1",
      "--hardware=TPU v5e-256",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "llama-3.2-1b on TPU v5e-256" in proc.stdout
  assert "| 128k | 1 | snapkv+kivi2 @ 0.9 |" in proc.stdout


def test_abstract_cache_allocates_nothing():
  # A 1M-token Llama-3.1-8B cache at B=8 (about 1 TiB) is shapes only.
  config = kvjax.get_config("llama-3.1-8b")
  cache = sm.cache_shapes(
    config,
    "turboquant3",
    None,
    batch=8,
    context=2**20,
    decode_steps=256,
    capacity=2**20 + 256,
  )
  leaves = jax.tree.leaves(cache)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert kvjax.kv_bytes(cache) > 2**37
  assert np.dtype(cache.pos.dtype) == np.int32
