"""A challenge data set on disk: training and test slices, labels, windows and groups."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.data.images import (cache_dir, cached_array, default_row_labels, folder_fingerprint, image_names,
                              pixels_digest, read_images_uncached, source_of)
from comp.data.labels import GROUPS_CSV, per_image_table, read_label_csv


@dataclass
class Dataset:
    """A data set in the challenge layout: X_train/, Y_train.csv, X_test/ (folders or zips), optional Y_test.csv."""

    root: Path
    name: str = ""
    _meta: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise UserError(self.root, "data folder not found")
        if not self.name:
            self.name = self.root.name
        if source_of(self.root, "X_train") is None:
            raise UserError(self.root, "no X_train/ folder or X_train.zip")
        if not (self.root / "Y_train.csv").is_file():
            raise UserError(self.root / "Y_train.csv", "file not found")

    def _images(self, stem: str) -> np.ndarray:
        """Images of a split, through the cache."""
        src = source_of(self.root, stem)
        if src is None:
            raise UserError(self.root, f"no {stem}/ folder or {stem}.zip")
        return cached_array(src, cache_dir(self.root), stem, read_images_uncached)

    def _labels(self, name: str, n_images: int) -> np.ndarray:
        """Label maps from a CSV, through the cache, checked against the image count."""
        path = self.root / name
        stem = name[:-4]

        def load(p: Path) -> np.ndarray:
            table = read_label_csv(p)
            if table.row_labels is not None:
                atomic_write_text(cache_dir(self.root) / f"{stem}-rowlabels.json", json.dumps(table.row_labels))
            return table.maps

        maps = cached_array(path, cache_dir(self.root), stem, load)
        if len(maps) != n_images:
            split = stem.replace("Y_", "X_")
            which = f"column '{n_images}.png' and after have no image" if len(maps) > n_images else f"no column for {len(maps)}.png and after"
            raise UserError(path, f"{len(maps)} image columns but {n_images} images in {split}: {which}")
        return maps

    @cached_property
    def x_train(self) -> np.ndarray:
        """Training slices, (N, 512, 512) uint8."""
        return self._images("X_train")

    @cached_property
    def y_train(self) -> np.ndarray:
        """Training instance maps, (N, 512, 512) uint8; all-zero for unlabelled slices."""
        return self._labels("Y_train.csv", len(self.x_train))

    @cached_property
    def x_test(self) -> np.ndarray:
        """Test slices, (T, 512, 512) uint8."""
        return self._images("X_test")

    @property
    def has_test_images(self) -> bool:
        """Whether X_test/ or X_test.zip is present."""
        return source_of(self.root, "X_test") is not None

    @property
    def has_test_labels(self) -> bool:
        """Whether Y_test.csv is present (phantom and proxy data sets)."""
        return (self.root / "Y_test.csv").is_file()

    @cached_property
    def y_test(self) -> np.ndarray:
        """Test instance maps where the data set ships them."""
        return self._labels("Y_test.csv", len(self.x_test))

    @cached_property
    def annotated(self) -> np.ndarray:
        """Indices of training slices that carry at least one annotated pixel."""
        return np.flatnonzero(self.y_train.reshape(len(self.y_train), -1).any(axis=1))

    @cached_property
    def unlabelled(self) -> np.ndarray:
        """Indices of training slices with no annotation."""
        return np.setdiff1d(np.arange(len(self.x_train)), self.annotated)

    def row_labels(self) -> list[str]:
        """Row labels of Y_train.csv, so a submission mirrors them."""
        self.y_train  # noqa: B018 - reading the CSV records custom labels
        custom = cache_dir(self.root) / "Y_train-rowlabels.json"
        if custom.exists() and custom.stat().st_mtime >= (self.root / "Y_train.csv").stat().st_mtime:
            return json.loads(custom.read_text())
        return default_row_labels()

    @property
    def groups_file(self) -> Path:
        """groups.csv: each training slice's CV group (image, group[, volume, slice])."""
        return self.root / GROUPS_CSV

    def groups_table(self):
        """groups.csv's rows for X_train's slices, in their order (a DataFrame), or None without the file."""
        return per_image_table(self.groups_file, ("group",), image_names(len(self.x_train)), "group")

    def groups(self) -> np.ndarray | None:
        """Per-slice group ids (e.g. source volume) from groups.csv, if present."""
        df = self.groups_table()
        return None if df is None else df["group"].to_numpy(str)

    @cached_property
    def test_digest(self) -> str:
        """Hash of the test slices' pixels in order ("" without X_test): test predictions and cached test maps are keyed
        on it, so slices that change, are added or are swapped never meet predictions made for others."""
        if not self.has_test_images:
            return ""
        return pixels_digest(self.x_test)

    def fingerprint(self) -> dict:
        """What identifies this data set in a run record."""
        return {
            "name": self.name,
            "root": str(self.root.resolve()),
            "n_train": int(len(self.x_train)),
            "n_annotated": int(len(self.annotated)),
            "n_test": int(len(self.x_test)) if source_of(self.root, "X_test") else 0,
            "y_train": folder_fingerprint(self.root / "Y_train.csv"),
            "x_test": self.test_digest,
        }
