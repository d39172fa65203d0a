"""Timing helpers shared by the benchmark scripts (run as ``python bench/<script>.py``)."""
from __future__ import annotations

import time


def best_of(fn, repeat: int) -> tuple[float, float]:
    """(wall, cpu): minimum wall time and minimum process CPU time of ``repeat`` calls (after a warm-up).

    On a shared machine the CPU time is the steadier figure (it leaves out time spent descheduled).
    """
    fn()
    wall, cpu = [], []
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def best(fn, repeat: int) -> float:
    """Minimum wall time in seconds of ``repeat`` calls of ``fn()`` (after a warm-up)."""
    return best_of(fn, repeat)[0]
