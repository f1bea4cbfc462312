#!/usr/bin/env bash
# Installs what is needed and runs the test suite:
#   1. the core with the tested package set, constraints/newest.txt (.venv)
#   2. the WebUI side (tab, glue, API, install.py and its pip-freeze check, browser) in venvs shaped like the hosts:
#      gradio 4.44.1 (Forge-like) and A1111 1.10's pins with gradio 3.41.2
#   3. the core with the oldest supported packages (.venv-oldest, Forge's pins); tests marked
#      `once` (learning, benchmark smoke: nothing version-sensitive) run in step 1 only
# Two lanes run side by side, one per core: step 1 in this terminal; steps 2-3 (their venvs
# built first) in the background, logged to .test-logs/lane2.log and printed when step 1 ends;
# step 1's longest modules (POOL) go to whichever lane is free first
# (one after the other where OMP_NUM_THREADS is more than half the cores).
# Each test process uses one CPU thread unless OMP_NUM_THREADS says otherwise (tiny models
# gain nothing from more, and two lanes of two threads would fight over two cores).
# `bash test.sh --quick`: step 1 only. `bash test.sh --latest`: the core with the newest
# releases instead (.venv-latest, not in CI); prints which pins of constraints/newest.txt would
# move. Extra arguments go to pytest. Each stage prints its 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")"
mode=full
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "${1:-}" in --quick) mode=quick; shift ;; --latest) mode=latest; shift ;; esac

pytest_in() {  # VENV ARGS...: run pytest; "no tests collected" (exit 5) is a failure too
  local v=$1; shift
  local rc=0
  "$v/bin/python" -m pytest -q -rs --durations=15 "$@" || rc=$?
  if [ $rc = 5 ]; then echo "error: pytest collected no tests ($*)" >&2; fi
  return $rc
}

webui_venv() {  # VENV PIP-ARGS...: create once, install the host's pins, then our package without deps
  local v=$1; shift
  [ -x "$v/bin/python" ] || python3 -m venv "$v"
  "$v/bin/python" -m pip install -q "$@" pytest playwright
  "$v/bin/python" -m pip install -q --no-deps -e .
}

if [ $mode = latest ]; then
  bash tools/bootstrap.sh .venv-latest test
  # eager: every dependency to its newest release, not only ours (torch stays the one installed)
  .venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" \
    -c .venv-latest/torch-pin.txt
  export DREAMBOOTH_TEST_TRAIN_PYTHON=$PWD/.venv-latest/bin/python
  echo "== tests: core, newest releases =="
  rc=0; pytest_in .venv-latest "$@" || rc=$?
  echo "== pins that would move (constraints/newest.txt -> installed) =="
  .venv-latest/bin/python tools/pin_changes.py constraints/newest.txt
  exit $rc
fi

bash tools/bootstrap.sh .venv test constraints/newest.txt
export DREAMBOOTH_TEST_TRAIN_PYTHON=$PWD/.venv/bin/python
FREEZE_TEST=tests/test_install_freeze.py
# the longest modules of step 1 (tested packages, .venv), longest first: with two lanes, each
# lane takes the next one nobody has taken when its own stages end (a claim is a mkdir), so the
# lanes end together whatever the load; with one lane, step 1 runs them
POOL="tests/test_profile.py tests/test_learning.py tests/test_reliability.py tests/test_bench_smoke.py tests/test_compile.py tests/test_profile_reference.py"
run_pool() {  # ARGS...: the pool's modules this lane claims; 0 unless one of them failed
  local rc=0 r t
  for t in $POOL; do
    mkdir ".test-logs/claim-${t//\//_}" 2>/dev/null || continue
    echo "== tests: core, tested packages, from the shared pool: $t =="
    r=0; pytest_in .venv "$t" "$@" || r=$?
    [ $r = 0 ] || [ $r = 5 ] || rc=1  # extra arguments may select none of its tests
  done
  return $rc
}
WEBUI_TESTS="tests/test_ui_fields.py tests/test_ui_build.py tests/test_webui_glue.py tests/test_forge_glue.py tests/test_api.py tests/test_confinement.py tests/test_browser.py tests/test_page_script.py tests/test_install.py"

