"""The training loop: a jitted step on `kvjax.forward`, checkpoints, resume.

`make_train_step` builds a jitted `(state, arrays) -> (state, metrics)` that
runs a teacher-forced `kvjax.forward` on a fresh cache (capacity T), takes
the cross-entropy on the answer tokens (or all tokens) and applies an optax
update. `train(config, workdir)` drives it over the task stream of
`kvjax.train.data`, as a `kvjax.train.config.TrainConfig` describes:

* the batch of step s is a pure function of (seed, s), so the data position
  is the step;
* orbax `CheckpointManager` saves (params, opt_state, step) every
  `checkpoint_every` steps and at the end; a rerun with the same workdir
  restores the latest checkpoint and continues, reaching the same params as
  an uninterrupted run;
* metrics go to `workdir/metrics.jsonl`, one JSON object per logged step;
  on resume rows past the restored step are dropped first, so no step is
  logged twice;
* a tqdm bar shows progress.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import tqdm

from kvjax import model as model_lib
from kvjax.cache import init_cache
from kvjax.config import ModelConfig
from kvjax.tasks import TASK_NAMES
from kvjax.train import data as data_lib
from kvjax.train import losses
from kvjax.train.config import TrainConfig

Array = jax.Array


class TrainState(NamedTuple):
  """What a checkpoint holds.

  Attributes:
    step: scalar int32, the number of updates applied.
    params: the model parameter pytree.
    opt_state: the optimizer state.
  """

  step: Array
  params: Any
  opt_state: Any


def init_state(
  model_config: ModelConfig,
  optimizer,
  seed: int,
  init_std: float = 0.02,
  init_out_std: float | None = None,
) -> TrainState:
  """Fresh parameters (from `seed`) and optimizer state at step 0.

  `init_out_std` is the std of the residual-output matrices (wo, w_down);
  None uses `init_std` (see `kvjax.model.init_params`).
  """
  params = model_lib.init_params(
    model_config, jax.random.key(seed), std=init_std, out_std=init_out_std
  )
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def loss_fn(params, arrays: Mapping[str, Array], *, config: ModelConfig):
  """Weighted next-token cross-entropy of one batch (see `data.model_inputs`).

  With "lens_weights" in `arrays`, adds `lens_scale` times the lens loss:
  the same cross-entropy, on the one-lookup answers (`data.lens_mask`),
  of the logit-lens readout of the residual entering the last layer
  (final norm, then the LM head). It asks single lookups to be done one
  layer early, so that the last layer can compose a second one (2-hop).

  Returns:
    (loss, metrics).
  """
  inputs = arrays["inputs"]  # [B, T]
  B, T = inputs.shape
  cache = init_cache(config, B, T)
  lens = "lens_weights" in arrays
  logits, _, aux = model_lib.forward(
    params,
    inputs,
    cache,
    config=config,
    token_mask=arrays["token_mask"],
    capture=("resid",) if lens else (),
  )
  loss, metrics = losses.weighted_cross_entropy(
    logits, arrays["targets"], arrays["weights"]
  )
  if lens:
    h = model_lib.rms_norm(
      aux["resid"][config.num_layers - 1], params["final_norm"], config.norm_eps
    )
    lens_loss, lens_metrics = losses.weighted_cross_entropy(
      model_lib.unembed(params, config, h),
      arrays["targets"],
      arrays["lens_weights"],
    )
    metrics = dict(
      metrics, lens_loss=lens_loss, lens_accuracy=lens_metrics["accuracy"]
    )
    loss = loss + arrays["lens_scale"] * lens_loss
  if "answer_mask" in arrays and "task_ids" in arrays:
    metrics.update(
      per_task_accuracy(
        logits, arrays["targets"], arrays["answer_mask"], arrays["task_ids"]
      )
    )
  return loss, metrics


def per_task_accuracy(
  logits, targets, answer_mask, task_ids
) -> dict[str, Array]:
  """Teacher-forced answer accuracy per task of one batch, per answer slot
  (each step of a multihop walk counts apiece).

  Returns:
    {"acc/<task>": accuracy, "n/<task>": answer count} for every task in
    `kvjax.tasks.TASK_NAMES` and for the aids "copy" and "chain"; a task
    absent from the batch has n 0 and accuracy 0 (the logger drops it).
  """
  correct = (jnp.argmax(logits, axis=-1) == targets) & answer_mask  # [B, T]
  per_row_correct = jnp.sum(correct, axis=1).astype(jnp.float32)
  per_row_count = jnp.sum(answer_mask, axis=1).astype(jnp.float32)
  out = {}
  for index, name in [*enumerate(TASK_NAMES), *data_lib.AID_NAMES.items()]:
    rows = (task_ids == index).astype(jnp.float32)
    count = jnp.sum(rows * per_row_count)
    out[f"acc/{name}"] = jnp.sum(rows * per_row_correct) / jnp.maximum(
      count, 1.0
    )
    out[f"n/{name}"] = count
  return out


def make_train_step(
  config: ModelConfig, optimizer
) -> Callable[
  [TrainState, Mapping[str, Array]], tuple[TrainState, dict[str, Array]]
]:
  """A jitted train step `(state, arrays) -> (state, metrics)`.

  `arrays` is `data.model_inputs(batch)`: inputs, targets, weights,
  token_mask, all [B, T]. The state is donated.
  """

  def step_fn(state: TrainState, arrays):
    grad_fn = jax.value_and_grad(
      lambda p: loss_fn(p, arrays, config=config), has_aux=True
    )
    (_, metrics), grads = grad_fn(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(step_fn, donate_argnums=0)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, last_step: int) -> None:
  """Keeps only the metric rows with step <= last_step (resume)."""
  rows = [r for r in _read_jsonl(path) if r.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)


def train(
  config: TrainConfig,
  workdir: str,
  *,
  stop_after: int | None = None,
  eval_fn: Callable[[Any, int], dict[str, Any]] | None = None,
  progress: bool = True,
) -> TrainState:
  """Trains (or resumes training) the run `config` in `workdir`.

  Args:
    config: the run (model, data, optimizer, steps, seed, bookkeeping).
    workdir: where `checkpoints/` and `metrics.jsonl` live; an existing
      checkpoint there is resumed.
    stop_after: stop (after checkpointing) once this many steps are done,
      as if killed there; None runs to `config.total_steps`.
    eval_fn: optional `(params, step) -> dict` called every
      `config.evaluation.every` steps (if > 0) and at the end; its result
      is logged with the metrics.
    progress: show a tqdm bar.

  Returns:
    The final TrainState.

  Raises:
    TypeError: `config` is not a TrainConfig.
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(
      f"train takes a kvjax.train.TrainConfig (e.g. "
      f"TrainConfig.from_dict(...)), got "
      f"{type(config).__name__}."
    )
  model_config = config.model
  optimizer = config.optimizer.make(config.total_steps)
  step_fn = make_train_step(model_config, optimizer)
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")

  state = init_state(
    model_config, optimizer, config.seed, config.init_std, config.init_out_std
  )
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.max_checkpoints, create=True
  )
  manager = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
  )
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(
      latest, args=ocp.args.StandardRestore(abstract._asdict())
    )
    state = TrainState(**restored)
    _truncate_metrics(metrics_path, int(state.step))
  start = int(state.step)
  total = config.total_steps
  end = total if stop_after is None else min(total, stop_after)
  eval_every = config.evaluation.every

  def save(state):
    manager.save(int(state.step), args=ocp.args.StandardSave(state._asdict()))

  bar = tqdm.tqdm(
    total=end,
    initial=start,
    disable=not progress,
    dynamic_ncols=True,
    desc="train",
  )
  t_last = time.perf_counter()
  pending = []
  with open(metrics_path, "a") as log:
    for step in range(start, end):
      batch = data_lib.task_batch(config.data, config.seed, step)
      arrays = data_lib.model_inputs(
        batch, config.loss_on, config.data.mixture_at(step).lens_weight
      )
      state, metrics = step_fn(state, arrays)
      done = step + 1
      pending.append(
        (done, int(batch.context_end[0]), batch.tokens.shape[0], metrics)
      )
      if done % config.log_every == 0 or done == end:
        jax.block_until_ready(state.params)
        now = time.perf_counter()
        for s, context_len, batch_size, m in pending:
          row = {
            "step": s,
            "context_len": context_len,
            "batch_size": batch_size,
          }
          values = {k: float(v) for k, v in m.items()}
          # Per-task accuracy only for tasks in the batch; no counts.
          row.update(
            {
              k: v
              for k, v in values.items()
              if not k.startswith(("acc/", "n/"))
              or (k.startswith("acc/") and values["n/" + k[4:]] > 0)
            }
          )
          if s == done:
            row["seconds_per_step"] = (now - t_last) / len(pending)
          log.write(json.dumps(row) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
        pending, t_last = [], now
      bar.update(1)
      if (
        eval_fn is not None
        and eval_every
        and (done % eval_every == 0 or done == total)
      ):
        row = {"step": done, "eval": eval_fn(state.params, done)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        t_last = time.perf_counter()
      if done % config.checkpoint_every == 0 or done == end:
        save(state)
  bar.close()
  manager.wait_until_finished()
  manager.close()
  return state
