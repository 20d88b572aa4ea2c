"""Thread choice (issue 20): the affinity mask and the current load cap the default thread count."""
from __future__ import annotations

import os

from gguf_runtime import threads


def test_default_threads_follow_affinity_and_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.setattr(threads, "runnable_others", lambda: 0)
    assert threads.default_threads() == 8
    monkeypatch.setattr(threads, "runnable_others", lambda: 3)
    assert threads.default_threads() == 5
    monkeypatch.setattr(threads, "runnable_others", lambda: 30)  # a saturated machine: one thread, not zero
    assert threads.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's word wins
    assert threads.default_threads() == 3


def test_affinity_and_loadavg_read_from_the_system():
    assert 1 <= threads.available_cpus() <= (os.cpu_count() or 1)
    assert threads.runnable_others() >= 0


def test_passive_wait_respects_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.set_passive_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.set_passive_wait()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
