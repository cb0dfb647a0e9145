"""Training on the synthetic task suite: typed config, data, losses,
optimizers, loop, eval."""

from kvjax.train.config import (
  DataConfig,
  EvalConfig,
  Mixture,
  OptimizerConfig,
  Phase,
  TrainConfig,
)
from kvjax.train.data import model_inputs, task_batch
from kvjax.train.evaluate import evaluate_batch, evaluate_suite, evaluate_task
from kvjax.train.loop import (
  TrainState,
  init_state,
  loss_fn,
  make_train_step,
  train,
)
from kvjax.train.losses import weighted_cross_entropy
from kvjax.train.optimizers import (
  OPTIMIZERS,
  make_optimizer,
  muon_dimension_numbers,
  param_labels,
  warmup_cosine,
  warmup_stable_decay,
)
