"""How many threads to compute with, and how they wait: chosen so a busy machine does not collapse.

On a machine whose cores are taken by other work, OpenMP's default of one spinning worker per core
turns every parallel region into a wait for descheduled siblings: on 2 busy cores a decode step of
SmolLM2 went from 0.7 s with one thread to 18 s with two (issue 20). So, unless the user says
otherwise (``-t N``, ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``):

- workers wait passively (``OMP_WAIT_POLICY=PASSIVE``: they sleep instead of spinning when idle),
  which must be set before torch starts its thread pool, i.e. before ``import torch``;
- the thread count is the CPUs this process may run on (its affinity mask, not the machine's core
  count) minus the other runnable tasks right now (``/proc/loadavg``'s running count), at least 1.

Results do not depend on the thread count (batch invariance holds per thread count, and the kernels'
rules are calibrated per thread count), so this only moves speed.
"""
from __future__ import annotations

import os


def set_passive_wait() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment already chose; call before importing torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def runnable_others() -> int:
    """Runnable tasks other than this one, from ``/proc/loadavg`` (0 where unknown)."""
    try:
        with open("/proc/loadavg") as fh:
            running = int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def default_threads() -> int:
    """Threads for a command given no ``-t``: ``OMP_NUM_THREADS`` if set, else the free CPUs."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = available_cpus()
    return max(1, min(cpus, cpus - runnable_others()))
