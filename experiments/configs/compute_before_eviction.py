"""Config of the compute-before-eviction experiment
(`experiments/compute_before_eviction.py`).

  python -m experiments.compute_before_eviction \\
      --config=experiments/configs/compute_before_eviction.py \\
      --config.workdir=results/memories/compute_before_eviction

Two copies of kvjax-tiny are fine-tuned the same way on the same rows, one
answering after a single read of the context (passes=1), one after
re-reading it (passes=2, `kvjax.ingest`); then each answers under eviction.
The "smoke" preset runs in seconds (tests).
"""

import ml_collections

PRESETS = ("default", "smoke")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  """Returns the config of `preset` (one of `PRESETS`)."""
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}; allowed: {', '.join(PRESETS)}.")
  c = ml_collections.ConfigDict()
  c.model = "kvjax-tiny"  # the shipped model both arms start from
  # Reads of the context per arm; each arm is fine-tuned with its own.
  c.passes = "1,2"
  c.context_len = 256  # context positions of every row (BOS included)
  # Training tasks (kvjax.tasks.suite names) and rows of each per step.
  c.train_tasks = "mqar,multihop_k2,multihop_k2_latent,overwrite"
  c.rows_per_task = 4
  c.steps = 400  # fine-tuning steps per arm
  c.learning_rate = 1e-3  # peak AdamW rate (warmup, then cosine to 10%)
  c.warmup_steps = 40
  c.seed = 7  # training rows' seed (evaluation uses eval_seed)
  # Evaluation: tasks, rows per task, eviction policies (registry names)
  # and ratios (share of the last read's entries removed; 0 = none).
  c.eval_tasks = "mqar,multihop_k2,multihop_k2_latent,overwrite"
  c.eval_examples = 64
  c.eval_seed = 4242
  c.policies = "snapkv,expected_attention,streaming_llm"
  c.ratios = "0,0.5,0.9,0.95"
  c.workdir = "/tmp/kvjax-cbe"  # results.jsonl, summary.md, figure
  if preset == "smoke":
    c.context_len = 96
    c.train_tasks = "mqar,overwrite"
    c.eval_tasks = "mqar,overwrite"
    c.rows_per_task = 2
    c.steps = 2
    c.warmup_steps = 1
    c.eval_examples = 4
    c.policies = "snapkv"
    c.ratios = "0,0.5"
    c.workdir = "/tmp/kvjax-cbe-smoke"
  return c
