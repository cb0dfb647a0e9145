#!/usr/bin/env bash
# Runs the whole test suite (CPU). Usage: bash launch/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# 8 simulated CPU devices for the sharded-path tests.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
# Two workers (pytest-xdist): the suite is mostly XLA compiles, which a
# second process overlaps (about 0.8x the time on the 2-core CI machine).
exec python -m pytest -q -n "${KVJAX_TEST_WORKERS:-2}" "$@"
