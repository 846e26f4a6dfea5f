"""The region graph: what it reads of the merged regions equals a fresh pass over the merged label map."""

from __future__ import annotations

import numpy as np

from comp.methods.merge import FeatureGraph, majority, pair_features
from comp.regions.graph import RegionGraph
from comp.regions.ops import adjacent_pairs, crossings, merge_pairs
from comp.regions.superpixels import SuperpixelParams, superpixels


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy slice with a few flat structures, its superpixels (hundreds), and a truth map with unannotated parts."""
    rng = np.random.default_rng(seed)
    img = np.full((96, 96), 40.0)
    truth = np.zeros((96, 96), np.uint8)
    for k, (y, x, v) in enumerate([(10, 10, 120), (10, 50, 160), (50, 20, 90), (55, 55, 200)], start=1):
        img[y : y + 35, x : x + 35] = v
        truth[y : y + 30, x : x + 30] = 10 * k
    img = np.clip(np.rint(img + rng.normal(0, 6, img.shape)), 0, 255).astype(np.uint8)
    return img, superpixels(img, SuperpixelParams(sigma=0.5, h=0.01)), truth


def _random_merges(labels: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """k adjacent pairs of the current regions, drawn at random."""
    pairs = adjacent_pairs(labels)[0]
    return pairs[rng.permutation(len(pairs))[:k]]


def test_a_merged_graph_reads_like_a_fresh_pass_over_the_merged_label_map() -> None:
    img, sp, truth = _scene()
    sp[:4] = 0  # a strip of no region: never paired, never merged
    rng = np.random.default_rng(1)
    values = rng.normal(size=sp.shape).astype(np.float32)
    graph, lab = RegionGraph.read(sp, [img, values], [values], [truth]), sp.astype(np.int64)
    assert graph.n > 100
    for _ in range(3):
        m = _random_merges(lab, rng, 40)
        graph, lab = graph.merge(m), merge_pairs(lab, m)
        assert np.array_equal(graph.label_map(), lab)  # ids: the smallest of each merged region, as merge_pairs names them
        inv, (vals,), pairs = crossings(lab, [values])
        e = graph.borders()
        assert np.array_equal(e.pairs, pairs) and np.array_equal(e.length, np.bincount(inv))
        assert np.allclose(e.total[:, 0], np.bincount(inv, weights=vals), atol=1e-9)
        assert np.array_equal(e.high[:, 0], [vals[inv == j].max() for j in range(len(pairs))])
        assert np.array_equal(e.low[:, 0], [vals[inv == j].min() for j in range(len(pairs))])
        sums = graph.region_sums()
        n = graph.n
        assert np.array_equal(sums[:, 0], np.bincount(lab.ravel(), minlength=n))
        assert np.array_equal(sums[:, 1], np.bincount(lab.ravel(), weights=img.ravel().astype(float), minlength=n))
        assert np.allclose(sums[:, 2], np.bincount(lab.ravel(), weights=values.ravel(), minlength=n), atol=1e-9)
        assert np.array_equal(graph.region_hist(0).argmax(1)[np.unique(lab)], majority(lab, truth)[0][np.unique(lab)])
    assert graph.merge(np.zeros((0, 2), np.int64)) is graph


def test_feature_rows_after_merges_match_the_features_of_the_merged_map() -> None:
    """A merger that works on the graph sees, round after round, the features a pass over the merged map gives (maps,
    raw slice, relative and vote columns included), and the same training targets."""
    img, sp, truth = _scene(2)
    rng = np.random.default_rng(3)
    maps = rng.random((5, 96, 96)).astype(np.float32)  # fg, boundary, distance, a 2-channel embedding
    raw, vote = (img // 2).astype(np.uint8), (img > 100).astype(np.uint8)
    graph, lab = FeatureGraph(sp, maps, img, None, raw, vote, truth), sp.astype(np.int64)
    for _ in range(3):
        pairs, x = graph.features(relative=True)
        want_pairs, want = pair_features(lab, maps, img, None, raw, True, vote)
        assert np.array_equal(pairs, want_pairs) and len(pairs) > 20
        assert np.allclose(x, want, rtol=1e-6, atol=1e-6, equal_nan=True) and not np.isnan(x).all(0).any()
        ids = np.unique(lab)
        assert all(np.array_equal(a[ids], b[ids]) for a, b in zip(graph.majority("truth"), majority(lab, truth)))
        m = _random_merges(lab, rng, 30)
        graph.merge(m)
        lab = merge_pairs(lab, m)
    assert np.array_equal(graph.label_map(), lab)
