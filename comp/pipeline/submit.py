"""Predict the test slices with a method, write the submission CSV atomically, validate it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from comp.core.atomic import atomic_path
from comp.core.errors import UserError
from comp.core.log import LOG, progress
from comp.core.metric import image_scores
from comp.core.parallel import pmap
from comp.core.store import load_maps
from comp.data.contrast import resolve
from comp.data.dataset import Dataset
from comp.data.groups import fold_groups
from comp.data.images import SIZE, count_images, image_names
from comp.data.labels import read_label_csv, scored_maps, write_label_csv
from comp.data.sets import extra_data, labels_key
from comp.methods.base import FitContext, FoldData
from comp.methods.compose import segment
from comp.methods.merge import load_merger
from comp.methods.registry import get_method
from comp.nets.targets import blend
from comp.pipeline.config import Experiment
from comp.pipeline.cv import teacher_run
from comp.pipeline.ensemble import check_selected_on, load_ensemble, merger_path
from comp.pipeline.oof import has_maps, run_experiment
from comp.pipeline.pseudo import pseudo_labels
from comp.pipeline.workspace import RUNS, RunDir


def validate_submission(path: str | Path, data_root: str | Path, row_labels: list[str] | None = None) -> dict:
    """Check a submission CSV against the test layout of a data folder; return a short summary."""
    path, data_root = Path(path), Path(data_root)
    if not path.is_file():
        raise UserError(path, "file not found")
    n_test = count_images(data_root, "X_test")
    table = read_label_csv(path)
    if row_labels is None and (data_root / "Y_train.csv").is_file():
        row_labels = Dataset(data_root).row_labels()
    maps, reordered = scored_maps(table, path, image_names(n_test), row_labels)
    regions = [len(np.unique(m)) - (1 if (m == 0).any() else 0) for m in maps]
    return {"images": n_test, "mean_regions": float(np.mean(regions)), "rows_reordered": reordered}


def submit(exp: Experiment, data: Dataset, out: str | Path, runs: Path = RUNS) -> dict:
    """Fit the method on every annotated slice, predict X_test, write and validate `out`."""
    return _write_validate_score(Path(out), predict_test(exp, data, runs), data)


def predict_test(exp: Experiment, data: Dataset, runs: Path = RUNS) -> np.ndarray:
    """The method fitted on every annotated slice, its X_test instance maps (kept beside the fit, reused while the
    config, the labels and the test slices themselves, by a hash of their pixels, are the same)."""
    if not data.has_test_images:
        raise UserError(data.root, "no X_test/ folder or X_test.zip: nothing to predict")
    # Keyed like CV runs (config and data): a model fitted on other data is never resumed or shipped.
    workdir = RunDir.submit_workdir(runs, exp.name, exp.digest(), labels_key(data, exp.cv.extra))
    kept = RunDir.submit_predictions(workdir)
    if kept.is_file():
        with np.load(kept) as z:
            if "x_test" in z.files and str(z["x_test"]) == data.test_digest and len(z["pred"]) == len(data.x_test):
                LOG.info(f"{exp.name}: test predictions of its fit on every annotated slice, kept in {kept}")
                return z["pred"]
        LOG.info(f"{exp.name}: the test slices differ from those of the predictions kept in {kept}: fitting and predicting anew")
    pred = _fit_predict(exp, data, runs, workdir)
    with atomic_path(kept, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, pred=pred, x_test=np.array(data.test_digest))
    return pred


def _fit_predict(exp: Experiment, data: Dataset, runs: Path, workdir: Path) -> np.ndarray:
    """Fit on every annotated slice in `workdir` and predict X_test."""
    return fit_every_annotated(exp, data, runs=runs, workdir=workdir).predict(data.x_test)


def fit_every_annotated(exp: Experiment, data: Dataset, seed: int | None = None, runs: Path = RUNS, workdir: Path | None = None):
    """The experiment's method fitted on every annotated slice of `data` (in the submit folder of this config and data,
    so a later `submit` or transfer resumes its checkpoints), behind the contrast step resolved on its slices; the seed
    is the config's (`cv.seed`, `cv.fit_seed`) unless given."""
    seed = exp.cv.full_fit_seed() if seed is None else seed
    spec = get_method(exp.method, exp.path)
    method = spec.build(exp.params)
    ann = data.annotated
    if len(ann) == 0:
        raise UserError(data.root / "Y_train.csv", "no annotated image to fit on")
    workdir = workdir or RunDir.submit_workdir(runs, exp.name, exp.digest(), labels_key(data, exp.cv.extra))
    workdir.mkdir(parents=True, exist_ok=True)
    contrast = resolve(exp.contrast, data.x_train, exp.path)  # as in CV: the training slices' histogram
    ctx = FitContext(workdir=workdir, fold=-1, seed=seed, contrast=contrast)
    groups = fold_groups(exp.cv.groups, data)
    pseudo = None
    if exp.pseudo.enabled:  # every fold model of the teacher labels: this fit holds nothing out

        pseudo = pseudo_labels(teacher_run(exp, data, exp.cv.folds, runs), None, data.x_train, data.unlabelled, exp.pseudo)
    extra = extra_data(exp.cv.extra, data, exp.contrast.per_slice)  # as in every CV fold's training part
    method.fit(FoldData(data.x_train[ann], data.y_train[ann], ann, None if groups is None else groups[ann], pseudo).with_extra(extra), ctx)
    return method


