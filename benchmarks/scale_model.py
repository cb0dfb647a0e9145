"""A scale model on paper, checked against kvjax's byte accounting.

  python -m benchmarks.scale_model                  # the markdown tables
  python -m benchmarks.scale_model --models=llama-3.1-8b --batches=1
  python -m benchmarks.scale_model --nomarkdown     # one JSON row per line

How much KV cache each chip holds, and how many bytes one decode step reads
per chip, when decoding at 128k and 1M context on a TPU v5e-256 slice and
on an 8xH100 node, for the uncompressed cache, SnapKV at ratio 0.9 followed
by KIVI-2, and TurboQuant-3, on the published shapes of Llama-3.1-8B and
Llama-3.2-1B (`kvjax.config` presets).

Nothing is measured and nothing is allocated. Each cache is built
abstractly: `jax.eval_shape` of `kvjax.init_cache` at the full capacity,
then of the transform's prefill-phase `apply` with the context
`kvjax.prefill` gives it (live bound = the prompt, `decode_steps` slots of
decode room). Its bytes are `kvjax.kv_bytes` of the resulting
`ShapeDtypeStruct`s: the function that counts a real cache, so codes,
scales, norms, KIVI's full-precision window, positions and validity are all
in, padding included. Before the tables the script builds the same caches
for real on a small shape (`kvjax.prefill` of random weights) and checks
that the two counts are equal.

The assumptions (printed above the tables):
  - the cache is sharded along its slot axis over every chip (the `seq`
    mesh axis): each per-slot leaf splits into `chips` equal shards, its
    slot count padded up to a multiple of the chip count; leaves without a
    slot axis (counters, transform state) are replicated;
  - the weights are replicated on every chip, in the model's dtype (bf16);
  - a decode step reads the whole per-chip cache once (every slot of the
    static layout: at the last decode step every slot but a few of KIVI's
    padding is live) and the weights once;
  - the step-time bound is those bytes at the chip's peak HBM bandwidth
    (compute, the cross-chip merge of the partial attentions and the
    prefill are not counted).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import kvjax
from kvjax import cache as cache_lib
from kvjax import model as model_lib
from kvjax.compress import base, registry

BASELINE = "none"  # the uncompressed cache (the sweep's name for it)


class Hardware(NamedTuple):
  """One accelerator slice: its chip count and each chip's HBM."""

  name: str
  chips: int
  hbm_bytes: int  # per chip
  hbm_bytes_per_s: float  # peak HBM bandwidth per chip


HARDWARE = (
  # Cloud TPU v5e: "HBM2 capacity and bandwidth: 16 GB, 819 GBps" per chip,
  # 256 chips per pod (cloud.google.com/tpu/docs/v5e, key chip and pod
  # specifications), counted here as 16 GiB (see HEADROOM).
  Hardware("TPU v5e-256", 256, 16 * 2**30, 819e9),
  # NVIDIA H100 SXM5: 80 GB HBM3 at 3.35 TB/s (NVIDIA H100 Tensor Core GPU
  # datasheet, "H100 SXM" column); an HGX/DGX H100 node holds 8.
  Hardware("8xH100 SXM", 8, 80 * 10**9, 3.35e12),
)
HARDWARE_BY_NAME = {h.name: h for h in HARDWARE}

# Published shapes (kvjax.config presets): Llama-3.1-8B has 32 layers, 32
# query heads on 8 kv heads of head_dim 128; Llama-3.2-1B 16 layers, 32 on
# 8 of head_dim 64. Both bf16.
MODELS = ("llama-3.1-8b", "llama-3.2-1b")
CONTEXTS = (131072, 1048576)  # 128k and 1M prompt tokens
BATCHES = (1, 8)
RATIO = 0.9  # SnapKV's eviction ratio (share of entries removed)
# (method, takes the ratio): registry names, BASELINE uncompressed.
METHODS = (
  (BASELINE, False),
  ("snapkv+kivi2", True),
  ("turboquant3", False),
)
DECODE_STEPS = 256  # tokens generated after the prompt (the cache's room)
# HBM a chip needs besides weights and cache (activations, XLA's own
# reserve): a row that leaves less is marked marginal, not a clean fit.
HEADROOM = 2**30

