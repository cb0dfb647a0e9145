#!/usr/bin/env bash
# Runs the whole test suite (CPU). Usage: bash launch/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The CPU suite: libtpu (the `tpu` extra) is there to compile TPU kernels
# ahead of time, not to be picked as a platform.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# 8 simulated CPU devices for the sharded-path tests. The suite is mostly
# XLA compiles of small programs: compile them without the CPU backend's
# expensive optimizations (the same programs, plainer machine code; about
# half the compile time). Speed is measured in benchmarks/, never here.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8 \
--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Two workers (pytest-xdist): the suite is mostly XLA compiles, which a
# second process overlaps (about 0.8x the time on the 2-core CI machine).
exec python -m pytest -q -n "${KVJAX_TEST_WORKERS:-2}" "$@"
