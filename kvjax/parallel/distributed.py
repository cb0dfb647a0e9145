"""Multi-process start-up: one process per host (a TPU pod slice's workers,
or several local processes with CPU devices)."""

from __future__ import annotations

import os

import jax

_ENV = ("KVJAX_COORDINATOR", "KVJAX_NUM_PROCESSES", "KVJAX_PROCESS_ID")


def initialize() -> bool:
  """Calls `jax.distributed.initialize()` once when this process is one of
  several; returns True when it did (or had).

  Several processes are recognized from `KVJAX_COORDINATOR` (host:port),
  `KVJAX_NUM_PROCESSES` and `KVJAX_PROCESS_ID` (a local multi-process
  run, e.g. 2 processes with 4 CPU devices each), or from a Cloud TPU pod
  slice's environment (`TPU_WORKER_HOSTNAMES` with more than one worker:
  JAX finds the coordinator itself). A single process does nothing.

  Raises:
    ValueError: only some of the KVJAX_* variables are set, or they are
      not integers.
  """
  if jax.distributed.is_initialized():
    return True
  given = [v for v in _ENV if os.environ.get(v)]
  if given:
    if len(given) != len(_ENV):
      raise ValueError(
        f"multi-process run: set all of {_ENV}, got only {given}."
      )
    try:
      num = int(os.environ["KVJAX_NUM_PROCESSES"])
      pid = int(os.environ["KVJAX_PROCESS_ID"])
    except ValueError:
      raise ValueError(
        "KVJAX_NUM_PROCESSES and KVJAX_PROCESS_ID must be integers."
      ) from None
    jax.distributed.initialize(
      coordinator_address=os.environ["KVJAX_COORDINATOR"],
      num_processes=num,
      process_id=pid,
    )
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    jax.distributed.initialize()
    return True
  return False
