"""Compression sweep: methods x ratios x tasks x question modes.

kvjax's main job (`bash launch/local.sh`). For every unit (method, ratio,
task, mode) it prefills the task contexts, compresses the cache, feeds the
question teacher-forced and records accuracy, hallucination and abstention
rates, the Global Eviction Ratio of the answer-critical tokens (and per
layer: evicted from every head of that layer), their reachability in the
token-attention graph, the KL of the answer distribution to the
uncompressed model, the physical and logical bytes of the compressed
cache, and the wall time. Rows append to
`<workdir>/results.jsonl` (one per finished unit); a rerun skips the units
already there, so a killed sweep resumes without losing or duplicating a
unit. At the end it prints a summary table, writes `summary.md`,
`facts.json` and the figures.

Question modes:
  agnostic  prefill the context with the transform (its observation window
            is the end of the context), then ask the question;
  aware     prefill the context, compress it while observing the question's
            queries (`kvjax.compress_observing`; the question proper,
            `kvjax.tasks.question_mask`, so no answer and nothing that
            follows from one), then ask the question.

Tokens (`config.tokens`, see `experiments/sweeps/tokens.py`): kvjax-tiny
reads the tasks' private ids; an `hf:PATH` checkpoint reads the tasks
written as text and encoded by its own `tokenizer.json`
(`kvjax.tasks.text`), every position (answers, critical tokens, the
question span) mapped through the tokens. A checkpoint without
`tokenizer.json` is refused unless `--config.tokens=raw` asks for the
private ids (arbitrary tokens to it: a warning, and rows say so).

Methods are names of `kvjax.compress.registry`; the code lives in
`experiments/sweeps/` (one module per role, see its `__init__`).

  python -m experiments.sweep                       # the default (kvjax-tiny)
  python -m experiments.sweep --config=experiments/configs/sweep.py:smoke
  python -m experiments.sweep --config.model=hf:/path/to/checkpoint
  python -m experiments.sweep --config.model=hf:/path/to/checkpoint \\
      --config.tokens=raw                           # no tokenizer.json
"""

import os
import sys

from absl import app
from ml_collections import config_flags

from experiments import common
from experiments.configs import sweep as sweep_config
from experiments.sweeps import loop
from experiments.sweeps import plan
from kvjax import parallel


def main(argv):
  del argv
  # One of several processes (a TPU pod's workers, or local processes
  # given KVJAX_COORDINATOR etc.): join the others first.
  parallel.initialize()
  try:  # a bad config is one clear line, before anything runs
    plan.plan_units(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  loop.run(_CONFIG.value)


if __name__ == "__main__":
  # Defined here, not at import, so tests can import several mains.
  common.check_config_overrides(sys.argv, sweep_config.get_config())
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "configs", "sweep.py"),
    "Sweep config (see experiments/configs/sweep.py).",
  )
  app.run(main)
