"""Next-token losses for teacher-forced training on task batches.

A task batch holds the answers inside `tokens`; the token at position p is
predicted from the logits at position p - 1. The losses here take the
shifted views directly: `logits` [B, T-1, V] computed on `tokens[:, :-1]`,
`targets = tokens[:, 1:]` and `weights = mask[:, 1:]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

LOSS_ON = ("answers", "all")


def weighted_cross_entropy(
  logits: Array,  # [B, T, V]
  targets: Array,  # [B, T] int
  weights: Array,  # [B, T] float or bool
) -> tuple[Array, dict[str, Array]]:
  """Mean cross-entropy and accuracy over the positions with weight > 0.

  Args:
    logits: [B, T, V] next-token logits (any float dtype; computed in f32).
    targets: [B, T] int target ids.
    weights: [B, T] per-position weights (bool masks are fine).

  Returns:
    loss: scalar, sum(weights * nll) / max(sum(weights), 1).
    metrics: dict with "loss", "accuracy" (weighted argmax accuracy) and
      "num_targets" (sum of weights).

  Raises:
    ValueError: for mismatched shapes.
  """
  if logits.ndim != 3 or logits.shape[:2] != targets.shape:
    raise ValueError(
      f"logits must be [B, T, V] with [B, T] = targets.shape "
      f"{tuple(targets.shape)}, got {tuple(logits.shape)}."
    )
  if weights.shape != targets.shape:
    raise ValueError(
      f"weights shape {tuple(weights.shape)} != targets shape "
      f"{tuple(targets.shape)}."
    )
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
  nll = -jnp.take_along_axis(
    log_probs, targets[..., None].astype(jnp.int32), axis=-1
  )[..., 0]  # [B, T]
  total = jnp.sum(weights)
  denom = jnp.maximum(total, 1.0)
  loss = jnp.sum(weights * nll) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(weights * correct) / denom
  return loss, {"loss": loss, "accuracy": accuracy, "num_targets": total}


def loss_weights(loss_mask, lengths, loss_on: str = "answers"):
  """[B, T-1] target weights for a batch's `loss_mask` [B, T].

  Args:
    loss_mask: [B, T] bool, True at answer positions.
    lengths: [B] number of real (non-PAD) tokens per row.
    loss_on: "answers" (the answer tokens only, the default) or "all"
      (every real token after BOS; filler is noise, answers are a few).

  Raises:
    ValueError: unknown `loss_on`.
  """
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r}; allowed: {LOSS_ON}.")
  if loss_on == "answers":
    return loss_mask[:, 1:]
  T = loss_mask.shape[1]
  xp = jnp if isinstance(loss_mask, jax.Array) else np
  positions = xp.arange(1, T)[None, :]  # target positions
  return positions < lengths[:, None]
