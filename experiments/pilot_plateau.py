"""Pilot: how long does MQAR's elimination plateau last, per architecture?

MQAR with 4 pairs at context 17 (64 rows a step, every key queried, answers
teacher-forced). A model that only picks "a context value not yet revealed
in the question" scores (1/4 + 1/3 + 1/2 + 1) / 4 = 0.52 without matching a
single key; key matching (the induction circuit) is what takes it past.
Prints, every 100 steps, the mean train answer accuracy of the last 100
steps and the seconds so far. AdamW, warmup 30 steps, then a constant rate
(WSD with a 100-step decay at the very end). Results: plateau.md.

  python -m experiments.pilot_plateau --d_model=64 \
      --num_layers=2 --num_heads=2 --num_kv_heads=2 --head_dim=32 \
      --mlp_dim=128 --seed=0 --steps=1200
"""
import argparse
import time

import numpy as np

import kvjax
from kvjax import tasks
from kvjax.train import data, loop, optimizers

parser = argparse.ArgumentParser()
for name, default in [("d_model", 64), ("num_layers", 3), ("num_heads", 2),
                      ("num_kv_heads", 2), ("head_dim", 32), ("mlp_dim", 128),
                      ("seed", 0), ("steps", 1500), ("num_pairs", 4),
                      ("context_len", 17), ("rows", 64), ("num_queries", 0)]:
  parser.add_argument(f"--{name}", type=int, default=default)
for name, default in [("lr", 3e-3), ("init_std", 0.02), ("rope_theta", 1e4)]:
  parser.add_argument(f"--{name}", type=float, default=default)
parser.add_argument("--init_out_std", type=float, default=None)
parser.add_argument("--qkv_bias", action="store_true")
parser.add_argument("--optimizer", default="adamw")
parser.add_argument("--copy", action="store_true",
                    help="copy rows (kvjax.train.data.copy_batch) instead")
args = parser.parse_args()

config = kvjax.ModelConfig(
    vocab_size=512, d_model=args.d_model, num_layers=args.num_layers,
    num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
    head_dim=args.head_dim, mlp_dim=args.mlp_dim, tie_embeddings=True,
    qkv_bias=args.qkv_bias, rope_theta=args.rope_theta)
opt = optimizers.make_optimizer(args.optimizer, learning_rate=args.lr,
                                adam_learning_rate=3e-3,
                                total_steps=args.steps, warmup_steps=30,
                                decay_steps=100)
state = loop.init_state(config, opt, args.seed, init_std=args.init_std,
                        init_out_std=args.init_out_std)
step = loop.make_train_step(config, opt)
accs, start = [], time.time()
for i in range(args.steps):
  if args.copy:
    batch = data.copy_batch(args.rows, args.context_len,
                            seed=(5 + args.seed, i))
  else:
    batch = tasks.make_batch("mqar", args.rows, seed=(5 + args.seed, i),
                             context_len=args.context_len,
                             num_pairs=args.num_pairs,
                             num_queries=args.num_queries or None)
  state, metrics = step(state, data.model_inputs(batch))
  accs.append(float(metrics["accuracy"]))
  if (i + 1) % 100 == 0:
    print(i + 1, round(float(np.mean(accs[-100:])), 3),
          round(time.time() - start), flush=True)
