"""Challenge I/O: round trips, numeric order, zips, caches, and one clear error per bad input."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from comp.core.errors import UserError
from comp.data.dataset import Dataset
from comp.data.images import N_PIXELS, cached_array, default_row_labels, image_names, write_images
from comp.data.labels import read_label_csv, write_label_csv
from tests.conftest import run_cli


def _maps(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((n, 512, 512), np.uint8)
    for i in range(n):
        for _ in range(6):
            y, x = rng.integers(0, 480, 2)
            m[i, y : y + 30, x : x + 30] = rng.integers(1, 256)
    m[0, 0, :4] = [0, 9, 99, 255]  # one-, two- and three-digit tokens
    return m


def test_label_csv_round_trip_matches_pandas(tmp_path: Path) -> None:
    maps = _maps(3)
    path = tmp_path / "Y.csv"
    write_label_csv(path, maps)
    table = read_label_csv(path)
    assert table.maps.dtype == np.uint8
    assert np.array_equal(table.maps, maps)
    assert table.columns == image_names(3) and table.row_labels is None
    df = pd.read_csv(path, index_col=0)
    assert list(df.index[:2]) == ["Pixel 0", "Pixel 1"] and df.index.name is None
    assert list(df.columns) == ["0.png", "1.png", "2.png"]
    assert np.array_equal(df.to_numpy().T.reshape(3, 512, 512), maps)
    # Byte-identical to pandas' own writer.
    ref = tmp_path / "ref.csv"
    pd.DataFrame(maps.reshape(3, -1).T, index=default_row_labels(), columns=image_names(3)).to_csv(ref)
    assert ref.read_bytes() == path.read_bytes()


def test_small_blocks_and_custom_row_labels_are_mirrored(tmp_path: Path) -> None:
    maps = _maps(2, seed=1)
    labels = [f"px{i}" for i in range(N_PIXELS)]
    path = tmp_path / "Y.csv"
    write_label_csv(path, maps, row_labels=labels)
    table = read_label_csv(path, block_bytes=1 << 16)
    assert np.array_equal(table.maps, maps)
    assert table.row_labels == labels


def test_columns_in_any_order_and_crlf(tmp_path: Path) -> None:
    maps = _maps(3, seed=2)
    df = pd.DataFrame(maps.reshape(3, -1).T, index=default_row_labels(), columns=image_names(3))
    path = tmp_path / "Y.csv"
    df[["2.png", "0.png", "1.png"]].to_csv(path, lineterminator="\r\n")
    table = read_label_csv(path)
    assert table.columns == image_names(3)
    assert np.array_equal(table.maps, maps)


def test_integral_floats_take_the_tolerant_path(tmp_path: Path) -> None:
    maps = _maps(2, seed=3)
    path = tmp_path / "Y.csv"
    df = pd.DataFrame(maps.reshape(2, -1).T.astype(float), index=default_row_labels(), columns=image_names(2))
    df.to_csv(path)
    assert np.array_equal(read_label_csv(path).maps, maps)


def _bad_csv(tmp_path: Path, mutate) -> Path:
    maps = _maps(2, seed=4)
    df = pd.DataFrame(maps.reshape(2, -1).T.astype(object), index=default_row_labels(), columns=image_names(2))
    df = mutate(df)
    path = tmp_path / "bad.csv"
    df.to_csv(path)
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda df: df.iloc[:-1], "wrong row count 262143"),
        (lambda df: df.assign(**{"1.png": df["1.png"].where(df.index != "Pixel 7", "abc")}), "non-integer value 'abc'"),
        (lambda df: df.assign(**{"1.png": df["1.png"].where(df.index != "Pixel 7", 2.5)}), "non-integer value 2.5"),
        (lambda df: df.assign(**{"0.png": df["0.png"].where(df.index != "Pixel 3", 256)}), "out of range"),
        (lambda df: df.assign(**{"0.png": df["0.png"].where(df.index != "Pixel 3", -1)}), "out of range"),
        (lambda df: df.rename(columns={"1.png": "0.png"}), "duplicate column '0.png'"),
        (lambda df: df.rename(columns={"1.png": "2.png"}), "missing column '1.png'"),
        (lambda df: df.rename(columns={"1.png": "b.jpg"}), "bad column name 'b.jpg'"),
        (lambda df: df.rename(columns={"1.png": "2.png"}), "column '2.png' is out of sequence"),
        (lambda df: df.assign(**{"1.png": df["1.png"].where(df.index != "Pixel 7", None)}), "empty value at row 8, column '1.png'"),
        (lambda df: df.assign(**{"1.png": df["1.png"].where(df.index != "Pixel 3", 256)}), "out of range 0..255 at row 4, column '1.png'"),
    ],
)
def test_bad_csv_gives_one_clear_error(tmp_path: Path, mutate, message: str) -> None:
    path = _bad_csv(tmp_path, mutate)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as exc:
        read_label_csv(path)
    assert str(path) in str(exc.value)


def test_ragged_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "Y.csv"
    write_label_csv(path, _maps(2, seed=5))
    lines = path.read_bytes().split(b"\n")
    lines[101] += b",7"  # row 101 of the data (line 102 of the file)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match="row 101 has 4 fields; expected 3"):
        read_label_csv(path)


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        read_label_csv(tmp_path / "nope.csv")


def test_images_load_in_numeric_order_from_folder_and_zip(tmp_path: Path) -> None:
    imgs = (np.arange(12)[:, None, None] * 20 + np.zeros((12, 512, 512))).astype(np.uint8)
    write_images(tmp_path / "X_train", imgs)
    with zipfile.ZipFile(tmp_path / "X.zip", "w") as zf:
        for i in range(12):
            zf.write(tmp_path / "X_train" / f"{i}.png", f"X_train/{i}.png")
    from comp.data.images import read_images_uncached

    a = read_images_uncached(tmp_path / "X_train")
    b = read_images_uncached(tmp_path / "X.zip")
    assert np.array_equal(a, imgs) and np.array_equal(b, imgs)  # 10.png after 9.png, not after 1.png


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "1.png").unlink(), "gap in numbering: 1.png is missing"),
        (lambda d: Image.new("L", (256, 512)).save(d / "2.png"), "wrong image size 256x512"),
        (lambda d: Image.new("RGB", (512, 512)).save(d / "2.png"), "colour image"),
        (lambda d: (d / "2.png").write_bytes(b"not a png"), "not a readable image"),
    ],
)
def test_bad_images(tmp_path: Path, make, message: str) -> None:
    from comp.data.images import read_images_uncached

    d = tmp_path / "X_train"
    write_images(d, np.zeros((3, 512, 512), np.uint8))
    make(d)
    with pytest.raises(UserError, match=message):
        read_images_uncached(d)


def test_cache_is_invalidated_when_the_source_changes(tmp_path: Path) -> None:
    src = tmp_path / "X"
    write_images(src, np.zeros((2, 512, 512), np.uint8))
    calls = []

    def load(p: Path) -> np.ndarray:
        from comp.data.images import read_images_uncached

        calls.append(p)
        return read_images_uncached(p)

    cache = tmp_path / "cache"
    a = cached_array(src, cache, "X", load)
    b = cached_array(src, cache, "X", load)
    assert len(calls) == 1 and np.array_equal(a, b)
    write_images(src, np.full((3, 512, 512), 5, np.uint8))
    c = cached_array(src, cache, "X", load)
    assert len(calls) == 2 and c.shape[0] == 3 and c.max() == 5
    assert len(list(cache.glob("X-*.npy"))) == 1  # the stale cache is gone


def test_two_sources_sharing_one_cache_folder_keep_their_own_entries(tmp_path: Path) -> None:
    """One $COMP_CACHE for several data sets: loading the second does not evict the first's cache."""
    calls = []

    def load(p: Path) -> np.ndarray:
        calls.append(p)
        return np.full((1, 4, 4), len(calls), np.uint8)

    a, b = tmp_path / "a" / "X_train", tmp_path / "b" / "X_train"
    for src in (a, b):
        write_images(src, np.zeros((1, 512, 512), np.uint8))
    cache = tmp_path / "cache"
    (cache / "X_train-0123456789abcdef.npy").parent.mkdir()
    np.save(cache / "X_train-0123456789abcdef.npy", np.zeros(1))  # an entry of the older naming: removed on a write
    first = cached_array(a, cache, "X_train", load)
    cached_array(b, cache, "X_train", load)
    again = cached_array(a, cache, "X_train", load)
    assert calls == [a, b] and np.array_equal(first, again)
    assert len(list(cache.glob("X_train-*.npy"))) == 2


