"""The superpixel + learned-merging hybrid on hand-drawn slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from comp.data.contrast import Contrast
from comp.methods.base import FitContext, FoldData
from comp.methods.hybrid import Hybrid, HybridParams
from comp.methods.merge import agglomeration_rows
from comp.regions.superpixels import SuperpixelParams, superpixels


def _slice(seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A body (60) holding structure A (a faint step inside: 120 | 126), and B (100) touching C (140)."""
    rng = np.random.default_rng(seed)
    img = np.full((512, 512), 60.0)
    truth = np.zeros((512, 512), np.uint8)
    s = int(rng.integers(-20, 20))
    img[100 + s : 220 + s, 80:200], truth[100 + s : 220 + s, 80:200] = 120, 7  # A, left half
    img[100 + s : 220 + s, 200:320] = 126  # A, right half: the same structure, a faint step
    img[300:420, 100 + s : 220 + s], truth[300:420, 100 + s : 220 + s] = 100, 3  # B
    img[300:420, 220 + s : 340 + s], truth[300:420, 220 + s : 340 + s] = 140, 9  # C, touching B
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), truth


@pytest.mark.slow
def test_hybrid_merges_one_structure_split_by_superpixels_and_keeps_touching_ones_apart(tmp_path: Path) -> None:
    p = HybridParams(superpixels=SuperpixelParams(h=0.005), threshold=0.5, fit_images=0, train_rounds=4, workers=1)
    test_x, test_y = _slice(99)
    sp = superpixels(test_x, p.superpixels)
    a = test_y == 7
    assert len(np.unique(sp[a])) >= 2  # the over-segmentation cuts A along its faint step: merging must join it

    train = [_slice(s) for s in range(6)]
    x, y = np.stack([t[0] for t in train]), np.stack([t[1] for t in train])
    method = Hybrid(p)
    method.fit(FoldData(x, y, np.arange(6)), FitContext(tmp_path, 0, 0, Contrast()))
    pred = method.predict(test_x[None])[0]
    vals, counts = np.unique(pred[a], return_counts=True)
    assert counts.max() / a.sum() > 0.95  # A is one region
    b, c = pred[test_y == 3], pred[test_y == 9]
    major_b, major_c = np.bincount(b).argmax(), np.bincount(c).argmax()
    assert major_b != major_c and major_b > 0 and major_c > 0  # B and C touch, yet stay apart
    assert (tmp_path / "merge.txt").is_file() and method.fitted["threshold"] == 0.5


def test_agglomeration_rows_cover_later_stages_and_skip_unannotated_pairs() -> None:
    img, truth = _slice(1, noise=4.0)  # noisy: many superpixels per structure
    sp = superpixels(img, SuperpixelParams(h=0.005))
    x1, y1 = agglomeration_rows(sp, None, img, truth, 1, 10_000, 0)
    x4, y4 = agglomeration_rows(sp, None, img, truth, 4, 10_000, 0)
    assert len(y4) > len(y1) > 0 and y1.sum() > 0 and (y1 == 0).sum() > 0  # both classes; later stages add rows
    assert np.isnan(x1[:, 1]).all()  # no network maps: their columns are missing values, not zeros


