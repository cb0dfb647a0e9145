"""kvjax against Hugging Face transformers (and kvpress) on CPU: prefill,
decode, generate, peak memory and compressed decode, on the same random
Llama weights, in one run.

  python -m benchmarks.attention_bench                 # 512..8k, CPU
  python -m benchmarks.attention_bench --long          # + 32k decode rows
  python -m benchmarks.attention_bench --skip_peers    # kvjax only
  python -m benchmarks.attention_bench --quick --out=/tmp/bench_quick

The model is a random float32 Llama (L=4, D=256, 8 query / 2 kv heads,
head_dim 32, vocab 512) made by transformers with a fixed seed, saved as
safetensors and loaded into kvjax with `kvjax.hf.load_pretrained`; both
frameworks get `--threads` CPU threads (torch.set_num_threads; XLA_FLAGS
and, when fewer than the machine's CPUs, the process' CPU affinity).
Times are medians of `--repeats` calls after one warm-up call (kvjax:
after compilation); every kvjax call is blocked on before the clock stops.
Prompts are uniform random token ids (seed 0), batch 1 unless stated.
Run it on an idle machine: with other work on the CPUs torch's OpenMP
threads stall (10-100x slower decode seen with 2 threads on 2 busy cores);
a warning says so when the load average is too high.

Sections (each row is measured in this run; ratios are stated per column):
  prefill: `kvjax.prefill(params, tokens, config=config)` with default
    settings (capacity T, no prefill_chunk) vs `model(ids, use_cache=True)`
    (sdpa attention, torch.no_grad); both return logits for all T tokens
    and a cache. The max |difference| of the last-token logits checks that
    both run the same model.
  decode: kvjax prefills with capacity T + steps (untimed), then one
    `kvjax.decode(..., max_new_tokens=steps)` call is timed (one jitted
    while loop, `steps` forward passes); transformers prefills into a
    DynamicCache (untimed), then a greedy Python loop of `steps` one-token
    forwards with past_key_values is timed. ms/token = time / steps. The
    slot row decodes the smallest decode context in caches of (smallest +
    64) and (largest + 64) slots (4 x smallest when only one), kvjax only.
  generate: `kvjax.generate(params, prompts, config=config,
    max_new_tokens=n)` vs `model.generate(do_sample=False,
    min_new_tokens=n, max_new_tokens=n)`, prompt included; tokens/s =
    batch * n / time.
  peak RSS: each framework in a fresh spawned process: load the weights,
    run the prefill of the largest prefill context once (warm-up: kvjax
    compiles), free its outputs, gc + malloc_trim, read VmRSS, reset the
    peak (VmHWM, via /proc/self/clear_refs), run the same prefill again
    and keep its outputs, read VmHWM. Reported: VmHWM - VmRSS before, i.e.
    the resident memory one steady-state prefill adds at its peak (logits
    and cache included, compilation excluded).
  compressed decode: at the largest decode context, kvjax `prefill(...,
    transform=t, capacity=T + steps, decode_steps=steps)` then `decode(...,
    transform=t if t.every > 0 else None)`; peers: transformers for the
    uncompressed row, kvpress SnapKVPress under its context manager (then
    the same greedy loop, positions continuing from the prompt) for SnapKV.
    The uncompressed row is the decode section's. --long adds 32k rows
    (uncompressed, KIVI-2, TurboQuant-3; their untimed kvjax prefill runs
    in chunks of 4096). A method whose transform refuses the input
    (`compress.Degenerate`, e.g. KIVI on too few entries) shows as refused.
  SnapKV prefill+compress: the timed prefill of the compressed decode
    rows (kvjax: capacity T + steps) vs kvpress' prefill with the press.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import gc
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
import kvjax
from kvjax import compress
from kvjax import hf
from kvjax.compress import registry

_CONTEXTS = flags.DEFINE_list(
  "contexts", ["512", "2048", "8192"], "Prefill prompt lengths."
)
_DECODE_CONTEXTS = flags.DEFINE_list(
  "decode_contexts",
  ["2048", "8192"],
  "Decode context lengths; the largest also runs the compressed rows.",
)
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 32, "Decode steps timed.")
_GEN_PROMPT = flags.DEFINE_integer(
  "generate_prompt", 512, "Prompt length of the generate rows."
)
_GEN_NEW = flags.DEFINE_integer(
  "generate_new", 64, "New tokens of the generate rows."
)
_GEN_BATCHES = flags.DEFINE_list(
  "generate_batches", ["1", "8"], "Batch sizes of the generate rows."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_THREADS = flags.DEFINE_integer(
  "threads", 2, "CPU threads for torch and XLA (both get the same)."
)
_SKIP_PEERS = flags.DEFINE_bool(
  "skip_peers", False, "kvjax only (no transformers, no kvpress)."
)
_LONG = flags.DEFINE_bool(
  "long", False, "Add 32k decode rows (uncompressed, KIVI-2, TurboQuant-3)."
)
_QUICK = flags.DEFINE_bool(
  "quick",
  False,
  "Tiny shapes to check the script end to end: prefill "
  "128,256; decode 128; 4 steps; generate 128+8; 1 repeat.",
)
_OUT = flags.DEFINE_string(
  "out", "results/bench_attention", "Output prefix (.md and .jsonl)."
)

_VOCAB = 512
_SLOT_HEADROOM = 64  # free slots of the slot-comparison caches
_LONG_CONTEXT = 32768
_LONG_PREFILL_CHUNK = 4096
_PEER = "transformers"
_NA = "—"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The shapes of one run (flags, or the --quick ones)."""

  contexts: tuple[int, ...]
  decode_contexts: tuple[int, ...]
  steps: int
  gen_prompt: int
  gen_new: int
  gen_batches: tuple[int, ...]
  repeats: int
  threads: int
  peers: bool
  long: bool


