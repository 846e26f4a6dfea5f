"""`comp data groups DIR`: which slices come from the same CT scan, found from the images alone, and their order in it.

The challenge's slices are shuffled from a limited number of scans and no file says which; random folds then put
slices a few millimetres apart in training and in the scored fold. Slices of one scan share the patient's body
outline (it changes slowly along the scan) and, for resampled volumes, the padding of the field of view. Two
slices are linked when their body outlines are close, or further apart with the same field-of-view padding
(rows or columns of one value at the border: a volume resampled to 512x512); scans are the connected components. Within a scan the slices
are ordered along the leading non-trivial eigenvector of their similarity graph (spectral ordering), and cut into
contiguous blocks, the CV groups, as the importer does. Training and test slices are grouped together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from comp.core.errors import UserError
from comp.core.log import LOG
from comp.data.contrast import Contrast, calibration
from comp.data.dataset import Dataset
from comp.data.images import SIZE, image_names
from comp.data.labels import write_groups_csv

POOL = 16  # descriptors are 32x32 means of 16x16 pixel cells
# Distances between body outlines: the root of the summed squared differences of the cells' body fractions (1.0:
# about one cell of 16x16 pixels wholly inside one outline and outside the other).
LINK = 1.0  # outlines closer than this are one scan
FOV_LINK = 6.0  # ... or closer than this with the same field-of-view padding
# The two links were set on the proxy's two scans mixed with phantom slices, the data the README measures
# them on; a data set of another make may need others (`comp data groups --link`).


def contiguous_blocks(position: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """Block (0..blocks-1) of each slice at `position` along a scan of n slices: contiguous runs of equal size."""
    return np.minimum(np.asarray(position) * blocks // max(n, 1), blocks - 1)


@dataclass
class Scans:
    """Inferred scans: a scan id per slice, and each slice's position along its scan."""

    scan: np.ndarray  # (N,) int, 0.. in order of decreasing size
    position: np.ndarray  # (N,) int, 0.. along the scan

    def groups(self, blocks: int = 5) -> np.ndarray:
        """CV group per slice: its scan and contiguous block ('s3:1'), as groups.csv names them."""
        out = np.empty(len(self.scan), object)
        for s in np.unique(self.scan):
            m = self.scan == s
            out[m] = [f"s{s}:{b}" for b in contiguous_blocks(self.position[m], int(m.sum()), blocks)]
        return out.astype(str)

    def sizes(self) -> list[int]:
        """Slices per scan, largest first."""
        return sorted(np.bincount(self.scan).tolist(), reverse=True)


BODY_HU = -500.0  # the body outline: above this (air, lungs' far side and the table's foam below)


