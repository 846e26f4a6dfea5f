"""Process-parallel map over slices (post-processing is CPU-bound and holds the GIL)."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Sequence

from comp.core.errors import UserError


class WorkerDied(UserError):
    """A worker process ended without an answer: one line and exit code 2 (the CLI's), never a hang."""

    def __init__(self, problem: str) -> None:
        super().__init__("worker", problem)


GPU_PROCS_ENV = "COMP_GPU_PROCS"  # processes of one run sharing this machine's CPUs (`make cv GPUS="0 1"` sets it)


def cpu_share() -> int:
    """This process's share of the CPUs: those it may run on (its affinity and its cgroup's quota, which
    os.cpu_count ignores) divided among the run's processes on this machine (COMP_GPU_PROCS)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, quota)
    raw = os.environ.get(GPU_PROCS_ENV, "1") or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(GPU_PROCS_ENV, f"must be a whole number of processes, at least 1, got {raw!r}")
    return max(1, cpus // int(raw))


def cgroup_cpus(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs a cgroup v2 quota allows (a container's --cpus), rounded up; None without a quota."""
    try:
        quota, period = open(path).read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, -(-int(quota) // int(period)))


def n_workers(workers: int | None = 0) -> int:
    """Resolve a worker count: 0 or None means this process's share of the CPUs."""
    return workers if workers is not None and workers > 0 else cpu_share()


def pmap(fn: Callable, items: Sequence, *args: Any, workers: int = 0, desc: str | None = None) -> list:
    """[fn(item, *args) for item in items], spread over processes, in order, with an optional progress bar."""
    from tqdm import tqdm

    call = partial(_apply, fn, args)
    n = n_workers(workers)
    bar = dict(total=len(items), desc=desc, leave=False, disable=desc is None)
    if n == 1 or len(items) < 2:
        return [call(it) for it in tqdm(items, **bar)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    global _CALL
    # Forked workers inherit the function and its fixed arguments (e.g. a LightGBM model): only the
    # items cross the pipe, instead of re-pickling the arguments with every task.
    _CALL = call
    # An executor, not multiprocessing.Pool: a worker killed by a signal or an abort (a crash in native code)
    # breaks the executor, which fails the call; a Pool replaces the worker and waits for its task forever.
    ex = ProcessPoolExecutor(min(n, len(items)), mp_context=mp.get_context("fork"), initializer=_single_thread)
    try:
        return list(tqdm(ex.map(_call_inherited, items, chunksize=max(1, len(items) // (8 * n))), **bar))
    except BrokenProcessPool:
        raise WorkerDied(f"a worker process of {getattr(fn, '__name__', 'a parallel step')} died (killed, out of memory, "
                         "or a crash in native code): the command stops instead of waiting for it") from None  # fmt: skip
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


_CALL: Callable | None = None


def _call_inherited(item: Any) -> Any:
    """Pool entry point: the call set up by pmap before the fork."""
    return _CALL(item)


def _single_thread() -> None:
    """Worker start: one intra-op thread, so forked workers never oversubscribe the cores (or hang in OpenMP)."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _apply(fn: Callable, args: tuple, item: Any) -> Any:
    """Pool entry point: fn(item, *args)."""
    return fn(item, *args)
