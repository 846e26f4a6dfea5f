"""What a method sees and implements: a fold's data, its fit context, the inner validation split, the method protocols."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from comp.core.errors import UserError
from comp.data.contrast import Contrast


@dataclass
class FoldData:
    """Images with their instance maps and their indices in X_train."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    groups: np.ndarray | None = None  # group (e.g. CT volume) of each image, when the data set ships groups.csv
    # Unlabelled training slices pseudo-labelled by a teacher that never saw the scored fold's annotations.
    pseudo: "FoldData | None" = None

    def with_extra(self, extra) -> "FoldData":
        """These slices and the extra data's (`comp.data.sets.Extra`, None: as they are): extra slices get ids -1, -2,
        ... (they are in no X_train) and, where ours have groups, groups of their own (`extra<k>:...`)."""
        if extra is None:
            return self
        ids = np.concatenate([self.ids, -1 - np.arange(len(extra.x))])
        groups = None if self.groups is None else np.concatenate([self.groups.astype(str), extra.groups])
        return FoldData(np.concatenate([self.x, extra.x]), np.concatenate([self.y, extra.y]), ids, groups, self.pseudo)


@dataclass
class FitContext:
    """What a method may use while fitting one fold, besides its training images."""

    workdir: Path
    fold: int
    seed: int
    contrast: Contrast = Contrast()  # the experiment's contrast step, resolved on this data set
    folds_left: int = 0  # folds this process fits after this one (for a whole-run ETA)


def inner_split(n: int, n_val: int, seed: int, where: str = "params.val_images",
                groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(fit, validation) indices of n training images: about n_val held out at random (seeded), in order.

    With `groups` (e.g. the CT volume of each slice) whole groups are held out, so a selection made on the
    validation images is not flattered by near-copies of them in the fitting part.
    """
    if n_val <= 0:
        return np.arange(n), np.arange(0)
    if n_val >= n:
        raise UserError(where, f"{n_val} validation images but the fold has only {n} training images")
    rng = np.random.default_rng(seed)
    if groups is None or len(np.unique(groups)) < 2:
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    uniq = np.unique(groups)
    held: list = []
    for g in rng.permutation(uniq)[:-1]:  # at least one group stays for fitting
        if np.isin(groups, held).sum() >= n_val:
            break
        held.append(g)
    val = np.isin(groups, held)
    return np.flatnonzero(~val), np.flatnonzero(val)


class Method(Protocol):
    """A segmentation method: fit on annotated slices, predict uint8 instance maps."""

    def fit(self, train: FoldData, ctx: FitContext) -> None:
        """Fit on one fold's training images (no-op for fixed pipelines)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predict (N, 512, 512) uint8 instance maps for (N, 512, 512) uint8 slices."""


@runtime_checkable
class MapMethod(Protocol):
    """A method whose network maps are worth caching: CV stores its OOF and test maps, ensembles and tuning reuse them."""

    def fit(self, train: FoldData, ctx: FitContext) -> None:
        """Fit on one fold's training images."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Slices -> uint8 instance maps (predict_maps, then postprocess_maps)."""

    def predict_maps(self, x: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N, 512, 512) slices -> (N, C, r, r) float16 maps."""

    def postprocess_maps(self, maps: np.ndarray) -> np.ndarray:
        """(N, C, r, r) maps -> (N, 512, 512) uint8 instance maps."""

    def load(self, workdir: Path, contrast: Contrast) -> None:
        """A trained fold from its folder, behind the run's resolved contrast, instead of fitting."""
