"""Physical vs logical KV bytes of every registered eviction method.

  python -m benchmarks.method_bytes                       # ratios 0.5, 0.9
  python -m benchmarks.method_bytes --ratios=0.75 --context=1024

Each method compresses the same prefilled `kvjax-tiny` cache (batch 2,
ragged rows of `--context` and 3/4 of it, random tokens, float32, a
reserve of 16 slots for the question). The table gives, per method and
ratio: the static capacity, the kept share of the live entries, the
physical bytes of the cache pytree (`kv_bytes`: every leaf) and of the
payload alone, the logical bytes (`logical_bytes`: live entries only), all
relative to the uncompressed cache, and the padding (payload - logical, as
a share of the payload): what a static layout pays for head- or
layer-variable budgets and the reserve.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import compress
from kvjax.cache import kv_bytes, logical_bytes, payload_bytes
from kvjax.compress import registry

_RATIOS = flags.DEFINE_list("ratios", ["0.5", "0.9"], "Eviction ratios.")
_CONTEXT = flags.DEFINE_integer("context", 512, "Longest row's length.")
_RESERVE = flags.DEFINE_integer("reserve", 16, "Free slots for the question.")
_METHODS = flags.DEFINE_list(
  "methods", [], "Registry policy names (default: every one but the oracle)."
)


def main(argv):
  del argv
  config, params = kvjax.pretrained.load("kvjax-tiny")
  T, R = _CONTEXT.value, _RESERVE.value
  lengths = jnp.array([T, (3 * T) // 4])
  tokens = jax.random.randint(jax.random.key(0), (2, T), 1, config.vocab_size)
  kw = dict(config=config, prompt_lengths=lengths, capacity=T + R)
  _, full = kvjax.prefill(params, tokens, **kw)
  live_full = int(np.asarray(full.valid).sum())
  methods = _METHODS.value or [
    n for n in registry.POLICY_NAMES if n != "oracle"
  ]
  print(
    f"kvjax-tiny, batch 2 (rows {T} and {int(lengths[1])} tokens), reserve "
    f"{R}; uncompressed: capacity {full.capacity}, {kv_bytes(full):,} bytes "
    f"physical, {logical_bytes(full):,} logical\n"
  )
  print(
    "| method | ratio | capacity | kept share | physical / full | payload / "
    "full | logical / full | padding share of payload |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name in methods:
    for ratio in (float(r) for r in _RATIOS.value):
      try:
        _, cache = kvjax.prefill(
          params, tokens, transform=registry.build(name, ratio), **kw
        )
      except compress.Degenerate as e:
        print(f"| {name} | {ratio} | refused: {e} | | | | | |")
        continue
      live = int(np.asarray(cache.valid).sum())
      payload = payload_bytes(cache)
      print(
        f"| {name} | {ratio} | {cache.capacity} | {live / live_full:.3f} | "
        f"{kv_bytes(cache) / kv_bytes(full):.3f} | "
        f"{payload / payload_bytes(full):.3f} | "
        f"{logical_bytes(cache) / logical_bytes(full):.3f} | "
        f"{(payload - logical_bytes(cache)) / payload:.3f} |"
      )


if __name__ == "__main__":
  app.run(main)
