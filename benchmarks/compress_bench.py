"""Prefill+compress time, decode ms/token and KV bytes/token per method,
kvjax side by side with kvpress on the same tiny HF Llama, in one run.

  python -m benchmarks.compress_bench                    # 2k and 8k, CPU
  python -m benchmarks.compress_bench --contexts=2048 --decode_steps=16

Both run the same safetensors weights (random, float32) with batch 1.
Timings are medians of `--repeats` runs after one warm-up (kvjax: after
compilation). Bytes are the bytes of each cache after prefill and
compression, divided by the prompt length: kvjax physical (`kv_bytes`:
every leaf, positions, validity and the static decode room included) and
logical (`logical_bytes`: live entries only); kvpress: the key/value
tensors of its DynamicCache (AdaKV masks, so it keeps everything). kvpress has no quantizing press comparable to KIVI or
TurboQuant, so those rows have kvjax only.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
import kvjax
from kvjax import hf
from kvjax.compress import registry

_CONTEXTS = flags.DEFINE_list("contexts", ["2048", "8192"], "Prompt lengths.")
_DECODE = flags.DEFINE_integer("decode_steps", 32, "Decode steps timed.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Compression ratio of policies.")
_OUT = flags.DEFINE_string(
  "out", "results/bench_compress", "Output prefix (.md and .jsonl)."
)
_SKIP_PEER = flags.DEFINE_bool("skip_kvpress", False, "kvjax only.")
_CHUNK = flags.DEFINE_integer(
  "prefill_chunk", 1024, "kvjax prefill chunk (0: the whole prompt at once)."
)
_THREADS = flags.DEFINE_integer(
  "threads",
  1,
  "CPU threads for torch and XLA (1 avoids oversubscription "
  "on a shared machine; both frameworks get the same number).",
)


# Registry methods timed (kvjax.compress.registry names), policies at --ratio.
METHODS = (
  "snapkv",
  "streaming_llm",
  "knorm",
  "tova",
  "expected_attention",
  "pyramidkv",
  "adakv_snapkv",
  "kivi2",
  "turboquant3",
  "snapkv+kivi2",
)


def _methods(ratio):
  """name -> (kvjax transform, kvpress press factory or None); "none" is
  the uncompressed model."""
  import kvpress  # pylint: disable=g-import-not-at-top

  r = ratio
  presses = {
    "snapkv": lambda: kvpress.SnapKVPress(r),
    "streaming_llm": lambda: kvpress.StreamingLLMPress(r),
    "knorm": lambda: kvpress.KnormPress(r),
    "tova": lambda: kvpress.TOVAPress(r),
    "expected_attention": lambda: kvpress.ExpectedAttentionPress(r),
    "pyramidkv": lambda: kvpress.PyramidKVPress(r),
    "adakv_snapkv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(r)),
  }
  out = {"none": (None, None)}
  for name in METHODS:
    policy, _ = registry.parse(name)
    out[name] = (registry.build(name, r if policy else None), presses.get(name))
  return out


def bench_kvjax(params, config, tokens, transform, steps, repeats):
  tokens = jnp.asarray(tokens, jnp.int32)
  T = tokens.shape[1]
  # Room for the decoded tokens, all of it decode steps through the
  # transform: decode-time policies keep their budget (+ `every` slots of
  # headroom) and use none of it, KIVI flushes its window into it.
  cap = T + steps

  def prefill():
    out = kvjax.prefill(
      params,
      tokens,
      config=config,
      transform=transform,
      capacity=cap,
      prefill_chunk=_CHUNK.value or None,
      decode_steps=steps,
    )
    return jax.block_until_ready(out)

  t_prefill, (logits, cache) = median_time(prefill, repeats)
  kv, logical = kvjax.kv_bytes(cache), kvjax.logical_bytes(cache)
  first = logits[:, -1].argmax(-1).astype(jnp.int32)

  def decode():  # one jitted while_loop, decode-time eviction included
    return jax.block_until_ready(
      kvjax.decode(
        params,
        cache,
        first,
        config=config,
        max_new_tokens=steps,
        transform=transform,
      )
    )

  t_decode, _ = median_time(decode, repeats)
  return t_prefill, t_decode / steps, kv / T, logical / T


def bench_kvpress(model, tokens, make_press, steps, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  ids = torch.from_numpy(tokens)
  state = {}

  def prefill():
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
      if make_press is None:
        out = model(ids, past_key_values=cache)
      else:
        with make_press()(model):
          out = model(ids, past_key_values=cache)
    state["cache"], state["logits"] = cache, out.logits

  t_prefill, _ = median_time(prefill, repeats)
  kv = sum(l.keys.nbytes + l.values.nbytes for l in state["cache"].layers)

  def decode():
    prefill()
    cache = state["cache"]
    tok = state["logits"][:, -1].argmax(-1, keepdim=True)
    T = tokens.shape[1]
    t0 = time.perf_counter()
    with torch.no_grad():
      for i in range(steps):
        # Positions continue from the prompt, not from the compressed
        # cache's length (as kvpress' own pipeline does).
        out = model(
          tok,
          past_key_values=cache,
          position_ids=torch.tensor([[T + i]]),
          cache_position=torch.tensor([T + i]),
        )
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    state["decode"] = time.perf_counter() - t0

  times = []
  decode()
  for _ in range(repeats):
    decode()
    times.append(state["decode"])
  return t_prefill, statistics.median(times) / steps, kv / tokens.shape[1]


def main(argv):
  del argv
  if _THREADS.value == 1:  # before XLA's CPU backend starts
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    )
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=16384,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
    attn_implementation="sdpa",
  )
  model = transformers.LlamaForCausalLM(hf_config).eval()
  path = tempfile.mkdtemp()
  model.save_pretrained(path)
  config, params = hf.load_pretrained(path)
  rows = []
  methods = _methods(_RATIO.value)
  device = jax.devices()[0].device_kind
  for ctx in map(int, _CONTEXTS.value):
    tokens = np.random.default_rng(0).integers(0, 512, (1, ctx))
    for name, (transform, make_press) in methods.items():
      row = {
        "context": ctx,
        "method": name,
        "ratio": _RATIO.value,
        "device": device,
      }
      (
        row["kvjax_prefill_s"],
        row["kvjax_decode_ms"],
        row["kvjax_bytes_tok"],
        row["kvjax_logical_bytes_tok"],
      ) = bench_kvjax(
        params, config, tokens, transform, _DECODE.value, _REPEATS.value
      )
      row["kvjax_decode_ms"] *= 1e3
      if not _SKIP_PEER.value and (make_press is not None or name == "none"):
        p, d, b = bench_kvpress(
          model, tokens, make_press, _DECODE.value, _REPEATS.value
        )
        row.update(
          kvpress_prefill_s=p, kvpress_decode_ms=d * 1e3, kvpress_bytes_tok=b
        )
      rows.append(row)
      print(json.dumps(row), flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
  lines = [
    "| context | method | kvjax prefill+compress s | kvpress prefill+"
    "compress s | kvjax decode ms/tok | kvpress decode ms/tok | kvjax "
    "KV B/tok (physical) | kvjax KV B/tok (logical) | kvpress KV B/tok "
    "|",
    "|" + "---|" * 9,
  ]
  for r in rows:
    lines.append(
      f"| {r['context']} | {r['method']} | {fmt(r['kvjax_prefill_s'], 3)} | "
      f"{fmt(r.get('kvpress_prefill_s'), 3)} | "
      f"{fmt(r['kvjax_decode_ms'], 2)} | "
      f"{fmt(r.get('kvpress_decode_ms'), 2)} | "
      f"{fmt(r['kvjax_bytes_tok'], 0)} | "
      f"{fmt(r['kvjax_logical_bytes_tok'], 0)} | "
      f"{fmt(r.get('kvpress_bytes_tok'), 0)} |"
    )
  table = "\n".join(lines)
  with open(_OUT.value + ".md", "w") as f:
    f.write(
      f"Device: {device} ({_THREADS.value} thread(s) each); model: "
      f"random Llama L=4 D=256 N=8 K=2 H=32 "
      f"float32; batch 1; ratio {_RATIO.value}; kvjax prefill chunk "
      f"{_CHUNK.value}; decode "
      f"{_DECODE.value} steps; median of {_REPEATS.value}.\n\n" + table + "\n"
    )
  print(table)


if __name__ == "__main__":
  app.run(main)
