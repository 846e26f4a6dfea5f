"""Transfer: an experiment fitted on every annotated slice of one data set, scored on another's annotated slices.

CV on blocks of one labelled scan says how a method does on more of that scan; transfer says how it does on
data it was never fitted on (another stand-in, another rendering, another resolution). The contrast step is
resolved on each data set's own slices (never its labels), as `cv` and `submit` resolve it on theirs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from comp.config import Experiment
from comp.contrast import resolve
from comp.data.sets import labels_key
from comp.errors import UserError
from comp.io import Dataset, image_names
from comp.metric import image_scores
from comp.rundir import RUNS, TransferRecord


@dataclass
class TransferResult:
    """One (fit, score) pair: where it was written and its headline numbers."""

    experiment: str
    fit: str
    score: str
    mean_ari: float
    std_ari: float
    n_images: int
    mean_regions: float
    path: str


def _pixels_digest(x: np.ndarray) -> str:
    """Hash of the scored slices' pixels: a kept record is reused only for the very slices it scored."""
    return hashlib.sha1(np.ascontiguousarray(x).data).hexdigest()[:16]


def _record(exp: Experiment, fit: Dataset, score: Dataset, runs: Path) -> TransferRecord:
    """Where the (experiment, fit data, score data) record lives."""
    return TransferRecord.of(runs, exp.name, exp.digest(), labels_key(fit, exp.cv.extra), score.fingerprint()["y_train"][:6])


def _kept(rec: TransferRecord, digest: str) -> TransferResult | None:
    """A record of the same pair, for the same scored slices, if one was written."""
    d = rec.read()
    if d is None or d.get("pixels") != digest:
        return None
    return TransferResult(**{k: d[k] for k in TransferResult.__dataclass_fields__})


def transfer(exp: Experiment, fit: Dataset, scores: list[Dataset], seed: int = 0, runs: Path = RUNS,
             command: str = "") -> list[TransferResult]:  # fmt: skip
    """Fit `exp` on every annotated slice of `fit` (once), score it on every annotated slice of each of `scores`."""
    fitted = {fit.root.resolve(), *(Path(e).resolve() for e in exp.cv.extra)}
    for d in scores:
        if d.root.resolve() in fitted:
            raise UserError("--score", f"{d.root} is data the experiment is fitted on (--fit or cv.extra): a transfer "
                            "scores other data (`comp cv` scores held-out folds of one data set)")  # fmt: skip
        if len(d.annotated) == 0:
            raise UserError(d.root / "Y_train.csv", "no annotated slice to score a transfer on")
    todo = [(d, _record(exp, fit, d, runs), _pixels_digest(d.x_train[d.annotated])) for d in scores]
    out: list[TransferResult | None] = [_kept(rec, dig) for _, rec, dig in todo]
    if all(r is not None for r in out):
        for r in out:
            print(f"{r.experiment}: {r.fit} -> {r.score} kept in {r.path}", flush=True)
        return out  # type: ignore[return-value]
    from comp.submit import fit_every_annotated

    print(f"{exp.name}: fitting on every annotated slice of {fit.name} ({len(fit.annotated)} slices)", flush=True)
    method = fit_every_annotated(exp, fit, seed, runs)
    for i, (d, rec, dig) in enumerate(todo):
        if out[i] is None:
            out[i] = _score(exp, method, fit, d, rec, dig, command)
    return out  # type: ignore[return-value]


def _score(exp: Experiment, method, fit: Dataset, data: Dataset, rec: TransferRecord, digest: str, command: str) -> TransferResult:
    """Predict `data`'s annotated slices behind the contrast step resolved on its own slices; write the record."""
    ann = data.annotated  # which slices are scored; their labels are read only once they are predicted
    # Every method reads its slices through `contrast`: the fit's windows, given in HU, re-resolved on this data.
    method.contrast = resolve(exp.contrast, data.x_train, str(data.root))
    pred = method.predict(data.x_train[ann])
    s = image_scores(data.y_train[ann], pred)
    regions = [len(np.unique(p[t > 0])) for p, t in zip(pred, data.y_train[ann])]
    res = TransferResult(exp.name, fit.name, data.name, float(s.mean()), float(s.std()), int(len(ann)),
                         float(np.mean(regions)), str(rec.path))  # fmt: skip
    names = image_names(len(data.x_train))
    rec.write({**asdict(res), "pixels": digest, "fit_data": fit.fingerprint(), "score_data": data.fingerprint(),
               "command": command, "images": [{"image": names[i], "ari": float(v)} for i, v in zip(ann, s)]})  # fmt: skip
    print(f"{exp.name}: {fit.name} -> {data.name}: ARI {res.mean_ari:.4f} ± {res.std_ari:.4f} on {res.n_images} slices "
          f"({res.mean_regions:.1f} predicted regions per slice on the annotated pixels) -> {rec.path}", flush=True)  # fmt: skip
    return res


def table(results: list[TransferResult]) -> str:
    """Markdown rows of transfer results."""
    head = "| experiment | fitted on | scored on | ARI | image std | slices | regions |\n|---|---|---|---|---|---|---|\n"
    return head + "".join(f"| `{r.experiment}` | {r.fit} | {r.score} | {r.mean_ari:.4f} | {r.std_ari:.4f} | {r.n_images} | "
                          f"{r.mean_regions:.1f} |\n" for r in results)  # fmt: skip


def as_json(results: list[TransferResult]) -> str:
    """The results as a JSON list (for scripts)."""
    return json.dumps([asdict(r) for r in results], indent=1)
