"""Label CSVs (the challenge's transposed format: read, write, score) and per-image tables (windows.csv, groups.csv)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from comp.core.atomic import atomic_path, atomic_write_text
from comp.core.errors import UserError
from comp.data.images import N_PIXELS, PNG_NAME, SIZE, default_row_labels, image_names


WINDOWS_CSV = "windows.csv"  # a stand-in rendered with a window per slice: each training slice's HU window (image,lo,hi)
GROUPS_CSV = "groups.csv"  # each training slice's CV group (image,group[,volume,slice]): the importer's, or inferred
_COMMA, _NL, _CR = 44, 10, 13


@dataclass
class LabelTable:
    """A transposed label CSV: (N, 512, 512) uint8 maps, their column names and the CSV's row labels."""

    maps: np.ndarray
    columns: list[str]
    row_labels: list[str] | None = None  # None means the default 'Pixel i' labels
    file_columns: list[str] | None = None  # the columns in the file's order (None: already 0.png, 1.png, ...)

    def labels(self) -> list[str]:
        """The row labels, materialised."""
        return self.row_labels if self.row_labels is not None else default_row_labels(self.maps[0].size)


def scored_maps(table: LabelTable, path: Path, columns: list[str], row_labels: list[str] | None = None) -> tuple[np.ndarray, bool]:
    """A submission's maps as the official scorer reads them, or one clear error: images paired by column *position*
    (so the columns must be exactly `columns`, in order) and pixel rows matched by *label* (reordered to
    `row_labels`). Returns the maps and whether the rows had to be reordered. validate-submission and score share it."""
    if table.columns != columns:
        have, want = set(table.columns), set(columns)
        if want - have:
            first = sorted(want - have, key=lambda c: int(c[:-4]))[0]
            raise UserError(path, f"missing column '{first}' ({len(table.columns)} columns, expected {len(columns)})")
        extra = sorted(have - want, key=lambda c: int(c[:-4]))[0]
        raise UserError(path, f"unexpected column '{extra}' ({len(table.columns)} columns, expected {len(columns)})")
    if table.file_columns is not None:
        pos = next(i for i, c in enumerate(table.file_columns) if c != columns[i])
        raise UserError(path, f"column {pos + 1} is '{table.file_columns[pos]}', not '{columns[pos]}': the official scorer pairs "
                        "images by column position, so the columns must run 0.png, 1.png, ... in order")  # fmt: skip
    want = row_labels if row_labels is not None else default_row_labels(table.maps[0].size)
    got = table.labels()
    if got == want:
        return table.maps, False
    row_of = {lab: r for r, lab in enumerate(got)}
    if len(row_of) != len(got):
        dup = next(lab for r, lab in enumerate(got) if row_of[lab] != r)  # its later row: the dict kept the last one
        raise UserError(path, f"row label '{dup}' appears twice")
    missing = next((lab for lab in want if lab not in row_of), None)
    if missing is not None:
        first = next(r for r in range(len(want)) if got[r] != want[r])
        raise UserError(path, f"no row labelled '{missing}' (row {first + 1} is '{got[first]}'): pixel rows are matched "
                        "by their label, as the official scorer does")  # fmt: skip
    order = np.fromiter((row_of[lab] for lab in want), np.int64, len(want))
    return table.maps.reshape(len(table.maps), -1)[:, order].reshape(table.maps.shape), True


def _header(line: bytes, path: Path) -> list[str]:
    """Parse and check the header line of a label CSV: an empty index name, then '<n>.png' columns."""
    # pandas quotes the header when asked to ('"","0.png",...'): the quotes are not part of the names.
    fields = [f.strip().strip('"') for f in line.decode("utf-8", "replace").rstrip("\r\n").split(",")]
    if fields and PNG_NAME.match(fields[0]):
        raise UserError(path, f"the first column is '{fields[0]}', not the row labels ('Pixel 0', ...): "
                              "was it written without its index (to_csv(index=False))?")  # fmt: skip
    cols = fields[1:]
    if not cols:
        raise UserError(path, "header has no image columns")
    seen: set[str] = set()
    for c in cols:
        if c in seen:
            raise UserError(path, f"duplicate column '{c}'")
        seen.add(c)
        if not PNG_NAME.match(c):
            raise UserError(path, f"bad column name '{c}'; expected '<number>.png'")
    numbers = sorted(int(c[:-4]) for c in cols)
    if numbers != list(range(len(cols))):
        missing = sorted(set(range(len(cols))) - set(numbers))
        beyond = [n for n in numbers if n >= len(cols)]
        raise UserError(path, f"missing column '{missing[0]}.png', and column '{beyond[0]}.png' is out of sequence: "
                        f"{len(cols)} columns must be 0.png ... {len(cols) - 1}.png")  # fmt: skip
    return cols


