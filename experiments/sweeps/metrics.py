"""The sweep's numbers: per unit (KL to the uncompressed model, eviction of
the answer-critical tokens and their reachability) and over rows (means,
Pearson r, the active support of the answer queries)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.analysis import graph as graph_lib


def kl(p_logits, q_logits, mask) -> float:
  """Mean KL(p || q) of next-token distributions over the True slots of
  `mask` (0 when there are none)."""
  lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
  lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
  out = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
  return float(out[mask].mean()) if mask.any() else 0.0


def answer_logits(td, logits) -> np.ndarray:
  """[B, Tq, V] question logits of `td` (a `TaskData`) -> [B, A, V] at the
  rows predicting answers."""
  idx = np.maximum(td.sources - td.L, 0)
  return np.take_along_axis(np.asarray(logits), idx[:, :, None], axis=1)


def answer_eviction(
  td, cache, probs, pos, valid, graph_eps: float
) -> dict[str, Any]:
  """What a compressed cache lost of the answer-critical tokens.

  Args:
    td: the task's `TaskData`.
    cache: the compressed cache (before the question).
    probs: [L, B, N, Tq, S] attention of the question on the cache.
    pos, valid: [L, B, K, S] the cache's positions and validity after the
      question.
    graph_eps: edge threshold of the token-attention graph.

  Returns:
    ger (Global Eviction Ratio: evicted from every head of every layer),
    ger_per_layer (evicted from every head of that layer: the lookup
    layer's loss can break an answer that GER still calls kept) and
    reachability (share of the critical tokens the answer queries still
    reach in the token-attention graph; None without a prefill graph,
    `config.reachability` off); all None for rows with nothing to find
    (abstention).
  """
  has_targets = (td.targets >= 0).any(axis=1)
  if not has_targets.any():
    return dict(ger=None, ger_per_layer=None, reachability=None)
  ger = graph_lib.global_eviction_ratio(cache.pos, cache.valid, td.targets)
  ger = float(np.asarray(ger)[has_targets].mean())
  per_layer = graph_lib.global_eviction_ratio(
    cache.pos, cache.valid, td.targets, per_layer=True
  )
  per_layer = [
    round(float(x), 6)
    for x in np.asarray(per_layer)[:, has_targets].mean(axis=1)
  ]
  if td.prefill_graph is None:
    return dict(ger=ger, ger_per_layer=per_layer, reachability=None)
  q_graph = graph_lib.token_graph(
    probs,
    jnp.asarray(td.query_pos),
    pos,
    valid,
    num_positions=td.T,
    eps=graph_eps,
  )
  reach = np.asarray(
    graph_lib.reachable(
      graph_lib.merge_graphs(td.prefill_graph, q_graph), td.sources, td.targets
    )
  )
  return dict(
    ger=ger,
    ger_per_layer=per_layer,
    reachability=float(reach[td.targets >= 0].mean()),
  )


def pearson(x, y) -> float:
  """Pearson r of `x` and `y`; nan for fewer than 3 points or a constant."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def mean(rows, field: str) -> float:
  """Mean of `field` over the rows that have it (nan if none do)."""
  vals = [r[field] for r in rows if r.get(field) is not None]
  return float(np.mean(vals)) if vals else float("nan")


def warm_seconds(rows) -> float:
  """Mean unit time, leaving out units that paid a compile when any did not."""
  warm = [r for r in rows if not r.get("includes_compile", False)]
  return mean(warm or rows, "seconds")


def active_support(task_data, share: float) -> dict[str, Any]:
  """Active support of the uncompressed model's answer queries, pooled over
  tasks: per layer a histogram (log-spaced bins), the median and the mean
  number of keys holding `share` of the attention.

  Args:
    task_data: name -> `TaskData` of the sweep's tasks.
    share: the attention share (`config.support_share`).
  """
  per_layer = []
  for l in range(next(iter(task_data.values())).support.shape[0]):
    vals = []
    for td in task_data.values():
      s = td.support[l]  # [B, N, A]
      mask = np.broadcast_to((td.sources >= 0)[:, None, :], s.shape)
      vals.append(s[mask])
    per_layer.append(np.concatenate(vals))
  top = max(2, int(max(v.max() for v in per_layer)))
  edges = np.unique(np.round(np.geomspace(1, top + 1, 20)).astype(int))
  edges = np.concatenate([edges, [edges[-1] + 1]]) if len(edges) < 2 else edges
  hist = [np.histogram(v, bins=edges)[0].tolist() for v in per_layer]
  return dict(
    share=share,
    bin_edges=edges.tolist(),
    histogram=hist,
    median_per_layer=[float(np.median(v)) for v in per_layer],
    mean_per_layer=[float(np.mean(v)) for v in per_layer],
  )