lane2() {  # steps 2 and 3: build each venv, then run its tests; a failed stage does not stop the next
  local rc=0
  tv=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
  webui_venv .venv-gradio4 gradio==4.44.1 "huggingface_hub<1" fastapi==0.112.2 pydantic==2.10.6 httpx
  webui_venv .venv-gradio3 gradio==3.41.2 gradio_client==0.5.0 fastapi==0.94.0 starlette==0.26.1 \
    pydantic==1.10.13 httpx==0.24.1 httpcore==0.15.0 transformers==4.30.2 tokenizers==0.13.3 \
    accelerate==0.21.0 safetensors==0.4.2 numpy==1.26.2 Pillow==9.5.0 open-clip-torch==2.20.0 \
    protobuf==3.20.0 psutil==5.9.5 "torch==$tv"
  .venv-gradio3/bin/python -m pip uninstall -y -q torchvision || true  # does not match a CPU torch
  command -v chromium >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || true
  # install.py against the finished A1111-pins venv: here, not in step 1, which would race
  # its build (a freeze taken while pip still installs) or skip it (one lane after the other)
  echo "== tests: install.py leaves A1111 1.10's pip freeze unchanged (.venv-gradio3) =="
  pytest_in .venv $FREEZE_TEST || rc=1
  echo "== tests: WebUI side, gradio 4.44.1 (Forge-like) =="
  pytest_in .venv-gradio4 $WEBUI_TESTS || rc=1
  echo "== tests: WebUI side, gradio 3.41.2 + AUTOMATIC1111 1.10 pins =="
  pytest_in .venv-gradio3 $WEBUI_TESTS || rc=1
  bash tools/bootstrap.sh .venv-oldest test constraints/oldest.txt
  echo "== tests: core, oldest supported packages (constraints/oldest.txt) =="
  pytest_in .venv-oldest -m "not once" "$@" || rc=1
  if [ $lanes = 2 ]; then run_pool "$@" || rc=1; fi
  return $rc
}

rc2=0
# side by side only where each lane's threads fit in half the cores (OMP_NUM_THREADS=2 on two
# cores: one lane after the other; four threads on two cores made the suite ~2x slower)
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)  # nproc obeys both
lanes=0  # steps 2-3 not run (--quick)
if [ $mode = full ]; then
  lanes=1
  case "$OMP_NUM_THREADS" in ''|*[!0-9]*) ;; *) [ $((OMP_NUM_THREADS * 2)) -gt "$cores" ] || lanes=2 ;; esac
  [ $lanes = 2 ] || echo "== OMP_NUM_THREADS=$OMP_NUM_THREADS on $cores cores: the stages run one after another =="
fi
if [ $lanes = 2 ]; then
  mkdir -p .test-logs
  rm -rf .test-logs/claim-* .test-logs/tiny-inputs
  # the gradio lanes' tiny checkpoint and images: made once by the first, read by the next
  export DREAMBOOTH_TEST_TINY_CACHE=$PWD/.test-logs/tiny-inputs
  echo "== steps 2-3 (WebUI side, oldest packages) run alongside: .test-logs/lane2.log =="
  ( lane2 "$@" ) > .test-logs/lane2.log 2>&1 &
  lane2_pid=$!
  kill_tree() { local c; for c in $(pgrep -P "$1" || true); do kill_tree "$c"; done; kill "$1" 2>/dev/null || true; }
  trap 'kill_tree $lane2_pid; exit 130' INT TERM
fi

echo "== tests: core, tested packages (constraints/newest.txt) =="
core_args=(); [ $lanes = 0 ] || core_args=(--ignore=$FREEZE_TEST)  # step 2 runs it
if [ $lanes = 2 ]; then for t in $POOL; do core_args+=(--ignore=$t); done; fi
rc1=0; pytest_in .venv "${core_args[@]}" "$@" || rc1=$?
if [ $lanes = 2 ]; then
  run_pool "$@" || rc1=1
  echo "== waiting for steps 2-3 =="
  wait $lane2_pid || rc2=$?
  cat .test-logs/lane2.log
elif [ $lanes = 1 ]; then
  set +e; ( set -e; lane2 "$@" ); rc2=$?; set -e
fi
if [ $rc1 != 0 ] || [ $rc2 != 0 ]; then
  echo "FAILED: core (tested packages) rc=$rc1, WebUI side + oldest packages rc=$rc2" >&2
  exit 1
fi
echo "all stages passed"
