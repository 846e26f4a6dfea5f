"""Volume import: orientation (radiological display), resampling, components, groups, errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from comp.core.errors import UserError
from comp.data.dataset import Dataset
from comp.data.volumes import ImportConfig, axial_slices, import_volumes, load_volume, split_components
from tests.conftest import run_cli

SHAPE = (40, 30, 6)  # x (towards the patient's right in RAS), y (anterior), z (superior)


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume whose marked corner lies at the patient's right-anterior side, with labels."""
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[5:35, 5:25, :] = 40.0  # soft tissue
    ct[30:35, 20:25, :] = 1000.0  # the marked corner: right (high x), anterior (high y)
    lab = np.zeros(SHAPE, np.int16)
    lab[30:35, 20:25, :] = 7
    lab[8:14, 8:12, :] = 3
    lab[18:22, 8:12, :] = 3  # structure 3 has two separate pieces
    return ct, lab


def _nifti(tmp: Path, ct: np.ndarray, lab: np.ndarray, zooms=(1.0, 2.0, 3.0)) -> tuple[Path, Path]:
    aff = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(ct, aff), tmp / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp / "seg.nii.gz")
    return tmp / "ct.nii.gz", tmp / "seg.nii.gz"


def _check_corner(img: np.ndarray) -> None:
    """The marked corner (patient's right, anterior) must be at the image's top-left."""
    ys, xs = np.nonzero(img > 250)
    assert ys.mean() < 256 and xs.mean() < 256


def test_nifti_import_lands_the_marked_corner(tmp_path: Path) -> None:
    ct, lab = _volume()
    img, seg = _nifti(tmp_path, ct, lab)
    out = import_volumes([img], [seg], tmp_path / "out", ImportConfig(min_px=5))
    d = Dataset(out)
    assert d.x_train.shape == (6, 512, 512)
    _check_corner(d.x_train[0])
    y = d.y_train[0]
    bright = d.x_train[0] > 250
    assert (y[bright] > 0).mean() > 0.9  # labels stay on the structures they mark
    ids = np.unique(y[y > 0])
    assert len(ids) == 3  # 7, and two components of 3, each its own region
    groups = pd.read_csv(out / "groups.csv")
    assert list(groups["volume"]) == ["ct.nii.gz"] * 6 and groups["group"].nunique() == 5


def test_aspect_ratio_is_kept(tmp_path: Path) -> None:
    ct, lab = _volume()
    img, seg = _nifti(tmp_path, ct, lab, zooms=(1.0, 1.0, 3.0))
    sl, spacing = axial_slices(load_volume(img))
    assert sl.shape[1:] == (30, 40) and spacing == (1.0, 1.0)  # rows: y (anterior up), cols: x
    out = import_volumes([img], [seg], tmp_path / "o", ImportConfig())
    x = Dataset(out).x_train[0]
    body = np.argwhere(x > 100)
    h, w = np.ptp(body[:, 0]) + 1, np.ptp(body[:, 1]) + 1
    assert w / h == pytest.approx(30 / 20, rel=0.05)


def test_nrrd_lps_import(tmp_path: Path) -> None:
    import nrrd

    ct, _ = _volume()
    # The same anatomy in LPS voxel order: x grows to the patient's left, y to posterior.
    lps = ct[::-1, ::-1, :]
    nrrd.write(str(tmp_path / "ct.nrrd"), lps, {"space": "left-posterior-superior", "space directions": np.eye(3)})
    sl, _ = axial_slices(load_volume(tmp_path / "ct.nrrd"))
    _check_corner(np.where(sl[0] > 500, 255, 0))


