"""Pseudo-labelling: a teacher run's fold models label the unlabelled training slices for a student.

Fold discipline: the student of fold k trains on labels made by the teacher's fold-k model only, which
was trained on the other folds' annotations; the teacher's folds must be the student's (checked on
folds.csv). A fit on every annotated slice (`submit`) uses the mean maps of all the teacher's fold models.
The most confident slices are kept: confidence = 1 - (pixels of uncertain foreground, 0.2 < p < 0.8)
/ (pixels of predicted foreground), so blurred, hesitant predictions are left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from comp.core.atomic import atomic_path
from comp.core.errors import UserError
from comp.core.log import LOG
from comp.methods.base import FoldData
from comp.pipeline.config import PseudoParams
from comp.pipeline.workspace import RunDir

FG = 0  # the foreground probability channel of the cached maps (comp.nets.models.FG; models imports torch)


def confidence(fg: np.ndarray) -> float:
    """How sure a foreground probability map is: 1 - uncertain pixels / predicted-foreground pixels (0 if none)."""
    fg = np.asarray(fg, np.float32)
    predicted = int((fg > 0.5).sum())
    if predicted == 0:
        return 0.0
    return max(0.0, 1.0 - float(((fg > 0.2) & (fg < 0.8)).sum()) / predicted)


def check_folds(teacher: RunDir, ann: np.ndarray, fold_of: np.ndarray) -> None:
    """The teacher's folds must be the student's: otherwise its fold-k model saw some of fold k's annotations."""
    ids, folds = teacher.folds()
    order = np.argsort(ids)
    want = np.argsort(ann)
    if not (np.array_equal(ids[order], ann[want]) and np.array_equal(folds[order], fold_of[want])):
        raise UserError(teacher.folds_file, "the teacher run's folds differ from this run's (other fold count, seed or "
                        "data): its fold models saw annotations of the student's held-out folds")  # fmt: skip


def pseudo_labels(teacher: RunDir, fold: int | None, x_train: np.ndarray, unlabelled: np.ndarray, p: PseudoParams) -> FoldData:
    """Unlabelled slices labelled by the teacher's fold-`fold` model (None: every fold model), the most confident kept.

    Cached in the teacher's run folder (written atomically), so students sharing a teacher label once."""
    path = teacher.pseudo_file(fold, p.tag(len(x_train)))
    which = "all" if fold is None else fold
    if path.is_file():
        with np.load(path) as z:
            ids, labels = z["ids"], z["labels"]
        LOG.info(f"pseudo-labels: {len(ids)} slices from {teacher.label} (fold {which}; cached)")
        return FoldData(x_train[ids], labels, ids)
    folds = range(teacher.n_folds) if fold is None else [fold]
    models = [teacher.fold_model(f) for f in folds]
    conf = np.zeros(len(unlabelled))
    for c0 in range(0, len(unlabelled), p.chunk):
        ids = unlabelled[c0 : c0 + p.chunk]
        fg = np.mean([m.predict_maps(x_train[ids])[:, FG].astype(np.float32) for m in models], axis=0)
        conf[c0 : c0 + len(ids)] = [confidence(f) for f in fg]
    order = np.argsort(-conf, kind="stable")
    order = order[conf[order] >= p.min_confidence] if p.min_confidence > 0 else order[conf[order] > 0]
    keep = np.sort(unlabelled[order[: p.images] if p.images > 0 else order])
    labels = np.zeros((len(keep), *x_train.shape[1:]), np.uint8)
    for c0 in range(0, len(keep), p.chunk):
        ids = keep[c0 : c0 + p.chunk]
        maps = np.mean([m.predict_maps(x_train[ids]).astype(np.float32) for m in models], axis=0)
        labels[c0 : c0 + len(ids)] = models[0].postprocess_maps(maps)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, ids=keep, labels=labels, confidence=conf, params=json.dumps(asdict(p)))
    kept = conf[np.isin(unlabelled, keep)]
    LOG.info(f"pseudo-labels: {len(keep)} of {len(unlabelled)} unlabelled slices from {teacher.label} (fold "
          f"{which}; confidence {kept.min() if len(kept) else 0:.3f}..{kept.max() if len(kept) else 0:.3f})")  # fmt: skip
    return FoldData(x_train[keep], labels, keep)
