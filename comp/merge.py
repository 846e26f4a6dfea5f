"""LightGBM region merging: score each pair of adjacent predicted regions, merge greedily above a threshold.

Features describe the shared border (length, boundary/foreground/distance maps along it), the two regions
(sizes, intensity, mean maps) and their mean-embedding distance. The label of a pair is 1 when both regions
lie mostly inside the same true structure. Models are trained with fold discipline: the model that merges
fold k's regions never saw fold k; the model for the test set saw every fold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comp.errors import UserError, atomic_write_text
from comp.parallel import pmap
from comp.postprocess import PostParams, adjacent_pairs, blend, merge_pairs, relabel_uint8, segment, upsample_maps

FEATURES = (
    "log_border", "border_boundary", "border_fg", "border_dist", "contact",
    "log_area_min", "log_area_max", "fg_min", "dist_max_min", "emb_dist",
    "int_diff", "int_mean", "int_std_max",
)  # fmt: skip
LGB_PARAMS = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 10,
    "feature_fraction": 0.9, "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
    "verbose": -1, "deterministic": True, "force_row_wise": True, "seed": 0, "num_threads": 1,
}  # fmt: skip
ROUNDS = 150


def _region_stats(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region mean and standard deviation of `values` (index = region id)."""
    n = int(labels.max()) + 1
    flat, v = labels.ravel(), values.ravel().astype(np.float64)
    cnt = np.maximum(np.bincount(flat, minlength=n), 1)
    mean = np.bincount(flat, weights=v, minlength=n) / cnt
    var = np.bincount(flat, weights=v * v, minlength=n) / cnt - mean**2
    return mean, np.sqrt(np.maximum(var, 0))


