"""The challenge metric: adjusted Rand index over truly annotated pixels, averaged over images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _contingency_sums(t: np.ndarray, p: np.ndarray) -> tuple[int, int, int, int]:
    """Return (n, sum n_ij^2, sum a_i^2, sum b_j^2) of the contingency table, via bincount."""
    n = t.size
    if n == 0:
        return 0, 0, 0, 0
    if t.dtype == np.uint8 and p.dtype == np.uint8:
        kt, kp = 256, 256
    else:
        t = np.unique(t, return_inverse=True)[1].ravel()
        p = np.unique(p, return_inverse=True)[1].ravel()
        kt, kp = int(t.max()) + 1, int(p.max()) + 1
    key = t.astype(np.intp)
    key *= kp
    key += p
    flat = np.bincount(key, minlength=kt * kp)
    table = flat.reshape(kt, kp)
    a = table.sum(axis=1)
    b = table.sum(axis=0)
    return n, int(flat.dot(flat)), int(a.dot(a)), int(b.dot(b))


def adjusted_rand(truth: np.ndarray, pred: np.ndarray) -> float:
    """Adjusted Rand index of two flat labelings, identical to sklearn's adjusted_rand_score."""
    n, ss, sa, sb = _contingency_sums(np.ravel(truth), np.ravel(pred))
    tp = ss - n
    fp = sb - ss  # pairs together in pred, apart in truth
    fn = sa - ss
    tn = n * n - fp - fn - ss
    if fn == 0 and fp == 0:
        return 1.0
    # Python ints: the products overflow int64 on 512x512 images.
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def image_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """Challenge score of one image: ARI restricted to pixels where the truth is non-zero."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    if truth.ndim == 2 and truth.flags.c_contiguous and pred.flags.c_contiguous:
        # Only the band of rows holding annotations matters; rows keep the crop contiguous.
        rows = np.flatnonzero(truth.max(axis=1))
        if len(rows) == 0:
            return 1.0
        truth, pred = truth[rows[0] : rows[-1] + 1], pred[rows[0] : rows[-1] + 1]
    mask = truth != 0
    return adjusted_rand(truth[mask], pred[mask])


def image_scores(truths: np.ndarray, preds: np.ndarray, workers: int = 1) -> np.ndarray:
    """Per-image challenge scores of two (N, H, W) stacks."""
    if len(truths) != len(preds):
        raise ValueError(f"{len(truths)} truth maps but {len(preds)} predictions")
    if workers <= 1:
        return np.array([image_score(t, p) for t, p in zip(truths, preds)], dtype=np.float64)
    with ThreadPoolExecutor(workers) as ex:  # bincount and masking release the GIL
        return np.array(list(ex.map(image_score, truths, preds)), dtype=np.float64)


def score(truths: np.ndarray, preds: np.ndarray) -> float:
    """Challenge score: plain mean of per-image scores."""
    return float(image_scores(truths, preds).mean())


def group_means(values: np.ndarray, keys: np.ndarray) -> tuple[list, np.ndarray, float]:
    """Per-image values averaged per group (fold or scan block): the groups in order, their means, and the standard
    error of those means (0 with one group), the spread a choice between two candidates is judged against."""
    keys = np.asarray(keys)
    uniq = sorted(set(keys.tolist()))
    means = np.array([np.asarray(values, np.float64)[keys == g].mean() for g in uniq])
    se = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else 0.0
    return uniq, means, se


SPLIT_SHARE = 0.1  # a predicted region holding at least this share of a structure is one of its pieces


def region_counts(truth: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """Where an image's ARI goes, on its annotated pixels: true structures, predicted regions, structures split
    (two or more predicted regions each hold >= SPLIT_SHARE of it) and structures merged (their largest predicted
    region is another structure's largest too; structures minus distinct largest regions)."""
    m = truth > 0
    t, p = truth[m].astype(np.int64), pred[m].astype(np.int64)
    if len(t) == 0:
        return {"true": 0, "predicted": 0, "split": 0, "merged": 0}
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), np.int64)
    np.add.at(table, (ti, pi), 1)
    share = table / table.sum(1, keepdims=True)
    largest = table.argmax(1)
    return {"true": int(table.shape[0]), "predicted": int(table.shape[1]), "split": int(((share >= SPLIT_SHARE).sum(1) >= 2).sum()),
            "merged": int(table.shape[0] - len(np.unique(largest)))}  # fmt: skip


def mean_counts(rows: list[dict[str, int]]) -> dict[str, float]:
    """region_counts of several images, averaged."""
    return {k: float(np.mean([r[k] for r in rows])) for k in ("true", "predicted", "split", "merged")}