def _body(s: np.ndarray, threshold: float) -> np.ndarray:
    """The largest component above the body threshold (a grey level), holes filled."""
    m = ndi.binary_opening(s > threshold, iterations=2)
    lab, n = ndi.label(m)
    if n == 0:
        return m
    return ndi.binary_fill_holes(lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _pool(a: np.ndarray) -> np.ndarray:
    """Mean of POOL x POOL cells, flattened."""
    k = SIZE // POOL
    return a.reshape(POOL, k, POOL, k).mean(axis=(1, 3)).ravel()


def _fov(s: np.ndarray) -> tuple[int, int, int, int]:
    """Rows at the top and bottom, columns at the left and right, that hold a single value (a volume's padding)."""
    flat_r, flat_c = (s == s[:, :1]).all(axis=1), (s == s[:1, :]).all(axis=0)
    run = lambda v: int(np.argmin(v)) if not v.all() else len(v)  # noqa: E731
    return run(flat_r), run(flat_r[::-1]), run(flat_c), run(flat_c[::-1])


def _distances(f: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows."""
    sq = (f * f).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0))


def _order(f: np.ndarray) -> np.ndarray:
    """Position of each slice along its scan: spectral ordering of the image similarity graph."""
    n = len(f)
    if n <= 2:
        return np.arange(n)
    d = _distances(f)
    sigma = float(np.median(np.sort(d, axis=1)[:, min(n - 1, 5)]))  # the 5th neighbour's distance: a connected graph
    w = np.exp(-((d / max(sigma, 1e-9)) ** 2))
    lap = np.diag(w.sum(1)) - w
    vec = np.linalg.eigh(lap)[1][:, 1]
    return np.argsort(np.argsort(vec))


def infer_scans(x: np.ndarray, link: float = LINK, fov_link: float = FOV_LINK) -> Scans:
    """Scans and slice order of slices `x` from their pixels alone (windowed per slice or not)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components
    from tqdm import tqdm

    fov = np.array([_fov(s) for s in x])  # on the slices as given: re-rendering would flatten clipped air too
    per_slice, cal = calibration(x, where="groups", say=lambda _: None)
    x = Contrast(per_slice=per_slice).canonical(x)  # the body threshold and the image descriptor need one rendering
    threshold = cal.grey(BODY_HU)
    body = np.stack([_pool(_body(s, threshold).astype(np.float32)) for s in tqdm(x, desc="scans: outlines", leave=False)])
    image = np.stack([_pool(s.astype(np.float32) / 255.0) for s in x])
    d = _distances(body)
    same_fov = (fov[:, None, :] == fov[None, :, :]).all(-1) & (fov.sum(1) > 0)[:, None]
    adj = (d < link) | (same_fov & (d < fov_link))
    _, comp = connected_components(csr_matrix(adj), directed=False)
    sizes = np.bincount(comp)
    rank = np.argsort(np.argsort(-sizes, kind="stable"), kind="stable")
    scan = rank[comp]
    position = np.zeros(len(x), np.int64)
    for s in np.unique(scan):
        m = np.flatnonzero(scan == s)
        position[m] = _order(image[m])
    return Scans(scan, position)


def fold_groups(mode: str, data: Dataset, say=LOG.info) -> np.ndarray | None:
    """The CV group of every training slice by `cv.groups` (auto: groups.csv, else scans inferred from the slices)."""
    if mode in ("auto", "file") and data.groups_file.is_file():
        say(f"groups: {data.groups_file}")
        return data.groups()
    if mode == "file":
        raise UserError(data.groups_file, "not found (cv.groups: file): write it with `comp data groups DIR --write`, or use auto")
    if mode == "none":
        say("groups: none (random folds: neighbouring slices of one scan can land in training and in the scored fold)")
        return None
    scans = infer_scans(data.x_train)
    alone = sum(s for s in scans.sizes() if s == 1)
    if alone > len(scans.scan) / 2:  # most slices have no scan mate (the phantom): random folds, as before groups existed
        say(f"groups: none inferred ({alone} of {len(scans.scan)} slices stand alone): random folds")
        return None
    say(f"groups: inferred from the slices ({len(scans.sizes())} scans, largest {scans.sizes()[:5]}); "
        f"`comp data groups {data.root} --write` keeps them in groups.csv")  # fmt: skip
    return scans.groups()


def dataset_scans(data: Dataset, link: float = LINK, fov_link: float = FOV_LINK) -> tuple[Scans, int]:
    """Scans of a data set's training and test slices inferred together; (scans, number of training slices first)."""
    x = data.x_train if not data.has_test_images else np.concatenate([data.x_train, data.x_test])
    return infer_scans(x, link, fov_link), len(data.x_train)


def describe(data: Dataset, scans: Scans, n_train: int) -> str:
    """What `comp data groups` prints: scans and their sizes, test slices sharing a scan with training ones, and the
    agreement with the data set's own groups.csv where it has one."""
    sizes = scans.sizes()
    lines = [f"{data.root}: {len(sizes)} scans inferred from {len(scans.scan)} slices; sizes {sizes[:12]}{' ...' if len(sizes) > 12 else ''}",
             f"  {sum(s == 1 for s in sizes)} slices stand alone (no close neighbour)"]  # fmt: skip
    if len(scans.scan) > n_train:
        test_scans = scans.scan[n_train:]
        shared = np.isin(test_scans, scans.scan[:n_train])
        lines.append(f"  {int(shared.sum())} of {len(test_scans)} test slices share a scan with training slices")
    table = data.groups_table()
    if table is not None:
        from sklearn.metrics import adjusted_rand_score

        truth = table["volume"] if "volume" in table else table["group"]
        lines.append(f"  against {data.groups_file} ({truth.nunique()} volumes): adjusted Rand index {adjusted_rand_score(truth, scans.scan[:n_train]):.3f}")
    return "\n".join(lines) + "\n"


def write_groups(data: Dataset, scans: Scans, blocks: int, force: bool = False) -> None:
    """groups.csv (image, group, volume, slice) of the training slices from inferred scans; an existing file only with force."""
    if data.groups_file.is_file() and not force:
        raise UserError(data.groups_file, "exists (the data's own groups?): pass --force to replace it with inferred ones")
    n = len(data.x_train)
    part = Scans(scans.scan[:n], scans.position[:n])
    write_groups_csv(data.groups_file, image_names(n), list(zip(part.groups(blocks), [f"s{s}" for s in part.scan], part.position)))