# The small shape the accounting is checked on: the first model's attention
# geometry and dtype, one layer, a narrow residual; a prompt long enough
# that SnapKV at 0.9 keeps more than one KIVI block, a capacity padded for
# 8 chips (so the transform also leaves a reserve).
CHECK_CHANGES = {
  "num_layers": 1,
  "d_model": 64,
  "mlp_dim": 128,
  "vocab_size": 256,
}
CHECK_BATCH, CHECK_CONTEXT, CHECK_DECODE_STEPS, CHECK_CHIPS = 2, 1408, 61, 8


def method_label(method: str, ratio: float | None) -> str:
  """How a method reads in the tables."""
  if method == BASELINE:
    return "none"
  return f"{method} @ {ratio:g}" if ratio else method


def capacity_for(context: int, decode_steps: int, chips: int) -> int:
  """Cache slots of the prefill: prompt + decode room, padded up to a
  multiple of `chips` (a sequence-sharded cache needs equal shards)."""
  return -(-(context + decode_steps) // chips) * chips


def build_transform(method: str, ratio: float | None):
  """The registry transform of `method` (None for the baseline)."""
  if method == BASELINE:
    return None
  return registry.build(method, ratio)


def observed_shapes(
  config: kvjax.ModelConfig, transform, batch: int, context: int, capacity: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """The prefill captures `transform` reads, as `kvjax.prefill` passes
  them (`kvjax.model.TAPS`): queries [L, B, T, N, H] in the model's dtype,
  attention mass [L, B, N, S] float32."""
  L, N, H = config.num_layers, config.num_heads, config.head_dim
  shapes = {
    "q": ((L, batch, context, N, H), config.jnp_dtype),
    "q_pre_rope": ((L, batch, context, N, H), config.jnp_dtype),
    "attn_mass": ((L, batch, N, capacity), jnp.float32),
  }
  return {
    name: jax.ShapeDtypeStruct(*shapes[name])
    for name in transform.needs
    if name in model_lib.PREFILL_TAPS
  }


@functools.cache
def cache_shapes(
  config: kvjax.ModelConfig,
  method: str,
  ratio: float | None,
  *,
  batch: int,
  context: int,
  decode_steps: int,
  capacity: int,
) -> kvjax.KVCache:
  """The cache `kvjax.prefill` would return, as `ShapeDtypeStruct`s.

  Mirrors `kvjax.prefill(tokens [batch, context], transform=...,
  capacity=capacity, decode_steps=decode_steps)`: an empty cache of
  `capacity` slots in the model's dtype, then the transform's prefill
  `apply` with the prompt as its live bound, `decode_steps` slots of decode
  room and the rest of the free slots as reserve. Shapes only: nothing is
  allocated, so 1M-token caches cost nothing.

  Raises:
    ValueError: `capacity` below context + decode_steps, an unknown method,
      or a transform that refuses the shape (`kvjax.compress.Degenerate`).
  """
  reserve = capacity - context - decode_steps
  if reserve < 0:
    raise ValueError(
      f"capacity={capacity} is below context + decode_steps = "
      f"{context + decode_steps}."
    )
  empty = jax.eval_shape(
    lambda: kvjax.init_cache(config, batch, capacity, dtype=config.dtype)
  )
  transform = build_transform(method, ratio)
  if transform is None:
    return empty

  def compress(cache, observed, positions, mask):
    ctx = base.CompressContext(
      phase="prefill",
      step=jnp.int32(0),
      q_pos=positions,
      q_mask=mask,
      reserve=reserve,
      geometry=config.geometry,
      live_bound=context,
      decode_reserve=decode_steps,
      **{name: observed.get(name) for name in model_lib.COMPRESS_TAPS},
    )
    new, state = transform.apply(cache, transform.init(cache), ctx)
    return new._replace(state=state)

  prompt = jax.ShapeDtypeStruct((batch, context), jnp.int32)
  return jax.eval_shape(
    compress,
    empty,
    observed_shapes(config, transform, batch, context, capacity),
    prompt,
    jax.ShapeDtypeStruct((batch, context), jnp.bool_),
  )


def _slot_leaves(cache: kvjax.KVCache) -> list[Any]:
  """The leaves with a slot axis (axis 3, after L, B, K): payload codes,
  scales and norms, KIVI's window, `pos` and `valid`. A codec's leaves
  shared by a layer's slots are not among them."""
  leaves = [cache.pos, cache.valid]
  for x in (cache.k, cache.v):
    if isinstance(x, cache_lib.TailedKV):
      leaves += jax.tree.leaves(x.code.slots) + [x.tail]
    elif isinstance(x, cache_lib.CodedKV):
      leaves += jax.tree.leaves(x.slots)
    else:
      leaves.append(x)
  return leaves


def _leaf_bytes(x, slots: int | None = None) -> int:
  shape = list(x.shape)
  if slots is not None:
    shape[3] = slots
  return np.dtype(x.dtype).itemsize * math.prod(shape)


def per_chip_bytes(cache: kvjax.KVCache, chips: int) -> int:
  """Bytes of `cache` on each chip when its slot axis is sharded over
  `chips`: each per-slot leaf holds ceil(slots / chips) of its slots (the
  padding counts), every other leaf is replicated. With one chip this is
  `kvjax.kv_bytes(cache)`."""
  sharded = _slot_leaves(cache)
  for x in sharded:
    if x.shape[:3] != cache.pos.shape[:3]:
      raise ValueError(
        f"a per-slot leaf {x.shape} does not lead with [L, B, K] = "
        f"{cache.pos.shape[:3]}."
      )
  ids = {id(x) for x in sharded}
  replicated = [x for x in jax.tree.leaves(cache) if id(x) not in ids]
  return sum(_leaf_bytes(x, -(-x.shape[3] // chips)) for x in sharded) + sum(
    _leaf_bytes(x) for x in replicated
  )


def weight_bytes(config: kvjax.ModelConfig) -> int:
  """Bytes of the model's parameters (`kvjax.model.param_shapes`)."""
  return sum(
    _leaf_bytes(x) for x in jax.tree.leaves(model_lib.param_shapes(config))
  )


def real_cache(
  config: kvjax.ModelConfig,
  method: str,
  ratio: float | None,
  *,
  batch: int,
  context: int,
  decode_steps: int,
  capacity: int,
  seed: int = 0,
) -> kvjax.KVCache:
  """The same cache built for real: `kvjax.prefill` of random weights on a
  random prompt (allocates: small shapes only). The weights are drawn with
  numpy (N(0, 0.02) for every leaf; the bytes do not depend on them), which
  compiles nothing."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
    model_lib.param_shapes(config),
  )
  tokens = rng.integers(0, config.vocab_size, (batch, context), np.int32)
  return kvjax.prefill(
    params,
    tokens,
    config=config,
    transform=build_transform(method, ratio),
    capacity=capacity,
    decode_steps=decode_steps,
  ).cache


def check_accounting(
  config: kvjax.ModelConfig,
  *,
  batch: int,
  context: int,
  decode_steps: int,
  chips: int,
  methods=METHODS,
  ratio: float = RATIO,
) -> list[dict[str, Any]]:
  """Checks the abstract byte count against a real cache of one shape.

  For each method: `kvjax.kv_bytes` of `cache_shapes` must equal
  `kvjax.kv_bytes` of `real_cache` (same leaves, shapes and dtypes), and
  `per_chip_bytes` with one chip must equal it too.

  Returns:
    One dict per method: method, bytes (the shared count), capacity.

  Raises:
    AssertionError: a count or a leaf that differs, naming both.
  """
  capacity = capacity_for(context, decode_steps, chips)
  out = []
  for method, takes_ratio in methods:
    r = ratio if takes_ratio else None
    shape = {
      "batch": batch,
      "context": context,
      "decode_steps": decode_steps,
      "capacity": capacity,
    }
    abstract = cache_shapes(config, method, r, **shape)
    real = real_cache(config, method, r, **shape)
    spec = lambda t: [(x.shape, np.dtype(x.dtype)) for x in jax.tree.leaves(t)]
    want, got = kvjax.kv_bytes(real), kvjax.kv_bytes(abstract)
    if want != got or spec(real) != spec(abstract):
      raise AssertionError(
        f"{method_label(method, r)}: eval_shape gives {got} bytes "
        f"{spec(abstract)}, the real prefill {want} bytes {spec(real)}."
      )
    if per_chip_bytes(abstract, 1) != want:
      raise AssertionError(
        f"{method_label(method, r)}: per_chip_bytes(chips=1) = "
        f"{per_chip_bytes(abstract, 1)} != kv_bytes = {want}."
      )
    out.append(
      {"method": method_label(method, r), "bytes": want, "capacity": capacity}
    )
  return out


def scale_rows(
  models=MODELS,
  hardware=HARDWARE,
  contexts=CONTEXTS,
  batches=BATCHES,
  methods=METHODS,
  ratio: float = RATIO,
  decode_steps: int = DECODE_STEPS,
) -> list[dict[str, Any]]:
  """One row per (model, hardware, context, batch, method).

  Args:
    models: `kvjax.config` preset names or `ModelConfig`s.
    hardware: `Hardware` values.
    contexts: prompt lengths (tokens).
    batches: batch sizes.
    methods: (registry name or BASELINE, takes the ratio) pairs.
    ratio: the eviction ratio of the methods that take one.
    decode_steps: decode room after the prompt.

  Returns:
    Dicts with the shape, the totals and per-chip bytes, whether weights
    plus cache fit in a chip's HBM, the bytes a decode step reads per chip
    and the step-time lower bound at peak HBM bandwidth (seconds).
  """
  rows = []
  for model in models:
    config = kvjax.get_config(model) if isinstance(model, str) else model
    weights = weight_bytes(config)
    for hw in hardware:
      for context in contexts:
        for batch in batches:
          capacity = capacity_for(context, decode_steps, hw.chips)
          baseline = None
          for method, takes_ratio in methods:
            r = ratio if takes_ratio else None
            cache = cache_shapes(
              config,
              method,
              r,
              batch=batch,
              context=context,
              decode_steps=decode_steps,
              capacity=capacity,
            )
            total = kvjax.kv_bytes(cache)
            if per_chip_bytes(cache, 1) != total:  # the split loses nothing
              raise AssertionError(f"{method}: per-chip split != kv_bytes")
            chip = per_chip_bytes(cache, hw.chips)
            if method == BASELINE:
              baseline = total
            read = chip + weights
            rows.append(
              {
                "model": config.name,
                "hardware": hw.name,
                "chips": hw.chips,
                "context": context,
                "batch": batch,
                "method": method_label(method, r),
                "capacity": capacity,
                "slots_after": cache.capacity,
                "cache_bytes": total,
                "cache_vs_none": None if baseline is None else total / baseline,
                "cache_per_chip": chip,
                "weights_per_chip": weights,
                "hbm_per_chip": hw.hbm_bytes,
                "free_per_chip": hw.hbm_bytes - weights - chip,
                "read_per_step_per_chip": read,
                "step_s_lower_bound": read / hw.hbm_bytes_per_s,
              }
            )
  return rows


def query_capture_bytes(
  config: kvjax.ModelConfig,
  method: str,
  ratio: float | None,
  batch: int,
  context: int,
) -> int:
  """Bytes of what the method's prefill captures for it (SnapKV: every
  prompt query, [L, B, T, N, H]); not part of the cache."""
  transform = build_transform(method, ratio)
  if transform is None:
    return 0
  observed = observed_shapes(config, transform, batch, context, context)
  return sum(_leaf_bytes(x) for x in observed.values())


def _size(n: float) -> str:
  """Bytes in binary units: 3 significant figures, whole numbers from 100."""
  sign, n = ("-" if n < 0 else ""), abs(n)
  for unit, scale in (
    ("TiB", 2**40),
    ("GiB", 2**30),
    ("MiB", 2**20),
    ("KiB", 2**10),
  ):
    if n >= scale:
      x = n / scale
      return f"{sign}{x:.0f} {unit}" if x >= 100 else f"{sign}{x:.3g} {unit}"
  return f"{sign}{n:.0f} B"


def _tokens(n: int) -> str:
  if n % 2**20 == 0:
    return f"{n // 2**20}M"
  return f"{n // 2**10}k" if n % 2**10 == 0 else str(n)


def assumptions(
  hardware=HARDWARE, ratio: float = RATIO, decode_steps: int = DECODE_STEPS
) -> list[str]:
  """The assumptions, as printed above the tables."""
  hw = "; ".join(
    f"{h.name}: {h.chips} chips, {_size(h.hbm_bytes)} HBM and "
    f"{h.hbm_bytes_per_s / 1e9:g} GB/s each"
    for h in hardware
  )
  return [
    f"Hardware: {hw}.",
    (
      "Cache: a prompt of the given context, then room for "
      f"{decode_steps} decode steps; the model's dtype (bf16) before "
      "compression. Bytes are `kvjax.kv_bytes` of the cache `kvjax.prefill` "
      "returns (payload, scales, KIVI's full-precision window, positions, "
      "validity), built with `jax.eval_shape`; `cache` is the total over "
      "all chips."
    ),
    (
      "Sharding: the cache is split along its slots over every chip (the "
      "`seq` mesh axis), each per-slot leaf padded up to a multiple of the "
      "chip count; counters are replicated. The weights are replicated on "
      "every chip (bf16)."
    ),
    (
      f"Methods: none (uncompressed), SnapKV at ratio {ratio:g} (share "
      "removed) then KIVI-2, TurboQuant-3 (registry names)."
    ),
    (
      "Per step: a decode step reads the whole per-chip cache once and the "
      "weights once; `step >=` is those bytes at peak HBM bandwidth "
      "(compute and the cross-chip merge of partial attentions not counted)."
    ),
    (
      "Fits: weights + cache within one chip's HBM; marginal when under "
      f"{_size(HEADROOM)} is left for activations and XLA's own reserve. The "
      "compressed rows are the cache after prefill: kvjax compresses at "
      "the end of prefill, so prefill holds the uncompressed cache (the "
      "`none` row) first."
    ),
    (
      "1M tokens is past Llama 3.x's 128k training context: a memory "
      "exercise, not a quality claim."
    ),
  ]


def markdown(
  rows: list[dict[str, Any]],
  hardware=HARDWARE,
  ratio: float = RATIO,
  decode_steps: int = DECODE_STEPS,
) -> str:
  """The tables: one per (model, hardware), assumptions first."""
  lines = ["Assumptions:", ""]
  lines += [f"- {a}" for a in assumptions(hardware, ratio, decode_steps)]
  groups: dict[tuple[str, str], list] = {}
  for row in rows:
    groups.setdefault((row["model"], row["hardware"]), []).append(row)
  header = (
    "| context | B | method | cache | vs none | cache/chip "
    "| fits (HBM left/chip) | read/step/chip | step >= |"
  )
  for (model, hw), group in groups.items():
    weights = group[0]["weights_per_chip"]
    share = weights / group[0]["hbm_per_chip"]
    lines += [
      "",
      f"{model} on {hw}: weights {_size(weights)} per chip ({share:.0%} HBM).",
      "",
      header,
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
      free = r["free_per_chip"]
      if free < 0:
        fits = f"**no** ({_size(-free)} short)"
      elif free < HEADROOM:
        fits = f"marginal ({_size(free)})"
      else:
        fits = f"yes ({_size(free)})"
      vs = r["cache_vs_none"]
      lines.append(
        f"| {_tokens(r['context'])} | {r['batch']} | {r['method']} | "
        f"{_size(r['cache_bytes'])} | "
        f"{'-' if vs is None else f'{vs:.3f}'} | "
        f"{_size(r['cache_per_chip'])} | {fits} | "
        f"{_size(r['read_per_step_per_chip'])} | "
        f"{r['step_s_lower_bound'] * 1e3:.3g} ms |"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  models = [kvjax.get_config(m) for m in _MODELS.value]
  unknown = sorted(set(_HARDWARE.value) - set(HARDWARE_BY_NAME))
  if unknown:
    raise app.UsageError(
      f"unknown hardware {unknown}; allowed: {list(HARDWARE_BY_NAME)}"
    )
  hardware = [HARDWARE_BY_NAME[h] for h in _HARDWARE.value]
  contexts = [int(c) for c in _CONTEXTS.value]
  batches = [int(b) for b in _BATCHES.value]
  if _CHECK.value:
    small = models[0].replace(**CHECK_CHANGES)
    checked = check_accounting(
      small,
      batch=CHECK_BATCH,
      context=CHECK_CONTEXT,
      decode_steps=CHECK_DECODE_STEPS,
      chips=CHECK_CHIPS,
      ratio=_RATIO.value,
    )
    print(
      f"Checked: eval_shape bytes == kv_bytes of a real kvjax.prefill cache "
      f"({models[0].name} attention, 1 layer, B={CHECK_BATCH}, "
      f"context {CHECK_CONTEXT}, {CHECK_DECODE_STEPS} decode steps, "
      f"capacity {checked[0]['capacity']}): "
      + ", ".join(f"{c['method']} {c['bytes']} B" for c in checked)
      + ".\n"
    )
  rows = scale_rows(
    models,
    hardware,
    contexts,
    batches,
    ratio=_RATIO.value,
    decode_steps=_DECODE_STEPS.value,
  )
  if not _MARKDOWN.value:
    for row in rows:
      print(json.dumps(row))
    return
  print(markdown(rows, hardware, _RATIO.value, _DECODE_STEPS.value))
  # What the tables leave out: the prefill captures a method reads (SnapKV
  # reads every prompt query, although it scores with its window only).
  big, b = max(contexts), max(batches)
  for config in models:
    for method, takes_ratio in METHODS:
      r = _RATIO.value if takes_ratio else None
      q = query_capture_bytes(config, method, r, b, big)
      if q:
        per_chip = ", ".join(
          f"{_size(q / h.chips)} per chip on {h.name}" for h in hardware
        )
        print(
          f"\nNot counted: at {_tokens(big)} context and B={b}, "
          f"{config.name}'s prefill for {method_label(method, r)} captures "
          f"the queries of every prompt token (`q` [L, B, T, N, H]; SnapKV "
          f"scores with its last window only): {_size(q)} in all "
          f"({per_chip} if sharded like the cache)."
        )


if __name__ == "__main__":
  # Defined here, not at import, so tests can import this module.
  _MODELS = flags.DEFINE_list("models", list(MODELS), "kvjax.config presets.")
  _HARDWARE = flags.DEFINE_list(
    "hardware", [h.name for h in HARDWARE], "Names of HARDWARE."
  )
  _CONTEXTS = flags.DEFINE_list(
    "contexts", [str(c) for c in CONTEXTS], "Prompt lengths (tokens)."
  )
  _BATCHES = flags.DEFINE_list("batches", [str(b) for b in BATCHES], "Batches.")
  _RATIO = flags.DEFINE_float("ratio", RATIO, "SnapKV's eviction ratio.")
  _DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps", DECODE_STEPS, "Decode room after the prompt."
  )
  _MARKDOWN = flags.DEFINE_bool(
    "markdown", True, "Markdown tables (--nomarkdown: JSON lines)."
  )
  _CHECK = flags.DEFINE_bool(
    "check", True, "First check eval_shape bytes against a real cache."
  )
  app.run(main)
