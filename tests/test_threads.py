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


def test_wait_policy_follows_load_and_respects_the_environment(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # recorded first, so both are restored after
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    monkeypatch.setattr(threads, "runnable_others", lambda: 0)  # idle: bounded spin, then sleep
    assert threads.set_wait_policy() == "spin"
    assert os.environ["GOMP_SPINCOUNT"] == threads.SPIN_COUNT and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setattr(threads, "runnable_others", lambda: 2)  # loaded: sleep at once
    assert threads.set_wait_policy() == "passive"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's word wins
    assert threads.set_wait_policy() == "user"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
