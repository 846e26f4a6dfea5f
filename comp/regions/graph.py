"""A label map's regions as a graph: per-region sums, value histograms and per-border aggregates read from the pixels
once, so that merging regions round after round (and reading the merged regions' statistics) costs no further pass
over the image.

A merged region is named by the smallest id among the regions it joins, as `ops.merge_pairs` names them, and its
pairs come in the order `ops.adjacent_pairs` lists them (a < b, sorted): a merger that works on the graph takes the
same steps as one that re-reads a merged label map every round. Sums agree with a pass over the merged map up to the
order of floating-point additions (exactly, for integer-valued channels); maxima, minima, counts and lengths exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from comp.regions.ops import crossings


@dataclass(frozen=True)
class Borders:
    """The shared borders of the current regions: pairs (a < b, sorted), length in 4-neighbour steps, and per border
    channel the sum, maximum and minimum along it (each step valued at the mean of its two pixels)."""

    pairs: np.ndarray  # (p, 2) int64
    length: np.ndarray  # (p,) float64
    total: np.ndarray  # (p, B) float64
    high: np.ndarray  # (p, B)
    low: np.ndarray  # (p, B)


@dataclass(frozen=True)
class RegionGraph:
    """The starting regions of a label map (ids 0..n-1; 0 = no region), what was read of them, and the current merge."""

    labels: np.ndarray  # the starting label map, int64
    root: np.ndarray  # (n,) current id of each starting id: the smallest starting id of its merged region
    sums: np.ndarray  # (n, 1 + K) per starting region: pixel count, then each channel's sum
    hists: tuple[np.ndarray, ...]  # per uint8 map: (n, 256) counts of each of its values in each starting region
    edges: Borders  # between starting regions

    @classmethod
    def read(cls, labels: np.ndarray, channels: list[np.ndarray] = (), border: list[np.ndarray] = (),
             hists: list[np.ndarray] = ()) -> "RegionGraph":  # fmt: skip
        """One pass over the pixels: per region the sums of `channels`, per border those of `border` (each step's
        mean of its two pixels: its sum, max and min) and per region the counts of each value of the uint8 `hists`."""
        lab = np.asarray(labels).astype(np.int64, copy=False)
        n = int(lab.max()) + 1 if lab.size else 1
        flat = lab.ravel()
        cols = [np.bincount(flat, minlength=n).astype(np.float64)]
        cols += [np.bincount(flat, weights=np.asarray(c, np.float64).ravel(), minlength=n) for c in channels]
        tables = tuple(np.bincount(flat * 256 + np.asarray(h).ravel(), minlength=n * 256).reshape(n, 256) for h in hists)
        inv, vals, pairs = crossings(lab, border)
        return cls(lab, np.arange(n), np.stack(cols, 1), tables, _aggregate(pairs, inv, vals))

    @property
    def n(self) -> int:
        """How many starting ids (the length of every per-region array)."""
        return len(self.root)

    def label_map(self) -> np.ndarray:
        """The current regions as a label map (int64, in the starting ids' space)."""
        return self.root[self.labels]

    def region_sums(self) -> np.ndarray:
        """(n, 1 + K) per current id (0 where no region has it): pixel count, then each channel's sum."""
        return _sum_rows(self.root, self.sums, self.n)

    def region_hist(self, j: int) -> np.ndarray:
        """(n, 256) per current id: the counts of each value of the j-th uint8 map."""
        out = np.zeros_like(self.hists[j])
        np.add.at(out, self.root, self.hists[j])
        return out

    def borders(self) -> Borders:
        """The shared borders of the current regions (what adjacent_pairs / border_profile read off the merged map)."""
        e = self.edges
        a, b = self.root[e.pairs[:, 0]], self.root[e.pairs[:, 1]]
        keep = a != b
        lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
        uniq, inv = np.unique(lo * self.n + hi, return_inverse=True)
        p = len(uniq)
        pairs = np.stack([uniq // self.n, uniq % self.n], axis=1)
        length = np.bincount(inv, weights=e.length[keep], minlength=p)
        total = _sum_rows(inv, e.total[keep], p)
        high = np.full((p, e.high.shape[1]), -np.inf)
        low = np.full((p, e.low.shape[1]), np.inf)
        np.maximum.at(high, inv, e.high[keep])
        np.minimum.at(low, inv, e.low[keep])
        return Borders(pairs, length, total, high, low)

    def merge(self, pairs: np.ndarray) -> "RegionGraph":
        """The graph with the current regions joined by `pairs` (current ids) merged, transitively."""
        if len(pairs) == 0:
            return self
        g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(self.n, self.n))
        _, comp = connected_components(g, directed=False)
        first = np.full(comp.max() + 1, self.n, np.int64)
        np.minimum.at(first, comp, np.arange(self.n))  # each component named by its smallest id, so 0 stays 0
        return replace(self, root=first[comp][self.root])


def _sum_rows(index: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """(n, C): the rows of `rows` summed by `index`, column by column."""
    return np.stack([np.bincount(index, weights=rows[:, c], minlength=n) for c in range(rows.shape[1])], 1)


def _aggregate(pairs: np.ndarray, inv: np.ndarray, vals: list[np.ndarray]) -> Borders:
    """Per pair: steps, and each channel's sum, max and min over its steps (`inv`: each step's pair)."""
    p = len(pairs)
    length = np.bincount(inv, minlength=p).astype(np.float64)
    total = np.stack([np.bincount(inv, weights=v, minlength=p) for v in vals], 1) if vals else np.zeros((p, 0))
    high, low = np.full((p, len(vals)), -np.inf), np.full((p, len(vals)), np.inf)
    for c, v in enumerate(vals):
        np.maximum.at(high[:, c], inv, v)
        np.minimum.at(low[:, c], inv, v)
    return Borders(pairs, length, total, high, low)
