"""Sharded vs one device: the full method x mesh table on 8 devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python -m benchmarks.sharded_equality

For every method of `tests/parallel/test_sharded.py` (its small f32 model,
batch 2 with ragged rows) on every mesh `seq:8`, `data:2,seq:4` and
`data:2,heads:2,seq:2`, generates on one device and on the mesh and prints
a markdown row: greedy tokens equal, the largest prompt-logit difference,
kept sets equal (positions per layer, row and kv head), the capacity on one
device and on the mesh (rounded to the shards), `kv_bytes` on one device
and `parallel.device_bytes` per device (min-max). The CI test runs a
subset of these pairs; this prints the whole product.
"""

import os
import sys

import jax
import numpy as np

import kvjax
from kvjax import parallel

sys.path.insert(
  0, os.path.join(os.path.dirname(__file__), "..", "tests", "parallel")
)
import test_sharded as cases  # noqa: E402  (the test's model and methods)

MESHES = ("seq:8", "data:2,seq:4", "data:2,heads:2,seq:2")


def main():
  if jax.device_count() != 8:
    raise SystemExit(
      f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS="
      "--xla_force_host_platform_device_count=8 (CPU)."
    )
  print(
    "| method | mesh | tokens equal | max abs dlogit | kept sets equal | "
    "capacity (1 dev -> mesh) | bytes 1 device | bytes per device |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for method in cases.METHODS:
    ref = cases._generate(method)
    for spec in MESHES:
      out = cases._generate(method, parallel.make_mesh(spec))
      tokens = np.array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
      dlogit = np.max(
        np.abs(np.asarray(out.prompt_logits) - np.asarray(ref.prompt_logits))
      )
      kept = cases._kept(out.cache) == cases._kept(ref.cache)
      per = parallel.device_bytes(out.cache).values()
      print(
        f"| {method} | {spec} | {tokens} | {dlogit:.1e} | {kept} | "
        f"{ref.cache.capacity} -> {out.cache.capacity} | "
        f"{kvjax.kv_bytes(ref.cache)} | {min(per)}-{max(per)} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
