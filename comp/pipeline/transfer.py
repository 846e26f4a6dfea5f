"""Transfer: an experiment fitted on every annotated slice of one data set, scored on another's annotated slices.

CV on blocks of one labelled scan says how a method does on more of that scan; transfer says how it does on
data it was never fitted on (another stand-in, another rendering, another resolution). The fitted method reads
the scored slices through its contrast step resolved on their own data set (never its labels), as `cv` and
`submit` resolve it on theirs: its HU windows land where that data set's calibration puts them (so a fixed
method transfers exactly as it scores in CV there). An ensemble transfers as it was selected and tuned on the
fitting data (`transfer_ensemble`), its tuned superpixel window carried over in HU: nothing is chosen on the
scored data.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from comp.core.errors import UserError
from comp.core.log import LOG, result
from comp.core.metric import image_scores, mean_counts, region_counts
from comp.data.contrast import Contrast, ContrastParams, calibration, resolve
from comp.data.dataset import Dataset
from comp.data.images import image_names, pixels_digest
from comp.data.sets import labels_key
from comp.pipeline.config import Experiment
from comp.pipeline.ensemble import check_selected_on, ensemble_path, load_ensemble
from comp.pipeline.oof import has_maps, run_experiment
from comp.pipeline.submit import MemberMaps, fit_every_annotated, predict_ensemble
from comp.pipeline.workspace import RUNS, TransferRecord, Workspace


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
    split: float = float("nan")  # structures per slice split among predicted regions (comp.core.metric.region_counts)
    merged: float = float("nan")  # structures per slice merged with another


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


def transfer(exp: Experiment, fit: Dataset, scores: list[Dataset], runs: Path = RUNS,
             command: str = "") -> list[TransferResult]:  # fmt: skip
    """Fit `exp` on every annotated slice of `fit` (once), score it on every annotated slice of each of `scores`."""
    _check_scored(fit, scores, exp.cv.extra)
    todo = [(d, _record(exp, fit, d, runs), pixels_digest(d.x_train[d.annotated])) for d in scores]
    out: list[TransferResult | None] = [_kept(rec, dig) for _, rec, dig in todo]
    if all(r is not None for r in out):
        for r in out:
            LOG.info(f"{r.experiment}: {r.fit} -> {r.score} kept in {r.path}")
        return out  # type: ignore[return-value]

    LOG.info(f"{exp.name}: fitting on every annotated slice of {fit.name} ({len(fit.annotated)} slices)")
    method = fit_every_annotated(exp, fit, runs=runs)
    for i, (d, rec, dig) in enumerate(todo):
        if out[i] is None:
            out[i] = _score(exp, method, fit, d, rec, dig, command)
    return out  # type: ignore[return-value]


def _resolved_on(data: Dataset, p: ContrastParams) -> Contrast:
    """A contrast section resolved on a data set's own slices (label-free), quietly."""
    return resolve(p, data.x_train, str(data.root), lambda *_: None)


def _score(exp: Experiment, method, fit: Dataset, data: Dataset, rec: TransferRecord, digest: str, command: str) -> TransferResult:
    """Predict `data`'s annotated slices behind the contrast step resolved on its own slices; score; write the record."""
    method.contrast = _resolved_on(data, exp.contrast)  # every method reads its slices through `contrast`
    return _scored(exp.name, method.predict(data.x_train[data.annotated]), fit, data, rec, digest, command)


def _window_in(window: list[float], fit: Dataset, data: Dataset, per_slice) -> list[float]:
    """A grey window of the slices as methods read them on `fit`, moved to `data`'s through HU."""
    quiet = lambda *_: None  # noqa: E731
    a = calibration(fit.x_train, per_slice, str(fit.root), quiet)[1]
    b = calibration(data.x_train, per_slice, str(data.root), quiet)[1]
    return [round(float(b.grey(a.hu(w))), 4) for w in window]


def _scored(name: str, pred: np.ndarray, fit: Dataset, data: Dataset, rec: TransferRecord, digest: str, command: str) -> TransferResult:
    """Score predictions of `data`'s annotated slices (their labels read only now) and write the record."""
    ann = data.annotated
    truth = data.y_train[ann]
    s = image_scores(truth, pred)
    counts = [region_counts(t, p) for t, p in zip(truth, pred)]
    mean = mean_counts(counts)
    res = TransferResult(name, fit.name, data.name, float(s.mean()), float(s.std()), int(len(ann)), mean["predicted"], str(rec.path),
                         mean["true"], mean["split"], mean["merged"])  # fmt: skip
    names = image_names(len(data.x_train))
    rec.write({**asdict(res), "pixels": digest, "fit_data": fit.fingerprint(), "score_data": data.fingerprint(), "command": command,
               "images": [{"image": names[i], "ari": float(v), **c} for i, v, c in zip(ann, s, counts)]})  # fmt: skip
    result(f"{name}: {fit.name} -> {data.name}: ARI {res.mean_ari:.4f} ± {res.std_ari:.4f} on {res.n_images} slices; per slice "
          f"{res.mean_regions:.1f} predicted regions for {res.true_regions:.1f} structures, {res.split:.1f} split, "
          f"{res.merged:.1f} merged -> {rec.path}")  # fmt: skip
    return res


