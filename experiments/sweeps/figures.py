"""The sweep's four figures: accuracy vs compression (both question modes),
GER vs hallucination, the active support per layer, and KV bytes per token.
Refused units are left out."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from experiments import plotting
from experiments.sweeps import metrics
from experiments.sweeps import plan
from experiments.sweeps import report

FILES = (
  "accuracy_vs_ratio.png",
  "ger_vs_hallucination.png",
  "active_support.png",
  "bytes_per_token.png",
)


def _at(rows, ratio):
  return [r for r in rows if r["ratio"] == ratio]


def _accuracy_vs_compression(plt, rows, base, colors, path):
  base_bytes = metrics.mean(base, "logical_bytes_per_token")
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
  for ax, mode in zip(axes, plan.MODES):
    for m, color in colors.items():
      rs = [r for r in rows if r["method"] == m and r["mode"] == mode]
      if not rs:
        continue
      ratios = sorted({r["ratio"] for r in rs})
      xs = [0.0] + [
        1 - metrics.mean(_at(rs, x), "logical_bytes_per_token") / base_bytes
        for x in ratios
      ]
      ys = [metrics.mean(base, "accuracy")] + [
        metrics.mean(_at(rs, x), "accuracy") for x in ratios
      ]
      ax.plot(xs, ys, marker="o", label=m, color=color)
    ax.set_title(f"question-{mode}")
    ax.set_xlabel("compression: 1 - logical KV bytes / uncompressed")
    plotting.grid(ax, legend=False)
  axes[0].set_ylabel("accuracy (mean over tasks)")
  axes[1].legend(fontsize=7, loc="lower left")
  plotting.save(fig, path)


def _ger_vs_hallucination(plt, rows, path):
  ev = report.eviction_rows(rows)
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  for mode, marker in zip(plan.MODES, ("o", "^")):
    rs = [r for r in ev if r["mode"] == mode]
    ger = [r["ger"] for r in rs]
    hallucination = [r["hallucination_rate"] for r in rs]
    ax.scatter(
      ger,
      hallucination,
      marker=marker,
      alpha=0.6,
      label=f"{mode} (r={metrics.pearson(ger, hallucination):.2f})",
    )
  ax.set_xlabel("Global Eviction Ratio of answer-critical tokens")
  ax.set_ylabel("hallucination rate")
  plotting.grid(ax)
  plotting.save(fig, path)


def _active_support(plt, support, path):
  layers = len(support["histogram"])
  fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), sharey=True)
  axes = np.atleast_1d(axes)
  edges = np.asarray(support["bin_edges"])
  for l, ax in enumerate(axes):
    ax.bar(
      edges[:-1], support["histogram"][l], width=np.diff(edges), align="edge"
    )
    ax.set_xscale("log")
    ax.set_title(f"layer {l} (median {support['median_per_layer'][l]:g})")
    ax.set_xlabel(f"keys holding {support['share']:g} of the mass")
  axes[0].set_ylabel("(head, answer query) count")
  plotting.save(fig, path)


def _bytes_per_token(plt, rows, base, colors, path):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for m, color in colors.items():
    rs = [r for r in rows if r["method"] == m and r["mode"] == "agnostic"]
    ratios = sorted({r["ratio"] for r in rs})
    for field, style in (
      ("physical_bytes_per_token", "-"),
      ("logical_bytes_per_token", ":"),
    ):
      ax.plot(
        ratios,
        [metrics.mean(_at(rs, x), field) for x in ratios],
        style,
        marker="o",
        color=color,
        label=m if style == "-" else None,
      )
  ax.axhline(
    metrics.mean(base, "physical_bytes_per_token"),
    color="k",
    ls="--",
    label="uncompressed (physical)",
  )
  ax.set_xlabel("eviction ratio (quantizers and learned methods at 0)")
  ax.set_ylabel("KV bytes per context token (solid: physical, dotted: logical)")
  ax.set_yscale("log")
  plotting.grid(ax, fontsize=7)
  plotting.save(fig, path)


def plot(
  rows: list[dict[str, Any]], support: dict[str, Any], workdir: str
) -> None:
  """Writes the sweep's figures (`FILES`) into `workdir`.

  Args:
    rows: the sweep's rows (refused units are left out).
    support: `metrics.active_support` of the sweep's tasks.
    workdir: the output folder.
  """
  rows = [r for r in rows if r.get("status") != "refused"]
  plt = plotting.pyplot()
  base = [r for r in rows if r["method"] == plan.BASELINE]
  methods = sorted({r["method"] for r in rows} - {plan.BASELINE})
  colors = plotting.colors(methods)
  paths = [os.path.join(workdir, name) for name in FILES]
  _accuracy_vs_compression(plt, rows, base, colors, paths[0])
  _ger_vs_hallucination(plt, rows, paths[1])
  _active_support(plt, support, paths[2])
  _bytes_per_token(plt, rows, base, colors, paths[3])
