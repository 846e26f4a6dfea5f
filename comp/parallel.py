"""Process-parallel map over slices (post-processing is CPU-bound and holds the GIL)."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Sequence

from comp.errors import UserError


class WorkerDied(UserError):
    """A worker process ended without an answer: one line and exit code 2 (the CLI's), never a hang."""

    def __init__(self, problem: str) -> None:
        super().__init__("worker", problem)


def n_workers(workers: int = 0) -> int:
    """Resolve a worker count: 0 means every core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


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
