"""A learnable abdominal/pelvic CT phantom written in the exact challenge layout.

Each slice is drawn in Hounsfield units and rendered through the challenge-like window
(comp.data.contrast.hu_to_grey, -1000..1000 HU), so soft tissues sit a few grey levels apart as in the
challenge; or through a window drawn per slice (`window_per_slice`), and at a coarser effective
resolution (`coarse`: voxels that many pixels wide, stretched back to 512x512). Each slice is drawn analytically from an anatomy that varies with a random level (upper abdomen to
pelvis): body outline with fat and muscle wall, spine and ribs, organs, vessels, bowel loops and
lesions. Structures touch without background gaps (liver/kidney, psoas/vertebra, paired muscles),
some visible structures are never annotated (fat, abdominal wall, table, stomach, gallbladder), and
every slice gets a random rotation and flip. Annotated structures get random uint8 ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.parallel import n_workers
from comp.data.anatomy import AIR, FAT, HU_PER_TEXTURE, Anatomy, Blob, random_frame
from comp.data.calibration import HU_WINDOW
from comp.data.contrast import draw_windows, hu_to_grey, window_ranges_problem
from comp.data.images import SIZE, image_names, write_images
from comp.data.labels import WINDOWS_CSV, write_label_csv, write_windows


VERSION = 2  # bumped whenever the drawing changes, so a stale embedded phantom is regenerated


def render_slice(seed: int, novel: bool = False, window: tuple[float, float] = HU_WINDOW, coarse: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Render one (image, instance map) pair, deterministic in `seed`, through the HU `window`; `coarse` > 1 renders
    the image as if scanned with voxels that many pixels wide and stretched back to 512x512 (as the proxy's 3 mm)."""
    rng = np.random.default_rng(seed)
    frame = random_frame(rng)
    parts = Anatomy(rng, float(rng.uniform(0, 1)), novel).build()
    texture = ndi.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), 1.5) * 3.5
    img = np.full((SIZE, SIZE), AIR, np.float32)
    inst = np.zeros((SIZE, SIZE), np.int32)
    groups: dict[str, int] = {}
    ann_ids: set[int] = set()
    for k, part in enumerate(parts, start=1):
        if part.halo > 0:
            bl = part.blob
            pad = part.halo / frame.zoom  # the fat rim's width stays in image pixels
            grow = Blob(bl.u, bl.v, bl.a + pad, bl.b + pad, bl.angle, bl.wobble)
            hwin, hm = grow.mask(frame)
            img[hwin][hm] = FAT + 3 * HU_PER_TEXTURE * texture[hwin][hm]
            inst[hwin][hm] = 0
        win, m = part.blob.mask(frame)
        if not m.any():
            continue
        img[win][m] = part.grey + part.texture * HU_PER_TEXTURE * texture[win][m]
        pid = groups.setdefault(part.group, k) if part.group else k
        inst[win][m] = pid if part.annotated else 0
        if part.annotated:
            ann_ids.add(pid)
    labels = _connected_instances(inst, ann_ids, rng)
    # Touching annotated structures sometimes show a faint fat plane, sometimes nothing at all.
    edge = _interfaces(labels)
    img[edge] -= rng.uniform(0, 80)
    if coarse > 1:
        img = _coarse(img, coarse, float(rng.uniform(10, 25)), rng)
    else:
        img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, rng.uniform(10, 25), img.shape)  # quantum noise, HU
    return hu_to_grey(img, *window), labels


