"""Training SP-KV write gates (arXiv 2605.14037) on a kvjax model.

A gated model is the plain params plus `params["write_gate"]` (see
`kvjax.model.add_write_gate`): a sigmoid utility u per (token, kv head)
from the normed layer input. In training the attention logits of keys
older than the local window get log(u) (`kvjax.model.WriteGate("soft")`),
so the loss alone decides which entries are worth keeping; the paper uses
next-token loss only. `sparsity` > 0 adds an optional penalty
`sparsity * mean(u)` over the live tokens (a documented deviation, off by
default) for when the gates do not close by themselves.

The fine-tune here starts from a trained model (kvjax-tiny), draws task
batches from a `kvjax.train.DataConfig` exactly as the main loop does, and
updates everything with AdamW: the gate at `gate_lr`, the model at `lr`.
A gated model is stored as the model's Hugging Face export plus
`write_gate.safetensors` next to it (`save_gated` / `load_gated`), so the
plain HF import of the directory still reads the ungated model.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax import hf
from kvjax import model as model_lib
from kvjax.cache import init_cache
from kvjax.config import ModelConfig
from kvjax.train import data as data_lib
from kvjax.train import losses
from kvjax.train.config import DataConfig

Array = jax.Array

GATE_FILE = "write_gate.safetensors"


def gated_loss(
  params,
  arrays: Mapping[str, Array],
  *,
  config: ModelConfig,
  write_gate: model_lib.WriteGate,
  sparsity: float = 0.0,
):
  """Next-token cross-entropy of one batch under the soft write gate.

  Args:
    params: gated params (with "write_gate").
    arrays: `kvjax.train.data.model_inputs(batch)`.
    config: the model config.
    write_gate: the gate's mode and window (normally "soft").
    sparsity: weight of the optional mean-utility penalty (0: the paper's
      next-token loss only).

  Returns:
    (loss, metrics): metrics hold the cross-entropy, accuracy, mean u and
    the fraction of u >= write_gate.tau over live tokens (per layer too).
  """
  inputs = arrays["inputs"]  # [B, T]
  B, T = inputs.shape
  logits, _, aux = model_lib.forward(
    params,
    inputs,
    init_cache(config, B, T),
    config=config,
    token_mask=arrays["token_mask"],
    capture=("write_utility",),
    write_gate=write_gate,
  )
  ce, metrics = losses.weighted_cross_entropy(
    logits, arrays["targets"], arrays["weights"]
  )
  u = aux["write_utility"]  # [L, B, T, K]
  live = arrays["token_mask"].astype(jnp.float32)[None, :, :, None]  # [1,B,T,1]
  denom = jnp.maximum(jnp.sum(live) * u.shape[0] * u.shape[-1], 1.0)
  mean_u = jnp.sum(u * live) / denom
  kept = (u >= write_gate.tau).astype(jnp.float32)
  per_layer = jnp.sum(kept * live, axis=(1, 2, 3)) / jnp.maximum(
    jnp.sum(live) * u.shape[-1], 1.0
  )  # [L]
  loss = ce + sparsity * mean_u
  metrics = dict(metrics, ce=ce, mean_u=mean_u, keep=jnp.mean(per_layer))
  for layer in range(u.shape[0]):
    metrics[f"keep/{layer}"] = per_layer[layer]
  return loss, metrics


def gate_optimizer(
  lr: float, gate_lr: float, grad_clip: float = 1.0
) -> optax.GradientTransformation:
  """AdamW (no decay) with learning rate `gate_lr` on params["write_gate"]
  and `lr` on the rest (0 freezes the model)."""

  def labels(params):
    return {
      k: jax.tree.map(lambda _: "gate" if k == "write_gate" else "model", v)
      for k, v in params.items()
    }

  model_tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.0)
  if lr == 0:
    model_tx = optax.set_to_zero()
  return optax.chain(
    optax.clip_by_global_norm(grad_clip),
    optax.multi_transform(
      {
        "gate": optax.adamw(gate_lr, b1=0.9, b2=0.95, weight_decay=0.0),
        "model": model_tx,
      },
      labels,
    ),
  )


def make_gated_train_step(
  config: ModelConfig,
  optimizer: optax.GradientTransformation,
  write_gate: model_lib.WriteGate,
  sparsity: float = 0.0,
) -> Callable:
  """A jitted `(params, opt_state, arrays) -> (params, opt_state, metrics)`
  on `gated_loss`."""

  @jax.jit
  def step(params, opt_state, arrays):
    grad_fn = jax.value_and_grad(
      lambda p: gated_loss(
        p, arrays, config=config, write_gate=write_gate, sparsity=sparsity
      ),
      has_aux=True,
    )
    (loss, metrics), grads = grad_fn(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, loss=loss)

  return step


def finetune(
  params,
  config: ModelConfig,
  data: DataConfig,
  *,
  steps: int,
  seed: int,
  write_gate: model_lib.WriteGate,
  sparsity: float = 0.0,
  lr: float = 3e-4,
  gate_lr: float = 1e-2,
  log_every: int = 10,
  log: Callable[[dict[str, Any]], None] | None = None,
  max_seconds: float | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
  """Fine-tunes a gated model on the task stream `data`.

  Args:
    params: gated params (`kvjax.model.add_write_gate`).
    config: the model config.
    data: the task stream (batches are `task_batch(data, seed, step)`).
    steps: updates to run.
    seed: the stream's seed.
    write_gate: the soft gate (mode "soft") and its window; its tau is the
      threshold the keep metrics use.
    sparsity: optional mean-utility penalty weight (0: next-token only).
    lr: the model's learning rate (0 freezes it).
    gate_lr: the gate's learning rate.
    log_every: steps between logged rows.
    log: optional callback receiving each logged row (a dict).
    max_seconds: stop early (after a logged step) past this wall time;
      the rows say how many steps ran.

  Returns:
    (params, rows): the tuned params and the logged rows.

  Raises:
    ValueError: params without a gate, steps < 1, a non-soft gate.
  """
  if not model_lib.has_write_gate(params):
    raise ValueError("finetune needs gated params (add_write_gate).")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
  model_lib.check_write_gate(write_gate)
  if write_gate.mode != "soft":
    raise ValueError(
      f"training uses the soft gate, got mode {write_gate.mode!r}."
    )
  optimizer = gate_optimizer(lr, gate_lr)
  opt_state = optimizer.init(params)
  step_fn = make_gated_train_step(config, optimizer, write_gate, sparsity)
  rows, pending = [], []
  t0 = time.perf_counter()
  for step in range(steps):
    batch = data_lib.task_batch(data, seed, step)
    arrays = data_lib.model_inputs(batch, "answers")
    arrays = {
      k: v for k, v in arrays.items() if k not in ("answer_mask", "task_ids")
    }
    params, opt_state, metrics = step_fn(params, opt_state, arrays)
    pending.append(metrics)
    done = step + 1
    if done % log_every == 0 or done == steps:
      jax.block_until_ready(params)
      mean = {
        k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]
      }
      row = {"step": done, "seconds": round(time.perf_counter() - t0, 1)}
      row.update({k: round(v, 5) for k, v in mean.items()})
      rows.append(row)
      pending = []
      if log is not None:
        log(row)
      if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
        break
  return params, rows


def save_gated(
  directory: str, params, config: ModelConfig, record: dict | None = None
) -> None:
  """Writes a gated model: the HF export of the model (`config.json`,
  `model.safetensors`), `write_gate.safetensors` (w [L, D, K], b [L, K])
  and, if given, `training.json` = record."""
  base, gate = model_lib.split_write_gate(params)
  if gate is None:
    raise ValueError("save_gated needs gated params.")
  hf.save_pretrained(directory, base, config)
  hf.write_safetensors(
    os.path.join(directory, GATE_FILE),
    {k: np.asarray(v) for k, v in gate.items()},
  )
  if record is not None:
    with open(os.path.join(directory, "training.json"), "w") as f:
      json.dump(record, f, indent=2)


def load_gated(directory: str) -> tuple[ModelConfig, Any]:
  """(config, gated params) of a directory written by `save_gated`.

  Raises:
    ValueError: no `write_gate.safetensors` there, or mis-shaped tensors.
  """
  from safetensors.numpy import load_file

  path = os.path.join(directory, GATE_FILE)
  if not os.path.exists(path):
    raise ValueError(f"no {GATE_FILE} in {directory!r}: not a gated model.")
  config, params = hf.load_pretrained(directory)
  tensors = load_file(path)
  want = model_lib.write_gate_shapes(config)
  if set(tensors) != set(want) or any(
    tuple(tensors[k].shape) != want[k].shape for k in want
  ):
    raise ValueError(
      f"{path} must hold w {want['w'].shape} and b {want['b'].shape}, got "
      f"{ {k: v.shape for k, v in tensors.items()} }."
    )
  gate = {k: jnp.asarray(tensors[k], config.jnp_dtype) for k in want}
  return config, dict(params, write_gate=gate)


# ----------------------------------------------------------------------------
# Evaluation under the hard gate.


@functools.partial(jax.jit, static_argnames=("config", "write_gate"))
def _prefill(params, tokens, *, config, write_gate):
  B, T = tokens.shape
  _, cache, aux = model_lib.forward(
    params,
    tokens,
    init_cache(config, B, T),
    config=config,
    capture=("write_utility",),
    write_gate=write_gate,
  )
  return cache, aux["write_utility"]


@functools.partial(jax.jit, static_argnames=("config", "write_gate"))
def _question(params, cache, question, mask, utility, *, config, write_gate):
  logits, cache, _ = model_lib.forward(
    params,
    question,
    cache,
    config=config,
    token_mask=mask,
    write_gate=write_gate,
    cache_utility=utility,
  )
  return logits, cache.end - cache.capacity


def hard_gate_batch(
  params,
  config: ModelConfig,
  batch,
  *,
  tau: float,
  window: int,
  round_to: int = 32,
):
  """Answers one TaskBatch with SP-KV's hard gate.

  The context is prefilled with the hard gate on its attention (entries
  below tau outside the window are invisible, as if never written), the
  cache compressed by `kvjax.compress.spkv.spkv` to the largest head
  budget (rounded up to `round_to`, the padding counted in the bytes),
  then the question is fed (hard gate too, the cached entries biased by
  their recorded utility: exactly one gated pass over context + question)
  and its logits scored.

  Returns:
    (scores: task -> TaskScore, stats: dict of keep counts and bytes).
  """
  from kvjax.cache import kv_bytes, logical_bytes

  # (`kvjax.compress.spkv` is the transform; the module by its full path)
  from kvjax.compress.spkv import cache_utility, kept_counts, spkv
  from kvjax.generate import compress_cache
  from kvjax.tasks import scoring

  gate = model_lib.WriteGate("hard", int(window), float(tau))
  context_len = int(batch.context_end[0])
  tokens = jnp.asarray(batch.tokens)
  B, T = tokens.shape
  cache, u = _prefill(
    params, tokens[:, :context_len], config=config, write_gate=gate
  )
  mask = np.ones((B, context_len), bool)
  counts = kept_counts(np.asarray(u), mask, tau, window)  # [L, B, K]
  cap = int(-(-int(counts.max()) // round_to) * round_to)
  cap = min(cap, context_len)
  full_bytes = logical_bytes(cache)
  transform = spkv(tau=tau, window=window, capacity=cap)
  positions = np.broadcast_to(np.arange(context_len), (B, context_len))
  cache = compress_cache(
    cache,
    transform,
    config=config,
    observed={"write_utility": u},
    positions=positions,
    mask=mask,
    reserve=T - context_len,
  )
  stats = {
    "kept": counts.sum(axis=(1, 2)).tolist(),  # per layer
    "entries": int(B * config.num_kv_heads * context_len),
    "capacity": cap,
    "full_bytes": full_bytes,
    "logical_bytes": logical_bytes(cache),
    "kv_bytes": kv_bytes(cache),
  }
  question = tokens[:, context_len:]
  q_pos = context_len + np.arange(T - context_len)
  q_mask = jnp.asarray(q_pos[None, :] < np.asarray(batch.lengths)[:, None])
  utility = cache_utility(cache, u, positions, mask)
  logits, over = _question(
    params, cache, question, q_mask, utility, config=config, write_gate=gate
  )
  if int(np.max(np.asarray(over))) > 0:
    raise ValueError("the question did not fit the compressed cache.")
  predicted, confidence = scoring.predictions_from_logits(
    batch, logits, offset=context_len
  )
  return scoring.score(batch, predicted, confidence=confidence), stats


def evaluate_gated(
  params,
  base_params,
  config: ModelConfig,
  *,
  context_len: int,
  tau: float,
  window: int,
  num_examples: int,
  seed: int,
  batch_size: int = 16,
  progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """The suite at `context_len`: the ungated base model, the gated model
  with every entry kept (no gate on attention), and the hard gate at tau
  (`hard_gate_batch`), with keep fractions per layer and bytes.

  Returns:
    {"accuracy": {"base"|"gated_open"|"hard": {entry: acc}},
     "keep_fraction": {entry: [per layer]}, "keep_fraction_outside_window",
     "bytes": {entry: {...}}, ...}.
  """
  from kvjax.tasks import generators
  from kvjax.tasks.generators import TaskBatch
  from kvjax.tasks.suite import SUITE
  from kvjax.train import evaluate as evaluate_lib

  out = {
    "context_len": context_len,
    "tau": tau,
    "window": window,
    "num_examples": num_examples,
    "seed": seed,
    "accuracy": {"base": {}, "gated_open": {}, "hard": {}},
    "keep_fraction": {},
    "keep_fraction_outside_window": {},
    "bytes": {},
  }
  for name, task, task_params in SUITE:
    task_params = dict(task_params)
    if context_len < generators.min_context_len(task, **task_params):
      continue
    for label, p in (("base", base_params), ("gated_open", params)):
      s = evaluate_lib.evaluate_task(
        p,
        config,
        task,
        context_len=context_len,
        num_examples=num_examples,
        seed=seed,
        batch_size=batch_size,
        **task_params,
      )
      out["accuracy"][label][name] = s.accuracy
    correct = total = 0.0
    kept = np.zeros(config.num_layers)
    entries = 0
    byt = {"full_bytes": 0, "logical_bytes": 0, "kv_bytes": 0}
    done, i = 0, 0
    while done < num_examples:
      n = min(batch_size, num_examples - done)
      batch = generators.make_batch(
        task,
        batch_size,
        seed=(seed, i),
        context_len=context_len,
        **task_params,
      )
      batch = TaskBatch(*(field[:n] for field in batch))
      scores, stats = hard_gate_batch(
        params, config, batch, tau=tau, window=window
      )
      sc = scores[task]
      correct += sc.accuracy * sc.num_answers
      total += sc.num_answers
      kept += np.asarray(stats["kept"], float)
      entries += stats["entries"]
      for k in byt:
        byt[k] += stats[k]
      done, i = done + n, i + 1
    out["accuracy"]["hard"][name] = correct / max(total, 1)
    frac = (kept / entries).tolist()
    out["keep_fraction"][name] = frac
    old = context_len - min(window, context_len)
    out["keep_fraction_outside_window"][name] = [
      (f * context_len - min(window, context_len)) / max(old, 1) for f in frac
    ]
    out["bytes"][name] = byt
    if progress:
      progress(
        f"{name}: base {out['accuracy']['base'][name]:.3f} open "
        f"{out['accuracy']['gated_open'][name]:.3f} hard "
        f"{out['accuracy']['hard'][name]:.3f} keep "
        + " ".join(f"{f:.3f}" for f in frac)
      )
  return out
