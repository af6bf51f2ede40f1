#!/usr/bin/env bash
# Set up everything on a fresh machine, then run the main job or the tests.
#
#   ./dev.sh bench [manidp-bench args...]   set up, then run manidp-bench (default model)
#   ./dev.sh test  [pytest args...]         set up, then run the whole test suite
#   ./dev.sh setup                          set up only
#
# Set-up is idempotent: the Debian Fashion-MNIST package, a venv in .venv with the
# pinned packages of requirements.txt, and the package with its C++ (and, where
# nvcc and a CUDA build of torch exist, CUDA) extension built in place.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${MANIDP_VENV:-.venv}

setup_data() {
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get install -y dataset-fashion-mnist >/dev/null || echo "warning: could not install dataset-fashion-mnist" >&2
    else
      echo "warning: Fashion-MNIST not found (apt-get install -y dataset-fashion-mnist as root)" >&2
    fi
  fi
}

setup_python() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e .
}

cmd=${1:-test}
shift || true
setup_data
setup_python
case "$cmd" in
  setup) ;;
  bench) exec "$VENV/bin/manidp-bench" "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest tests "$@" ;;
  *) echo "usage: ./dev.sh {bench|test|setup} [args...]" >&2; exit 2 ;;
esac
