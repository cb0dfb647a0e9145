"""Config of the compression sweep (`experiments/sweep.py`), kvjax's main job.

  bash launch/local.sh                              # this default (kvjax-tiny)
  python -m experiments.sweep --config=experiments/configs/sweep.py:smoke
  python -m experiments.sweep --config.model=hf:/path/to/llama \\
      --config.workdir=/tmp/sweep-llama           # any supported checkpoint
  python -m experiments.sweep --config=experiments/configs/sweep.py:full
  python -m experiments.sweep --config=experiments/configs/sweep.py:spkv
  python -m experiments.sweep --config=experiments/configs/sweep.py:reread
  python -m experiments.sweep --config.model=hf:/path/to/checkpoint \\
      --config.tokens=raw       # no tokenizer.json: arbitrary token ids
  python -m experiments.sweep --config=experiments/configs/sweep.py:long \\
      --config.context_len=131072                 # 128k, sequence-sharded
  bash launch/tpu_pod.sh NAME ZONE                # "long" on a TPU pod slice

The argument after ':' picks a preset: "default" (8 eviction methods, 2
quantizers and one eviction + quantization composition at ratios
{0, 0.5, 0.75, 0.9, 0.95} on five tasks, both question modes; about 10
minutes on a 2-core CPU), "smoke" (seconds, random weights; for tests),
"full" (every registered method at three ratios; about 10 minutes on a
2-core CPU, more rows and ratios on an accelerator), "spkv" (the gated
kvjax-tiny-spkv: SP-KV's learned write gate against the heuristics on the
same weights; a few minutes), "reread" (the default on a context read
twice before compression, compute before eviction; about 10 minutes) or
"long"
(the default's methods, ratios and tasks at a 32k context, bfloat16, the
cache sharded along the sequence over every device; for accelerators, see
`launch/tpu_pod.sh`). Any field can be overridden with
--config.<field>=<value>.

On hf:PATH the tasks are written as words and encoded by the checkpoint's
own tokenizer.json (`kvjax.tasks.text`); context_len counts the tasks'
positions (words), the rows record the context in tokens.
"""

import ml_collections

from kvjax.compress import registry

EVICTION = (
  "snapkv",
  "h2o",
  "streaming_llm",
  "tova",
  "adakv_snapkv",
  "pyramidkv",
  "knorm",
  "expected_attention",
)


