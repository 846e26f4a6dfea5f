"""The metric equals sklearn's adjusted_rand_score on the truly annotated pixels."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from comp.core.metric import adjusted_rand, image_score, image_scores, score


def sk_image_score(t: np.ndarray, p: np.ndarray) -> float:
    """The official formula, straight from sklearn."""
    m = t != 0
    return adjusted_rand_score(t[m], p[m])


@pytest.mark.parametrize("seed", range(30))
def test_random_maps_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 64)), int(rng.integers(1, 64)))
    t = rng.integers(0, rng.integers(1, 30), shape).astype(np.uint8)
    p = rng.integers(0, rng.integers(1, 30), shape).astype(np.uint8)
    assert abs(image_score(t, p) - sk_image_score(t, p)) < 1e-9


def test_full_size_structured_maps_match_sklearn() -> None:
    from comp.data.phantom import render_slice

    _, t = render_slice(5)
    rng = np.random.default_rng(0)
    p = np.where(rng.random(t.shape) < 0.2, rng.integers(0, 255, t.shape), t).astype(np.uint8)
    assert abs(image_score(t, p) - sk_image_score(t, p)) < 1e-9


def _square_pair() -> np.ndarray:
    t = np.zeros((40, 40), np.uint8)
    t[5:20, 5:20] = 7
    t[5:20, 20:35] = 9
    return t


def test_edge_cases() -> None:
    t = _square_pair()
    perfect = np.where(t == 7, 200, np.where(t == 9, 3, 0)).astype(np.uint8)
    assert image_score(t, perfect) == 1.0  # ids are arbitrary
    merged = (t > 0).astype(np.uint8)
    assert image_score(t, merged) == pytest.approx(sk_image_score(t, merged), abs=1e-12)
    assert image_score(t, merged) == 0.0
    split = t.copy()
    split[5:12, 5:20] = 8  # one true region predicted as two
    assert image_score(t, split) == pytest.approx(sk_image_score(t, split), abs=1e-12)
    assert 0 < image_score(t, split) < 1
    single = np.where(t > 0, 4, 0).astype(np.uint8)
    assert image_score(single, single) == 1.0  # a single region, predicted whole
    # Predicted 0 inside a true structure is just another cluster, not a free pass.
    holes = perfect.copy()
    holes[5:12, 5:20] = 0
    assert image_score(t, holes) == pytest.approx(sk_image_score(t, holes), abs=1e-12) and image_score(t, holes) < 1


def test_empty_truth_scores_one() -> None:
    t = np.zeros((16, 16), np.uint8)
    p = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert image_score(t, p) == 1.0 == adjusted_rand_score([], [])


def test_negative_ari() -> None:
    t, p = np.array([1, 1, 2, 2]), np.array([1, 2, 1, 2])
    assert adjusted_rand(t, p) == pytest.approx(-0.5)
    assert adjusted_rand(t, p) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)


def test_non_uint8_labels_use_the_general_path() -> None:
    rng = np.random.default_rng(1)
    t = rng.integers(1, 5, 500) * 1000
    p = rng.integers(-3, 700, 500)
    assert adjusted_rand(t, p) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)


def test_stack_scores_and_mean() -> None:
    rng = np.random.default_rng(2)
    t = rng.integers(0, 6, (5, 32, 32)).astype(np.uint8)
    p = rng.integers(0, 6, (5, 32, 32)).astype(np.uint8)
    s = image_scores(t, p, workers=2)
    assert np.allclose(s, [sk_image_score(a, b) for a, b in zip(t, p)], atol=1e-12)
    assert score(t, p) == pytest.approx(s.mean())
    with pytest.raises(ValueError):
        image_score(t[0], p[0, :5])


def test_region_counts_name_split_and_merged_structures() -> None:
    """Three structures: one cut in two halves, two others predicted as one region; unannotated pixels ignored."""
    import numpy as np

    from comp.core.metric import region_counts

    t = np.zeros((12, 12), np.uint8)
    t[:4], t[4:8], t[8:] = 3, 9, 5
    p = np.full_like(t, 1)
    p[:4, :6], p[:4, 6:] = 2, 4  # structure 3 split
    p[4:, :] = 6  # 9 and 5 merged
    t[:, 11] = 0  # unannotated column: whatever is predicted there does not count
    p[:, 11] = 8
    assert region_counts(t, p) == {"true": 3, "predicted": 3, "split": 1, "merged": 1}
    assert region_counts(t, t) == {"true": 3, "predicted": 3, "split": 0, "merged": 0}
