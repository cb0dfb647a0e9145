"""Checking kernels for hardware this machine does not have.

`compile_for_tpu` compiles a function ahead of time for a real TPU
generation with the libtpu wheel (the `tpu` extra), from a CPU-only
process: Mosaic then rejects what interpret mode accepts (float16 loads
inside a kernel, shifts of uint8 vectors, blocks breaking the (8, 128)
rule, VMEM overflow). `lower_for_cuda` lowers a function for CUDA from the
CPU wheel: the Triton lowering rejects primitives it does not implement.
Neither runs anything.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# libtpu takes a lock file per process unless told that several processes
# (parallel test workers) may load it; nothing here drives a real TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# TPU generations the kernels are compiled for in CI (topology names of
# `jax.experimental.topologies.get_topology_desc`).
TPU_TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2"}


def have_libtpu() -> bool:
  """Whether the libtpu wheel is installed (`pip install kvjax[tpu]`)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


@functools.cache
def _tpu_device(generation: str):
  from jax.experimental import topologies

  if generation not in TPU_TOPOLOGIES:
    raise ValueError(
      f"generation must be one of {sorted(TPU_TOPOLOGIES)}, got {generation!r}."
    )
  topo = topologies.get_topology_desc(
    platform="tpu", topology_name=TPU_TOPOLOGIES[generation]
  )
  return topo.devices[0]


def _abstract(args, sharding):
  def one(x):
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(x, "dtype"):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x

  return jax.tree.map(one, args)


def compile_for_tpu(fn: Callable, *args: Any, generation: str = "v5e"):
  """Compiles `fn(*args)` for one device of a TPU `generation` (array
  arguments become abstract shapes on that device); returns the
  `jax.stages.Compiled`. Raises what Mosaic raises.

  Raises:
    RuntimeError: when libtpu is not installed.
  """
  if not have_libtpu():
    raise RuntimeError(
      "compiling for TPU needs libtpu: pip install -e '.[tpu]'."
    )
  mesh = Mesh([_tpu_device(generation)], ("x",))
  abstract = _abstract(args, NamedSharding(mesh, PartitionSpec()))
  return (
    jax.jit(fn).trace(*abstract).lower(lowering_platforms=("tpu",)).compile()
  )


def lower_for_cuda(fn: Callable, *args: Any) -> str:
  """Lowers `fn(*args)` for CUDA (nothing is compiled or run); returns
  the StableHLO text, whose Pallas calls hold their Triton IR."""
  abstract = _abstract(args, None)
  return (
    jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cuda",)).as_text()
  )
