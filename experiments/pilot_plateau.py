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

import time

from absl import app
from absl import flags
import numpy as np

import kvjax
from kvjax import tasks
from kvjax.train import data, loop, optimizers

_D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 3, "Layers.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 2, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key-value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 32, "Head dimension.")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 128, "MLP hidden width.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", 4, "MQAR key-value pairs.")
_CONTEXT_LEN = flags.DEFINE_integer("context_len", 17, "Context tokens.")
_ROWS = flags.DEFINE_integer("rows", 64, "Rows per step.")
_NUM_QUERIES = flags.DEFINE_integer(
  "num_queries", 0, "MQAR queries (0: every key)."
)
_LR = flags.DEFINE_float("lr", 3e-3, "Learning rate.")
_INIT_STD = flags.DEFINE_float("init_std", 0.02, "Init std of the weights.")
_INIT_OUT_STD = flags.DEFINE_float(
  "init_out_std",
  None,
  "Init std of the output projections (default: init_std).",
)
_ROPE_THETA = flags.DEFINE_float("rope_theta", 1e4, "RoPE base.")
_QKV_BIAS = flags.DEFINE_bool("qkv_bias", False, "Biases on q, k and v.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adamw", "Optimizer name.")
_COPY = flags.DEFINE_bool(
  "copy", False, "Copy rows (kvjax.train.data.copy_batch) instead."
)


def main(argv):
  del argv
  config = kvjax.ModelConfig(
    vocab_size=512,
    d_model=_D_MODEL.value,
    num_layers=_NUM_LAYERS.value,
    num_heads=_NUM_HEADS.value,
    num_kv_heads=_NUM_KV_HEADS.value,
    head_dim=_HEAD_DIM.value,
    mlp_dim=_MLP_DIM.value,
    tie_embeddings=True,
    qkv_bias=_QKV_BIAS.value,
    rope_theta=_ROPE_THETA.value,
  )
  opt = optimizers.make_optimizer(
    _OPTIMIZER.value,
    learning_rate=_LR.value,
    adam_learning_rate=3e-3,
    total_steps=_STEPS.value,
    warmup_steps=30,
    decay_steps=100,
  )
  state = loop.init_state(
    config,
    opt,
    _SEED.value,
    init_std=_INIT_STD.value,
    init_out_std=_INIT_OUT_STD.value,
  )
  step = loop.make_train_step(config, opt)
  accs, start = [], time.time()
  for i in range(_STEPS.value):
    seed = (5 + _SEED.value, i)
    if _COPY.value:
      batch = data.copy_batch(_ROWS.value, _CONTEXT_LEN.value, seed=seed)
    else:
      batch = tasks.make_batch(
        "mqar",
        _ROWS.value,
        seed=seed,
        context_len=_CONTEXT_LEN.value,
        num_pairs=_NUM_PAIRS.value,
        num_queries=_NUM_QUERIES.value or None,
      )
    state, metrics = step(state, data.model_inputs(batch))
    accs.append(float(metrics["accuracy"]))
    if (i + 1) % 100 == 0:
      print(
        i + 1,
        round(float(np.mean(accs[-100:])), 3),
        round(time.time() - start),
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