def _write_validate_score(out: Path, pred: np.ndarray, data: Dataset) -> dict:
    """Write the CSV atomically, validate it, and add held-out ARI where the data set ships Y_test."""
    write_label_csv(out, pred, image_names(len(pred)), data.row_labels())
    summary = validate_submission(out, data.root, data.row_labels())
    if data.has_test_labels:
        summary["test_ari"] = float(image_scores(data.y_test, pred).mean())
    return summary


class MemberMaps:
    """A member's test maps, a chunk of slices at a time: its fold models loaded once (or its cached maps, memory-mapped)."""

    def __init__(self, run: Path, data: Dataset | None, cached: bool = False, tta: bool = True, x: np.ndarray | None = None,
                 contrast=None) -> None:  # fmt: skip
        """`data`'s test slices, or (x given, fold models only) these slices, read through `contrast` (default: the
        run's own, resolved on its data set)."""
        rd = RunDir(Path(run))
        cfg = rd.config()
        self.x, self.tta, self.sources = data.x_test if x is None else x, tta, []
        if cached:
            _check_test_slices(rd, cfg.get("data") or {}, data)
        for f in range(int(cfg["cv"]["folds"])):
            if cached:
                path = rd.test_maps_file(f)
                if not path.is_file():
                    had = (cfg.get("data") or {}).get("n_test", 0)
                    why = "missing (deleted?)" if had else "not there: the CV run's data had no X_test"
                    raise UserError(path, f"cached test maps {why}; drop --cached to predict with the fold models")
                n = len(rd.test_maps(f))
                if n != len(self.x):
                    raise UserError(path, f"{n} cached test maps but {len(self.x)} test images: drop --cached")
                self.sources.append(path)
            else:
                model = rd.fold_model(f)
                if contrast is not None:  # other slices than the run's data set's: their own contrast step
                    model.contrast = contrast
                self.sources.append(model)

    def chunk(self, sl: slice) -> np.ndarray:
        """(n, C, r, r) float16 maps of test slices `sl`, averaged over the fold models."""
        acc = None
        for src in self.sources:
            # A cached file is mapped for this chunk only: pages read stay out of the resident set afterwards.
            maps = load_maps(src)[sl] if isinstance(src, Path) else src.predict_maps(self.x[sl], tta=self.tta)
            acc = maps.astype(np.float32) if acc is None else acc + maps
        return (acc / len(self.sources)).astype(np.float16)


