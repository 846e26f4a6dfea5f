"""Operations on instance maps: relabelling, adjacency and borders, merging pairs, small regions."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def relabel_uint8(labels: np.ndarray, keep_zero: bool = True) -> np.ndarray:
    """Sequential uint8 ids; past 255 regions the smallest ones join their nearest kept region."""
    lab = np.asarray(labels)
    ids, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    inv = inv.reshape(lab.shape)
    has_zero = keep_zero and ids[0] == 0
    fg = np.arange(1 if has_zero else 0, len(ids))
    if len(fg) <= 255:
        lut = np.zeros(len(ids), np.uint8)
        lut[fg] = np.arange(1, len(fg) + 1)
        return lut[inv]
    keep = fg[np.argsort(-counts[fg], kind="stable")[:255]]
    lut = np.zeros(len(ids), np.uint8)
    lut[keep] = np.arange(1, 256)
    out = lut[inv]
    dropped = np.isin(inv, fg) & (out == 0)
    # Each dropped pixel takes the id of the nearest kept pixel (distance transform indices).
    _, (iy, ix) = ndi.distance_transform_edt(out == 0, return_indices=True)
    out[dropped] = out[iy[dropped], ix[dropped]]
    return out


def crossings(labels: np.ndarray, values: list[np.ndarray] | tuple = ()) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Every 4-neighbour step between two non-zero regions: pair index (into the sorted pairs), per map of `values`
    the mean of its two sides on each step (in the map's own dtype), and the pairs (a < b) themselves."""
    lab = labels.astype(np.int64)
    n = int(lab.max()) + 1
    keys, vals = [], [[] for _ in values]
    for cut_a, cut_b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
        a, b = lab[cut_a], lab[cut_b]
        m = (a != b) & (a > 0) & (b > 0)
        keys.append(np.minimum(a[m], b[m]) * n + np.maximum(a[m], b[m]))
        for out, v in zip(vals, values):
            out.append(0.5 * (v[cut_a][m] + v[cut_b][m]))
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    return inv, [np.concatenate(v) for v in vals], np.stack([uniq // n, uniq % n], axis=1)


def adjacent_pairs(labels: np.ndarray, values: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b) of 4-adjacent non-zero regions, their shared border length and the sum of `values` on it."""
    inv, vals, pairs = crossings(labels, [values] if values is not None else [])
    length = np.bincount(inv, minlength=len(pairs)).astype(np.float64)
    total = np.bincount(inv, weights=vals[0], minlength=len(pairs)) if vals else np.zeros(len(pairs))
    return pairs, length, total


def merge_pairs(labels: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Merge the regions joined by `pairs` (transitively); ids stay in the input's id space."""
    if len(pairs) == 0:
        return labels
    n = int(labels.max()) + 1
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    # Each component is named by its smallest id so region 0 (unlabelled) stays 0.
    root = np.full(comp.max() + 1, n, np.int64)
    np.minimum.at(root, comp, np.arange(n))
    return root[comp][labels]


def region_means(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Mean of `image` over each region id (index = id)."""
    n = int(labels.max()) + 1
    cnt = np.bincount(labels.ravel(), minlength=n)
    tot = np.bincount(labels.ravel(), weights=image.ravel().astype(np.float64), minlength=n)
    return tot / np.maximum(cnt, 1)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set regions smaller than `min_size` pixels to 0."""
    if min_size <= 1:
        return labels
    cnt = np.bincount(labels.ravel())
    small = cnt < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def absorb_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Regions below `min_size` pixels take the id of the (not small) neighbour with the longest shared border, or vanish if none."""
    if min_size <= 1 or labels.max() == 0:
        return labels
    cnt = np.bincount(labels.ravel())
    small = np.flatnonzero((cnt < min_size) & (cnt > 0))
    small = small[small > 0]
    if len(small) == 0:
        return labels
    pairs, length, _ = adjacent_pairs(labels)
    target = np.arange(len(cnt))
    is_small = np.zeros(len(cnt), bool)
    is_small[small] = True
    for s in small:
        rows = np.flatnonzero((pairs[:, 0] == s) | (pairs[:, 1] == s))
        nb = np.where(pairs[rows, 0] == s, pairs[rows, 1], pairs[rows, 0])
        ok = ~is_small[nb]
        target[s] = nb[ok][np.argmax(length[rows][ok])] if ok.any() else 0
    return target[labels]
