"""Learned instance segmentation: a U-Net's maps + the watershed post-processor, as a CV/submit method."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.fields import bounded
from comp.core.metric import image_scores
from comp.core.parallel import pmap
from comp.core.runtime import seed_everything
from comp.core.store import FoldDir
from comp.data.contrast import Contrast
from comp.methods.base import FitContext, FoldData, inner_split
from comp.methods.registry import register_method
from comp.nets.infer import predict_maps
from comp.nets.models import ModelConfig, build_model
from comp.nets.targets import PostParams, channels_used, instances_from_maps, resize_labels
from comp.nets.train import TrainConfig, train_fold


@dataclass
class LearnedParams:
    """A learned method: network, training, post-processing, test-time augmentation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    post: PostParams = field(default_factory=PostParams)
    tta: bool = False
    # An inner validation split of this many of the fold's *training* images picks the best epoch (never the
    # scored fold's images); 0 = a fixed schedule: train on every training image and keep the last epoch.
    val_images: int = bounded(0, lo=0)
    workers: int = bounded(0, lo=0)  # processes for post-processing (0 = all cores)


@register_method("unet", LearnedParams, pseudo=True)
class LearnedInstances:
    """Train per fold, predict maps, post-process them into instances."""

    def __init__(self, params: LearnedParams) -> None:
        self.p = params
        self.model = None
        self.contrast = Contrast()

    def fit(self, train: FoldData, ctx: FitContext) -> None:
        """Train a fresh network on the fold (and its pseudo-labelled slices, if any): the last epoch, or the best on
        an inner split of the annotated training images."""
        self.contrast = ctx.contrast
        seed_everything(ctx.seed)  # before the build: a fold's initial weights depend on its seed only
        self.model = build_model(self.p.model, self.contrast.stem_windows())
        fit_idx, val_idx = inner_split(len(train.x), self.p.val_images, ctx.seed, groups=train.groups)
        x = self.contrast.canonical(train.x)  # every slice in the same HU units, whatever its own window
        validate = None
        if len(val_idx):
            vx, vy = train.x[val_idx], train.y[val_idx]
            validate = lambda model: self._quick_score(vx, vy)  # noqa: E731
        extra = None if train.pseudo is None else (self.contrast.canonical(train.pseudo.x), train.pseudo.y)
        info = train_fold(self.model, x[fit_idx], train.y[fit_idx], self.p.train, ctx.workdir, ctx.seed, validate,
                          self.contrast.unit_affine(), ctx.folds_left, extra)  # fmt: skip
        atomic_write_text(FoldDir(ctx.workdir).history, json.dumps(info["history"], indent=1))
        self.fitted = {"best_val_ari": info["best_val_ari"], "epochs": len(info["history"]), "val_ids": train.ids[val_idx].tolist()}

    def load(self, workdir: Path, contrast: Contrast = Contrast()) -> None:
        """Load a trained fold (workdir/best.pt) and the run's resolved contrast; no pretraining checkpoint is needed."""
        import torch

        path = FoldDir(Path(workdir)).best
        if not path.is_file():
            raise UserError(path, "fold checkpoint not found (is the CV run finished?)")
        self.contrast = contrast
        self.model = build_model(dataclasses.replace(self.p.model, encoder_weights="none"), contrast.stem_windows())
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])

    def _quick_score(self, x: np.ndarray, y: np.ndarray) -> float:
        """Validation ARI at working resolution (cheap enough to run every epoch)."""
        res = self.p.train.resolution
        maps = self._read_channels(self.predict_maps(x, tta=False))
        pred = np.stack(pmap(instances_from_maps, maps, self.p.post, res, workers=self.p.workers))  # forked workers
        truth = np.stack([resize_labels(t, res) for t in y])
        return float(image_scores(truth, pred).mean())

    def predict_maps(self, x: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """(N, 512, 512) slices -> (N, C, r, r) float16 maps."""

        tta = self.p.tta if tta is None else tta
        return predict_maps(self.model, self.contrast.canonical(x), self.p.train.resolution, tta=tta, affine=self.contrast.unit_affine(), amp=self.p.train.amp)

    def postprocess_maps(self, maps: np.ndarray) -> np.ndarray:
        """(N, C, r, r) maps -> (N, 512, 512) uint8 instance maps."""
        return np.stack(pmap(instances_from_maps, self._read_channels(maps), self.p.post, workers=self.p.workers, desc="post-process"))

    def _read_channels(self, maps):
        """The maps cut to the channels the post-processor reads (only those cross to the workers); cached maps
        (a MapArray) stay lazy."""
        keep = channels_used(self.p.post, maps.shape[1])
        return maps.first_channels(keep) if hasattr(maps, "first_channels") else maps[:, :keep]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Slices -> uint8 instance maps."""
        return self.postprocess_maps(self.predict_maps(x))
