"""Predict the test slices with a method, write the submission CSV atomically, validate it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from comp.config import Experiment
from comp.errors import UserError
from comp.io import N_PIXELS, Dataset, count_images, image_names, read_label_csv, write_label_csv
from comp.metric import image_scores
from comp.registry import FitContext, FoldData, get_method


def validate_submission(path: str | Path, data_root: str | Path, row_labels: list[str] | None = None) -> dict:
    """Check a submission CSV against the test layout of a data folder; return a short summary."""
    path, data_root = Path(path), Path(data_root)
    if not path.is_file():
        raise UserError(path, "file not found")
    n_test = count_images(data_root, "X_test")
    table = read_label_csv(path)
    expected = image_names(n_test)
    if table.columns != expected:
        have, want = set(table.columns), set(expected)
        if want - have:
            first = sorted(want - have, key=lambda c: int(c[:-4]))[0]
            raise UserError(path, f"missing column '{first}' ({len(table.columns)} columns, expected {n_test})")
        extra = sorted(have - want, key=lambda c: int(c[:-4]))[0]
        raise UserError(path, f"unexpected column '{extra}' ({len(table.columns)} columns, expected {n_test})")
    if row_labels is None and (data_root / "Y_train.csv").is_file():
        row_labels = Dataset(data_root).row_labels()
    if row_labels is not None and table.labels() != row_labels:
        got = table.labels()
        r = next(i for i in range(N_PIXELS) if got[i] != row_labels[i])
        raise UserError(path, f"row label '{got[r]}' at row {r + 1} does not match '{row_labels[r]}' of Y_train.csv")
    regions = [len(np.unique(m)) - (1 if (m == 0).any() else 0) for m in table.maps]
    return {"images": n_test, "mean_regions": float(np.mean(regions))}


def submit(exp: Experiment, data: Dataset, out: str | Path, seed: int = 0) -> dict:
    """Fit the method on every annotated slice, predict X_test, write and validate `out`."""
    out = Path(out)
    if not data.has_test_images:
        raise UserError(data.root, "no X_test/ folder or X_test.zip: nothing to predict")
    spec = get_method(exp.method, exp.path)
    method = spec.build(exp.params)
    ann = data.annotated
    if len(ann) == 0:
        raise UserError(data.root / "Y_train.csv", "no annotated image to fit on")
    workdir = Path("runs") / exp.name / f"submit-{exp.digest()}"
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = FitContext(workdir=workdir, fold=-1, seed=seed, unlabelled=data.x_train[data.unlabelled])
    method.fit(FoldData(data.x_train[ann], data.y_train[ann], ann), ctx)
    pred = method.predict(data.x_test)
    write_label_csv(out, pred, image_names(len(pred)), data.row_labels())
    summary = validate_submission(out, data.root, data.row_labels())
    if data.has_test_labels:
        summary["test_ari"] = float(image_scores(data.y_test, pred).mean())
    return summary
