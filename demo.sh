#!/usr/bin/env bash
# Installs what is needed (into .venv) and runs the demo: a tiny model trained on sample images,
# a checkpoint out. The last line printed is the checkpoint's path.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/bootstrap.sh .venv test constraints/newest.txt
exec .venv/bin/python -m dreambooth demo "$@"