_DEFAULT_LABELS: tuple[bytes, np.ndarray] | None = None


def _default_label_bytes() -> tuple[bytes, np.ndarray]:
    """All default row labels concatenated, and each label's start offset (computed once)."""
    global _DEFAULT_LABELS
    if _DEFAULT_LABELS is None:
        labels = [f"Pixel {i}".encode() for i in range(N_PIXELS)]
        lens = np.array([len(x) for x in labels])
        _DEFAULT_LABELS = (b"".join(labels), np.concatenate([[0], np.cumsum(lens)]))
    return _DEFAULT_LABELS


class _SlowPath(Exception):
    """The fast parser met a token it does not handle (e.g. '3.0'); pandas takes over."""


class _BlockError(Exception):
    """A problem at a row of a block, before the block's first row number is known."""

    def __init__(self, row: int, fmt: str, col: int = 0) -> None:
        self.row, self.fmt, self.col = row, fmt, col

    def at(self, row0: int, columns: list[str]) -> str:
        """The message with the file's 1-based row number and the column's name."""
        return self.fmt.format(row=row0 + self.row + 1, column=columns[self.col] if self.col < len(columns) else self.col)


@dataclass
class _Block:
    """One parsed block: values, and the raw bytes and line starts its row labels are read from."""

    vals: np.ndarray
    raw: np.ndarray
    line_start: np.ndarray


def _parse_block(buf: bytes, ncols: int) -> _Block:
    """Parse whole CSV lines into a (rows, ncols) uint8 array.

    One pass finds the separators; a token's value is its last digit, plus the tens and hundreds
    gathered only for the minority of tokens longer than one byte.
    """
    if b"." in buf:  # pandas writes a column with a missing value as floats ('3.0'): read those here, not slowly
        buf = buf.replace(b".0,", b",").replace(b".0\n", b"\n").replace(b".0\r", b"\r")
    b = np.frombuffer(buf, np.uint8)
    if (b == _CR).any():
        b = b[b != _CR]
    is_nl = b == _NL
    sep = np.flatnonzero(is_nl | (b == _COMMA))
    nl = np.flatnonzero(is_nl)
    rows = len(nl)
    if len(sep) != rows * (ncols + 1):
        per_row = np.diff(np.searchsorted(sep, nl, side="right"), prepend=0)
        r = int(np.flatnonzero(per_row != ncols + 1)[0])
        raise _BlockError(r, f"row {{row}} has {per_row[r]} fields; expected {ncols + 1} (row label + {ncols} values)")
    lens = np.diff(sep, prepend=-1).reshape(rows, ncols + 1)[:, 1:] - 1
    if lens.min() < 1 or lens.max() > 3:
        raise _SlowPath  # empty or over-long value: pandas reports it precisely
    ends = sep.reshape(rows, ncols + 1)[:, 1:]
    # Every byte of a 1-3 byte token is gathered below, so each one is checked to be a digit.
    last = b[ends - 1] - np.uint8(48)
    if last.max() > 9:
        raise _SlowPath  # a non-digit inside a value, e.g. '3.0' or '-1'
    vals = last.astype(np.uint16)
    multi = np.flatnonzero(lens > 1)
    if len(multi):
        e, ln = ends.ravel()[multi], lens.ravel()[multi]
        tens = b[e - 2] - np.uint8(48)
        three = ln == 3
        hundreds = b[e[three] - 3] - np.uint8(48)
        if tens.max() > 9 or (len(hundreds) and hundreds.max() > 9):
            raise _SlowPath
        extra = tens.astype(np.uint16) * 10
        extra[three] += hundreds.astype(np.uint16) * 100
        vals.ravel()[multi] += extra
    if vals.max() > 255:
        r, c = np.argwhere(vals > 255)[0]
        raise _BlockError(int(r), f"value {vals[r, c]} out of range 0..255 at row {{row}}, column '{{column}}'", int(c))
    line_start = np.concatenate([[0], nl[:-1] + 1])
    return _Block(vals.astype(np.uint8), b, line_start)


