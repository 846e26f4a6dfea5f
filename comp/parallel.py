"""Process-parallel map over slices (post-processing is CPU-bound and holds the GIL)."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Sequence


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

    global _CALL
    # Forked workers inherit the function and its fixed arguments (e.g. a LightGBM model): only the
    # items cross the pipe, instead of re-pickling the arguments with every task.
    _CALL = call
    ctx = mp.get_context("fork")
    with ctx.Pool(min(n, len(items)), initializer=_single_thread) as pool:
        return list(tqdm(pool.imap(_call_inherited, items, chunksize=max(1, len(items) // (8 * n))), **bar))


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
