#!/usr/bin/env bash
# Installs what is needed and runs the test suite: first with the newest supported packages
# (.venv), then with the oldest (.venv-oldest, Forge's pins). `bash test.sh --quick`: newest only.
set -euo pipefail
cd "$(dirname "$0")"
quick=0; if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
bash tools/bootstrap.sh .venv test
echo "== tests: newest packages =="
.venv/bin/python -m pytest -q "$@"
if [ $quick = 0 ]; then
  bash tools/bootstrap.sh .venv-oldest test constraints/oldest.txt
  echo "== tests: oldest supported packages (constraints/oldest.txt) =="
  .venv-oldest/bin/python -m pytest -q "$@"
fi