def _row_labels(b: np.ndarray, line_start: np.ndarray, row0: int) -> list[str] | None:
    """None when the lines start with the default 'Pixel i,' labels, else the labels themselves."""
    rows = len(line_start)
    if row0 + rows <= N_PIXELS:
        blob, offs = _default_label_bytes()
        lens = np.diff(offs[row0 : row0 + rows + 1])
        ends = line_start + lens
        if ends[-1] < len(b) and (b[ends] == _COMMA).all():
            idx = np.arange(int(lens.sum())) + np.repeat(line_start - (offs[row0 : row0 + rows] - offs[row0]), lens)
            if b[idx].tobytes() == blob[offs[row0] : offs[row0 + rows]]:
                return None
    out = []
    for s0 in line_start:
        e0 = s0 + int(np.argmax(b[s0 : s0 + 4096] == _COMMA))
        out.append(bytes(b[s0:e0]).decode("utf-8", "replace"))
    return out


def _read_csv_slow(path: Path) -> tuple[np.ndarray, list[str]]:
    """Tolerant pandas reader for CSVs the fast path rejects; checks every value is an integer in 0..255."""
    import pandas as pd

    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as exc:
        raise UserError(path, f"not a readable CSV ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    empty = df.isna().to_numpy()
    if empty.any():
        r, c = np.argwhere(empty)[0]
        raise UserError(path, f"empty value at row {r + 1}, column '{df.columns[c]}' (every pixel needs an id, 0 = not annotated)")
    num = df.apply(pd.to_numeric, errors="coerce")
    bad = (num.isna() & df.notna()).to_numpy()
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(path, f"non-integer value '{df.iat[r, c]}' at row {r + 1}, column '{df.columns[c]}'")
    arr = num.to_numpy(dtype=np.float64)
    frac = arr != np.round(arr)
    if frac.any():
        r, c = np.argwhere(frac)[0]
        raise UserError(path, f"non-integer value {arr[r, c]} at row {r + 1}, column '{df.columns[c]}'")
    out = (arr < 0) | (arr > 255)
    if out.any():
        r, c = np.argwhere(out)[0]
        raise UserError(path, f"value {arr[r, c]:g} out of range 0..255 at row {r + 1}, column '{df.columns[c]}'")
    return arr.astype(np.uint8), [str(x) for x in df.index]


def _blocks(f, block_bytes: int):
    """Yield chunks of whole lines (each ends with a newline) from a binary file; blank lines at its end are dropped."""
    last = None
    while True:
        buf = f.read(block_bytes)
        if not buf:
            break
        if not buf.endswith(b"\n"):
            buf += f.readline()
            if not buf.endswith(b"\n"):
                buf += b"\n"
        if last is not None:
            yield last
        last = buf
    if last is not None and last.strip():
        yield last.rstrip(b"\r\n \t") + b"\n"


def _wrong_rows(path: Path, n: int) -> UserError:
    """The error for a CSV without exactly one row per pixel."""
    return UserError(path, f"wrong row count {n}; expected {N_PIXELS} (one per pixel of a {SIZE}x{SIZE} slice)")


class _Assembler:
    """Places parsed blocks in file order into a (ncols, pixels) array and checks their row labels."""

    def __init__(self, columns: list[str], path: Path) -> None:
        self.out = np.zeros((len(columns), N_PIXELS), np.uint8)
        self.columns, self.path = columns, path
        self.row0 = 0
        self.labels: list[str] | None = None  # None while every label so far is the default one

    def place(self, fut) -> None:
        """Take one block's parse result (a future) and copy it in at the next row."""
        try:
            blk: _Block = fut.result()
        except _BlockError as e:
            raise UserError(self.path, e.at(self.row0, self.columns)) from None
        rows = len(blk.vals)
        r1 = self.row0 + rows
        if r1 > N_PIXELS:
            raise UserError(self.path, f"too many rows: more than {N_PIXELS} (one per pixel of a {SIZE}x{SIZE} slice)")
        lab = _row_labels(blk.raw, blk.line_start, self.row0)
        if lab is not None and self.labels is None:
            self.labels = default_row_labels(self.row0)
        if self.labels is not None:
            self.labels.extend(lab if lab is not None else [f"Pixel {i}" for i in range(self.row0, r1)])
        self.out[:, self.row0 : r1] = blk.vals.T
        self.row0 = r1


def read_label_csv(path: str | os.PathLike, block_bytes: int = 8 << 20, threads: int = 2) -> LabelTable:
    """Read a transposed challenge label CSV (Y_train.csv, Y_test.csv or a submission), held in uint8."""
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    if not path.is_file():
        raise UserError(path, "file not found")
    with open(path, "rb") as f:
        cols = _header(f.readline(), path)
        asm = _Assembler(cols, path)
        try:
            # Blocks parse in parallel (numpy releases the GIL) and are placed in file order.
            with ThreadPoolExecutor(threads) as ex:
                pending = []
                for buf in _blocks(f, block_bytes):
                    pending.append(ex.submit(_parse_block, buf, len(cols)))
                    if len(pending) >= 2 * threads:
                        asm.place(pending.pop(0))
                for fut in pending:
                    asm.place(fut)
            out, labels, rows = asm.out, asm.labels, asm.row0
        except _SlowPath:
            arr, slow = _read_csv_slow(path)
            out, rows = np.ascontiguousarray(arr.T), len(arr)
            labels = slow if slow != default_row_labels(len(slow)) else None
    if rows != N_PIXELS:
        raise _wrong_rows(path, rows)
    order = np.argsort([int(c[:-4]) for c in cols], kind="stable")
    shuffled = bool((order != np.arange(len(cols))).any())
    if shuffled:
        out = out[order]
    return LabelTable(out.reshape(len(cols), SIZE, SIZE), [cols[i] for i in order], labels, cols if shuffled else None)


def _token_table(last: bool) -> np.ndarray:
    """(256, 4) byte table: each value's digits then ',' (or '\\n' when last), zero-padded."""
    t = np.zeros((256, 4), np.uint8)
    for v in range(256):
        s = (str(v) + ("\n" if last else ",")).encode()
        t[v, : len(s)] = np.frombuffer(s, np.uint8)
    return t


_TOK, _TOK_LAST = _token_table(False), _token_table(True)


def write_windows(path: Path, names: list[str], windows: np.ndarray) -> None:
    """image,lo,hi: the HU window each slice was rendered through."""
    atomic_write_text(path, "image,lo,hi\n" + "".join(f"{n},{lo:.3f},{hi:.3f}\n" for n, (lo, hi) in zip(names, windows)))


def read_windows(path: Path, names: list[str]) -> np.ndarray | None:
    """(N, 2) HU windows of the named slices from a windows.csv, or None where there is none."""
    df = per_image_table(path, ("lo", "hi"), names, "window")
    return None if df is None else df[["lo", "hi"]].to_numpy(np.float64)


def write_groups_csv(path: Path, names: list[str], rows: list[tuple]) -> None:
    """groups.csv: per image, its (group, volume, slice)."""
    atomic_write_text(path, "image,group,volume,slice\n" + "".join(f"{n},{g},{v},{s}\n" for n, (g, v, s) in zip(names, rows)))


def per_image_table(path: Path, columns: tuple[str, ...], names: list[str], what: str):
    """A CSV with one row per image (column 'image' and `columns`) as a string DataFrame in the order of `names`,
    or None where the file is absent; a missing column or image is a clear error naming the file."""
    if not path.is_file():
        return None
    import pandas as pd

    df = pd.read_csv(path, dtype=str)
    if not {"image", *columns} <= set(df.columns):
        raise UserError(path, "needs columns " + ", ".join(f"'{c}'" for c in ("image", *columns)))
    df = df.drop_duplicates("image").set_index("image")
    missing = [n for n in names if n not in df.index]
    if missing:
        raise UserError(path, f"no {what} for image '{missing[0]}'")
    return df.loc[names].reset_index()


def write_label_csv(
    path: str | os.PathLike,
    maps: np.ndarray,
    columns: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    block_rows: int = 16384,
) -> None:
    """Write (N, H, W) uint8 maps as a transposed challenge CSV, atomically."""
    maps = np.asarray(maps)
    if maps.dtype != np.uint8:
        raise ValueError(f"label maps must be uint8, got {maps.dtype}")
    n = len(maps)
    flat = maps.reshape(n, -1)
    p = flat.shape[1]
    columns = list(columns) if columns is not None else image_names(n)
    if len(columns) != n:
        raise ValueError(f"{len(columns)} column names for {n} maps")
    labels = list(row_labels) if row_labels is not None else None
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "wb") as f:
        f.write(("," + ",".join(columns) + "\n").encode())
        for r0 in range(0, p, block_rows):
            r1 = min(p, r0 + block_rows)
            vals = flat[:, r0:r1].T
            tok = _TOK[vals]
            tok[:, -1] = _TOK_LAST[vals[:, -1]]
            names = labels[r0:r1] if labels is not None else [f"Pixel {i}" for i in range(r0, r1)]
            pre = np.array([s.encode() + b"," for s in names], dtype="S")
            pre = pre.view(np.uint8).reshape(r1 - r0, -1)
            row = np.concatenate([pre, tok.reshape(r1 - r0, -1)], axis=1).ravel()
            f.write(row[row != 0].tobytes())