PRESETS = ("default", "smoke", "full", "spkv", "reread", "long")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  """Returns the sweep config of `preset` (one of `PRESETS`)."""
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}; allowed: {', '.join(PRESETS)}.")
  c = ml_collections.ConfigDict()
  # "kvjax-tiny" (shipped), "hf:PATH" (a Hugging Face checkpoint directory)
  # or "random:PRESET" (random weights of a kvjax.config preset; plumbing).
  c.model = "kvjax-tiny"
  c.dtype = "float32"  # Parameter and cache dtype.
  # What the model reads: "auto" (kvjax-tiny and random:PRESET the tasks'
  # private ids, hf:PATH the tasks written as text and encoded by PATH's
  # tokenizer.json), "text" (that, hf:PATH only) or "raw" (the private ids
  # 0..511; on hf:PATH arbitrary tokens: a warning, and every row says
  # "tokens": "raw"). hf:PATH without tokenizer.json is refused unless raw.
  c.tokens = "auto"
  # Attention backend: "auto" (by platform: xla on CPU, the Pallas kernels
  # on TPU/GPU), "xla" (blockwise), "reference" (the definition;
  # materializes [T, S]), "pallas_tpu" or "pallas_gpu" (interpret mode off
  # their accelerator: slow, for checking).
  c.backend = "auto"
  # Device mesh, "axis:size" pairs joined by commas, e.g. "seq:8" or
  # "data:2,seq:4" (axes data, seq, heads; a size of -1 takes the devices
  # the other axes leave). "" runs on one device.
  c.mesh = ""
  # Method names (see experiments/sweep.py METHODS): eviction policies run
  # at every ratio > 0, quantizers once, "A+B" evicts with A then encodes
  # with B at every ratio > 0. Ratio 0 is the uncompressed model ("none").
  # A learned method ("spkv") runs once per task, question-agnostic: its
  # model's write gates set the budget (it needs a gated model).
  # Lists are comma-separated strings (easy to override on the command line).
  c.methods = ",".join(EVICTION + ("kivi2", "turboquant3", "snapkv+kivi2"))
  c.ratios = "0,0.5,0.75,0.9,0.95"  # Eviction ratios (share removed).
  # Task suite entries (kvjax.train.evaluate.SUITE names).
  c.tasks = "mqar,needle,multihop_k2,overwrite,abstention"
  c.modes = "agnostic,aware"  # Question-agnostic / question-aware.
  # Context positions (BOS included) of every task row; on text, words
  # (rows record the tokenized context_len).
  c.context_len = 512
  c.mqar_pairs = 32  # Key-value pairs of mqar.
  c.num_examples = 32  # Rows per task (one batch).
  c.seed = 2024  # Held-out task seed (kvjax-tiny trained on others).
  c.support_share = 0.9  # Attention share of the active support.
  c.graph_eps = 0.01  # Edge threshold of the token-attention graph.
  # The reachability metric: builds the context's token-attention graph
  # from materialized [T, T] prefill attention per layer and row (off for
  # long contexts, where that does not fit; the rows then record None).
  c.reachability = True
  c.confidence = 0.5  # Max-softmax at which a wrong answer is confident.
  # results.jsonl, summary.md and PNGs go here (results/sweep/ holds the
  # committed copy of the default run).
  c.workdir = "runs/sweep"
  c.plots = True  # Write the PNG figures.
  c.stop_after_units = 0  # Stop after this many new units (0 = all); tests.
  # Compute before eviction (`kvjax.ingest`): the context is read this many
  # times in one causal prefill and every unit compresses the last read
  # (1 = a plain prefill). Eviction policies and codecs only; per-slot
  # attention readers are refused question-agnostic (rows say why).
  c.ingest_passes = 1

  if preset == "smoke":
    c.model = "random:tiny"
    c.methods = "snapkv,streaming_llm,turboquant3,snapkv+int4"
    c.ratios = "0,0.5,0.9"
    c.tasks = "needle,mqar"
    c.context_len = 80  # longer than SnapKV's window (64)
    c.mqar_pairs = 4
    c.num_examples = 4
    c.workdir = "/tmp/kvjax-sweep-smoke"
  elif preset == "full":
    # Every registered method: each eviction policy of
    # `kvjax.compress.registry` (kvjax's and the rest of kvpress' presses),
    # each codec, and evict-then-quantize compositions, on the default
    # tasks and rows at three ratios: about 10 minutes on the 2-core CPU;
    # results/sweep_full/ holds the committed copy. On an accelerator add
    # rows and ratios: --config.num_examples=128
    # --config.ratios=0,0.25,0.5,0.75,0.8,0.85,0.9,0.95,0.98
    # --config.tasks=mqar,needle,multihop_k1,multihop_k2,multihop_k3,\
    # multihop_k4,overwrite,abstention --config.workdir=runs/sweep_full.
    c.methods = ",".join(
      registry.POLICY_NAMES
      + registry.CODEC_NAMES
      + ("snapkv+kivi2", "snapkv+turboquant3", "h2o+turboquant3")
    )
    c.ratios = "0,0.5,0.9"
    c.workdir = "results/sweep_full"
  elif preset == "spkv":
    # SP-KV (learned write gates) on kvjax-tiny-spkv, kvjax-tiny fine-tuned
    # with the gates (`experiments/spkv.py`): the gate keeps what it keeps
    # (about a quarter of the entries at tau 0.5), the heuristics evict at
    # ratios around it, all on the same weights and rows; results/
    # sweep_spkv/ holds the committed copy.
    c.model = "kvjax-tiny-spkv"
    c.methods = ",".join(
      (
        "spkv",
        "spkv+turboquant3",
        "snapkv",
        "expected_attention",
        "h2o",
        "adakv_snapkv",
        "streaming_llm",
      )
    )
    c.ratios = "0,0.5,0.75,0.9"
    c.workdir = "results/sweep_spkv"
  elif preset == "reread":
    # The default sweep on a context read twice before compression
    # (`kvjax.ingest`), kvjax-tiny as shipped (not trained to re-read):
    # compare row by row with results/sweep/. results/sweep_reread2/ holds
    # the committed copy.
    c.ingest_passes = 2
    c.workdir = "results/sweep_reread2"
  elif preset == "long":
    # 32k positions. 64k and 128k: --config.context_len=65536 or 131072
    # (the cache grows linearly; add devices to the seq axis to keep the
    # per-device share).
    c.context_len = 32768
    # kvjax-tiny (trained at 512 positions) only exercises the machinery
    # here; pass --config.model=hf:PATH for a long-context checkpoint.
    c.dtype = "bfloat16"  # half the cache and weights of float32
    # Rows per task: every row holds a 32k-token cache and its prefill
    # captures; 8 instead of 32.
    c.num_examples = 8
    c.reachability = False  # [T, T] attention per layer does not fit
    c.mesh = "seq:-1"  # the cache sharded along the sequence, all devices
    c.backend = "auto"  # the Pallas kernels on TPU/GPU
    c.workdir = "runs/sweep_long"
  return c
