"""Deadlines for tests that wait on another process, derived from a measured baseline instead of
constants: a wait that takes `idle_seconds` on an idle 2-core machine gets that times how slow
this machine is right now (a fresh interpreter doing a fixed piece of arithmetic, timed once
per session against the idle figure; any venv of the suite has it, with or without torch), times a safety margin. A loaded CI machine waits longer instead of failing;
an idle one still stops a hung child in minutes. No test asserts on these times."""
from __future__ import annotations

import functools
import subprocess
import sys
import time

WORK = "sum(i * i for i in range(3_000_000))"
IDLE_WORK_S = 0.3  # WORK in a fresh interpreter on an idle 2-core machine of ours (measured)
MARGIN = 4.0


@functools.lru_cache(maxsize=None)
def slowness() -> float:
    """How many times slower than idle this machine starts a training child right now (>= 1)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", WORK], check=True, capture_output=True)
    return max(1.0, (time.perf_counter() - start) / IDLE_WORK_S)


def deadline(idle_seconds: float) -> float:
    """Seconds to wait for something that takes up to `idle_seconds` on an idle machine."""
    return idle_seconds * slowness() * MARGIN
