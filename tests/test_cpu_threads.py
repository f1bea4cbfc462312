"""A CPU run computes with the cores that are free when it starts: OpenMP threads beyond them
spin against the other processes (the demo: 4.1 s a step on a busy 2-core machine, 0.12 idle)."""
from __future__ import annotations

import pytest

from dreambooth.training import backends


@pytest.mark.parametrize("cores, load, processes, most, threads", [
    (2, 0.0, 1, None, 2), (2, 0.4, 1, None, 2), (2, 0.5, 1, None, 1), (2, 4.3, 1, None, 1),
    (1, 0.0, 1, None, 1), (16, 3.2, 1, None, 13), (16, 3.2, 2, None, 6), (16, 0.0, 1, 8, 8),
    (16, 12.0, 1, 8, 4), (4, 3.0, 4, None, 1), (8, 0.0, 3, None, 2)])
def test_threads_are_the_free_cores_shared_by_the_processes(cores, load, processes, most,
                                                            threads):
    assert backends.free_cores(cores, load, processes, most) == threads


def test_the_choice_is_the_users_where_they_made_one_and_said_where_it_is_ours(monkeypatch):
    said = []
    monkeypatch.setattr(backends.os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    monkeypatch.setattr(backends, "usable_cores", lambda: 4)
    monkeypatch.setattr(backends.torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert backends.cpu_threads(3, False, said.append) == 3  # the config's
    assert backends.cpu_threads(0, True, said.append) == 0  # a GPU run's host: as it is
    assert said == []
    assert backends.cpu_threads(0, False, said.append) == 1  # 4 cores, 3 busy
    assert said == ["Training on the CPU with 1 thread: 4 cores, load average 2.6 (set "
                    "cpu_threads or OMP_NUM_THREADS to choose)."]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert backends.cpu_threads(0, False, said.append) == 0  # the user's, as torch read it
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(backends.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert backends.cpu_threads(0, False, said.append) == 2
    assert said[-1].endswith("load average 0.0, 2 processes (set cpu_threads or "
                             "OMP_NUM_THREADS to choose).")


def test_usable_cores_is_at_least_one_and_at_most_the_machines():
    import os
    assert 1 <= backends.usable_cores() <= (os.cpu_count() or 1)
