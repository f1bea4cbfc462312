"""Deadlines for tests that wait on another process, derived from a measured baseline instead of
constants: a wait that takes `idle_seconds` on an idle 2-core machine gets that times how slow
this machine is right now, times a safety margin. A loaded CI machine waits longer instead of
failing; an idle one still stops a hung child in minutes. No test asserts on these times.

How slow: a fresh interpreter does a fixed piece of arithmetic (any venv of the suite has it,
with or without torch); its wall time over its own CPU time is how much other processes slow it
down now, and its wall time over the same work's on an idle machine of ours also counts a slower
CPU; the larger of the two is taken. The load moves
during a session, so the figure is measured again when it is older than REMEASURE_S, and a
`Deadline` that runs out measures once more and waits on if the machine has slowed down since.

    proc = run([python, "-m", "dreambooth", ...], idle_seconds=30, capture_output=True)
    d = Deadline(10)
    while not done() and not d.expired(): time.sleep(0.1)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

WORK = "sum(i * i for i in range(3_000_000))"
IDLE_WORK_S = 0.15  # WORK in a fresh interpreter on an idle machine of ours (its CPU time)
MARGIN = 4.0
REMEASURE_S = 30.0
_last: tuple[float, float] = (float("-inf"), 1.0)  # (when measured, slowness)


def slowness(fresh: bool = False) -> float:
    """How many times slower than idle this machine starts a training child right now (>= 1)."""
    global _last
    when, value = _last
    if fresh or time.monotonic() - when > REMEASURE_S:
        before, start = os.times(), time.perf_counter()
        subprocess.run([sys.executable, "-c", WORK], check=True, capture_output=True)
        wall, after = time.perf_counter() - start, os.times()
        cpu = (after.children_user - before.children_user
               + after.children_system - before.children_system)
        value = max(1.0, wall / max(cpu, 0.01), wall / IDLE_WORK_S)
        _last = (time.monotonic(), value)
    return value


def deadline(idle_seconds: float) -> float:
    """Seconds to wait for something that takes up to `idle_seconds` on an idle machine."""
    return idle_seconds * slowness() * MARGIN


class Deadline:
    """A deadline(idle_seconds) from now; when it passes, the load is measured again and the
    deadline moves out if the machine has become slower since it was set."""

    def __init__(self, idle_seconds: float):
        self.idle_seconds, self.start = idle_seconds, time.monotonic()
        self.seconds = deadline(idle_seconds)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def expired(self) -> bool:
        if self.left() > 0:
            return False
        self.seconds = max(self.seconds, self.idle_seconds * slowness(fresh=True) * MARGIN)
        return self.left() <= 0

    def __str__(self) -> str:
        return f"{self.seconds:.0f} s ({self.idle_seconds:g} s on an idle machine, scaled)"


def run(cmd, idle_seconds: float, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with a Deadline(idle_seconds) instead of a constant timeout."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    limit = Deadline(idle_seconds)
    with subprocess.Popen(cmd, **kwargs) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=max(limit.left(), 0.1))
                break
            except subprocess.TimeoutExpired:
                if limit.expired():
                    proc.kill()
                    out, err = proc.communicate()
                    raise subprocess.TimeoutExpired(cmd, limit.seconds, out, err) from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