def _settings() -> Settings:
  ints = lambda values: tuple(sorted(int(v) for v in values))
  s = Settings(
    contexts=ints(_CONTEXTS.value),
    decode_contexts=ints(_DECODE_CONTEXTS.value),
    steps=_DECODE_STEPS.value,
    gen_prompt=_GEN_PROMPT.value,
    gen_new=_GEN_NEW.value,
    gen_batches=ints(_GEN_BATCHES.value),
    repeats=_REPEATS.value,
    threads=_THREADS.value,
    peers=not _SKIP_PEERS.value,
    long=_LONG.value,
  )
  if _QUICK.value:
    s = dataclasses.replace(
      s,
      contexts=(128, 256),
      decode_contexts=(128,),
      steps=4,
      gen_prompt=128,
      gen_new=8,
      repeats=1,
    )
  return s


def limit_threads(threads: int) -> None:
  """Gives XLA `threads` CPU threads; call before XLA's backend starts.

  When fewer than the machine's CPUs, the process (and the processes it
  spawns) is also pinned to the first `threads` CPUs, so that neither
  framework's thread pools see more cores than the other's.
  """
  eigen = "true" if threads > 1 else "false"
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen="
    f"{eigen} intra_op_parallelism_threads={threads}"
  )
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])


def _tokens(batch, length, seed=0):
  return np.random.default_rng(seed).integers(0, _VOCAB, (batch, length))


