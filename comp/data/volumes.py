"""Import labelled CT volumes (NIfTI, NRRD, DICOM series) into the challenge layout.

Slices are axial, shown the radiological way (anterior up, the patient's left on the image's
right), resampled to 512x512 with the aspect ratio kept and padded, Hounsfield units windowed to
uint8 (by default like the challenge, -1000..1000 HU), and each labelled structure split into connected components with random uint8 ids. A
sidecar groups.csv names each slice's volume and contiguous block, so CV never splits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from comp.core.atomic import atomic_write_text, staged_folder
from comp.core.errors import UserError
from comp.core.fields import bounded
from comp.data.calibration import HU_WINDOW
from comp.data.contrast import draw_windows, hu_to_grey, window_ranges_problem
from comp.data.groups import contiguous_blocks
from comp.data.images import SIZE, image_names, write_images
from comp.data.labels import GROUPS_CSV, WINDOWS_CSV, write_groups_csv, write_label_csv, write_windows

AIR_HU = -1024.0


@dataclass
class Volume:
    """A volume in RAS+ voxel order (axes grow towards Right, Anterior, Superior), with voxel sizes in mm."""

    data: np.ndarray
    zooms: tuple[float, float, float]
    name: str


def _ras_volume(data: np.ndarray, affine: np.ndarray, name: str) -> Volume:
    """Reorder a voxel array with a RAS affine to the closest canonical (RAS+) orientation."""
    import nibabel as nib

    if 0 in np.shape(data):  # checked here: the reorientation of an empty volume fails obscurely
        raise UserError(name, f"volume of shape {np.shape(data)} has no axial slice to import")
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(np.asarray(img.dataobj), zooms, name)


def _load_nrrd(path: Path) -> Volume:
    """NRRD with a 'space' and 'space directions' header."""
    import nrrd

    data, hdr = nrrd.read(str(path))
    if data.ndim != 3:
        raise UserError(path, f"expected a 3-D volume, got {data.ndim} dimensions")
    dirs = np.asarray(hdr.get("space directions", np.eye(3)), float)
    origin = np.asarray(hdr.get("space origin", np.zeros(3)), float)
    space = str(hdr.get("space", "left-posterior-superior")).lower()
    affine = np.eye(4)
    affine[:3, :3] = dirs.T
    affine[:3, 3] = origin
    if space in ("left-posterior-superior", "lps"):
        affine[:2] *= -1  # LPS -> RAS
    elif space not in ("right-anterior-superior", "ras"):
        raise UserError(path, f"unsupported NRRD space '{space}'")
    return _ras_volume(data, affine, path.name)


def _load_dicom(folder: Path) -> Volume:
    """A DICOM series in a folder: slices sorted along their normal, rescaled to HU."""
    import pydicom

    slices = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise UserError(folder, "no DICOM images found")
    row, col = (np.array(slices[0].ImageOrientationPatient[i : i + 3], float) for i in (0, 3))
    normal = np.cross(row, col)
    slices.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    arr = np.stack([d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0)) for d in slices])
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    p0 = np.array(slices[0].ImagePositionPatient, float)
    step = (np.array(slices[-1].ImagePositionPatient, float) - p0) / max(len(slices) - 1, 1) if len(slices) > 1 else normal
    # Voxel (i=column, j=row, k=slice) -> LPS, then RAS.
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * dc, col * dr, step, p0
    affine[:2] *= -1
    return _ras_volume(arr.transpose(2, 1, 0), affine, folder.name)


def load_volume(path: str | Path) -> Volume:
    """Load a CT or label volume: .nii/.nii.gz, .nrrd/.nhdr, or a folder holding a DICOM series."""
    path = Path(path)
    if not path.exists():
        raise UserError(path, "file not found")
    if path.is_dir():
        return _load_dicom(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise UserError(path, f"not a readable NIfTI file ({exc.__class__.__name__})") from None
        if len(img.shape) != 3:
            raise UserError(path, f"expected a 3-D volume, got shape {img.shape}")
        return _ras_volume(np.asarray(img.dataobj), img.affine, path.name)
    if name.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path)
    raise UserError(path, "unknown file type (expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM folder)")


def axial_slices(vol: Volume) -> tuple[np.ndarray, tuple[float, float]]:
    """(k, rows, cols) axial slices, anterior up and the patient's left on the right; (row, col) spacing in mm."""
    # Column 0 shows the patient's right (largest axis-0 index), row 0 the most anterior (largest axis-1 index).
    d = vol.data[::-1, ::-1, :]
    return np.ascontiguousarray(d.transpose(2, 1, 0)), (vol.zooms[1], vol.zooms[0])