def _check_test_slices(rd: RunDir, recorded: dict, data: Dataset) -> None:
    """Cached test maps are used only for the very test slices they were predicted from (a hash of their pixels)."""
    if not recorded.get("x_test"):
        raise UserError(rd.path, "its cached test maps record no hash of the test slices they came from (a run older than "
                        "that check): drop --cached to predict with the fold models")  # fmt: skip
    if recorded["x_test"] != data.test_digest:
        raise UserError(rd.path, f"its cached test maps were predicted from other test slices than those in {data.root} "
                        "(changed, added or reordered since the CV run): drop --cached to predict with the fold models")  # fmt: skip


def member_test_maps(run: Path, data: Dataset, cached: bool = False, tta: bool = True) -> np.ndarray:
    """A member's maps of every test slice, averaged over its fold models (re-predicted, or the CV run's cache)."""
    return MemberMaps(run, data, cached, tta).chunk(slice(None))


def _segment_test(item: tuple, weights: list[float], post, merger, regions=None) -> np.ndarray:
    """One test slice: blend the members' maps, post-process (or superpixels, or a run's regions), merge."""

    maps, image, given = item
    return segment(blend(maps, weights), image, post, merger, -1, regions, given)


def submit_ensemble(name: str, data: Dataset, out: str | Path, runs: Path = RUNS, cached: bool = False,
                    tta: bool = True, workers: int = 0, chunk: int = 32) -> dict:  # fmt: skip
    """Predict X_test with an ensemble file's members (fold models, flip TTA), blend, post-process, write, validate."""
    import time


    spec = load_ensemble(name, runs)
    out = Path(out)
    if not data.has_test_images:
        raise UserError(data.root, "no X_test/ folder or X_test.zip: nothing to predict")
    check_selected_on(spec, data, data.root)
    if len(spec.members) == 1 and not has_maps(Path(spec.members[0].run)):
        # A tuned non-learned method: its settings (window included) applied to the fit on every annotated slice.
        exp, _ = run_experiment(Path(spec.members[0].run), spec.overrides)
        return submit(exp, data, out, runs=runs)
    t0 = time.time()
    members = []
    for m in spec.members:
        LOG.info(f"member {m.run} (weight {m.weight:.3f}): {'cached test maps' if cached else 'fold models'}")
        members.append(MemberMaps(Path(m.run), data, cached, tta))
    given = None
    if spec.regions is not None and spec.regions.run:  # the run's method fitted on every annotated slice gives the regions
        given = predict_test(run_experiment(Path(spec.regions.run))[0], data, runs=runs)
    pred = predict_ensemble(spec, members, data.x_test, given, runs, workers, chunk)
    seconds = time.time() - t0
    return {**_write_validate_score(out, pred, data), "seconds_per_slice": seconds / len(pred)}


def predict_ensemble(spec, members: list[MemberMaps], x: np.ndarray, given: np.ndarray | None, runs: Path = RUNS,
                     workers: int = 0, chunk: int = 32, contrast=None) -> np.ndarray:  # fmt: skip
    """Instance maps of slices `x`: the members' maps blended, post-processed (or superpixels, or the `given`
    regions), merged as the ensemble file says; a chunk of slices at a time. `contrast`: how the slices are read
    (default: as the first member's data set's)."""
    merger = load_merger(merger_path(spec.name, runs)) if spec.merge.enabled else None
    weights = [m.weight for m in spec.members]
    n = len(x)
    pred = np.empty((n, SIZE, SIZE), np.uint8)
    contrast = contrast or RunDir.contrast_of(RunDir(Path(spec.members[0].run)).config())  # as the members (and the tuning) read them
    # A chunk of slices at a time: peak memory does not grow with the number of slices.
    for c0 in progress(range(0, n, chunk), n <= chunk, desc="ensemble chunks"):
        sl = slice(c0, min(n, c0 + chunk))
        maps = [mm.chunk(sl) for mm in members]
        images = contrast.canonical(x[sl])
        items = [(tuple(mm[i] for mm in maps), images[i], None if given is None else given[c0 + i]) for i in range(sl.stop - c0)]
        pred[sl] = np.stack(pmap(_segment_test, items, weights, spec.post, merger, spec.regions, workers=workers))
    return pred