def test_dicom_series_import(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset as Dcm, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct, _ = _volume()
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(SHAPE[2]):
        ds = Dcm()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        # LPS: rows of the pixel array run posterior (+y), columns run to the patient's left (+x).
        px = ct[::-1, ::-1, k].T  # (rows=y_lps, cols=x_lps)
        ds.Rows, ds.Columns = px.shape
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(k) * 3]
        ds.PixelSpacing = [1, 1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (px + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{SHAPE[2] - k}.dcm", enforce_file_format=True)
    vol = load_volume(folder)
    assert vol.data.shape == SHAPE
    sl, _ = axial_slices(vol)
    _check_corner(np.where(sl[0] > 500, 255, 0))


def test_components_get_distinct_ids_in_range() -> None:
    lab = np.zeros((60, 60), np.int32)
    for i in range(300):  # 300 separate one-pixel-apart blobs of one structure
        r, c = divmod(i, 20)
        lab[r * 3 : r * 3 + 2, c * 3 : c * 3 + 2] = 5
    out = split_components(lab, np.random.default_rng(0), min_px=1)
    ids = np.unique(out[out > 0])
    assert len(ids) == 255 and ids.min() >= 1 and ids.max() <= 255  # at most 255 per slice
    small = split_components(lab, np.random.default_rng(0), min_px=5)
    assert small.max() == 0  # components below the minimum size are dropped


def test_mismatched_shapes_and_unknown_types(tmp_path: Path) -> None:
    ct, lab = _volume()
    img, _ = _nifti(tmp_path, ct, lab)
    nib.save(nib.Nifti1Image(lab[:, :, :3], np.eye(4)), tmp_path / "short.nii.gz")
    with pytest.raises(UserError, match="does not match image volume"):
        import_volumes([img], [tmp_path / "short.nii.gz"], tmp_path / "o", ImportConfig())
    (tmp_path / "scan.mha").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown file type"):
        load_volume(tmp_path / "scan.mha")
    r = run_cli("data", "import-volumes", "--images", str(img), "--labels", str(tmp_path / "short.nii.gz"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "does not match image volume" in r.stderr and "Traceback" not in r.stderr


def test_proxy_offline_without_cache_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import comp.data.proxy as proxy

    monkeypatch.setattr(proxy, "PACKAGE", "comp-no-such-package==0.0.0")
    with pytest.raises(UserError, match="not cached and could not download"):
        proxy.fetch_archive(tmp_path / "cache")
    bad = tmp_path / "cache2"
    bad.mkdir()
    (bad / proxy.ARCHIVE).write_bytes(b"tampered")
    with pytest.raises(UserError, match="sha256 mismatch"):
        proxy.fetch_archive(bad)


def test_the_proxy_is_made_as_noisy_as_a_native_slice_unless_told_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import comp.data.proxy as proxy
    from comp.cli import parser

    got = []
    monkeypatch.setattr(proxy, "fetch_archive", lambda cache: cache / proxy.ARCHIVE)
    monkeypatch.setattr(proxy, "extract", lambda archive, members, dest: [dest / m for m in members])
    monkeypatch.setattr(proxy, "import_volumes", lambda images, labels, out, cfg, *a, **k: got.append(cfg.noise_hu))
    proxy.build_proxy(tmp_path / "p", tmp_path / "cache")
    assert got == [15.0] and "noise sd 15 HU" in (tmp_path / "p" / proxy.MARKER).read_text()
    # The command line: the proxy defaults to the native noise, --noise-hu 0 gives the smooth proxy; a native import adds none.
    assert parser().parse_args(["data", "proxy"]).noise_hu == 15.0
    assert parser().parse_args(["data", "proxy", "--noise-hu", "0"]).noise_hu == 0.0
    assert parser().parse_args(["data", "import-volumes", "--images", "a.nii", "--out", "o"]).noise_hu == 0.0


def test_folds_take_contiguous_slice_blocks(tmp_path: Path) -> None:
    from comp.pipeline.cv import make_folds

    ct = np.full((20, 20, 25), 40.0, np.float32)
    lab = np.zeros(ct.shape, np.int16)
    lab[5:15, 5:15, :] = 1
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "a_seg.nii.gz")
    out = import_volumes([tmp_path / "a.nii.gz"], [tmp_path / "a_seg.nii.gz"], tmp_path / "o", ImportConfig(blocks=5))
    d = Dataset(out)
    folds = make_folds(len(d.annotated), 5, seed=0, groups=d.groups()[d.annotated])
    for f in range(5):
        idx = np.flatnonzero(folds == f)
        assert len(idx) == 5 and np.all(np.diff(idx) == 1)  # one contiguous block of slices per fold


def test_default_window_is_the_challenges(tmp_path: Path) -> None:
    """Without --window, -1000 HU -> 0, 0 HU -> 127 or 128, 1000 HU -> 255 (the shared mapping)."""
    ct = np.full((60, 60, 2), -1000.0, np.float32)
    ct[10:30, 10:50, :] = 0.0
    ct[35:55, 10:50, :] = 1000.0
    img, seg = _nifti(tmp_path, ct, np.zeros(ct.shape, np.int16), zooms=(1.0, 1.0, 1.0))
    r = run_cli("data", "import-volumes", "--images", str(img), "--unlabelled", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    x = Dataset(tmp_path / "out").x_train[0]
    assert set(np.unique(x)) >= {0, 255} and (np.isin(x, (127, 128))).sum() > 10_000
    assert x[0, 0] == 0 and np.isin(x, (0, 127, 128, 255)).mean() > 0.9  # only the resampled edges lie between


def test_noise_is_added_before_windowing_and_is_the_same_in_every_rendering(tmp_path: Path) -> None:
    """--noise-hu: a flat 0 HU slab gets grey levels spread as the noise says (about 40 HU / 7.8 per level), the labels and
    the one-window slices without it are untouched, and a second window renders the same noise."""
    ct = np.full((60, 60, 2), -1000.0, np.float32)
    ct[5:55, 5:55, :] = 0.0
    img, seg = _nifti(tmp_path, ct, np.zeros(ct.shape, np.int16), zooms=(1.0, 1.0, 1.0))
    plain = Dataset(import_volumes([img], [seg], tmp_path / "plain", ImportConfig())).x_train
    noisy = Dataset(import_volumes([img], [seg], tmp_path / "noisy", ImportConfig(noise_hu=40.0))).x_train
    wide = Dataset(import_volumes([img], [seg], tmp_path / "wide", ImportConfig(-2000, 2000, noise_hu=40.0))).x_train
    inner = (slice(None), slice(150, 350), slice(150, 350))
    assert plain[inner].std() == 0 and 4.0 < noisy[inner].astype(float).std() < 6.5
    grey = lambda x, lo, hi: lo + x.astype(float) / 255 * (hi - lo)  # noqa: E731  (back to HU)
    d = grey(noisy[inner], -1000, 1000) - grey(wide[inner], -2000, 2000)
    assert np.abs(d).mean() < 10 and np.corrcoef(noisy[inner].ravel(), wide[inner].ravel())[0, 1] > 0.9


def test_noise_stays_inside_the_scanned_field_and_leaves_the_padding_one_value(tmp_path: Path) -> None:
    """A field narrower than it is tall is padded left and right with air: --noise-hu noises the field, not the padding,
    so the padding stays one grey level (what `comp data groups` links a scan's slices by)."""
    ct = np.full((60, 30, 2), 0.0, np.float32)  # 0 HU over a field half as wide as it is tall: padded with air on two sides
    img, seg = _nifti(tmp_path, ct, np.zeros(ct.shape, np.int16), zooms=(1.0, 1.0, 1.0))
    plain = Dataset(import_volumes([img], [seg], tmp_path / "plain", ImportConfig())).x_train
    noisy = Dataset(import_volumes([img], [seg], tmp_path / "noisy", ImportConfig(noise_hu=40.0))).x_train
    pad = plain == 0  # air (-1000 HU -> 0) only in the padding; the field is 0 HU (127 or 128)
    assert 0.4 < pad.mean() < 0.6
    assert np.unique(noisy[pad]).tolist() == [0] and noisy[~pad].astype(float).std() > 4.0


@pytest.mark.slow
def test_import_over_a_data_set_is_refused_unless_forced_and_never_mixes(tmp_path: Path) -> None:
    """A non-empty --out (say the challenge's data/raw) is refused; --force replaces it whole, no old slice left."""
    ct, lab = _volume()
    img, seg = _nifti(tmp_path, ct, lab)
    out = tmp_path / "raw"
    import shutil

    shutil.copy(img, tmp_path / "ct2.nii.gz")
    import_volumes([img, tmp_path / "ct2.nii.gz"], [seg, seg], out, ImportConfig(min_px=5))
    assert len(list((out / "X_train").glob("*.png"))) == 12
    before = (out / "Y_train.csv").read_bytes()
    r = run_cli("data", "import-volumes", "--images", str(tmp_path / "ct2.nii.gz"), "--labels", str(seg), "--out", str(out))
    assert r.returncode == 2 and "is not empty" in r.stderr and "--force" in r.stderr
    assert (out / "Y_train.csv").read_bytes() == before  # untouched
    r = run_cli("data", "import-volumes", "--images", str(tmp_path / "ct2.nii.gz"), "--labels", str(seg), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    d = Dataset(out)
    assert len(d.x_train) == len(d.y_train) == 6 and len(list((out / "X_train").glob("*.png"))) == 6
    assert not list(tmp_path.glob(".raw.*"))  # no staging or old folder left beside it


def test_volumes_with_the_same_file_name_get_their_own_groups(tmp_path: Path) -> None:
    """TotalSegmentator names every subject's CT ct.nii.gz: two patients must never share CV groups."""
    ct, lab = _volume()
    paths = []
    for subject in ("s01", "s02"):
        (tmp_path / subject).mkdir()
        paths.append(_nifti(tmp_path / subject, ct, lab))
    out = import_volumes([p[0] for p in paths], [p[1] for p in paths], tmp_path / "o", ImportConfig(min_px=5))
    groups = pd.read_csv(out / "groups.csv")
    assert groups["volume"].nunique() == 2 and groups["group"].nunique() == 10


@pytest.mark.parametrize("case, message", [
    ("nan", "voxels are NaN or infinite"),
    ("float_labels", "not integer labels"),
    ("no_slices", "no axial slice"),
])  # fmt: skip
def test_volumes_that_are_no_ct_or_labels_are_refused(tmp_path: Path, case: str, message: str) -> None:
    ct, lab = _volume()
    if case == "nan":
        ct[3, 3, 2] = np.nan
    if case == "float_labels":
        lab = lab.astype(np.float32) + 0.5 * (lab > 0)
    if case == "no_slices":
        ct, lab = ct[:, :, :0], lab[:, :, :0]
    img, seg = _nifti(tmp_path, ct, lab)
    r = run_cli("data", "import-volumes", "--images", str(img), "--labels", str(seg), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--window", "1000", "-1000"], "must run from low to high HU"),
    (["--window", "nan", "1000"], "expected a finite number"),
    (["--every", "0"], "--every: must be at least 1"),
    (["--noise-hu", "-5"], "--noise-hu: must be at least 0"),
])  # fmt: skip
def test_import_settings_out_of_range_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    img, seg = _nifti(tmp_path, *_volume())
    r = run_cli("data", "import-volumes", "--images", str(img), "--labels", str(seg), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