def make_hf_model(path: str, max_positions: int):
  """Makes the random HF Llama (seed 0), saves it (safetensors) to `path`.

  Args:
    path: an empty directory.
    max_positions: the config's max_position_embeddings.

  Returns:
    The model, in eval mode, sdpa attention.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
    vocab_size=_VOCAB,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=max_positions,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
    attn_implementation="sdpa",
  )
  model = transformers.LlamaForCausalLM(hf_config).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def load_kvjax(path: str):
  """(config, params on the device) of the checkpoint at `path`."""
  config, params = hf.load_pretrained(path)
  return config, jax.block_until_ready(jax.device_put(params))


# ----------------------------------------------------------------------------
# kvjax.


def kvjax_prefill(params, config, tokens, repeats):
  """(median s of a default `prefill`, last-token logits [B, V])."""
  tokens = jnp.asarray(tokens, jnp.int32)
  run = lambda: jax.block_until_ready(
    kvjax.prefill(params, tokens, config=config)
  )
  t, (logits, _) = median_time(run, repeats)
  return t, np.asarray(logits[:, -1])


def kvjax_decode(
  params,
  config,
  tokens,
  *,
  steps,
  repeats,
  capacity,
  transform=None,
  time_prefill=False,
  prefill_chunk=None,
):
  """Decode ms/token (and prefill s when `time_prefill`, else None).

  Args:
    params: model parameters.
    config: the model config.
    tokens: [B, T] prompt.
    steps: tokens decoded in the timed `decode` call.
    repeats: timed repeats.
    capacity: cache slots of the prefill.
    transform: a compression transform, or None.
    time_prefill: also time the prefill (median of `repeats`).
    prefill_chunk: `prefill`'s chunk (None: the default, one call).

  Returns:
    (prefill seconds or None, decode ms/token).
  """
  tokens = jnp.asarray(tokens, jnp.int32)

  def prefill():
    return jax.block_until_ready(
      kvjax.prefill(
        params,
        tokens,
        config=config,
        transform=transform,
        capacity=capacity,
        decode_steps=0 if transform is None else steps,
        prefill_chunk=prefill_chunk,
      )
    )

  if time_prefill:
    t_prefill, (logits, cache) = median_time(prefill, repeats)
  else:
    t_prefill, (logits, cache) = None, prefill()
  first = logits[:, -1].argmax(-1).astype(jnp.int32)
  during = transform if transform is not None and transform.every > 0 else None

  def decode():
    return jax.block_until_ready(
      kvjax.decode(
        params,
        cache,
        first,
        config=config,
        max_new_tokens=steps,
        transform=during,
      )
    )

  t_decode, _ = median_time(decode, repeats)
  return t_prefill, t_decode / steps * 1e3


def kvjax_generate(params, config, prompts, new, repeats):
  """Tokens/s of `generate` (prompt included) over the whole batch."""
  prompts = jnp.asarray(prompts, jnp.int32)
  run = lambda: jax.block_until_ready(
    kvjax.generate(params, prompts, config=config, max_new_tokens=new)
  )
  t, out = median_time(run, repeats)
  assert out.tokens.shape == (prompts.shape[0], new), out.tokens.shape
  return prompts.shape[0] * new / t


# ----------------------------------------------------------------------------
# transformers and kvpress.


def hf_prefill(model, tokens, repeats):
  """(median s of `model(ids, use_cache=True)`, last-token logits [B, V])."""
  import torch  # pylint: disable=g-import-not-at-top

  ids = torch.from_numpy(tokens)

  def run():
    with torch.no_grad():
      return model(ids, use_cache=True)

  t, out = median_time(run, repeats)
  return t, out.logits[:, -1].numpy()


def hf_decode(
  model, tokens, *, steps, repeats, make_press=None, time_prefill=False
):
  """Decode ms/token of a greedy loop (and prefill s when `time_prefill`).

  Args:
    model: the HF model.
    tokens: [1, T] prompt.
    steps: one-token forwards timed.
    repeats: timed repeats.
    make_press: () -> a kvpress press applied during the prefill, or None.
    time_prefill: also time the prefill (median of `repeats`).

  Returns:
    (prefill seconds or None, decode ms/token).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  ids = torch.from_numpy(tokens)
  T = tokens.shape[1]

  def prefill():
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
      if make_press is None:
        out = model(ids, past_key_values=cache, use_cache=True)
      else:
        with make_press()(model):
          out = model(ids, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)

  t_prefill = median_time(prefill, repeats)[0] if time_prefill else None

  def decode():  # seconds of the loop alone; the cache grows in place
    cache, tok = prefill()
    t0 = time.perf_counter()
    with torch.no_grad():
      for i in range(steps):
        # Positions continue from the prompt, not from a compressed cache's
        # length (as kvpress' own pipeline does).
        out = model(
          tok,
          past_key_values=cache,
          use_cache=True,
          position_ids=torch.tensor([[T + i]]),
          cache_position=torch.tensor([T + i]),
        )
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0

  decode()  # warm-up
  t_decode = statistics.median(decode() for _ in range(repeats))
  return t_prefill, t_decode / steps * 1e3


def hf_generate(model, prompts, new, repeats):
  """Tokens/s of greedy `model.generate` (prompt included)."""
  import torch  # pylint: disable=g-import-not-at-top

  ids = torch.from_numpy(prompts)

  def run():
    with torch.no_grad():
      return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        min_new_tokens=new,
        max_new_tokens=new,
        pad_token_id=0,
      )

  t, out = median_time(run, repeats)
  assert out.shape == (ids.shape[0], ids.shape[1] + new), out.shape
  return ids.shape[0] * new / t


# ----------------------------------------------------------------------------
# Peak resident memory, in a fresh process per framework.


