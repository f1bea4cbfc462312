#!/usr/bin/env bash
# Creates a virtual environment (default .venv) and installs the package into it.
#   bash tools/bootstrap.sh VENV [EXTRAS] [CONSTRAINTS_FILE]
# torch: an existing torch in the venv is kept. Otherwise `pip install torch==$DREAMBOOTH_TORCH`
# (default below) or, with DREAMBOOTH_TORCH unset and a torch on the system Python, that version.
set -euo pipefail
venv=${1:-.venv}; extras=${2:-test}; constraints=${3:-}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  want=${DREAMBOOTH_TORCH:-2.13.0}
  echo "Installing torch==$want (set DREAMBOOTH_TORCH to choose another; a torch already in the venv is kept)"
  "$vpy" -m pip install -q "torch==$want"
fi
args=(-q -e "$here[$extras]")
if [ -n "$constraints" ]; then  # torch is pinned below to the one installed (a CPU or CUDA build)
  grep -v '^torch==' "$constraints" > "$venv/constraints.txt"
  args+=(-c "$venv/constraints.txt")
fi
# Pin torch to the one installed so no dependency can swap it for another build.
# (-W ignore: before numpy is installed, torch warns "Failed to initialize NumPy" on import)
tv=$("$vpy" -W ignore -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$tv" > "$venv/torch-pin.txt"
"$vpy" -m pip install "${args[@]}" -c "$venv/torch-pin.txt"