def test_dataset_reads_the_layout(tiny_phantom: Path) -> None:
    d = Dataset(tiny_phantom)
    assert d.x_train.shape == (12, 512, 512) and d.x_test.shape == (4, 512, 512)
    assert d.y_train.dtype == np.uint8
    assert list(d.annotated) == list(range(8)) and list(d.unlabelled) == [8, 9, 10, 11]
    assert d.has_test_labels and d.y_test.shape == (4, 512, 512)
    assert d.row_labels() == default_row_labels()


def test_dataset_from_zips(tiny_phantom: Path, tmp_path: Path) -> None:
    root = tmp_path / "zipped"
    root.mkdir()
    shutil.copy(tiny_phantom / "Y_train.csv", root)
    for split in ("X_train", "X_test"):
        shutil.make_archive(str(root / split), "zip", tiny_phantom, split)
    d = Dataset(root)
    ref = Dataset(tiny_phantom)
    assert np.array_equal(d.x_train, ref.x_train) and np.array_equal(d.x_test, ref.x_test)


def test_dataset_errors(tmp_path: Path, tiny_phantom: Path) -> None:
    with pytest.raises(UserError, match="data folder not found"):
        Dataset(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no X_train/ folder or X_train.zip"):
        Dataset(tmp_path / "empty")
    root = tmp_path / "mismatch"
    shutil.copytree(tiny_phantom / "X_train", root / "X_train")
    write_label_csv(root / "Y_train.csv", np.zeros((5, 512, 512), np.uint8))
    with pytest.raises(UserError, match="5 image columns but 12 images in X_train: no column for 5.png and after"):
        Dataset(root).y_train
    write_label_csv(root / "Y_train.csv", np.zeros((13, 512, 512), np.uint8))
    with pytest.raises(UserError, match="13 image columns but 12 images in X_train: column '12.png' and after have no image"):
        Dataset(root).y_train


def test_cli_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli("score", str(tmp_path / "truth.csv"), str(tmp_path / "pred.csv"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "truth.csv: file not found" in r.stderr


def test_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub.csv"
    path.write_text("old")
    with pytest.raises(ValueError):
        write_label_csv(path, np.zeros((2, 512, 512), np.int32))
    bad = np.zeros((2, 512, 512), np.uint8)
    with pytest.raises(ValueError):
        write_label_csv(path, bad, columns=["0.png"])
    # A failure after the header and the first blocks are written (too few row labels for the second block).
    with pytest.raises(ValueError):
        write_label_csv(path, bad, row_labels=[f"Pixel {i}" for i in range(20_000)], block_rows=16_384)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temp file left behind


def test_csvs_as_pandas_users_write_them(tmp_path):
    """A quoted header and trailing blank lines are read; a file written with index=False is named exactly."""
    import pandas as pd

    from comp.data.images import image_names
    from comp.data.labels import read_label_csv, write_label_csv

    y = np.zeros((2, 512, 512), np.uint8)
    y[0, :10, :10] = 3
    y[1, 100:, 7] = 200
    write_label_csv(tmp_path / "a.csv", y, image_names(2))
    raw = (tmp_path / "a.csv").read_bytes()
    (tmp_path / "blank.csv").write_bytes(raw + b"\n\r\n")
    (tmp_path / "quoted.csv").write_bytes(raw.replace(b",0.png,1.png", b'"","0.png","1.png"', 1))
    for name in ("blank.csv", "quoted.csv"):
        assert np.array_equal(read_label_csv(tmp_path / name).maps, y), name
    df = pd.DataFrame(y.reshape(2, -1).T, columns=image_names(2))
    df.to_csv(tmp_path / "noindex.csv", index=False)
    with pytest.raises(UserError, match=r"first column is '0.png'.*index=False"):
        read_label_csv(tmp_path / "noindex.csv")


def test_float_written_labels_take_the_fast_reader(tmp_path, monkeypatch):
    """'3.0'-style values (pandas floats) parse in the fast path; a real fraction still gets its exact error."""
    import comp.data.labels as io_mod
    from comp.data.images import image_names
    from comp.data.labels import read_label_csv

    y = np.zeros((2, 512, 512), np.uint8)
    y[0, :10, :10] = 3
    y[1, 5:, 9] = 255
    df = pd.DataFrame(y.reshape(2, -1).T.astype(float), columns=image_names(2), index=[f"Pixel {i}" for i in range(512 * 512)])
    df.to_csv(tmp_path / "f.csv")
    assert b"3.0," in (tmp_path / "f.csv").read_bytes()[:200_000] or b"255.0" in (tmp_path / "f.csv").read_bytes()
    monkeypatch.setattr(io_mod, "_read_csv_slow", lambda path: (_ for _ in ()).throw(AssertionError("slow path")))
    assert np.array_equal(read_label_csv(tmp_path / "f.csv").maps, y)
    monkeypatch.undo()
    df.iloc[7, 1] = 2.5
    df.to_csv(tmp_path / "g.csv")
    with pytest.raises(UserError, match="non-integer value 2.5"):
        read_label_csv(tmp_path / "g.csv")
