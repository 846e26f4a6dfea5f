"""Transfer: an experiment fitted on every annotated slice of one data set, scored on another's annotated slices.

CV on blocks of one labelled scan says how a method does on more of that scan; transfer says how it does on
data it was never fitted on (another stand-in, another rendering, another resolution). Each data set is
calibrated on its own slices (never its labels), and the scored slices are re-rendered in the grey levels the
fitted method reads (`contrast.rendered_as`, as `cv --extra` renders extra training slices): every window, tuned
or not, and every intensity feature then means the same HU on both. An ensemble transfers as it was selected and
tuned on the fitting data (`transfer_ensemble`): nothing is chosen on the scored data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from comp.config import Experiment
from comp.contrast import calibration, rendered_as
from comp.data.sets import labels_key
from comp.errors import UserError
from comp.io import Dataset, image_names
from comp.metric import image_scores, region_counts
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
    mean_regions: float  # predicted regions per slice on the annotated pixels
    path: str
    true_regions: float = float("nan")  # annotated structures per slice
    split: float = float("nan")  # structures per slice split among predicted regions (comp.metric.region_counts)
    merged: float = float("nan")  # structures per slice merged with another


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
    return TransferResult(**{k: d[k] for k in TransferResult.__dataclass_fields__ if k in d})


def _check_scored(fit: Dataset, scores: list[Dataset], extra: list[str]) -> None:
    """Every scored data set is other data than the fitting data (and its extra training data), with annotated slices."""
    fitted = {fit.root.resolve(), *(Path(e).resolve() for e in extra)}
    for d in scores:
        if d.root.resolve() in fitted:
            raise UserError("--score", f"{d.root} is data the experiment is fitted on (--fit or cv.extra): a transfer "
                            "scores other data (`comp cv` scores held-out folds of one data set)")  # fmt: skip
        if len(d.annotated) == 0:
            raise UserError(d.root / "Y_train.csv", "no annotated slice to score a transfer on")


def transfer(exp: Experiment, fit: Dataset, scores: list[Dataset], seed: int = 0, runs: Path = RUNS,
             command: str = "") -> list[TransferResult]:  # fmt: skip
    """Fit `exp` on every annotated slice of `fit` (once), score it on every annotated slice of each of `scores`."""
    _check_scored(fit, scores, exp.cv.extra)
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


def in_units_of(fit: Dataset, data: Dataset, per_slice="auto") -> np.ndarray:
    """`data`'s annotated slices, calibrated on its own slices, re-rendered in the grey levels methods fitted on
    `fit` read (label-free: which slices are annotated aside)."""
    quiet = lambda *_: None  # noqa: E731
    to = calibration(fit.x_train, per_slice, str(fit.root), quiet)[1]
    return rendered_as(data.x_train[data.annotated], *calibration(data.x_train, per_slice, str(data.root), quiet), to)


def _score(exp: Experiment, method, fit: Dataset, data: Dataset, rec: TransferRecord, digest: str, command: str) -> TransferResult:
    """Predict `data`'s annotated slices in the fitting data's grey levels; score them; write the record."""
    return _scored(exp.name, method.predict(in_units_of(fit, data, exp.contrast.per_slice)), fit, data, rec, digest, command)


def _scored(name: str, pred: np.ndarray, fit: Dataset, data: Dataset, rec: TransferRecord, digest: str, command: str) -> TransferResult:
    """Score predictions of `data`'s annotated slices (their labels read only now) and write the record."""
    ann = data.annotated
    truth = data.y_train[ann]
    s = image_scores(truth, pred)
    counts = [region_counts(t, p) for t, p in zip(truth, pred)]
    mean = {k: float(np.mean([c[k] for c in counts])) for k in counts[0]}
    res = TransferResult(name, fit.name, data.name, float(s.mean()), float(s.std()), int(len(ann)), mean["predicted"], str(rec.path),
                         mean["true"], mean["split"], mean["merged"])  # fmt: skip
    names = image_names(len(data.x_train))
    rec.write({**asdict(res), "pixels": digest, "fit_data": fit.fingerprint(), "score_data": data.fingerprint(), "command": command,
               "images": [{"image": names[i], "ari": float(v), **c} for i, v, c in zip(ann, s, counts)]})  # fmt: skip
    print(f"{name}: {fit.name} -> {data.name}: ARI {res.mean_ari:.4f} ± {res.std_ari:.4f} on {res.n_images} slices; per slice "
          f"{res.mean_regions:.1f} predicted regions for {res.true_regions:.1f} structures, {res.split:.1f} split, "
          f"{res.merged:.1f} merged -> {rec.path}", flush=True)  # fmt: skip
    return res


