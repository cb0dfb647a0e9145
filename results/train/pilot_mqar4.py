"""Pilot: can a 2-layer d=64 model break MQAR's elimination plateau?

MQAR with 4 pairs at context 17, every key queried, answers teacher-forced:
a model that only picks "a context value not yet revealed in the question"
scores (1/4 + 1/3 + 1/2 + 1) / 4 = 0.52 without any key matching. This
pilot trains the same tiny model with each optimizer and prints, every 200
steps, the mean train accuracy of the last 100 steps. Output of the runs
made on 2026-11-23 (2-core CPU) is in comparison.md.

  PYTHONPATH=. python results/train/pilot_mqar4.py muon_split 0.02 3e-3 1600
  PYTHONPATH=. python results/train/pilot_mqar4.py adamw 3e-3 3e-3 1200

Arguments: optimizer, peak LR, AdamW-half LR (muon_split), steps.
"""
import sys

import numpy as np

import kvjax
from kvjax import tasks
from kvjax.train import data, loop, optimizers

c = kvjax.ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=2,
                      num_kv_heads=2, head_dim=32, mlp_dim=128,
                      tie_embeddings=True)
steps = int(sys.argv[4])
opt = optimizers.make_optimizer(sys.argv[1], learning_rate=float(sys.argv[2]),
                                adam_learning_rate=float(sys.argv[3]),
                                total_steps=steps, warmup_steps=30)
st = loop.init_state(c, opt, 0)
step = loop.make_train_step(c, opt)
accs = []
for i in range(steps):
  b = tasks.make_batch("mqar", 64, seed=(5, i), context_len=17, num_pairs=4)
  st, m = step(st, data.model_inputs(b))
  accs.append(float(m["accuracy"]))
  if (i + 1) % 200 == 0:
    print(i + 1, np.mean(accs[-100:]), flush=True)
