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

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.log import LOG
from comp.core.parallel import pmap
from comp.methods.baselines import SmoothWatershedParams, smooth_watershed
from comp.methods.compose import segment
from comp.nets.targets import PostParams, blend, upsample_maps
from comp.regions.graph import RegionGraph
from comp.regions.ops import relabel_uint8
from comp.regions.superpixels import Regions, gradient, superpixels

# relative to the slice's own borders (opt-in, `relative`): a border's gradient and intensity step as a share of the
# slice's median, and their rank among its borders; blur and contrast move the absolute values, not these
RELATIVE = ("rel_border_grad", "rank_border_grad", "rel_int_diff", "rank_int_diff")
# a fixed rule's vote (opt-in, `vote`): whether the smoothed watershed at its defaults puts both regions in one of its
# regions, and the smaller of their shares in it; a rule nothing was fitted on reads every patient alike
VOTE = ("vote_same", "vote_share")
FEATURES = (
    "log_border", "border_boundary", "border_fg", "border_dist", "contact",
    "log_area_min", "log_area_max", "fg_min", "dist_max_min", "emb_dist",
    "int_diff", "int_mean", "int_std_max",
    # image-only (added later: a stored model that knows fewer features reads only the first ones)
    "border_grad", "grad_in_max", "int_diff_rel", "border_grad_max", "border_grad_min",
    "pos_y", "pos_x", "pos_dy", "pos_dx", "raw_min", "raw_max",
    *RELATIVE, *VOTE,  # appended in this order: pair_features stacks its columns so
)  # fmt: skip
# What each feature reads, for measuring which carry to data a merger was not fitted on (scripts/feature_carry.py)
FEATURE_GROUPS = {
    "position": ("pos_y", "pos_x", "pos_dy", "pos_dx"),
    "shape": ("log_border", "contact"),
    "sizes": ("log_area_min", "log_area_max"),
    "levels": ("int_mean", "raw_min", "raw_max"),
    "steps": ("int_diff", "int_std_max"),
    "step_rel": ("int_diff_rel",),
    "gradients": ("border_grad", "grad_in_max", "border_grad_max", "border_grad_min"),
    "relative": RELATIVE,
    "maps": ("border_boundary", "border_fg", "border_dist", "fg_min", "dist_max_min", "emb_dist"),
    "vote": VOTE,
}
GRAD_SIGMA = 1.0  # smoothing of the intensity gradient the border features read
LGB_PARAMS = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 10,
    "feature_fraction": 0.9, "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
    "verbose": -1, "deterministic": True, "force_row_wise": True, "seed": 0, "num_threads": 1,
}  # fmt: skip
ROUNDS = 150


@dataclass(frozen=True)
class Calibration:
    """A monotone map from a classifier's merge probability to the share of such pairs that truly merge, fitted by
    isotonic regression on pairs the classifier did not train on (knots x -> y; none: the identity)."""

    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities; a millionth of the raw one breaks ties within a flat step, so the merge order
        among equals stays the classifier's."""
        return p if not self.x else np.interp(p, self.x, self.y) + 1e-6 * p

    HEADS = ("# calibration ", "# calibration-fold ")  # how its lines start: every fold's map, one fold's

    def text(self, fold: int | None = None) -> str:
        """One line for the merger file ('' for the identity); `fold`: the map of that fold's classifier alone."""
        head = self.HEADS[0] if fold is None else f"{self.HEADS[1]}{fold} "
        return f"{head}{','.join(map(repr, self.x))} {','.join(map(repr, self.y))}\n" if self.x else ""  # exact

    @classmethod
    def parse(cls, line: str) -> tuple[int | None, "Calibration"]:
        """The inverse of text (one line, without its newline): the fold it is for (None: every fold) and the map."""
        words = line.split()
        fold = int(words.pop(2)) if line.startswith(cls.HEADS[1]) else None
        _, _, xs, ys = words  # exactly these words: anything else is a malformed line
        return fold, cls(tuple(float(v) for v in xs.split(",")), tuple(float(v) for v in ys.split(",")))


