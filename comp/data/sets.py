"""Which data set a command runs on: --data, else the challenge data in data/raw/, else the embedded phantom."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comp.core.errors import UserError
from comp.core.log import LOG
from comp.data.contrast import calibration, rendered_as
from comp.data.dataset import Dataset
from comp.data.groups import fold_groups
from comp.data.phantom import generate, stamp

# The embedded default data set of `make cv` when no challenge data is present: small enough
# for a 2-core CPU, in the exact challenge layout.
EMBEDDED = {"n_train": 1000, "n_labelled": 200, "n_test": 100, "seed": 0}
RAW = Path("data/raw")
PHANTOM = Path("data/phantom")


def resolve_data(arg: str | None) -> Dataset:
    """The data set to use: --data, else data/raw/, else the embedded phantom (generated once per generator version)."""
    if arg:
        return Dataset(Path(arg))
    if (RAW / "Y_train.csv").is_file():
        return Dataset(RAW)

    have = PHANTOM / "PHANTOM.txt"
    LOG.info(f"no challenge data in {RAW}/: using the embedded phantom data set ({PHANTOM}/)")
    if not have.is_file() or have.read_text() != stamp(**EMBEDDED):
        generate(PHANTOM, **EMBEDDED)
    return Dataset(PHANTOM, name="phantom")


@dataclass
class Extra:
    """Annotated slices of other data sets, in the grey levels the main data set's methods read, for every
    training part (never scored): slices, instance maps, a group per slice and the sources' fingerprints."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    sources: list[dict]


def extra_sources(dirs: list[str], data: Dataset, where: str = "cv.extra") -> list[Dataset]:
    """The extra data folders, checked before anything is written: each a data set with annotated slices, none the
    main data set itself or named twice."""
    seen, out = {data.root.resolve()}, []
    for d in dirs:
        ds = Dataset(Path(d))
        if ds.root.resolve() in seen:
            what = "the data set being cross-validated" if ds.root.resolve() == data.root.resolve() else "named twice"
            raise UserError(where, f"extra data {d} is {what}: extra slices must come from other data sets")
        if len(ds.annotated) == 0:
            raise UserError(ds.root / "Y_train.csv", f"no annotated slice to add as extra training data ({where})")
        seen.add(ds.root.resolve())
        out.append(ds)
    return out


def labels_key(data: Dataset, dirs: list[str]) -> str:
    """The labels part of a run key: the data set's label fingerprint, with the extra data's folded in."""
    fp = data.fingerprint()["y_train"]
    if dirs:
        fp = hashlib.sha1((fp + "".join(Dataset(Path(d)).fingerprint()["y_train"] for d in dirs)).encode()).hexdigest()
    return fp[:6]


def extra_data(dirs: list[str], data: Dataset, per_slice="auto", where: str = "cv.extra", say=LOG.info) -> Extra | None:
    """The extra data sets' annotated slices, each calibrated on its own slices and re-rendered in the grey levels of
    `data` as its contrast step reads them (label-free: pixels only); None without extra data."""

    if not dirs:
        return None
    quiet = lambda *_: None  # noqa: E731
    to = calibration(data.x_train, per_slice, str(data.root), quiet)[1]
    xs, ys, gs, fps = [], [], [], []
    for k, ds in enumerate(extra_sources(dirs, data, where)):
        ann = ds.annotated
        ps, cal = calibration(ds.x_train, per_slice, str(ds.root), quiet)
        xs.append(rendered_as(ds.x_train[ann], ps, cal, to))
        ys.append(ds.y_train[ann])
        g = fold_groups("auto", ds, quiet)
        gs.append(np.array([f"extra{k}:{v}" for v in (ann if g is None else g[ann])]))
        fps.append(ds.fingerprint())
        say(f"extra training data: {len(ann)} annotated slices of {ds.root} (in every training part, never scored)")
    return Extra(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), fps)