def _coarse(img: np.ndarray, f: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """The slice averaged into voxels f pixels wide, with its noise at that scale, stretched back (linear) to full size."""
    small = ndi.zoom(ndi.gaussian_filter(img, f / 2), 1 / f, order=1, grid_mode=True, mode="nearest")
    small += rng.normal(0, noise, small.shape)
    return ndi.zoom(small, (img.shape[0] / small.shape[0], img.shape[1] / small.shape[1]), order=1, grid_mode=True, mode="nearest")


def _connected_instances(
    inst: np.ndarray, ids: set[int], rng: np.random.Generator, min_px: int = 24, max_regions: int = 30
) -> np.ndarray:
    """Keep each annotated instance's largest connected piece (the largest `max_regions`) with a random uint8 id."""
    out = np.zeros(inst.shape, np.uint8)
    kept = []
    objs = ndi.find_objects(inst)
    for pid in sorted(ids):
        if pid > len(objs) or objs[pid - 1] is None:
            continue
        win = objs[pid - 1]
        comp, n = ndi.label(inst[win] == pid)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        if sizes.max() < min_px:
            continue
        kept.append((win, comp == (1 + int(sizes.argmax()))))
    kept = sorted(kept, key=lambda wm: -int(wm[1].sum()))[:max_regions]
    new_ids = rng.permutation(np.arange(1, 256))[: len(kept)]
    for (win, m), nid in zip(kept, new_ids):
        out[win][m] = nid
    return out


def _interfaces(labels: np.ndarray) -> np.ndarray:
    """Pixels where two different annotated structures touch (4-neighbourhood)."""
    edge = np.zeros(labels.shape, bool)
    for ax in (0, 1):
        a, b = labels, np.roll(labels, 1, axis=ax)
        e = (a != b) & (a > 0) & (b > 0)
        edge |= e
    return edge


def _rendering(window_per_slice: tuple, coarse: float, test_coarse: float | None) -> dict:
    """The stamp's entries for a rendering other than the default (none for the default, so its stamp stays)."""
    out = {"window_per_slice": ":".join(f"{v:g}" for v in window_per_slice)} if len(window_per_slice) else {}
    out |= {"coarse": f"{coarse:g}"} if coarse != 1 else {}
    return out | ({"test_coarse": f"{test_coarse:g}"} if test_coarse is not None else {})


def stamp(**settings) -> str:
    """The PHANTOM.txt line of a phantom made with these settings by this version of the generator."""
    return "comp phantom: " + " ".join(f"{k}={v}" for k, v in settings.items()) + f" version={VERSION}\n"


def _render_job(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Pool entry point for render_slice."""
    return render_slice(*job)


def generate(
    out: str | Path,
    n_train: int = 2000,
    n_labelled: int = 400,
    n_test: int = 500,
    seed: int = 0,
    workers: int = 0,
    window_per_slice: tuple[float, ...] = (),
    coarse: float = 1.0,
    test_coarse: float | None = None,
) -> Path:
    """Write a phantom data set in the challenge layout (plus Y_test.csv) and return its folder.

    `window_per_slice` [lo_from, lo_to, hi_from, hi_to]: each slice through its own window (seeded); `coarse`: the
    effective voxel width in pixels (`test_coarse`: the test split's, if different)."""
    from multiprocessing import Pool

    from tqdm import tqdm

    out = Path(out)
    if not 0 <= n_labelled <= n_train:
        raise ValueError(f"n_labelled={n_labelled} must lie in 0..n_train={n_train}")
    problem = window_ranges_problem(window_per_slice) if len(window_per_slice) else None
    if problem:
        raise UserError("--window-per-slice", problem)
    coarseness = {"train": coarse, "test": coarse if test_coarse is None else test_coarse}
    splits = {"train": (n_train, False, seed * 1_000_003), "test": (n_test, True, seed * 1_000_003 + 500_000)}
    for split, (n, novel, base) in splits.items():
        xs = np.empty((n, SIZE, SIZE), np.uint8)
        ys = np.zeros((n, SIZE, SIZE), np.uint8)
        rng = np.random.default_rng([seed, int(novel)])
        windows = draw_windows(window_per_slice, n, rng) if len(window_per_slice) else np.tile(HU_WINDOW, (n, 1))
        jobs = [(base + i, novel, tuple(windows[i]), coarseness[split]) for i in range(n)]
        with Pool(n_workers(workers)) as pool:
            it = pool.imap(_render_job, jobs, chunksize=8)
            for i, (x, y) in enumerate(tqdm(it, total=n, desc=f"phantom {split}", leave=False)):
                xs[i] = x
                if split == "test" or i < n_labelled:
                    ys[i] = y
        write_images(out / f"X_{split}", xs)
        write_label_csv(out / f"Y_{split}.csv", ys, image_names(n))
        if len(window_per_slice):  # the truth a calibration is checked against (`comp data stats`); no method reads it
            write_windows(out / (WINDOWS_CSV if split == "train" else f"{split}_{WINDOWS_CSV}"), image_names(n), windows)
    atomic_write_text(
        out / "PHANTOM.txt",
        stamp(n_train=n_train, n_labelled=n_labelled, n_test=n_test, seed=seed, **_rendering(window_per_slice, coarse, test_coarse)),
    )
    return out