def _status_kb(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _release_free_memory():
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def prefill_peak_rss(
  framework: str, path: str, context: int, threads: int
) -> dict[str, float]:
  """Runs in a spawned process: what one warm prefill adds to the RSS.

  Args:
    framework: "kvjax" or "transformers".
    path: the saved checkpoint.
    context: prompt length (batch 1).
    threads: torch threads (XLA's come from the inherited XLA_FLAGS).

  Returns:
    loaded_mb (VmRSS with the weights loaded), first_peak_mb (VmHWM after
    the warm-up call: loading, compilation and the first run), before_mb
    (VmRSS after the warm-up, its outputs freed), peak_mb (VmHWM of the
    measured prefill, its outputs alive) and added_mb = peak - before.
    VmHWM rather than getrusage's ru_maxrss: a spawned child's ru_maxrss
    starts from its parent's peak (kept across fork and exec), and it
    cannot be reset after the warm-up.
  """
  tokens = _tokens(1, context)
  if framework == "kvjax":
    config, params = load_kvjax(path)
    tokens = jnp.asarray(tokens, jnp.int32)
    run = lambda: jax.block_until_ready(
      kvjax.prefill(params, tokens, config=config)
    )
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(
      path, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    ids = torch.from_numpy(tokens)

    def run():
      with torch.no_grad():
        return model(ids, use_cache=True)

  loaded = _status_kb("VmRSS")
  out = run()
  first_peak = _status_kb("VmHWM")
  del out
  _release_free_memory()
  before = _status_kb("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
  out = run()
  peak = _status_kb("VmHWM")
  del out
  mb = lambda kb: kb / 1024
  return {
    "loaded_mb": mb(loaded),
    "first_peak_mb": mb(first_peak),
    "before_mb": mb(before),
    "peak_mb": mb(peak),
    "added_mb": mb(peak - before),
  }


def _in_fresh_process(fn, *args):
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------
# Report.


def _fmt(v, digits=2):
  return _NA if v is None else f"{v:.{digits}f}"


def _ratio(a, b):
  return None if a is None or b is None else a / b


def _section(title, header, lines):
  return (
    [
      f"### {title}",
      "",
      "| " + " | ".join(header) + " |",
      "|" + "---|" * len(header),
    ]
    + ["| " + " | ".join(map(str, l)) + " |" for l in lines]
    + [""]
  )


def _machine(threads):
  return (
    f"{platform.platform()}, {platform.processor() or 'cpu'}, "
    f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
    f"{threads} thread(s) per framework; jax {jax.__version__} on "
    f"{jax.devices()[0].device_kind}"
  )


def _targets(s, rows):
  """[(target, measured, met or None)] from the measured rows."""
  by = lambda sec: [r for r in rows if r["section"] == sec]
  out = []

  def add(name, value, ok, fmt="{:.2f}x"):
    out.append(
      (
        name,
        _NA if value is None else fmt.format(value),
        None if value is None else ok(value),
      )
    )

  for r in by("slots"):
    add(
      f"decode ms/token, {r['context']} context in {r['big_slots']} vs "
      f"{r['small_slots']} slots <= 1.15x",
      r["ratio"],
      lambda v: v <= 1.15,
    )
  prefill = by("prefill")
  big = [r for r in prefill if r["context"] >= 2048] or prefill[-1:]
  for r in big:
    add(
      f"prefill {r['context']} kvjax/{_PEER} <= 1.0x (aim 0.7x)",
      r["ratio"],
      lambda v: v <= 1.0,
    )
  for r in by("peak_rss"):
    add(
      f"peak RSS added by prefill {r['context']} kvjax <= {_PEER}",
      r["ratio"],
      lambda v: v <= 1.0,
    )
  decode = [r for r in by("decode") if r["slots"] == r["context"] + s.steps]
  if decode:
    r = max(decode, key=lambda r: r["context"])
    add(
      f"decode ms/token at {r['context']} batch 1 kvjax/{_PEER} <= 0.7x",
      r["ratio"],
      lambda v: v <= 0.7,
    )
  gen = by("generate")
  if gen:
    r = max(gen, key=lambda r: r["batch"])
    add(
      f"generate tokens/s batch {r['batch']} kvjax/{_PEER} >= 3x",
      r["ratio"],
      lambda v: v >= 3.0,
    )
  comp = [r for r in by("compressed") if r["context"] == s.decode_contexts[-1]]
  for r in comp:
    if r["method"] == "snapkv0.9":
      add(
        f"SnapKV 0.9 decode at {r['context']}: uncompressed/SnapKV >= 8x",
        r["speedup"],
        lambda v: v >= 8.0,
      )
    elif r["method"] in ("kivi2", "turboquant3"):
      add(
        f"{r['method']} decode at {r['context']}: method/uncompressed <= 1.0x",
        _ratio(1.0, r["speedup"]),
        lambda v: v <= 1.0,
      )
  for r in by("snapkv_prefill"):
    add(
      f"SnapKV 0.9 prefill+compress {r['context']} kvjax/kvpress <= 1.0x",
      r["ratio"],
      lambda v: v <= 1.0,
    )
  return out


def _report(s, rows, header):
  """The markdown report: one table per section, then the targets."""
  by = lambda sec: [r for r in rows if r["section"] == sec]
  md = [header, ""]
  md += _section(
    "Prefill, batch 1 (default settings)",
    [
      "tokens",
      "kvjax s",
      f"{_PEER} s",
      f"kvjax/{_PEER} time (<1: kvjax faster)",
      "max abs diff of last logits",
    ],
    [
      (
        r["context"],
        _fmt(r["kvjax_s"], 3),
        _fmt(r["peer_s"], 3),
        _fmt(r["ratio"]),
        _fmt(r["logit_diff"], 6),
      )
      for r in by("prefill")
    ],
  )
  md += _section(
    f"Decode, batch 1, {s.steps} steps",
    [
      "context",
      "cache slots",
      "kvjax ms/token",
      f"{_PEER} ms/token",
      f"kvjax/{_PEER} time (<1: kvjax faster)",
    ],
    [
      (
        r["context"],
        r["slots"],
        _fmt(r["kvjax_ms"]),
        _fmt(r["peer_ms"]),
        _fmt(r["ratio"]),
      )
      for r in by("decode")
    ],
  )
  md += _section(
    "Decode in a larger cache (kvjax only)",
    [
      "context",
      "small cache slots",
      "large cache slots",
      "ms/token small",
      "ms/token large",
      "large/small ms/token (1: no cost of empty slots)",
    ],
    [
      (
        r["context"],
        r["small_slots"],
        r["big_slots"],
        _fmt(r["small_ms"]),
        _fmt(r["big_ms"]),
        _fmt(r["ratio"]),
      )
      for r in by("slots")
    ],
  )
  md += _section(
    f"Generate, prompt {s.gen_prompt} + {s.gen_new} new tokens (greedy)",
    [
      "batch",
      "kvjax tokens/s",
      f"{_PEER} tokens/s",
      f"kvjax/{_PEER} tokens/s (>1: kvjax faster)",
    ],
    [
      (
        r["batch"],
        _fmt(r["kvjax_tps"], 1),
        _fmt(r["peer_tps"], 1),
        _fmt(r["ratio"]),
      )
      for r in by("generate")
    ],
  )
  md += _section(
    "Peak resident memory added by one warm prefill, batch 1",
    [
      "tokens",
      "kvjax MB",
      f"{_PEER} MB",
      f"kvjax/{_PEER} (<1: kvjax smaller)",
      "kvjax RSS before / peak MB",
      f"{_PEER} RSS before / peak MB",
    ],
    [
      (
        r["context"],
        _fmt(r["kvjax_mb"], 1),
        _fmt(r["peer_mb"], 1),
        _fmt(r["ratio"]),
        r["kvjax_abs"],
        r["peer_abs"],
      )
      for r in by("peak_rss")
    ],
  )
  md += _section(
    f"Compressed decode, batch 1, {s.steps} steps (ratio 0.9 = 90% evicted)",
    [
      "context",
      "method",
      "kvjax ms/token",
      "peer",
      "peer ms/token",
      "kvjax speedup: uncompressed/method ms (>1: faster)",
      "kvjax/peer time (<1: kvjax faster)",
    ],
    [
      (
        r["context"],
        r["method"],
        r.get("refused") or _fmt(r["kvjax_ms"]),
        r["peer"],
        _fmt(r["peer_ms"]),
        _fmt(r["speedup"]),
        _fmt(r["ratio"]),
      )
      for r in by("compressed")
    ],
  )
  md += _section(
    "SnapKV 0.9 prefill+compress, batch 1",
    ["tokens", "kvjax s", "kvpress s", "kvjax/kvpress time (<1: kvjax faster)"],
    [
      (
        r["context"],
        _fmt(r["kvjax_s"], 3),
        _fmt(r["peer_s"], 3),
        _fmt(r["ratio"]),
      )
      for r in by("snapkv_prefill")
    ],
  )
  status = {True: "met", False: "not met", None: "n/a (not measured)"}
  md += _section(
    "Targets",
    ["target", "measured", "status"],
    [(t, v, status[ok]) for t, v, ok in _targets(s, rows)],
  )
  return "\n".join(md)


# ----------------------------------------------------------------------------
# Main.


def _methods():
  """name -> (kvjax transform or None, kvpress press factory or None)."""
  press = None
  try:
    import kvpress  # pylint: disable=g-import-not-at-top

    press = lambda: kvpress.SnapKVPress(compression_ratio=0.9)
  except ImportError:
    pass
  return {
    "none": (None, None),
    "snapkv0.9": (registry.build("snapkv", 0.9), press),
    "kivi2": (registry.build("kivi2"), None),
    "turboquant3": (registry.build("turboquant3"), None),
    "snapkv0.9+kivi2": (registry.build("snapkv+kivi2", 0.9), None),
  }


def main(argv):
  del argv
  s = _settings()
  limit_threads(s.threads)  # before XLA's CPU backend starts
  load_before = os.getloadavg()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  torch.set_num_threads(s.threads)
  busy = ""
  if load_before[0] + s.threads > os.cpu_count() + 1.0:
    busy = (
      f"1-minute load average {load_before[0]:.2f} + {s.threads} "
      f"threads exceed the {os.cpu_count()} CPUs: other work shares "
      "them, so timings are slow and noisy (torch's worst: its OpenMP "
      "threads wait on descheduled peers; --threads=1 suffers least)."
    )
    logging.warning(busy)
  longest = max(
    s.contexts
    + s.decode_contexts
    + (s.gen_prompt + s.gen_new,)
    + ((_LONG_CONTEXT,) if s.long else ())
  )
  path = tempfile.mkdtemp(prefix="attention_bench_")
  model = make_hf_model(path, max_positions=2 * longest)
  config, params = load_kvjax(path)
  rows = []

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  def both(kvjax_fn, peer_fn):
    return kvjax_fn(), (peer_fn() if s.peers else None)

  for T in s.contexts:
    tokens = _tokens(1, T)
    (kt, klog), peer = both(
      lambda: kvjax_prefill(params, config, tokens, s.repeats),
      lambda: hf_prefill(model, tokens, s.repeats),
    )
    pt, plog = peer or (None, None)
    emit(
      {
        "section": "prefill",
        "context": T,
        "kvjax_s": kt,
        "peer_s": pt,
        "ratio": _ratio(kt, pt),
        "logit_diff": None
        if plog is None
        else float(np.abs(klog - plog).max()),
      }
    )

  uncompressed = {}
  for T in s.decode_contexts:
    tokens = _tokens(1, T)
    (_, km), peer = both(
      lambda: kvjax_decode(
        params,
        config,
        tokens,
        steps=s.steps,
        repeats=s.repeats,
        capacity=T + s.steps,
      ),
      lambda: hf_decode(model, tokens, steps=s.steps, repeats=s.repeats),
    )
    pm = peer[1] if peer else None
    uncompressed[T] = (km, pm)
    emit(
      {
        "section": "decode",
        "context": T,
        "slots": T + s.steps,
        "kvjax_ms": km,
        "peer_ms": pm,
        "ratio": _ratio(km, pm),
      }
    )

  small = s.decode_contexts[0]
  large = s.decode_contexts[-1] if len(s.decode_contexts) > 1 else 4 * small
  room = max(_SLOT_HEADROOM, s.steps)
  slot_ms = [
    kvjax_decode(
      params,
      config,
      _tokens(1, small),
      steps=s.steps,
      repeats=s.repeats,
      capacity=c + room,
    )[1]
    for c in (small, large)
  ]
  emit(
    {
      "section": "slots",
      "context": small,
      "small_slots": small + room,
      "big_slots": large + room,
      "small_ms": slot_ms[0],
      "big_ms": slot_ms[1],
      "ratio": slot_ms[1] / slot_ms[0],
    }
  )

  for B in s.gen_batches:
    prompts = _tokens(B, s.gen_prompt)
    kt, pt = both(
      lambda: kvjax_generate(params, config, prompts, s.gen_new, s.repeats),
      lambda: hf_generate(model, prompts, s.gen_new, s.repeats),
    )
    emit(
      {
        "section": "generate",
        "batch": B,
        "prompt": s.gen_prompt,
        "new": s.gen_new,
        "kvjax_tps": kt,
        "peer_tps": pt,
        "ratio": _ratio(kt, pt),
      }
    )

  T = s.contexts[-1]
  km = _in_fresh_process(prefill_peak_rss, "kvjax", path, T, s.threads)
  pm = (
    _in_fresh_process(prefill_peak_rss, _PEER, path, T, s.threads)
    if s.peers
    else None
  )
  absolute = lambda m: (
    _NA if m is None else (f"{m['before_mb']:.0f} / {m['peak_mb']:.0f}")
  )
  emit(
    {
      "section": "peak_rss",
      "context": T,
      "kvjax_mb": km["added_mb"],
      "peer_mb": pm and pm["added_mb"],
      "ratio": _ratio(km["added_mb"], pm and pm["added_mb"]),
      "kvjax_abs": absolute(km),
      "peer_abs": absolute(pm),
      "kvjax_detail": km,
      "peer_detail": pm,
    }
  )

  methods = _methods()
  plan = [(s.decode_contexts[-1], list(methods))]
  if s.long:
    plan.append((_LONG_CONTEXT, ["none", "kivi2", "turboquant3"]))
  for T, names in plan:
    tokens = _tokens(1, T)
    # The 32k rows' prefill is untimed: chunked, so that its [T, S] scores
    # fit in memory.
    chunk = _LONG_PREFILL_CHUNK if T == _LONG_CONTEXT else None
    for name in names:
      transform, make_press = methods[name]
      row = {
        "section": "compressed",
        "context": T,
        "method": name,
        "kvjax_ms": None,
        "peer": _NA,
        "peer_ms": None,
      }
      if name == "none":
        if T not in uncompressed:
          (_, km), peer = both(
            lambda: kvjax_decode(
              params,
              config,
              tokens,
              steps=s.steps,
              repeats=s.repeats,
              capacity=T + s.steps,
              prefill_chunk=chunk,
            ),
            lambda: hf_decode(model, tokens, steps=s.steps, repeats=s.repeats),
          )
          uncompressed[T] = (km, peer[1] if peer else None)
        row["kvjax_ms"], row["peer_ms"] = uncompressed[T]
        row["peer"] = _PEER if s.peers else _NA
      else:
        try:
          kp, row["kvjax_ms"] = kvjax_decode(
            params,
            config,
            tokens,
            steps=s.steps,
            repeats=s.repeats,
            capacity=T + s.steps,
            transform=transform,
            time_prefill=name == "snapkv0.9",
            prefill_chunk=chunk,
          )
        except compress.Degenerate as e:
          row["refused"] = "refused (Degenerate)"
          row["refused_why"] = str(e)
        if s.peers and make_press is not None:
          pp, row["peer_ms"] = hf_decode(
            model,
            tokens,
            steps=s.steps,
            repeats=s.repeats,
            make_press=make_press,
            time_prefill=True,
          )
          row["peer"] = "kvpress SnapKVPress(0.9)"
        else:
          pp = None
        if name == "snapkv0.9" and row["kvjax_ms"] is not None:
          emit(
            {
              "section": "snapkv_prefill",
              "context": T,
              "kvjax_s": kp,
              "peer_s": pp,
              "ratio": _ratio(kp, pp),
            }
          )
      row["speedup"] = _ratio(uncompressed[T][0], row["kvjax_ms"])
      row["ratio"] = _ratio(row["kvjax_ms"], row["peer_ms"])
      emit(row)

  load_after = os.getloadavg()
  load = lambda l: "/".join(f"{x:.2f}" for x in l)
  header = (
    f"Machine: {_machine(s.threads)}. Load average (1/5/15 min) before "
    f"{load(load_before)}, after {load(load_after)}.\n\nModel: random "
    "Llama L=4 D=256 N=8 K=2 H=32 vocab 512 float32, the same safetensors "
    f"weights in kvjax and transformers {transformers.__version__} (torch "
    f"{torch.__version__}, sdpa); median of {s.repeats} after a warm-up "
    "(kvjax: after compilation)." + (f"\n\n**Warning**: {busy}" if busy else "")
  )
  report = _report(s, rows, header)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(_OUT.value + ".md", "w") as f:
    f.write(report + "\n")
  print(report)


if __name__ == "__main__":
  app.run(main)