def test_average_linkage_pools_the_first_rounds_borders_by_length() -> None:
    """Two merged halves (1+2 above, 3+4 below) meet along a long strong border and a short weak one: the pair scores
    their length-weighted mean, not the weak one's; the linkage survives a save and load."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from comp.methods.merge import FirstEdges, Merger, load_merger, save_merger
    from comp.regions.graph import RegionGraph

    lab = np.zeros((20, 20), np.int64)
    lab[:10, :15], lab[:10, 15:], lab[10:, :15], lab[10:, 15:] = 1, 2, 3, 4
    pairs = np.array([[1, 2], [1, 3], [2, 4], [3, 4]])
    p = np.array([0.9, 0.9, 0.1, 0.9])
    length = np.array([10.0, 15.0, 5.0, 10.0])
    edges = FirstEdges(pairs, p, length)
    graph = RegionGraph.read(lab)
    merged = graph.merge(np.array([[1, 2], [3, 4]]))
    assert np.allclose(edges.pooled(merged.root, np.array([[1, 3]])), (0.9 * 15 + 0.1 * 5) / 20)
    assert np.allclose(edges.pooled(graph.root, pairs), p)  # before any merge: the pairs' own probabilities
    with tempfile.TemporaryDirectory() as d:
        save_merger(Merger({-1: "constant 0.5\n"}, 0.4, 8, ("pos_x",), "average"), Path(d) / "m.txt")
        m = load_merger(Path(d) / "m.txt")
        assert (m.linkage, m.drop, m.max_rounds, m.threshold) == ("average", ("pos_x",), 8, 0.4)


def test_relative_features_ignore_the_slices_contrast_and_are_missing_unless_asked(tmp_path: Path) -> None:
    """A border's gradient and intensity step relative to the slice's own borders: the same at half the contrast;
    absent (NaN) by default, so models trained before them are unchanged; a merger that reads them says so on disk."""
    from comp.methods.merge import FEATURES, RELATIVE, Merger, load_merger, pair_features, save_merger

    img, _ = _slice(3, noise=2.0)
    sp = superpixels(img, SuperpixelParams(h=0.005))
    cols = [FEATURES.index(f) for f in RELATIVE]
    pairs, full = pair_features(sp, None, img.astype(np.float32), relative=True)
    _, half = pair_features(sp, None, img.astype(np.float32) * 0.5 + 40, relative=True)
    assert len(pairs) > 3 and np.isfinite(full[:, cols]).all()
    assert np.allclose(full[:, cols], half[:, cols], rtol=1e-4, atol=1e-5)
    grad = FEATURES.index("border_grad")
    assert np.allclose(half[:, grad], full[:, grad] / 2, rtol=1e-4)  # the absolute one halves
    assert np.isnan(pair_features(sp, None, img.astype(np.float32))[1][:, cols]).all()
    save_merger(Merger({-1: "constant 0.2"}, 0.4, relative=True), tmp_path / "m.txt")
    assert load_merger(tmp_path / "m.txt").relative and not HybridParams().relative_features
    assert HybridParams(relative_features=True).merger({-1: "constant 0.1"}).relative


def test_vote_features_say_whether_the_fixed_watershed_joins_a_pair(tmp_path: Path) -> None:
    """Two superpixels inside one of the fixed watershed's regions vote 1 and two in different regions 0; the columns
    are missing unless asked (older models unchanged); a merger that reads them says so on disk and in the hybrid."""
    from comp.methods.merge import FEATURES, VOTE, Merger, load_merger, pair_features, save_merger

    img = np.full((64, 64), 20, np.uint8)  # air, then two flat halves: the voting regions are the halves
    img[8:56, 8:32], img[8:56, 32:56] = 120, 200
    sp = np.full((64, 64), 5, np.int32)  # 5: the air around
    sp[8:56, 8:20], sp[8:56, 20:32], sp[8:56, 32:44], sp[8:56, 44:56] = 1, 2, 3, 4  # 1|2 inside the left half, 2|3 across
    vote = np.zeros((64, 64), np.uint8)
    vote[8:56, 8:32], vote[8:56, 32:56] = 1, 2
    pairs, x = pair_features(sp, None, img.astype(np.float32), vote=vote)
    same = dict(zip(map(tuple, pairs.tolist()), x[:, FEATURES.index("vote_same")]))
    assert same[(1, 2)] == 1 and same[(2, 3)] == 0 and same[(3, 4)] == 1
    assert np.isnan(pair_features(sp, None, img.astype(np.float32))[1][:, [FEATURES.index(f) for f in VOTE]]).all()
    save_merger(Merger({-1: "constant 0.2"}, 0.4, vote=True), tmp_path / "m.txt")
    assert load_merger(tmp_path / "m.txt").vote and not load_merger(tmp_path / "m.txt").relative
    assert HybridParams(vote_features=True).merger({-1: "constant 0.1"}).vote and not HybridParams().merger({}).vote


def test_extra_renderings_add_training_rows_of_a_moved_slice_and_leave_the_original_rows_as_they_were() -> None:
    from comp.methods.hybrid import _rows, rerender
    from comp.regions.superpixels import gradient

    img, truth = _slice(2, noise=2.0)
    a, b = rerender(img, 5), rerender(img, 6)
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, rerender(img, 5)) and not np.array_equal(a, b)  # seeded: the same draw, the same slice
    assert np.abs(a.astype(int) - img).mean() > 0.5  # the rendering moves the slice
    grads, g0 = [float(gradient(rerender(img, s), 1.0).mean()) for s in range(12)], float(gradient(img, 1.0).mean())
    assert max(grads) > 1.5 * g0 and min(grads) < g0  # some sharpened or noised, some blurred
    p = HybridParams(superpixels=SuperpixelParams(h=0.005), train_rounds=2)
    x0, y0 = _rows((img, img, truth, 3), p)
    x1, y1 = _rows((img, img, truth, 3), HybridParams(superpixels=p.superpixels, train_rounds=2, renderings=1))
    assert len(y1) > len(y0) and np.array_equal(x1[: len(y0)], x0, equal_nan=True) and np.array_equal(y1[: len(y0)], y0)


def test_calibration_maps_overconfident_probabilities_to_frequencies_and_survives_the_merger_file(tmp_path: Path) -> None:
    from comp.methods.merge import Calibration, Merger, fit_calibration, load_merger, save_merger

    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, 20_000)
    y = (rng.uniform(0, 1, raw.size) < raw**3).astype(np.int8)  # the classifier says p, the pairs merge at p^3
    cal = fit_calibration(raw, y)
    grid = np.array([0.2, 0.5, 0.8, 0.95])
    assert np.abs(cal(grid) - grid**3).max() < 0.06  # the calibrated value is the merge frequency, not the raw one
    assert np.all(np.diff(cal(np.linspace(0, 1, 101))) > 0)  # monotone, ties broken by the raw probability
    assert fit_calibration(raw, np.zeros_like(y)) == Calibration() and Calibration()(grid) is grid  # one class: identity
    save_merger(Merger({-1: "constant 0.9"}, 0.4, calibration=cal), tmp_path / "m.txt")
    loaded = load_merger(tmp_path / "m.txt")
    assert loaded.calibration == cal and loaded.threshold == 0.4  # exactly: a replayed score is the same
    assert np.allclose(loaded.probabilities(np.zeros((3, 4))), cal(np.array([0.9]))[0], atol=1e-5)  # every model's p
    assert loaded.probabilities(np.zeros((3, 4)), calibrated=False)[0] == 0.9
    save_merger(Merger({-1: "constant 0.9"}, 0.4), tmp_path / "plain.txt")
    assert "calibration" not in (tmp_path / "plain.txt").read_text()  # an uncalibrated merger's file is as before
    from comp.core.errors import UserError

    (tmp_path / "bad.txt").write_text("# threshold 0.4 rounds 4\n# calibration 0.1,x 0.2\n# model -1\nconstant 0.9\n")
    with pytest.raises(UserError, match="bad.txt.*calibration line"):
        load_merger(tmp_path / "bad.txt")
    (tmp_path / "bad_fold.txt").write_text("# threshold 0.4 rounds 4\n# calibration-fold 0 0.1\n# model -1\nconstant 0.9\n")
    with pytest.raises(UserError, match="bad_fold.txt.*calibration line"):  # a fold line short of its lists
        load_merger(tmp_path / "bad_fold.txt")


def _small_fit(workdir: Path, **params) -> Hybrid:
    """The hybrid fitted on six noisy slices (many superpixels per structure, pairs of both kinds), two held out."""
    p = HybridParams(**{**dict(superpixels=SuperpixelParams(h=0.005), fit_h=[0.005], fit_thresholds=[0.5], fit_images=2,
                                train_rounds=4, workers=1), **params})  # fmt: skip
    train = [_slice(s, noise=4.0) for s in range(6)]
    method = Hybrid(p)
    method.fit(FoldData(np.stack([t[0] for t in train]), np.stack([t[1] for t in train]), np.arange(6)),
               FitContext(workdir, 0, 0, Contrast()))  # fmt: skip
    return method


@pytest.mark.slow
def test_a_calibrated_hybrid_fits_its_map_on_held_out_training_slices_and_stores_it(tmp_path: Path) -> None:
    from comp.methods.merge import Calibration, load_merger

    fitted = {calibrate: _small_fit(tmp_path / str(calibrate), calibrate=calibrate).merger for calibrate in (False, True)}
    assert fitted[False].calibration == Calibration()  # off by default: the merger is as before
    cal = fitted[True].calibration
    assert len(cal.x) >= 2 and min(cal.y) >= 0 and max(cal.y) <= 1
    assert load_merger(tmp_path / "True" / "merge.txt").calibration == cal  # the fold's merger file carries it
    assert fitted[True].models[-1] == fitted[False].models[-1]  # the same classifier, only its probabilities mapped


def test_fold_calibration_makes_an_overfitted_classifier_closer_to_the_truth_on_new_pairs() -> None:
    from comp.methods.merge import fit_fold_mergers, fold_calibration

    rng = np.random.default_rng(1)

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.normal(0, 1, (n, 20)).astype(np.float32)  # one informative feature, 19 of noise to overfit on
        truth = 1 / (1 + np.exp(-x[:, 0]))
        return x, (rng.uniform(0, 1, n) < truth).astype(np.int8), truth

    x, y, _ = pairs(600)
    folds = np.arange(len(y)) % 3
    merger = fit_fold_mergers(x, y, folds, workers=1)
    merger.calibration, merger.fold_calibrations = fold_calibration(merger, x, y, folds, workers=1)
    new_x, _, truth = pairs(4000)
    raw, cal = merger.probabilities(new_x, calibrated=False), merger.probabilities(new_x)
    assert np.mean((cal - truth) ** 2) < 0.8 * np.mean((raw - truth) ** 2)  # nearer each pair's true merge probability


def test_each_fold_model_is_calibrated_without_its_own_folds_pairs_and_the_maps_survive_the_merger_file(tmp_path: Path) -> None:
    from comp.methods.merge import fit_calibration, fit_fold_mergers, fold_calibration, load_merger, save_merger

    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (900, 6)).astype(np.float32)
    y = (rng.uniform(0, 1, 900) < 1 / (1 + np.exp(-2 * x[:, 0]))).astype(np.int8)
    folds = np.arange(len(y)) % 3
    merger = fit_fold_mergers(x, y, folds, workers=1)
    shared, per_fold = fold_calibration(merger, x, y, folds, workers=1)
    held = {k: merger.probabilities(x[folds == k], k, calibrated=False) for k in range(3)}
    for k in range(3):  # fold k's map: the other folds' held-out pairs only, so fold k's labels never shaped it
        others = [j for j in range(3) if j != k]
        assert per_fold[k] == fit_calibration(np.concatenate([held[j] for j in others]), np.concatenate([y[folds == j] for j in others]))
    assert shared == fit_calibration(np.concatenate(list(held.values())), np.concatenate([y[folds == k] for k in range(3)]))
    assert len({shared, *per_fold.values()}) == 4  # four different maps
    merger.calibration, merger.fold_calibrations = shared, per_fold
    save_merger(merger, tmp_path / "m.txt")
    loaded = load_merger(tmp_path / "m.txt")
    assert loaded.calibration == shared and loaded.fold_calibrations == per_fold  # exactly
    for k in (0, 1, 2, -1):  # each model's probabilities through its own map (the test-set model: the shared one)
        want = (per_fold.get(k, shared))(merger.probabilities(x[:50], k, calibrated=False))
        assert np.allclose(loaded.probabilities(x[:50], k), want, atol=1e-6)


def test_repeated_held_out_sets_pick_the_threshold_that_wins_pooled_not_the_first_sets_spike(tmp_path: Path, monkeypatch) -> None:
    import comp.methods.hybrid as hybrid

    held: list[tuple[int, ...]] = []

    def scores(rows, images, raws, truth, split, p):  # the first set's spike at 0.35; the others all prefer 0.2
        held.append(tuple(split[1]))
        first = len(held) == 1
        return {0.2: np.full(len(split[1]), 0.6), 0.35: np.full(len(split[1]), 0.7 if first else 0.3)}, hybrid.Calibration()

    monkeypatch.setattr(hybrid, "_held_out_scores", scores)
    monkeypatch.setattr(hybrid, "_rows", lambda item, p: (np.zeros((1, 3)), np.zeros(1)))
    monkeypatch.setattr(hybrid, "_train", lambda rows, idx, drop=(), workers=0: "constant 0.5")
    train = [_slice(s) for s in range(12)]
    x, y = np.stack([t[0] for t in train]), np.stack([t[1] for t in train])
    picked = {}
    for repeats in (1, 3):
        held.clear()
        p = HybridParams(fit_h=[0.01], fit_thresholds=[0.2, 0.35], fit_images=3, fit_repeats=repeats, workers=1)
        method = Hybrid(p)
        method.fit(FoldData(x, y, np.arange(12)), FitContext(tmp_path / str(repeats), 0, 0, Contrast()))
        picked[repeats] = method.fitted["threshold"]
        assert len(held) == repeats and all(len(h) == 3 for h in held)
    assert len(set(held)) == 3  # other slices held out each time
    assert picked == {1: 0.35, 3: 0.2}  # one set follows its spike; pooled over three, the steady choice wins


def test_a_bag_of_classifiers_averages_their_probabilities_and_survives_the_merger_file(tmp_path: Path) -> None:
    from comp.methods.merge import Merger, load_merger, save_merger

    merger = Merger({-1: ["constant 0.2", "constant 0.6"], 0: "constant 0.9"}, 0.4)
    x = np.zeros((3, 4))
    assert np.allclose(merger.probabilities(x), 0.4) and np.allclose(merger.probabilities(x, 0), 0.9)
    save_merger(merger, tmp_path / "m.txt")
    loaded = load_merger(tmp_path / "m.txt")
    assert loaded.models == {-1: [0.2, 0.6], 0: 0.9}  # the bag under its key, the single model as before
    assert np.allclose(loaded.probabilities(x), 0.4)


def test_a_bagged_hybrid_trains_one_classifier_per_draw_and_its_first_is_the_unbagged_one(tmp_path: Path) -> None:
    models = {bags: _small_fit(tmp_path / str(bags), fit_bags=bags).merger.models[-1] for bags in (1, 2)}
    assert isinstance(models[1], str) and len(models[2]) == 2  # one classifier per draw
    assert models[2][0] == models[1] and models[2][1] != models[1]  # draw 0 is the unbagged fit; draw 1 saw other pairs
    assert _small_fit(tmp_path / "w2", fit_bags=2, workers=2).merger.models[-1] == models[2]  # trained in parallel: the same
