#!/usr/bin/env bash
# Runs kvjax's main job on its built-in default (CPU is fine).
# Usage: bash launch/local.sh [--config.x=y ...]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m experiments.sweep "$@"