def fit_calibration(p: np.ndarray, y: np.ndarray) -> Calibration:
    """Isotonic regression of merge targets on held-out probabilities; the identity where a class is missing."""
    from sklearn.isotonic import IsotonicRegression

    if len(y) == 0 or y.min() == y.max():
        return Calibration()
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return Calibration(tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_)))


def held_out_probabilities(x: np.ndarray, merger: "Merger", fold: int = -1) -> np.ndarray:
    """The raw probabilities of `merger`'s classifier (no calibration) on one image's rows (a pool job, so LightGBM is
    never parsed in a parent that forks later)."""
    return merger.probabilities(x, fold, calibrated=False)


def _mean_std(count: np.ndarray, total: np.ndarray, squares: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-region mean (and standard deviation, given the sum of squares) from pixel counts and sums."""
    cnt = np.maximum(count, 1)
    mean = total / cnt
    return mean, None if squares is None else np.sqrt(np.maximum(squares / cnt - mean**2, 0))


def _body_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box (y0, x0, y1, x1) of the body (pixels brighter than air): where positions are measured from."""
    body = np.argwhere(image > 10)
    (y0, x0), (y1, x1) = (body.min(0), body.max(0)) if len(body) else ((0, 0), image.shape)
    return int(y0), int(x0), int(y1), int(x1)


def _relative(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value as a share of the slice's median and as its rank among the slice's pairs (0..1)."""
    med = float(np.median(v)) if len(v) else 1.0
    rank = np.argsort(np.argsort(v, kind="stable"), kind="stable") / max(len(v) - 1, 1)
    return v / max(med, 1e-6), rank


def vote_regions(image: np.ndarray) -> np.ndarray:
    """The fixed rule whose regions vote (VOTE features): the smoothed watershed at its defaults, on the stretched slice."""
    return smooth_watershed(image, SmoothWatershedParams(fit_images=0))


def _majority_of(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per region id (a row of value counts): its most common value and the share of its pixels that value holds."""
    return table.argmax(1), table.max(1) / np.maximum(table.sum(1), 1)


class FeatureGraph:
    """What pair_features reads of one slice, summarised once per starting region (a RegionGraph): each merge round's
    pairs and features come from the merged regions' sums, with no further pass over the pixels.

    `maps512` None: no network maps (their columns are NaN, which LightGBM treats as missing); `raw`: the slice before
    its contrast step, when `image` is stretched (bone and fat, clipped there, stay apart); `vote`: the voting regions
    (vote_regions) of the slice, or None (the VOTE columns missing); `truth`: an instance map whose majority per region
    `majority` gives (training targets)."""

    def __init__(self, labels: np.ndarray, maps512: np.ndarray | None, image: np.ndarray, grad: np.ndarray | None = None,
                 raw: np.ndarray | None = None, vote: np.ndarray | None = None, truth: np.ndarray | None = None) -> None:  # fmt: skip
        grad = gradient(image, GRAD_SIGMA) if grad is None else grad
        v = np.asarray(image, np.float64)
        yy, xx = np.indices(labels.shape)
        named = {"int": v, "int2": v * v, "grad": grad, "y": yy, "x": xx}
        if raw is not None:
            named["raw"] = raw
        border = [grad]
        self.n_emb = 0 if maps512 is None else maps512.shape[0] - 3
        if maps512 is not None:  # border sums of the boundary, foreground and distance maps; region means of all but the boundary
            named.update({"fg": maps512[0], "dist": maps512[2], **{f"emb{j}": e for j, e in enumerate(maps512[3:])}})
            border += [maps512[1], maps512[0], maps512[2]]
        self.column = {k: j + 1 for j, k in enumerate(named)}  # column 0: pixel count
        self.hist = {k: j for j, k in enumerate(h for h, m in (("vote", vote), ("truth", truth)) if m is not None)}
        maps = [m for m in (vote, truth) if m is not None]
        self.graph = RegionGraph.read(labels, list(named.values()), border, maps)
        self.has_maps, self.has_raw, self.body = maps512 is not None, raw is not None, _body_box(image)

    def merge(self, pairs: np.ndarray) -> None:
        """Merge the current regions joined by `pairs` (transitively; a merged region keeps its smallest id)."""
        self.graph = self.graph.merge(pairs)

    def label_map(self) -> np.ndarray:
        """The current regions (int64, the starting label map's ids)."""
        return self.graph.label_map()

    def current_ids(self) -> np.ndarray:
        """The current region of each starting region id."""
        return self.graph.root

    def majority(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Per current region id: the most common id of the `which` map ('truth' or 'vote') and the share it holds."""
        return _majority_of(self.graph.region_hist(self.hist[which]))

    def features(self, relative: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Adjacent current region pairs (a < b) and their feature rows (columns = FEATURES); `relative` False leaves
        the RELATIVE columns missing (all-missing columns leave a model exactly as without them)."""
        e = self.graph.borders()
        pairs = e.pairs
        if len(pairs) == 0:
            return pairs, np.zeros((0, len(FEATURES)), np.float32)
        sums = self.graph.region_sums()
        col = lambda k: sums[:, self.column[k]]  # noqa: E731
        area = sums[:, 0]
        a, b = pairs[:, 0], pairs[:, 1]
        nan = np.full(len(pairs), np.nan)
        length, gsum, gmax, gmin = e.length, e.total[:, 0], e.high[:, 0], e.low[:, 0]
        imean, istd = _mean_std(area, col("int"), col("int2"))
        gmean = _mean_std(area, col("grad"))[0]
        if self.has_maps:
            bsum, fsum, dsum = e.total[:, 1], e.total[:, 2], e.total[:, 3]
            fmean, dmean = _mean_std(area, col("fg"))[0], _mean_std(area, col("dist"))[0]
            fg_min, dist_min = np.minimum(fmean[a], fmean[b]), np.minimum(dmean[a], dmean[b])
        else:
            bsum = fsum = dsum = fg_min = dist_min = nan
        if self.n_emb > 0:
            emb = np.stack([_mean_std(area, col(f"emb{j}"))[0] for j in range(self.n_emb)], 1)
            emb_dist = np.linalg.norm(emb[a] - emb[b], axis=1)
        else:
            emb_dist = nan
        amin, amax = np.minimum(area[a], area[b]), np.maximum(area[a], area[b])
        diff = np.abs(imean[a] - imean[b])
        y0, x0, y1, x1 = self.body
        cy = (_mean_std(area, col("y"))[0] - y0) / max(y1 - y0, 1)
        cx = (_mean_std(area, col("x"))[0] - x0) / max(x1 - x0, 1)
        if self.has_raw:
            rmean = _mean_std(area, col("raw"))[0]
            rmin, rmax = np.minimum(rmean[a], rmean[b]) / 255, np.maximum(rmean[a], rmean[b]) / 255
        else:
            rmin = rmax = nan
        x = np.stack(
            [
                np.log1p(length), bsum / length, fsum / length, dsum / length, length / np.sqrt(np.maximum(amin, 1)),
                np.log1p(amin), np.log1p(amax), fg_min, dist_min,
                emb_dist, diff / 255, (imean[a] + imean[b]) / 510, np.maximum(istd[a], istd[b]) / 255,
                gsum / length, np.maximum(gmean[a], gmean[b]), diff / (np.sqrt(istd[a] ** 2 + istd[b] ** 2) + 1.0), gmax, gmin,
                (cy[a] + cy[b]) / 2, (cx[a] + cx[b]) / 2, np.abs(cy[a] - cy[b]), np.abs(cx[a] - cx[b]), rmin, rmax,
                *(_relative(gsum / length) if relative else (nan, nan)), *(_relative(diff) if relative else (nan, nan)),
                *self._votes(pairs),
            ],
            1,
        )  # fmt: skip
        return pairs, x.astype(np.float32)

    def _votes(self, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """VOTE columns of the pairs: both regions mostly in one voting region (1/0), the smaller of their shares in theirs."""
        if "vote" not in self.hist:
            nan = np.full(len(pairs), np.nan)
            return nan, nan
        major, share = self.majority("vote")
        a, b = pairs[:, 0], pairs[:, 1]
        return ((major[a] == major[b]) & (major[a] > 0)).astype(np.float64), np.minimum(share[a], share[b])


def pair_features(labels: np.ndarray, maps512: np.ndarray | None, image: np.ndarray,
                  grad: np.ndarray | None = None, raw: np.ndarray | None = None, relative: bool = False,
                  vote: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Adjacent region pairs (a < b) of a 512x512 label map and their feature rows (columns = FEATURES); the
    arguments as FeatureGraph's."""
    return FeatureGraph(labels, maps512, image, grad, raw, vote).features(relative)


def majority(labels: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per region id: its most common true id (0 = unannotated) and the share of its pixels that id holds."""
    n = int(labels.max()) + 1
    return _majority_of(np.bincount(labels.ravel().astype(np.int64) * 256 + truth.ravel(), minlength=n * 256).reshape(n, 256))


def pair_targets(labels: np.ndarray, truth: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """1 where both regions of a pair lie mostly (>50%) inside the same annotated structure, else 0."""
    return _same_structure(*majority(labels, truth), pairs)


def _same_structure(major: np.ndarray, share: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """pair_targets from the regions' majority ids and shares."""
    a, b = pairs[:, 0], pairs[:, 1]
    return ((major[a] == major[b]) & (major[a] > 0) & (share[a] > 0.5) & (share[b] > 0.5)).astype(np.int8)


def matching(pairs: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Pairs taken in `order`, skipping any that touches a region already taken (one merge per region a round)."""
    chosen, used = [], set()
    for j in order:
        a, b = int(pairs[j, 0]), int(pairs[j, 1])
        if a not in used and b not in used:
            chosen.append((a, b))
            used.update((a, b))
    return np.array(chosen, np.int64).reshape(-1, 2)


def agglomeration_rows(labels: np.ndarray, maps512: np.ndarray | None, image: np.ndarray, truth: np.ndarray, rounds: int,
                       max_pairs: int, seed: int, raw: np.ndarray | None = None, relative: bool = False,
                       vote: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Training rows of one image for every stage of an agglomeration: pairs of the regions as given, then after
    each round of true merges (the regions a merger meets while it works), pairs of two unannotated regions left out.

    (Rows along a trained merger's own path instead, its mistakes included, scored no better on the proxy.)"""
    rng = np.random.default_rng(seed)
    votes = vote_regions(image) if vote else None
    graph, xs, ys = FeatureGraph(labels, maps512, image, None, raw, votes, truth), [], []
    for _ in range(rounds):
        pairs, x = graph.features(relative)
        if len(pairs) == 0:
            break
        major, share = graph.majority("truth")
        y = _same_structure(major, share, pairs)
        keep = np.flatnonzero((major[pairs[:, 0]] > 0) | (major[pairs[:, 1]] > 0))
        keep = rng.permutation(keep)[:max_pairs]
        xs.append(x[keep])
        ys.append(y[keep])
        order = rng.permutation(np.flatnonzero(y))
        if len(order) == 0:
            break
        graph.merge(matching(pairs, order))
    if not xs:
        return np.zeros((0, len(FEATURES)), np.float32), np.zeros(0, np.int8)
    return np.concatenate(xs), np.concatenate(ys)


def _parsed(model: object) -> object:
    """A stored classifier ready to predict: model text becomes a Booster (in the process that predicts, see
    load_merger), `constant p` a float."""
    if isinstance(model, str) and model.startswith("constant "):
        return float(model.split()[1])
    if isinstance(model, str):
        import lightgbm as lgb

        return lgb.Booster(model_str=model)
    return model


def _predict(model: object, x: np.ndarray) -> np.ndarray:
    """One parsed classifier's probability of each row."""
    if not hasattr(model, "predict"):
        return np.full(len(x), float(model))
    return model.predict(x[:, : model.num_feature()], num_threads=1)  # a model stored before later features


@dataclass
class Merger:
    """Pair classifiers (key: fold whose regions a model may merge; -1: the test set) and the merge threshold."""

    # Booster, its model text, or a constant; or a list of them (a bag: their probabilities averaged)
    models: dict[int, object] = field(default_factory=dict)
    threshold: float = 0.5
    max_rounds: int = 4
    drop: tuple[str, ...] = ()  # FEATURES the classifiers were trained without (missing values to LightGBM)
    # classifier: every round re-scores the pairs of the merged regions; average: a pair of merged regions scores the
    # border-length-weighted mean of its first-round (superpixel) pair probabilities (average linkage, as GASP), so a
    # few weak superpixel borders cannot keep two halves of an organ apart against many strong ones.
    linkage: str = "classifier"
    relative: bool = False  # the classifiers read the RELATIVE features (pair_features' `relative`)
    vote: bool = False  # ... and the VOTE features (the fixed smoothed watershed's regions)
    calibration: Calibration = field(default_factory=Calibration)  # applied to every model's probabilities ...
    # ... but a fold classifier's own map where it has one: fitted without that fold's pairs (fold_calibration), so the
    # images a fold model merges in CV never shaped the map it merges them with.
    fold_calibrations: dict[int, Calibration] = field(default_factory=dict)

    def probabilities(self, x: np.ndarray, fold: int = -1, calibrated: bool = True) -> np.ndarray:
        """Merge probability of each feature row, by the model allowed to see `fold` (calibrated unless told not to)."""
        if self.models.get(fold) is None or len(x) == 0:
            return np.zeros(len(x))
        p = self._raw(x, fold)
        return self.fold_calibrations.get(fold, self.calibration)(p) if calibrated else p

    def _raw(self, x: np.ndarray, fold: int) -> np.ndarray:
        """The classifier's own probability of each feature row (a bag of classifiers: their mean)."""
        model = self.models[fold]
        x = without(x, self.drop)
        if isinstance(model, list):  # parsed in place, each on first use
            model[:] = [_parsed(m) for m in model]
            return np.mean([_predict(m, x) for m in model], axis=0)
        model = self.models[fold] = _parsed(model)
        return _predict(model, x)

    def apply(self, labels: np.ndarray, maps: np.ndarray | None, image: np.ndarray, fold: int = -1,
              raw: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """Greedily merge the most probable non-overlapping pairs above the threshold, re-scoring after each round."""
        maps512 = upsample_maps(maps, labels.shape[0]) if maps is not None else None
        votes = vote_regions(image) if self.vote else None
        graph = FeatureGraph(labels, maps512, image, None, raw, votes)
        first = None
        for _ in range(self.max_rounds):
            pairs, x = graph.features(self.relative)
            if first is not None:  # average linkage: the first round's pair probabilities, pooled
                p = first.pooled(graph.current_ids(), pairs)
            else:
                p = self.probabilities(x, fold)
                if self.linkage == "average":
                    first = FirstEdges(pairs, p, np.expm1(x[:, FEATURES.index("log_border")]))
            above = np.flatnonzero(p >= self.threshold)
            if len(above) == 0:
                break
            graph.merge(matching(pairs, above[np.argsort(-p[above], kind="stable")]))
        return relabel_uint8(graph.label_map())


def without(x: np.ndarray, drop: tuple[str, ...] | list[str]) -> np.ndarray:
    """Feature rows with the `drop`ped FEATURES set missing (NaN): a classifier then learns nothing from them."""
    if not drop:
        return x
    x = np.array(x, np.float32, copy=True)
    x[:, [FEATURES.index(f) for f in drop]] = np.nan
    return x


def unknown_features(names: list[str]) -> list[str]:
    """The names that are not FEATURES."""
    return [n for n in names if n not in FEATURES]


class FirstEdges:
    """The first round's region pairs, their merge probabilities and border lengths, for average linkage. The first
    round's regions are a FeatureGraph's starting ones: its current_ids say which region each is in now."""

    def __init__(self, pairs: np.ndarray, p: np.ndarray, length: np.ndarray) -> None:
        self.pairs, self.wp, self.w = pairs, p * length, length

    def pooled(self, current: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Per current pair (a < b): the border-length-weighted mean probability of the first-round pairs between them
        (`current`: the current region of each first-round region id)."""
        n = len(current)
        a, b = current[self.pairs[:, 0]], current[self.pairs[:, 1]]
        keep = a != b
        lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
        uniq, inv = np.unique(lo * n + hi, return_inverse=True)
        if len(uniq) == 0:
            return np.zeros(len(pairs))
        mean = np.bincount(inv, self.wp[keep]) / np.maximum(np.bincount(inv, self.w[keep]), 1e-9)
        want = pairs[:, 0] * n + pairs[:, 1]
        j = np.minimum(np.searchsorted(uniq, want), len(uniq) - 1)
        return np.where(uniq[j] == want, mean[j], 0.0)


LINKAGES = ("classifier", "average")


def train_classifier(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None):
    """A LightGBM pair classifier, or a constant where the rows hold a single class."""
    import lightgbm as lgb

    if len(y) == 0 or y.min() == y.max():
        return float(y[0]) if len(y) else 0.0
    return lgb.train(LGB_PARAMS, lgb.Dataset(x, y.astype(np.float32), weight=weight), num_boost_round=ROUNDS)


def _train_without(key: int, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> str:
    """The classifier on every row whose group is not `key` (-1: every row), as text (a pool job)."""
    keep = groups != key
    return model_text(train_classifier(x[keep], y[keep]))


def train_without(keys: list[int], x: np.ndarray, y: np.ndarray, groups: np.ndarray, workers: int = 0) -> dict[int, str]:
    """One classifier per key on the rows of the other groups, as text: the keys spread over forked workers.

    Each single-threaded: a multi-threaded LightGBM hangs in a child forked after torch's OpenMP pool ran."""
    return dict(zip(keys, pmap(_train_without, keys, x, y, groups, workers=workers)))


def fit_fold_mergers(x: np.ndarray, y: np.ndarray, folds: np.ndarray, threshold: float = 0.5, max_rounds: int = 4, workers: int = 0) -> Merger:
    """One classifier per fold trained on the other folds' pairs, and one (-1) on every pair."""
    keys = [int(k) for k in np.unique(folds) if k != -1] + [-1]
    return Merger(train_without(keys, x, y, folds, workers), threshold, max_rounds)


def model_text(model) -> str:
    """A classifier as text: LightGBM's model string, or `constant p`."""
    if isinstance(model, str):
        return model
    return model.model_to_string() if hasattr(model, "model_to_string") else f"constant {float(model or 0.0)}\n"


def save_merger(merger: Merger, path: Path) -> None:
    """Store every classifier (each fold's and the test set's) and the threshold as text, atomically."""
    tail = f" drop {','.join(merger.drop)}" if merger.drop else ""
    tail += f" linkage {merger.linkage}" if merger.linkage != "classifier" else ""
    tail += " relative 1" if merger.relative else ""
    tail += " vote 1" if merger.vote else ""
    parts = [f"# threshold {merger.threshold} rounds {merger.max_rounds}{tail}\n", merger.calibration.text()]
    parts += [c.text(k) for k, c in sorted(merger.fold_calibrations.items())]
    parts += [f"# model {k}\n{model_text(m)}" for k, ms in sorted(merger.models.items())
              for m in _bagged(ms)]  # a bag: its classifiers under one key, in turn
    atomic_write_text(path, "".join(parts))


def load_merger(path: Path) -> Merger:
    """Load a merger written by save_merger."""
    if not path.is_file():
        raise UserError(path, "merge model not found (run `comp tune` again)")
    head, _, rest = path.read_text().partition("\n")
    if not head.startswith("# threshold "):
        raise UserError(path, "not a merge model written by comp")
    calibration, folds, rest = _calibrations(path, rest)
    chunks = re.split(r"^# model (-?\d+)\n", rest, flags=re.M)
    if len(chunks) == 1:  # the first format: the test-set classifier only, right after the threshold line
        chunks = ["", "-1", rest]
    # The boosters are built from their text on first use: parsing them here would start LightGBM's OpenMP
    # threads in the parent, and OpenMP then hangs in the forked post-processing workers.
    models: dict[int, object] = {}
    for k, body in zip(chunks[1::2], chunks[2::2]):
        m = float(body.split()[1]) if body.startswith("constant ") else body
        models[int(k)] = m if int(k) not in models else _bagged(models[int(k)]) + [m]  # a key met again: a bag
    words = head.split()  # "# threshold T" (first format) or "# threshold T rounds R [drop f1,f2] [linkage L]"
    extra = dict(zip(words[5::2], words[6::2]))
    drop = tuple(extra["drop"].split(",")) if "drop" in extra else ()
    return Merger(models, float(words[2]), int(words[4]) if len(words) > 4 else 4, drop, extra.get("linkage", "classifier"),
                  extra.get("relative") == "1", extra.get("vote") == "1", calibration, folds)  # fmt: skip


def _bagged(model: object) -> list:
    """A stored classifier as a bag of one, or the bag it already is."""
    return model if isinstance(model, list) else [model]


def _calibrations(path: Path, rest: str) -> tuple[Calibration, dict[int, Calibration], str]:
    """The calibration lines at the head of a merger file's body (the shared map, then per-fold ones), and what follows."""
    shared, folds = Calibration(), {}
    while rest.startswith(Calibration.HEADS):
        line, _, rest = rest.partition("\n")
        try:
            fold, cal = Calibration.parse(line)
        except (ValueError, IndexError):
            raise UserError(path, "its calibration line is not two comma-separated lists of numbers (run `comp tune` again)") from None
        if fold is None:
            shared = cal
        else:
            folds[fold] = cal
    return shared, folds, rest


@dataclass(frozen=True)
class MergeKind:
    """How a fitted merger reads and joins pairs: its linkage (Merger.linkage), whether it reads the RELATIVE features,
    whether its probabilities are calibrated (Merger.calibration) and which FEATURES it is blind to (Merger.drop)."""

    linkage: str = "classifier"
    relative: bool = False
    calibrate: bool = False  # map the probabilities by isotonic regression on the fold classifiers' held-out pairs
    drop: tuple[str, ...] = ()  # e.g. FEATURE_GROUPS that memorise the training scan (scripts/feature_carry.py)

    def problem(self) -> str | None:
        """What is wrong with it, or None."""
        bad = unknown_features(list(self.drop))
        if bad:
            return f"unknown feature '{bad[0]}' (known: {', '.join(FEATURES)})"
        return None if self.linkage in LINKAGES else f"linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}"


def _pair_rows(i: int, oof, weights: list[float], post: PostParams, kind: MergeKind) -> tuple[np.ndarray, np.ndarray]:
    """Merge-classifier rows (features, targets) of OOF image i (an ensemble.OOF's)."""
    maps, image, truth, _ = oof.item(i, range(len(oof.members)))
    m = upsample_maps(blend(maps, weights), image.shape[-1])  # once: segment() keeps maps already at full size
    labels = segment(m, image, post)
    pairs, x = pair_features(labels, m, image, relative=kind.relative)
    return x, pair_targets(labels, truth, pairs)


def fit_merging(oof, weights: list[float], post: PostParams, workers: int = 0, kind: MergeKind = MergeKind()) -> Merger:
    """Fold-disciplined pair classifiers trained on the OOF regions (an ensemble.OOF) of the tuned post-processing."""
    rows = pmap(_pair_rows, list(range(len(oof.images))), oof, weights, post, kind, workers=workers, desc="merge features")
    return _fit_on_rows(rows, oof.folds, "merge classifier", kind, workers=workers)


def _fit_on_rows(rows: list[tuple[np.ndarray, np.ndarray]], image_folds: np.ndarray, what: str, kind: MergeKind,
                 max_rounds: int = 4, workers: int = 0) -> Merger:  # fmt: skip
    """Fold mergers of `kind` from per-image (features, targets) rows, each image's rows tagged with its fold."""
    x = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    folds = np.concatenate([np.full(len(r[1]), f) for r, f in zip(rows, image_folds)])
    LOG.info(f"{what}: {len(y)} region pairs, {int(y.sum())} to merge")
    merger = fit_fold_mergers(without(x, kind.drop), y, folds, max_rounds=max_rounds, workers=workers)
    merger.linkage, merger.relative, merger.drop = kind.linkage, kind.relative, tuple(kind.drop)
    if kind.calibrate:
        merger.calibration, merger.fold_calibrations = fold_calibration(merger, x, y, folds, workers)
    return merger


def _fold_probabilities(key: int, merger: Merger, x: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Fold `key`'s classifier on fold `key`'s rows, which it did not train on (a pool job)."""
    return held_out_probabilities(x[folds == key], merger, key)


def fold_calibration(merger: Merger, x: np.ndarray, y: np.ndarray, folds: np.ndarray,
                     workers: int = 0) -> tuple[Calibration, dict[int, Calibration]]:  # fmt: skip
    """Isotonic maps cross-fitted on each fold classifier's held-out rows: one on every fold's (for the test-set
    classifier, whose own held-out rows do not exist) and, per fold k, one on the other folds' (for fold k's model, so
    the map that merges fold k's images in CV was fitted without their labels)."""
    keys = [int(k) for k in np.unique(folds) if k != -1]
    if not keys:  # no fold classifiers: nothing held out to fit on
        return Calibration(), {}
    raw = dict(zip(keys, pmap(_fold_probabilities, keys, merger, x, folds, workers=workers)))
    truth = {k: y[folds == k] for k in keys}

    def fitted(ks: list[int]) -> Calibration:
        return fit_calibration(np.concatenate([raw[k] for k in ks]), np.concatenate([truth[k] for k in ks]))

    per_fold = {k: fitted([j for j in keys if j != k]) for k in keys} if len(keys) > 1 else {}
    return fitted(keys), per_fold


SUPERPIXEL_ROUNDS = 16  # merge rounds over ~1,000 superpixels (each round merges a matching of pairs)


def _region_rows(i: int, oof, weights: list[float], regions: Regions, rounds: int, max_pairs: int,
                 kind: MergeKind) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Agglomeration rows of OOF image i: its superpixels (or a run's regions), with the blended maps as features."""
    maps, image, truth, _ = oof.item(i, range(len(oof.members)))
    stretched = regions.stretch(image)
    given = oof.given(i, regions)
    labels = superpixels(stretched, regions.superpixels) if given is None else given
    maps512 = upsample_maps(blend(maps, weights), image.shape[-1])
    return agglomeration_rows(labels, maps512, stretched, truth, rounds, max_pairs, i, image, kind.relative)


def fit_region_merging(oof, weights: list[float], regions: Regions, workers: int = 0, rounds: int = 8,
                       max_pairs: int = 1500, kind: MergeKind = MergeKind()) -> Merger:  # fmt: skip
    """Fold-disciplined pair classifiers for the hybrid: every agglomeration stage of the OOF images' superpixels
    (or of a run's OOF regions)."""
    items = list(range(len(oof.images)))
    oof.given(0, regions)  # a run's regions are loaded before the workers fork
    what = f"{regions.run} regions" if regions.run else "superpixel"
    rows = pmap(_region_rows, items, oof, weights, regions, rounds, max_pairs, kind, workers=workers, desc=f"{what} merge features")
    return _fit_on_rows(rows, oof.folds, f"{what} merge classifier", kind, SUPERPIXEL_ROUNDS, workers)
