"""Shared pytest fixtures."""

import contextlib
import json

import jax
import pytest


@contextlib.contextmanager
def _count_compiles():
  """Counts XLA backend compilations inside the block."""
  counter = {"n": 0}

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      counter["n"] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def count_compiles():
  """`with count_compiles() as c: ...` then `c["n"]` compilations."""
  return _count_compiles


@pytest.fixture
def update_json():
  """`update_json(path, change)` rewrites a JSON object file with the keys
  of the dict `change` set (a config.json edited to test a refusal)."""

  def update(path, change):
    with open(path) as f:
      data = json.load(f)
    data.update(change)
    with open(path, "w") as f:
      json.dump(data, f)

  return update


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops jax's compiled programs after each test module.

  Every XLA:CPU executable keeps its JIT-code mappings for the life of the
  process; a whole-suite run compiles thousands of programs, and without
  this the process hit a segfault inside an XLA compile late in the suite
  (vm.max_map_count is 65530 here).
  """
  yield
  jax.clear_caches()