def transfer_ensemble(name: str, fit: Dataset, scores: list[Dataset], runs: Path = RUNS, tta: bool = False,
                      workers: int = 0, command: str = "") -> list[TransferResult]:  # fmt: skip
    """An ensemble file as selected and tuned on `fit` (members' fold models, weights, post-processing, superpixels or
    a run's regions, merger) scored on each of `scores`' annotated slices; a tuned non-learned method: its settings
    applied to its fit on every annotated slice."""

    spec = load_ensemble(name, runs)
    check_selected_on(spec, fit, "--fit")
    first = Path(spec.members[0].run)
    if len(spec.members) == 1 and not has_maps(first):
        return transfer(run_experiment(first, spec.overrides)[0], fit, scores, runs=runs, command=command)
    exps = [run_experiment(Path(m.run))[0] for m in spec.members]
    _check_scored(fit, scores, sorted({e for x in exps for e in x.cv.extra}))
    text = Path(name if name.endswith(".yaml") else ensemble_path(name, runs)).read_text()
    digest = f"{spec.name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    given_by = None  # the regions run's method, fitted once on every annotated slice of `fit`
    out = []
    for d in scores:
        rec = TransferRecord.of(runs, Workspace(runs).ensembles.name, digest, fit.fingerprint()["y_train"][:6], d.fingerprint()["y_train"][:6])
        dig = pixels_digest(d.x_train[d.annotated])
        kept = _kept(rec, dig)
        if kept is not None:
            LOG.info(f"ensemble {spec.name}: {fit.name} -> {d.name} kept in {rec.path}")
            out.append(kept)
            continue
        x = d.x_train[d.annotated]
        resolved: dict[str, Contrast] = {}  # one survey of d per distinct contrast section

        def on_d(p: ContrastParams) -> Contrast:
            return resolved.setdefault(repr(p), _resolved_on(d, p))

        members = [MemberMaps(Path(m.run), None, False, tta, x=x, contrast=on_d(e.contrast)) for m, e in zip(spec.members, exps)]
        here, given = spec, None
        if spec.regions is not None and not spec.regions.run:  # superpixels behind the tuned window, the same HU here
            here = replace(spec, regions=replace(spec.regions, window=_window_in(spec.regions.window, fit, d, exps[0].contrast.per_slice)))
        if spec.regions is not None and spec.regions.run:
            rexp = run_experiment(Path(spec.regions.run))[0]
            given_by = given_by or fit_every_annotated(rexp, fit, runs=runs)
            given_by.contrast = on_d(rexp.contrast)
            given = given_by.predict(x)
        pred = predict_ensemble(here, members, x, given, runs, workers, contrast=on_d(exps[0].contrast))
        out.append(_scored(f"ensemble {spec.name}", pred, fit, d, rec, dig, command))
    return out


def table(results: list[TransferResult]) -> str:
    """Markdown rows of transfer results."""
    head = "| experiment | fitted on | scored on | ARI | image std | slices | regions | structures | split | merged |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    return head + "".join(f"| `{r.experiment}` | {r.fit} | {r.score} | {r.mean_ari:.4f} | {r.std_ari:.4f} | {r.n_images} | "
                          f"{r.mean_regions:.1f} | {r.true_regions:.1f} | {r.split:.1f} | {r.merged:.1f} |\n" for r in results)  # fmt: skip


@dataclass(frozen=True)
class FoldTransfer:
    """One model's transfer score: a fold model alone (fold k) or the fold models' maps averaged (fold -1)."""

    fold: int
    mean_ari: float
    mean_regions: float
    true_regions: float


def transfer_fold_models(run: Path, data: Dataset) -> list[FoldTransfer]:
    """A learned CV run's fold models scored on `data`'s annotated slices, each alone and then their maps averaged
    (as an ensemble of the run transfers), behind the contrast step resolved on `data`: how far one fitted model's
    transfer moves with the fold it was fitted on. Labels are read only to score."""
    if not has_maps(run):
        raise UserError(run, "not a run of a learned method with fold models (no OOF maps)")
    x = data.x_train[data.annotated]
    members = MemberMaps(Path(run), None, False, False, x=x, contrast=_resolved_on(data, run_experiment(Path(run))[0].contrast))
    maps = [m.predict_maps(x, tta=False).astype(np.float32) for m in members.sources]
    truth, model, out = data.y_train[data.annotated], members.sources[0], []
    for fold, m in [*enumerate(maps), (-1, sum(maps) / len(maps))]:
        pred = model.postprocess_maps(m.astype(np.float16))
        counts = mean_counts([region_counts(t, p) for t, p in zip(truth, pred)])
        out.append(FoldTransfer(fold, float(image_scores(truth, pred).mean()), counts["predicted"], counts["true"]))
    return out
