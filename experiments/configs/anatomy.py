"""Config of the residual-stream report (`experiments/anatomy.py`).

python -m experiments.anatomy                       # kvjax-tiny, mqar
python -m experiments.anatomy --config.task=multihop_k2
python -m experiments.anatomy --config.model=hf:/path/to/checkpoint
python -m experiments.anatomy --config=experiments/configs/anatomy.py:smoke
"""

import ml_collections


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  """Returns the anatomy config of `preset` ("default" or "smoke")."""
  if preset not in ("default", "smoke"):
    raise ValueError(f"preset={preset!r}; allowed: default, smoke.")
  c = ml_collections.ConfigDict()
  # "kvjax-tiny", "hf:PATH" or "random:PRESET" (see experiments/common.py).
  # The rows are kvjax's private task ids whatever the model: on hf:PATH
  # they are arbitrary tokens, so the logit lens' answer accuracy means
  # nothing there (the geometry of the residual stream still holds). The
  # sweep writes the tasks as the checkpoint's text (its config.tokens).
  c.model = "kvjax-tiny"
  c.dtype = "float32"  # Parameter dtype of the analysed model.
  c.task = "mqar"  # A kvjax.train.evaluate.SUITE entry.
  c.context_len = 512  # Context tokens of each row.
  c.mqar_pairs = 32  # Key-value pairs when the task is mqar.
  c.num_examples = 16  # Rows analysed.
  c.seed = 77  # Task seed.
  c.null_fraction = 0.1  # Near-null space: this share of D's directions.
  c.dct_fractions = "0.01,0.05,0.1,0.25,0.5"  # DCT keep fractions.
  c.jacobian_tokens = 8  # Length of the short input of the Jacobians.
  c.interventions = "ablate,rotate,scale,noise"  # Modes applied per layer.
  c.scales = "0.5,2.0"  # Magnitude interventions (write times scale).
  c.noise = 1.0  # Noise intervention: added norm / write norm.
  c.drift_tokens = 64  # Tokens of the cached-vs-recompute comparison.
  c.workdir = "results/anatomy"  # anatomy.json and the PNGs go here.
  c.plots = True  # Write the figures.
  if preset == "smoke":
    c.model = "random:tiny"
    c.task = "needle"
    c.context_len = 32
    c.num_examples = 2
    c.jacobian_tokens = 3
    c.drift_tokens = 8
    c.interventions = "ablate,rotate"
    c.workdir = "/tmp/kvjax-anatomy-smoke"
  return c
