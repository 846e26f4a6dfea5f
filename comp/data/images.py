"""Challenge slices: PNG folders or zips, image names, the .npy cache."""

from __future__ import annotations

import hashlib
import io as _io
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from comp.core.atomic import atomic_path, atomic_save_npy
from comp.core.errors import UserError
from comp.core.log import progress


SIZE = 512
N_PIXELS = SIZE * SIZE
PNG_NAME = re.compile(r"^(\d+)\.png$")


def default_row_labels(n: int = N_PIXELS) -> list[str]:
    """Row labels of the challenge CSVs: 'Pixel 0' ... 'Pixel n-1'."""
    return [f"Pixel {i}" for i in range(n)]


def image_names(n: int) -> list[str]:
    """Column names of the challenge CSVs: '0.png' ... 'n-1.png'."""
    return [f"{i}.png" for i in range(n)]


def _numbered(names: Sequence[str], where: Path) -> list[tuple[int, str]]:
    """Sort '<int>.png' names numerically and check the numbering has no gap."""
    found = []
    for name in names:
        m = PNG_NAME.match(Path(name).name)
        if m and not Path(name).name.startswith("."):
            found.append((int(m.group(1)), name))
    if not found:
        raise UserError(where, "no '<number>.png' images found")
    found.sort()
    numbers = [k for k, _ in found]
    if len(set(numbers)) != len(numbers):
        raise UserError(where, "two images share a number")
    missing = sorted(set(range(len(numbers))) - set(numbers))
    if missing or numbers[0] != 0:
        first = missing[0] if missing else 0
        raise UserError(where, f"gap in numbering: {first}.png is missing (expected 0.png ... {len(numbers) - 1}.png)")
    return found


def _decode_png(data: bytes, where: str) -> np.ndarray:
    """Decode one 8-bit grayscale 512x512 PNG, or raise a UserError naming it."""
    try:
        img = Image.open(_io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise UserError(where, f"not a readable image ({exc.__class__.__name__})") from None
    if img.mode not in ("L", "I", "I;16", "P", "1"):
        raise UserError(where, f"colour image (mode {img.mode}); expected 8-bit grayscale")
    if img.size != (SIZE, SIZE):
        raise UserError(where, f"wrong image size {img.size[0]}x{img.size[1]}; expected {SIZE}x{SIZE}")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise UserError(where, "pixel values outside 0..255; expected 8-bit grayscale")
        arr = arr.astype(np.uint8)
    return arr


def read_images_uncached(src: Path) -> np.ndarray:
    """Read every '<n>.png' of a folder or zip into a (N, 512, 512) uint8 array."""
    if src.is_dir():
        entries = _numbered([p.name for p in src.iterdir()], src)
        out = np.empty((len(entries), SIZE, SIZE), np.uint8)
        for i, (_, name) in enumerate(progress(entries, len(entries) < 200, desc=f"read {src.name}", leave=False)):
            out[i] = _decode_png((src / name).read_bytes(), str(src / name))
        return out
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(src, f"not a readable zip file ({exc})") from None
    with zf:
        entries = _numbered([n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n], src)
        out = np.empty((len(entries), SIZE, SIZE), np.uint8)
        for i, (_, name) in enumerate(progress(entries, len(entries) < 200, desc=f"read {src.name}", leave=False)):
            out[i] = _decode_png(zf.read(name), f"{src}:{name}")
        return out


def source_of(root: Path, stem: str) -> Path | None:
    """The folder `stem/` or the archive `stem.zip` under root, whichever exists."""
    for cand in (root / stem, root / f"{stem}.zip"):
        if cand.exists():
            return cand
    return None


def count_images(root: Path, stem: str) -> int:
    """Number of '<n>.png' slices in root/stem/ or root/stem.zip (numbering checked, nothing decoded)."""
    src = source_of(Path(root), stem)
    if src is None:
        raise UserError(root, f"no {stem}/ folder or {stem}.zip")
    if src.is_dir():
        return len(_numbered([p.name for p in src.iterdir()], src))
    try:
        with zipfile.ZipFile(src) as zf:
            return len(_numbered([n for n in zf.namelist() if not n.endswith("/")], src))
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(src, f"not a readable zip file ({exc})") from None


def write_images(folder: str | os.PathLike, images: np.ndarray) -> None:
    """Write a (N, H, W) uint8 stack as '<i>.png' files (each written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        with atomic_path(folder / f"{i}.png", suffix=".png") as tmp:
            Image.fromarray(np.ascontiguousarray(img), mode="L").save(tmp, format="PNG", compress_level=1)


def folder_fingerprint(src: Path) -> str:
    """Hash of a file's or folder's path, names, sizes and mtimes: changes when the source does."""
    h = hashlib.sha1(str(src.resolve()).encode())
    paths = sorted(src.iterdir()) if src.is_dir() else [src]
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def pixels_digest(x: np.ndarray) -> str:
    """Hash of slices' pixels in order: what was predicted from them is reused only for the very same slices."""
    return hashlib.sha1(np.ascontiguousarray(x).data).hexdigest()[:16]


def cache_dir(data_root: Path) -> Path:
    """Where .npy caches of a data set live: $COMP_CACHE, else <data>/.cache."""
    env = os.environ.get("COMP_CACHE")
    return Path(env) if env else data_root / ".cache"


def cached_array(src: Path, cache: Path, name: str, load: Callable[[Path], np.ndarray]) -> np.ndarray:
    """Load `src` through an .npy cache that is invalidated when the source changes.

    Entries are named by the source's path, then its contents, so data sets sharing one $COMP_CACHE keep their own
    caches, and only this source's older entries are stale."""
    source = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]
    target = cache / f"{name}-{source}-{folder_fingerprint(src)}.npy"
    try:
        return np.load(target, mmap_mode=None)
    except FileNotFoundError:
        pass
    arr = load(src)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        legacy = cache.glob(f"{name}-{'?' * 16}.npy")  # named by contents alone, before the source's path came first
        for stale in [*cache.glob(f"{name}-{source}-*.npy"), *legacy]:
            if stale != target:  # another process may have just written this one
                stale.unlink(missing_ok=True)
        atomic_save_npy(target, arr)
    except OSError:
        pass  # a read-only data folder still loads, just without a cache
    return arr


