"""Test-only: makes a training child slow where a test asks, through its environment.

A folder a test puts first on the child's PYTHONPATH (tests/test_webui_runner.py); Python runs
this module at start-up, and it acts only in `python -m dreambooth ...`. Once the trainer module is imported, each step from
DREAMBOOTH_TEST_SLOW_FROM_STEP on takes DREAMBOOTH_TEST_SLOW_STEP_S seconds more, and each
resume state takes DREAMBOOTH_TEST_SLOW_STATE_S more to write. With DREAMBOOTH_TEST_START_GATE
the process waits at its start, before any code of ours, until that file exists. Nothing in the
product reads these variables.
"""
import importlib.abc
import importlib.util
import os
import sys
import time

TARGET = "dreambooth.training.trainer"


def _slow(module) -> None:
    step_s = float(os.environ.get("DREAMBOOTH_TEST_SLOW_STEP_S", "0"))
    state_s = float(os.environ.get("DREAMBOOTH_TEST_SLOW_STATE_S", "0"))
    first = int(os.environ.get("DREAMBOOTH_TEST_SLOW_FROM_STEP", "1"))
    micro_step, save_snapshot = module.Trainer.micro_step, module.save_snapshot

    def slow_step(self, order, b, step):
        loss = micro_step(self, order, b, step)
        if step >= first:
            time.sleep(step_s)
        return loss

    def slow_state(*args, **kwargs):
        time.sleep(state_s)
        return save_snapshot(*args, **kwargs)

    module.Trainer.micro_step, module.save_snapshot = slow_step, slow_state


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _slow(module)
        spec.loader.exec_module = exec_module
        return spec


# only in the training child: the test's other processes (a load probe...) see the same env
CHILD = getattr(sys, "orig_argv", [])[1:3] == ["-m", "dreambooth"]
if CHILD and any(os.environ.get(f"DREAMBOOTH_TEST_SLOW_{what}_S") for what in ("STEP", "STATE")):
    sys.meta_path.insert(0, _AfterImport())
while CHILD and os.environ.get("DREAMBOOTH_TEST_START_GATE") and \
        not os.path.exists(os.environ["DREAMBOOTH_TEST_START_GATE"]):
    time.sleep(0.05)
