#!/usr/bin/env bash
# Runs a kvjax experiment on every worker of a Cloud TPU pod slice.
#
# Usage: bash launch/tpu_pod.sh NAME ZONE [--dry-run] [experiment args...]
#
#   NAME, ZONE   the TPU VM (`gcloud compute tpus tpu-vm create NAME
#                --zone=ZONE ...`), already created.
#   --dry-run    print the commands, one per line and shell-quoted (paste
#                them to run them by hand), and run nothing.
#   args         appended to the experiment command, by default
#                  python -m experiments.sweep \
#                    --config=experiments/configs/sweep.py:long
#                (a later flag wins, e.g. --config.context_len=65536).
#
# Three steps, each on all workers at once (--worker=all):
#   1. the code: by default this checkout as it is (uncommitted changes
#      included; no .git, .venv or runs/) is packed with tar into
#      $TMPDIR/kvjax-pod-NAME.tgz, copied with `gcloud compute tpus tpu-vm
#      scp` and unpacked over ~/$KVJAX_DIR (its .venv and runs/ stay); with
#      KVJAX_REPO set, each worker clones that URL instead and checks out
#      KVJAX_REF (a branch, tag or commit; default: the remote's HEAD).
#   2. the install: launch/env.sh on each worker (a .venv with kvjax and the
#      pins of setup.cfg; extras $KVJAX_POD_EXTRAS, default tpu,plot: jax
#      with its pinned libtpu, matplotlib for the figures). It reinstalls only
#      when setup.cfg changes; python3.11 comes from apt if the image lacks it.
#   3. the run: the experiment on every worker. Each process calls
#      jax.distributed.initialize() itself, which needs no arguments on a
#      TPU pod; output of all workers streams back here.
#
# Environment: KVJAX_REPO, KVJAX_REF (see 1), KVJAX_DIR (on the workers,
# relative to the home directory; default kvjax), KVJAX_POD_EXTRAS (see 2),
# KVJAX_PYTHON (default python3.11), KVJAX_MAIN (the module run; default
# experiments.sweep), KVJAX_CONFIG (its first flag; default
# --config=experiments/configs/sweep.py:long; empty: none).
set -euo pipefail

usage() {
  sed -n '4,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# Words quoted for a shell, space-separated: a word of safe characters as
# it is, any other in single quotes (each ' as '\''), so a printed command
# pastes back as the same words and a remote command keeps its arguments.
quote() {
  local out="" word q="'"
  for word in "$@"; do
    if ! [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      word="$q${word//$q/$q\\$q$q}$q"
    fi
    out+="${out:+ }$word"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it (shell-quoted, one line).
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi
if [ "$#" -lt 2 ]; then
  echo "error: NAME and ZONE are required." >&2
  usage >&2
  exit 2
fi
NAME="$1"
ZONE="$2"
shift 2
# TPU names and zones are lowercase letters, digits and hyphens
# (e.g. my-v5e-256, us-west4-a); anything else is a mistyped argument.
for arg in NAME ZONE; do
  if ! [[ "${!arg}" =~ ^[a-z][a-z0-9-]*$ ]]; then
    echo "error: $arg=$(quote "${!arg}") is not a TPU $arg (lowercase" \
      "letters, digits and hyphens)." >&2
    usage >&2
    exit 2
  fi
done
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${KVJAX_DIR:-kvjax}"
PY="${KVJAX_PYTHON:-python3.11}"
EXTRAS="${KVJAX_POD_EXTRAS:-tpu,plot}"
MAIN="${KVJAX_MAIN:-experiments.sweep}"
CONFIG="${KVJAX_CONFIG---config=experiments/configs/sweep.py:long}"
ARCHIVE="${TMPDIR:-/tmp}/kvjax-pod-$NAME.tgz"
REMOTE_ARCHIVE=kvjax-pod.tgz  # in the workers' home directories

pod_ssh() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
    --command="$1"
}

if [ "$DRY_RUN" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  echo "error: gcloud is not on PATH (install the Google Cloud CLI)." >&2
  exit 1
fi

# 1. The code on every worker.
if [ -n "${KVJAX_REPO:-}" ]; then
  fetch="if [ ! -d $(quote "$DIR/.git") ]; then"
  fetch+=" git clone --quiet $(quote "$KVJAX_REPO" "$DIR"); fi"
  fetch+=" && git -C $(quote "$DIR") fetch --quiet origin"
  fetch+=" $(quote "${KVJAX_REF:-HEAD}")"
  fetch+=" && git -C $(quote "$DIR") checkout --quiet --detach FETCH_HEAD"
else
  run tar -czf "$ARCHIVE" -C "$ROOT" --exclude=./.git --exclude=./.venv \
    --exclude=./runs --exclude=./build --exclude=./dist --exclude=./.whl \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.ruff_cache .
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:$REMOTE_ARCHIVE" \
    --zone="$ZONE" --worker=all
  # Unpacked over the previous copy, so its .venv and runs/ stay.
  fetch="mkdir -p $(quote "$DIR")"
  fetch+=" && tar -xzf $(quote "$REMOTE_ARCHIVE") -C $(quote "$DIR")"
fi

# 2. The pinned install (launch/env.sh), with Python 3.11 from apt if needed.
install="set -eu; if ! command -v $(quote "$PY") >/dev/null 2>&1; then"
install+=" sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive"
install+=" apt-get install -y -qq $(quote "$PY" "$PY-venv"); fi"
install+="; $fetch"
install+=" && cd $(quote "$DIR")"
install+=" && PYTHON=$(quote "$PY") KVJAX_EXTRAS=$(quote "$EXTRAS")"
install+=" bash launch/env.sh"
pod_ssh "$install"

# 3. The experiment, on every worker at once.
cmd=(.venv/bin/python -m "$MAIN")
if [ -n "$CONFIG" ]; then
  cmd+=("$CONFIG")
fi
cmd+=("$@")
pod_ssh "cd $(quote "$DIR") && PYTHONUNBUFFERED=1 exec $(quote "${cmd[@]}")"
