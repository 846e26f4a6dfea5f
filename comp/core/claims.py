"""Claims on files shared by processes and machines (NFS-safe): a CV fold being trained, a run's critical sections.

A claim holds pid@host and is touched every minute; a claim of a dead process of this host, or one nobody
touched for STALE_S, is taken over.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from comp.core.errors import UserError


def _alive(pid: int) -> bool:
    """Whether a process of this machine still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


STALE_S = 600.0  # a claim not touched for this long is abandoned (its holder beats every HEARTBEAT_S)
HEARTBEAT_S = 60.0


def me() -> str:
    """pid@host of this process: what a claim (or a running tuning trial) records of its holder."""
    return f"{os.getpid()}@{socket.gethostname()}"


def dead_here(holder: str) -> bool:
    """Whether pid@host names a process of this host that no longer exists."""
    pid, _, host = holder.partition("@")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def _stale(path: Path, holder: str) -> bool:
    """A claim left by a dead process of this host, or one whose holder (on any host) stopped touching it."""
    if dead_here(holder):
        return True
    try:
        return time.time() - path.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return True


def _take(path: Path) -> str | None:
    """Create `path` holding pid@host (None), or return its holder's pid@host when someone else holds it.

    The claim is written to a temp file and hard-linked into place (atomic, and exclusive on NFS too), so a claim
    file is never seen empty: an empty one is junk (a crash of an older version, a `touch`) and is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.write(fd, me().encode())
            os.close(fd)
            os.link(tmp, path)
            return None
        except FileExistsError:
            try:
                holder = path.read_text().strip()
            except FileNotFoundError:
                continue  # released meanwhile
            if holder and not _stale(path, holder):
                return holder
            path.unlink(missing_ok=True)  # left by a process that died (kill -9, a lost machine), or empty: take it over
        finally:
            os.unlink(tmp)
    return "?"


@contextlib.contextmanager
def claim(path: Path, wait_s: float = 0.0) -> Iterator[str | None]:
    """Hold `path` for the block, touched every minute so other machines see it is alive (works on NFS).

    Yields None when held, else the holder's pid@host (after waiting up to `wait_s` for it to go)."""
    deadline = time.time() + wait_s
    while (holder := _take(path)) is not None and time.time() < deadline:
        time.sleep(0.5)
    if holder is not None:
        yield holder
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)

    threading.Thread(target=beat, daemon=True).start()
    try:
        yield None
    finally:
        stop.set()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(path: Path):
    """The run's short critical sections (choosing its folder, summarising): wait a little, then one clear error."""
    with claim(path, float(os.environ.get("COMP_LOCK_WAIT", "120"))) as holder:
        if holder is not None:
            raise UserError(path, f"this run is locked by process {holder}; wait for it (or delete this file if that process is gone)")
        yield
