"""Atomic file output (temp file + rename) and staged folders, so a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from comp.core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, force: bool = False, replaces: str = "") -> Iterator[Path]:
    """Yield a hidden folder beside `out` to write a whole data set into; it becomes `out` only if the block succeeds.

    A non-empty `out` is refused unless `force`, or unless it holds the marker file `replaces` (an earlier output
    of the same builder): old files never mix with new ones, and the challenge's own data is never overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force and not (replaces and (out / replaces).is_file()):
        raise UserError(out, "is not empty (a data set is there?): choose an empty or new --out, or add --force to replace it whole")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        yield stage
        old = out.with_name(f".{out.name}.old-{stage.name.rsplit('-', 1)[-1]}")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete temp files that `atomic_path` left beside `path` when a kill -9 stopped it (its `finally` never ran).

    Only for a writer that holds the file alone (a claimed fold's checkpoints): another writer's temp would go too."""
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_npy(path: str | os.PathLike, arr) -> None:
    """np.save to `path` atomically."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def writable_dir(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` if needed and prove it takes a file, before any long work writes there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(folder, f"cannot write the {what} there ({exc.strerror or exc.__class__.__name__})") from None
    return folder
