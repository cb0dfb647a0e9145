"""Demo job: build a model, prefill ragged prompts, generate, report the cache.

Prints the generated tokens' shape, the timing of a jitted generate call
(first call with compilation, second without), and the cache's physical and
logical bytes per token.

  bash launch/local.sh
  python -m experiments.demo --config.prompt_len=1024
"""

import time

from absl import app
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import hf

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/demo.py", lock_config=True
)


def main(argv):
  del argv
  c = _CONFIG.value
  if c.hf_path:
    config, params = hf.load_pretrained(c.hf_path)
  else:
    config = kvjax.get_config(c.preset, dtype=c.dtype)
    params = kvjax.init_params(config, jax.random.key(c.seed))
  rng = np.random.default_rng(c.seed)
  lengths = rng.integers(c.min_prompt_len, c.prompt_len + 1, c.batch_size)
  tokens = rng.integers(0, config.vocab_size, (c.batch_size, c.prompt_len))
  tokens[np.arange(c.prompt_len)[None, :] >= lengths[:, None]] = 0
  tokens, lengths = jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths)
  print(
    f"model {config.name}: L={config.num_layers} D={config.d_model} "
    f"N={config.num_heads} K={config.num_kv_heads} H={config.head_dim} "
    f"V={config.vocab_size} dtype={config.dtype}"
  )
  print(f"prompts: batch {c.batch_size}, lengths {lengths.tolist()}")

  def run():
    out = kvjax.generate(
      params,
      tokens,
      config=config,
      max_new_tokens=c.max_new_tokens,
      prompt_lengths=lengths,
      temperature=c.temperature,
      top_k=c.top_k or None,
      rng=jax.random.key(c.seed),
    )
    jax.block_until_ready(out)
    return out

  t0 = time.perf_counter()
  out = run()
  t1 = time.perf_counter()
  out = run()
  t2 = time.perf_counter()
  new = int(out.num_generated.sum())
  print(
    f"generate: first call {t1 - t0:.2f}s (with compile), second "
    f"{t2 - t1:.3f}s = {1e3 * (t2 - t1) / c.max_new_tokens:.2f} ms/step "
    f"for {c.batch_size} rows"
  )
  print("first row, first 16 new tokens:", np.asarray(out.tokens[0, :16]))
  cache = out.cache
  stored = int(jnp.sum(cache.end))
  phys, logical = kvjax.kv_bytes(cache), kvjax.logical_bytes(cache)
  print(
    f"cache: capacity {cache.capacity} slots x {c.batch_size} rows, "
    f"{stored} tokens stored"
  )
  print(
    f"  physical bytes {phys:,} ({phys / stored:,.0f} per stored token, "
    "padding and bookkeeping included)"
  )
  print(
    f"  logical bytes  {logical:,} ({logical / stored:,.0f} per token = "
    f"2 x L x K x H x {jnp.dtype(config.dtype).itemsize} B)"
  )


if __name__ == "__main__":
  app.run(main)
