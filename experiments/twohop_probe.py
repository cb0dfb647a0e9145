"""Probe of 2-hop in a kvjax-tiny checkpoint (results/train/twohop.md).

For multihop rows (k = 1 and k = 2) at one context it prints, per layer,
the logit-lens accuracy of the answer y and, for k = 2, of the chain's
middle node x2 (the first lookup's result); and, per layer and head, the
attention of the answering query to the links' key and value slots, to
the question's x1 and to BOS.

  python -m experiments.twohop_probe \
      --workdir=/tmp/kvjax-twohop --preset=twohop --context_len=64
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments.configs import train as train_configs
from kvjax import model as model_lib
from kvjax.analysis import residual
from kvjax.cache import init_cache
from kvjax.tasks import generators
from kvjax.train import loop
from kvjax.train.config import TrainConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "Train workdir.", required=True)
_PRESET = flags.DEFINE_string("preset", "twohop", "Config preset of the run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default last).")
_CONTEXT = flags.DEFINE_integer("context_len", 64, "Context length.")
_ROWS = flags.DEFINE_integer("rows", 64, "Rows per hop count.")


def main(_):
  train_config = TrainConfig.from_dict(
    json.loads(train_configs.get_config(_PRESET.value).to_json())
  )
  config = train_config.model
  state = loop.init_state(
    config, train_config.optimizer.make(train_config.total_steps), 0
  )
  manager = ocp.CheckpointManager(
    os.path.abspath(os.path.join(_WORKDIR.value, "checkpoints"))
  )
  step = _STEP.value if _STEP.value is not None else manager.latest_step()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  params = manager.restore(
    step, args=ocp.args.StandardRestore(abstract._asdict())
  )["params"]
  print(f"step {step}, context {_CONTEXT.value}, {_ROWS.value} rows")
  for hops in (1, 2):
    b = generators.make_batch(
      "multihop", _ROWS.value, seed=999, context_len=_CONTEXT.value, hops=hops
    )
    tokens = jnp.asarray(b.tokens[:, :-1])
    B, T = tokens.shape
    _, _, aux = model_lib.forward(
      params,
      tokens,
      init_cache(config, B, T),
      config=config,
      capture=("resid", "final_hidden", "attn_probs"),
    )
    read = b.answer_positions - 1  # the query that answers
    targets = {"y": b.answers}
    if hops == 2:  # the middle node sits in the value slot of link 1
      targets["x2"] = b.tokens[np.arange(B), b.critical_positions[:, 1]][
        :, None
      ]
    for name, target in targets.items():
      lens = residual.logit_lens(
        params, config, aux["resid"], aux["final_hidden"], read, target
      )
      print(
        f"k={hops} lens accuracy of {name} entering layers 0..L-1 and "
        f"at the output: {np.round(np.asarray(lens.accuracy), 2)}"
      )
    probs = np.asarray(aux["attn_probs"])  # [L, B, N, T, S]
    rows, q = np.arange(B), read[:, 0]
    slots = {
      f"{kind}{j + 1}": b.critical_positions[:, 2 * j + i]
      for j in range(hops)
      for i, kind in enumerate(("key", "value"))
    }
    for j in range(hops):  # the link's arrow and the token after it
      slots[f"arrow{j + 1}"] = b.critical_positions[:, 2 * j] + 1
      slots[f"after{j + 1}"] = b.critical_positions[:, 2 * j + 1] + 1
    slots.update(
      question=q - 2, question_x1=q - 1, self=q, bos=np.zeros(B, int)
    )
    for at, query in (("answering query", q), ("question's x1", q - 1)):
      for layer in range(config.num_layers):
        for head in range(config.num_heads):
          p = probs[layer, rows, head, query]  # [B, S]
          mass = {
            k: round(float(p[rows, v].mean()), 2)
            for k, v in slots.items()
            if k != "self" or at[0] == "a"
          }
          print(f"k={hops} {at}, layer {layer} head {head}: {mass}")


if __name__ == "__main__":
  app.run(main)