def to_square(sl: np.ndarray, spacing: tuple[float, float], size: int = SIZE, order: int = 1, pad: float = 0.0) -> np.ndarray:
    """Resample a slice to square pixels filling `size` along its longer side, centred and padded."""
    h_mm, w_mm = sl.shape[0] * spacing[0], sl.shape[1] * spacing[1]
    scale = size / max(h_mm, w_mm)
    h, w = max(1, min(size, round(h_mm * scale))), max(1, min(size, round(w_mm * scale)))
    z = ndi.zoom(sl.astype(np.float32), (h / sl.shape[0], w / sl.shape[1]), order=order, grid_mode=True, mode="nearest")
    out = np.full((size, size), pad, np.float32)
    y0, x0 = (size - h) // 2, (size - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = z[:h, :w]
    return out


def split_components(lab: np.ndarray, rng: np.random.Generator, min_px: int = 20, max_regions: int = 255) -> np.ndarray:
    """Each labelled structure's connected components as separate regions with distinct random uint8 ids."""
    pieces = []
    for value in np.unique(lab[lab > 0]):
        comp, n = ndi.label(lab == value)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        pieces += [(int(sizes[i]), comp == i + 1) for i in range(n) if sizes[i] >= min_px]
    pieces.sort(key=lambda p: -p[0])
    out = np.zeros(lab.shape, np.uint8)
    ids = rng.permutation(np.arange(1, 256))
    for nid, (_, m) in zip(ids, pieces[:max_regions]):
        out[m] = nid
    return out


@dataclass
class ImportConfig:
    """How volumes become challenge slices."""

    window_lo: float = HU_WINDOW[0]  # the challenge-like wide window
    window_hi: float = HU_WINDOW[1]
    every: int = bounded(1, lo=1)  # keep every k-th slice
    min_px: int = bounded(20, lo=0)  # components smaller than this (at 512x512) are dropped
    blocks: int = bounded(5, lo=1)  # contiguous slice blocks per volume (the CV groups)
    seed: int = bounded(0, lo=0)
    window_per_slice: list[float] = bounded(factory=list, max_len=4)  # [lo_from, lo_to, hi_from, hi_to]: a window drawn per slice
    # Gaussian noise (sd in HU) added inside every 512x512 slice's scanned field before its windowing, seeded, the same in
    # every rendering: a smooth scan (3 mm voxels stretched 4x) made as noisy as a native one, so a wide window's rounding
    # is dithered
    noise_hu: float = bounded(0.0, lo=0)

    def violations(self) -> dict[str, str]:
        """Relations between fields that no single range states."""
        out = {} if self.window_lo < self.window_hi else {"window": f"must run from low to high HU, got {self.window_lo:g}..{self.window_hi:g}"}
        problem = window_ranges_problem(self.window_per_slice) if self.window_per_slice else None
        return out | ({"window_per_slice": problem} if problem else {})

    def windows(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 2) HU windows of n slices: the one window, or one drawn per slice."""
        if not self.window_per_slice:
            return np.tile([self.window_lo, self.window_hi], (n, 1))
        return draw_windows(self.window_per_slice, n, rng)


def _hu_slices(vol: Volume, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """A CT volume's axial slices, refused when it has none or holds values that are no Hounsfield units (NaN, inf)."""
    sl, spacing = axial_slices(vol)
    if len(sl) == 0 or sl[0].size == 0:
        raise UserError(path, f"volume of shape {vol.data.shape} has no axial slice to import")
    if np.issubdtype(sl.dtype, np.floating) and not np.isfinite(sl).all():
        raise UserError(path, f"{int((~np.isfinite(sl)).sum())} voxels are NaN or infinite: not a CT volume in HU")
    return sl, spacing


def _label_slices(label: Path, shape: tuple, image: Path) -> np.ndarray:
    """A label volume's axial slices as integers, refused unless its shape is the image's and every value is an integer label."""
    lv = load_volume(label)
    if lv.data.shape != shape:
        raise UserError(label, f"label volume shape {lv.data.shape} does not match image volume {shape} ({image})")
    sl = axial_slices(lv)[0]
    if np.issubdtype(sl.dtype, np.floating):
        bad = ~np.isfinite(sl) | (sl != np.round(sl))
        if bad.any():
            raise UserError(label, f"{int(bad.sum())} voxels are not integer labels (e.g. {sl[bad].flat[0]!r}): expected a label volume")
    if sl.size and sl.min() < 0:
        raise UserError(label, f"negative label {sl.min()}: expected 0 (background) and positive structure labels")
    return sl.astype(np.int32)


