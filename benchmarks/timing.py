"""Timing shared by the benchmarks (no flags, so any benchmark imports it)."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats):
  """(median seconds of `repeats` timed calls after a warm-up, last result)."""
  out = fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out
