"""How many threads to compute with, and how they wait: chosen so a busy machine does not collapse.

On a machine whose cores are taken by other work, OpenMP's default of one spinning worker per core
turns every parallel region into a wait for descheduled siblings: on 2 busy cores a decode step of
SmolLM2 went from 0.7 s with one thread to 18 s with two (issue 20). So, unless the user says
otherwise (``-t N``, ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``):

- how workers wait is chosen from the load at start (before torch starts its thread pool, i.e.
  before ``import torch``): on a machine with no other runnable task they spin for a while before
  sleeping (``GOMP_SPINCOUNT=100000``, libgomp's bounded spin: a decode step of SmolLM2 at 2 threads
  took 41 ms with passive waiting, 20 ms spinning, the same as ``OMP_WAIT_POLICY=ACTIVE``, since a
  sleeping worker takes tens of microseconds to wake for each of the step's few hundred parallel
  regions); on a loaded one they wait passively (``OMP_WAIT_POLICY=PASSIVE``: they sleep at once);
- the thread count is the CPUs this process may run on (its affinity mask, not the machine's core
  count) minus the other runnable tasks right now (``/proc/loadavg``'s running count), at least 1.

Results do not depend on the thread count (batch invariance holds per thread count, and the kernels'
rules are calibrated per thread count), so this only moves speed.
"""
from __future__ import annotations

import os


SPIN_COUNT = "100000"


def set_wait_policy() -> str:
    """Choose how OpenMP workers wait (see the module docstring) unless the environment already did
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set); call before importing torch. Returns the choice:
    ``spin``, ``passive`` or ``user``."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return "user"
    if runnable_others() == 0:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        return "spin"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "passive"


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