def transfer_ensemble(name: str, fit: Dataset, scores: list[Dataset], runs: Path = RUNS, tta: bool = False,
                      workers: int = 0, command: str = "") -> list[TransferResult]:  # fmt: skip
    """An ensemble file as selected and tuned on `fit` (members' fold models, weights, post-processing, superpixels or
    a run's regions, merger) scored on each of `scores`' annotated slices; a tuned non-learned method: its settings
    applied to its fit on every annotated slice."""
    from comp.ensemble import ensemble_path, has_maps, load_ensemble, run_experiment
    from comp.submit import MemberMaps, fit_every_annotated, predict_ensemble

    spec = load_ensemble(name, runs)
    if spec.data.get("y_train") and spec.data["y_train"] != fit.fingerprint()["y_train"]:
        raise UserError("--fit", f"ensemble '{spec.name}' was selected on other data ({spec.data.get('root')}), not on {fit.root}")
    first = Path(spec.members[0].run)
    if len(spec.members) == 1 and not has_maps(first):
        return transfer(run_experiment(first, spec.overrides)[0], fit, scores, runs=runs, command=command)
    exps = [run_experiment(Path(m.run))[0] for m in spec.members]
    _check_scored(fit, scores, sorted({e for x in exps for e in x.cv.extra}))
    text = Path(name if name.endswith(".yaml") else ensemble_path(name, runs)).read_text()
    digest = f"{spec.name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    out = []
    for d in scores:
        rec = TransferRecord.of(runs, "ensembles", digest, fit.fingerprint()["y_train"][:6], d.fingerprint()["y_train"][:6])
        dig = _pixels_digest(d.x_train[d.annotated])
        kept = _kept(rec, dig)
        if kept is not None:
            print(f"ensemble {spec.name}: {fit.name} -> {d.name} kept in {rec.path}", flush=True)
            out.append(kept)
            continue
        x = in_units_of(fit, d, exps[0].contrast.per_slice)
        members = [MemberMaps(Path(m.run), None, False, tta, x=x) for m in spec.members]
        given = None
        if spec.regions is not None and spec.regions.run:  # that run's method fitted on every annotated slice of `fit`
            given = fit_every_annotated(run_experiment(Path(spec.regions.run))[0], fit, runs=runs).predict(x)
        out.append(_scored(f"ensemble {spec.name}", predict_ensemble(spec, members, x, given, runs, workers), fit, d, rec, dig, command))
    return out


def table(results: list[TransferResult]) -> str:
    """Markdown rows of transfer results."""
    head = "| experiment | fitted on | scored on | ARI | image std | slices | regions | structures | split | merged |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join(f"| `{r.experiment}` | {r.fit} | {r.score} | {r.mean_ari:.4f} | {r.std_ari:.4f} | {r.n_images} | "
                          f"{r.mean_regions:.1f} | {r.true_regions:.1f} | {r.split:.1f} | {r.merged:.1f} |\n" for r in results)  # fmt: skip


def as_json(results: list[TransferResult]) -> str:
    """The results as a JSON list (for scripts)."""
    return json.dumps([asdict(r) for r in results], indent=1)
