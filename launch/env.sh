# Sourced by the launch scripts: makes .venv (once) and installs kvjax with
# the pinned extras it needs. Reinstalls only when setup.cfg changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "kvjax needs Python >= 3.11"'
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.kvjax-installed
WANT="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1) ${KVJAX_EXTRAS:=test,hf,plot,peers,nn,tpu}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "Installing kvjax[${KVJAX_EXTRAS:=test,hf,plot,peers,nn,tpu}] into .venv ..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[${KVJAX_EXTRAS:=test,hf,plot,peers,nn,tpu}]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1
