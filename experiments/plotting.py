"""Figure helpers shared by the experiment mains (sweep, anatomy, train).

matplotlib is an optional dependency (the `plot` extra): it is imported on
the first call of `pyplot`, with the non-interactive Agg backend, so a main
that writes no figure never needs it.

  plt = plotting.pyplot()
  fig, ax = plt.subplots()
  ax.plot(steps, plotting.smooth(losses, 10))
  plotting.save(fig, os.path.join(workdir, "loss.png"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DPI = 120  # every figure kvjax writes


def pyplot():
  """`matplotlib.pyplot` on the Agg backend (files only, no display).

  Raises:
    ImportError: matplotlib is not installed (`pip install kvjax[plot]`).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save(fig, path: str, dpi: int = DPI) -> None:
  """Lays `fig` out tightly, writes it to `path` and closes it."""
  plt = pyplot()
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def smooth(values: Sequence[float], window: int) -> list[float]:
  """Trailing moving average: element i is the mean of values[i-window+1:i+1]
  (fewer at the start).

  Raises:
    ValueError: window < 1.
  """
  if window < 1:
    raise ValueError(f"window={window}: must be >= 1.")
  out = []
  for i in range(len(values)):
    last = values[max(0, i - window + 1) : i + 1]
    out.append(sum(last) / len(last))
  return out


def colors(names: Sequence[str]) -> dict[str, Any]:
  """One stable colour per name (tab20, in the order given), so a method
  keeps its colour across the panels of a figure."""
  plt = pyplot()
  return {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}


def grid(*axes, legend: bool = True, **legend_kwargs) -> None:
  """A light grid (and a legend unless `legend=False`) on each of `axes`."""
  for ax in axes:
    ax.grid(alpha=0.3)
    if legend:
      ax.legend(**legend_kwargs)