def volume_slices(image: Path, label: Path | None, cfg: ImportConfig, rng: np.random.Generator, window_rng: np.random.Generator,
                  noise_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Windowed 512x512 slices of one volume, their instance maps (zeros when unlabelled) and each slice's HU window."""
    vol = load_volume(image)
    sl, spacing = _hu_slices(vol, image)
    lab_sl = None if label is None else _label_slices(label, vol.data.shape, image)
    keep = np.arange(0, len(sl), max(1, cfg.every))
    xs = np.empty((len(keep), SIZE, SIZE), np.uint8)
    ys = np.zeros((len(keep), SIZE, SIZE), np.uint8)
    windows = cfg.windows(len(keep), window_rng)
    # Noise goes inside the scanned field only: the padding around it was never scanned (a scanner pads with one value),
    # and `comp data groups` links a scan's slices by it. Every slice of a volume shares the field.
    fov = to_square(np.ones(sl.shape[1:], np.float32), spacing, order=0) > 0 if cfg.noise_hu > 0 else None
    for n, k in enumerate(keep):
        hu = to_square(sl[k], spacing, order=1, pad=AIR_HU)
        if fov is not None:  # no draw otherwise: noiseless imports stay as they were; drawn whole, so the field's noise is as before
            hu = hu + noise_rng.normal(0.0, cfg.noise_hu, hu.shape) * fov
        xs[n] = hu_to_grey(hu, *windows[n])
        if lab_sl is not None:
            ys[n] = split_components(to_square(lab_sl[k], spacing, order=0).astype(np.int32), rng, cfg.min_px)
    return xs, ys, windows


def volume_ids(paths: list[Path]) -> list[str]:
    """A distinct id per volume for groups.csv: its file name, or the path as given where names repeat
    (TotalSegmentator names every subject's CT `ct.nii.gz`: two patients must never share a CV group)."""
    names = [Path(p).name for p in paths]
    ids = [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(dup, "given twice: each volume is imported once")
    return ids


def import_volumes(images: list[Path], labels: list[Path | None], out: Path, cfg: ImportConfig, unlabelled: list[Path] | None = None,
                   force: bool = False, replaces: str = "") -> Path:  # fmt: skip
    """Write volumes as X_train/, Y_train.csv and groups.csv (image, group, volume, slice) under `out`.

    The data set is written beside `out` and swapped in whole; a non-empty `out` is refused unless `force`
    (or it holds the marker file `replaces`, an earlier output of the caller)."""
    from tqdm import tqdm

    if len(images) != len(labels):
        raise UserError("--labels", f"{len(labels)} label volumes for {len(images)} image volumes")
    rng = np.random.default_rng(cfg.seed)
    window_rng = np.random.default_rng([cfg.seed, 1])  # its own stream: the one-window import's label ids stay as they were
    noise_rng = np.random.default_rng([cfg.seed, 2])  # and the noise its own: the same in every rendering of a volume
    xs, ys, rows, windows = [], [], [], []
    jobs = list(zip(images, labels)) + [(u, None) for u in (unlabelled or [])]
    ids = volume_ids([Path(image) for image, _ in jobs])
    with staged_folder(out, force, replaces) as stage:  # before any volume is read: a refused --out costs nothing
        for (image, label), vid in zip(tqdm(jobs, desc="volumes", leave=False), ids):
            x, y, w = volume_slices(Path(image), None if label is None else Path(label), cfg, rng, window_rng, noise_rng)
            rows += [(f"{vid}:{b}", vid, i) for i, b in enumerate(contiguous_blocks(np.arange(len(x)), len(x), cfg.blocks))]
            xs.append(x)
            ys.append(y)
            windows.append(w)
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        names = image_names(len(x_all))
        write_images(stage / "X_train", x_all)
        write_label_csv(stage / "Y_train.csv", y_all, names)
        write_groups_csv(stage / GROUPS_CSV, names, rows)
        if cfg.window_per_slice:  # the truth a calibration is checked against (`comp data stats`); no method reads it
            write_windows(stage / WINDOWS_CSV, names, np.concatenate(windows))
        if replaces:
            atomic_write_text(stage / replaces, "")  # the caller's marker, written over by it once the folder is in place
    return out
