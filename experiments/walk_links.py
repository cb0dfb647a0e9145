"""Which links of a 2-hop walk survive compression, layer by layer.

For the default sweep's 2-hop walk rows (context 512, 32 rows, the sweep's
seed), compresses the kvjax-tiny cache as the sweep does and prints, per
layer, the share of (row, kv head) pairs that still hold the value token of
link 1 (`x1 -> x2`) and of link 2 (`x2 -> y`), next to the sweep's accuracy
on those rows. The committed output is results/probes/walk_links.txt.

  python -m experiments.walk_links > results/probes/walk_links.txt
"""

from absl import app
import numpy as np

from experiments import common
from experiments.configs import sweep as sweep_config
from experiments.sweeps import units
from experiments.sweeps.task_data import TaskData

UNITS = (
  ("agnostic", "snapkv", 0.5),
  ("agnostic", "snapkv", 0.9),
  ("agnostic", "expected_attention", 0.9),
  ("aware", "snapkv", 0.5),
  ("aware", "snapkv", 0.9),
  ("aware", "expected_attention", 0.9),
  ("aware", "adakv_snapkv", 0.9),
)


def main(argv):
  del argv
  cfg = sweep_config.get_config()
  config, params = common.load_model(cfg.model)
  td = TaskData(cfg, config, params, "multihop_k2")
  values = td.targets[:, 1::2]  # [B, 2] value slots of link 1 and link 2
  print(
    "mode | method | ratio | accuracy | "
    + " | ".join(f"layer {l}: link 1, link 2" for l in range(config.num_layers))
  )
  for mode, method, ratio in UNITS:
    unit = dict(method=method, ratio=ratio, task="multihop_k2", mode=mode)
    row = units.run_unit(cfg, td, unit)
    cache = units.compress_unit(td, unit)
    pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)  # [L,B,K,S]
    held = (
      (pos[..., None] == values[None, :, None, None, :]) & valid[..., None]
    ).any(axis=3)  # [L, B, K, 2]
    shares = held.mean(axis=(1, 2))  # [L, 2]
    print(
      f"{mode} | {method} | {ratio} | {row['accuracy']:.2f} | "
      + " | ".join(f"{a:.2f}, {b:.2f}" for a, b in shares)
    )


if __name__ == "__main__":
  app.run(main)