def pair_features(labels: np.ndarray, maps512: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adjacent region pairs (a < b) of a 512x512 label map and their feature rows (columns = FEATURES)."""
    fg, bnd, dist = maps512[0], maps512[1], maps512[2]
    pairs, length, bsum = adjacent_pairs(labels, bnd)
    if len(pairs) == 0:
        return pairs, np.zeros((0, len(FEATURES)), np.float32)
    fsum = adjacent_pairs(labels, fg)[2]
    dsum = adjacent_pairs(labels, dist)[2]
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    imean, istd = _region_stats(labels, image)
    fmean = _region_stats(labels, fg)[0]
    dmean = _region_stats(labels, dist)[0]
    a, b = pairs[:, 0], pairs[:, 1]
    if maps512.shape[0] > 3:
        emb = np.stack([_region_stats(labels, e)[0] for e in maps512[3:]], 1)
        emb_dist = np.linalg.norm(emb[a] - emb[b], axis=1)
    else:
        emb_dist = np.full(len(pairs), np.nan)
    amin, amax = np.minimum(area[a], area[b]), np.maximum(area[a], area[b])
    x = np.stack(
        [
            np.log1p(length), bsum / length, fsum / length, dsum / length, length / np.sqrt(np.maximum(amin, 1)),
            np.log1p(amin), np.log1p(amax), np.minimum(fmean[a], fmean[b]), np.minimum(dmean[a], dmean[b]),
            emb_dist, np.abs(imean[a] - imean[b]) / 255, (imean[a] + imean[b]) / 510, np.maximum(istd[a], istd[b]) / 255,
        ],
        1,
    )  # fmt: skip
    return pairs, x.astype(np.float32)


def pair_targets(labels: np.ndarray, truth: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """1 where both regions of a pair lie mostly (>50%) inside the same annotated structure, else 0."""
    n = int(labels.max()) + 1
    table = np.bincount(labels.ravel().astype(np.int64) * 256 + truth.ravel(), minlength=n * 256).reshape(n, 256)
    major = table.argmax(1)
    share = table.max(1) / np.maximum(table.sum(1), 1)
    a, b = pairs[:, 0], pairs[:, 1]
    return ((major[a] == major[b]) & (major[a] > 0) & (share[a] > 0.5) & (share[b] > 0.5)).astype(np.int8)


@dataclass
class Merger:
    """Pair classifiers (key: fold whose regions a model may merge; -1: the test set) and the merge threshold."""

    models: dict[int, object] = field(default_factory=dict)  # Booster, its model text, or a constant
    threshold: float = 0.5
    max_rounds: int = 4

    def probabilities(self, x: np.ndarray, fold: int = -1) -> np.ndarray:
        """Merge probability of each feature row, by the model allowed to see `fold`."""
        model = self.models.get(fold)
        if model is None or len(x) == 0:
            return np.zeros(len(x))
        if isinstance(model, str):  # loaded lazily, in the process that predicts (see load_merger)
            import lightgbm as lgb

            model = self.models[fold] = lgb.Booster(model_str=model)
        return model.predict(x, num_threads=1) if hasattr(model, "predict") else np.full(len(x), float(model))

    def apply(self, labels: np.ndarray, maps: np.ndarray, image: np.ndarray, fold: int = -1) -> np.ndarray:
        """Greedily merge the most probable non-overlapping pairs above the threshold, re-scoring after each round."""
        maps512 = upsample_maps(maps, labels.shape[0])
        lab = labels.astype(np.int64)
        for _ in range(self.max_rounds):
            pairs, x = pair_features(lab, maps512, image)
            p = self.probabilities(x, fold)
            chosen, used = [], set()
            for j in np.argsort(-p, kind="stable"):
                if p[j] < self.threshold:
                    break
                a, b = int(pairs[j, 0]), int(pairs[j, 1])
                if a not in used and b not in used:
                    chosen.append((a, b))
                    used.update((a, b))
            if not chosen:
                break
            lab = merge_pairs(lab, np.array(chosen))
        return relabel_uint8(lab)


def train_classifier(x: np.ndarray, y: np.ndarray):
    """A LightGBM pair classifier, or a constant where the rows hold a single class."""
    import lightgbm as lgb

    if len(y) == 0 or y.min() == y.max():
        return float(y[0]) if len(y) else 0.0
    return lgb.train(LGB_PARAMS, lgb.Dataset(x, y.astype(np.float32)), num_boost_round=ROUNDS)


def fit_fold_mergers(x: np.ndarray, y: np.ndarray, folds: np.ndarray, threshold: float = 0.5) -> Merger:
    """One classifier per fold trained on the other folds' pairs, and one (-1) on every pair."""
    models = {int(k): train_classifier(x[folds != k], y[folds != k]) for k in np.unique(folds)}
    models[-1] = train_classifier(x, y)
    return Merger(models, threshold)


def _model_text(model) -> str:
    """A classifier as text: LightGBM's model string, or `constant p`."""
    if isinstance(model, str):
        return model
    return model.model_to_string() if hasattr(model, "model_to_string") else f"constant {float(model or 0.0)}\n"


def save_merger(merger: Merger, path: Path) -> None:
    """Store every classifier (each fold's and the test set's) and the threshold as text, atomically."""
    parts = [f"# threshold {merger.threshold}\n"]
    parts += [f"# model {k}\n{_model_text(m)}" for k, m in sorted(merger.models.items())]
    atomic_write_text(path, "".join(parts))


def load_merger(path: Path) -> Merger:
    """Load a merger written by save_merger."""
    if not path.is_file():
        raise UserError(path, "merge model not found (run `comp tune` again)")
    head, _, rest = path.read_text().partition("\n")
    if not head.startswith("# threshold "):
        raise UserError(path, "not a merge model written by comp")
    chunks = re.split(r"^# model (-?\d+)\n", rest, flags=re.M)
    if len(chunks) == 1:  # the first format: the test-set classifier only, right after the threshold line
        chunks = ["", "-1", rest]
    # The boosters are built from their text on first use: parsing them here would start LightGBM's OpenMP
    # threads in the parent, and OpenMP then hangs in the forked post-processing workers.
    models = {int(k): float(body.split()[1]) if body.startswith("constant ") else body for k, body in zip(chunks[1::2], chunks[2::2])}
    return Merger(models, float(head.split()[2]))


def _pair_rows(i: int, oof, weights: list[float], post: PostParams) -> tuple[np.ndarray, np.ndarray]:
    """Merge-classifier rows (features, targets) of OOF image i (an ensemble.OOF's)."""
    maps, image, truth, _ = oof.item(i, range(len(oof.members)))
    m = upsample_maps(blend(maps, weights), image.shape[-1])  # once: segment() keeps maps already at full size
    labels = segment(m, image, post)
    pairs, x = pair_features(labels, m, image)
    return x, pair_targets(labels, truth, pairs)


def fit_merging(oof, weights: list[float], post: PostParams, workers: int = 0) -> Merger:
    """Fold-disciplined pair classifiers trained on the OOF regions (an ensemble.OOF) of the tuned post-processing."""
    rows = pmap(_pair_rows, list(range(len(oof.images))), oof, weights, post, workers=workers, desc="merge features")
    x = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    folds = np.concatenate([np.full(len(r[1]), f) for r, f in zip(rows, oof.folds)])
    print(f"merge classifier: {len(y)} region pairs, {int(y.sum())} to merge", flush=True)
    return fit_fold_mergers(x, y, folds)
