#!/usr/bin/env bash
# Installs what is needed and runs the test suite:
#   1. the core with the newest supported packages (.venv)
#   2. the WebUI side (tab, glue, API, install.py, browser) in venvs shaped like the hosts:
#      gradio 4.44.1 (Forge-like) and A1111 1.10's pins with gradio 3.41.2
#   3. the core with the oldest supported packages (.venv-oldest, Forge's pins)
# `bash test.sh --quick`: step 1 only. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
quick=0; if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi

webui_venv() {  # VENV PIP-ARGS...: create once, install the host's pins, then our package without deps
  local v=$1; shift
  [ -x "$v/bin/python" ] || python3 -m venv "$v"
  "$v/bin/python" -m pip install -q "$@" pytest playwright
  "$v/bin/python" -m pip install -q --no-deps -e .
}

bash tools/bootstrap.sh .venv test
export DREAMBOOTH_TEST_TRAIN_PYTHON=$PWD/.venv/bin/python
if [ $quick = 0 ]; then
  tv=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
  webui_venv .venv-gradio4 gradio==4.44.1 "huggingface_hub<1" fastapi==0.112.2 pydantic==2.10.6 httpx
  webui_venv .venv-gradio3 gradio==3.41.2 gradio_client==0.5.0 fastapi==0.94.0 starlette==0.26.1 \
    pydantic==1.10.13 httpx==0.24.1 httpcore==0.15.0 transformers==4.30.2 tokenizers==0.13.3 \
    accelerate==0.21.0 safetensors==0.4.2 numpy==1.26.2 Pillow==9.5.0 open-clip-torch==2.20.0 \
    protobuf==3.20.0 psutil==5.9.5 "torch==$tv"
  .venv-gradio3/bin/python -m pip uninstall -y -q torchvision || true  # does not match a CPU torch
  command -v chromium >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || true
fi

echo "== tests: core, newest packages =="
.venv/bin/python -m pytest -q "$@"
if [ $quick = 0 ]; then
  WEBUI_TESTS="tests/test_ui_fields.py tests/test_ui_build.py tests/test_webui_glue.py tests/test_api.py tests/test_browser.py tests/test_install.py"
  echo "== tests: WebUI side, gradio 4.44.1 (Forge-like) =="
  .venv-gradio4/bin/python -m pytest -q $WEBUI_TESTS
  echo "== tests: WebUI side, gradio 3.41.2 + AUTOMATIC1111 1.10 pins =="
  .venv-gradio3/bin/python -m pytest -q $WEBUI_TESTS
  bash tools/bootstrap.sh .venv-oldest test constraints/oldest.txt
  echo "== tests: core, oldest supported packages (constraints/oldest.txt) =="
  .venv-oldest/bin/python -m pytest -q "$@"
fi
