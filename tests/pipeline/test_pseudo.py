"""Pseudo-labelling: fold discipline, confidence ranking, config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from comp.core.errors import UserError


@pytest.mark.slow
def test_pseudo_labels_of_fold_k_come_only_from_the_teacher_model_blind_to_fold_k(tmp_path: Path, tiny_phantom: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from comp.pipeline.config import experiment_from_dict
    from comp.pipeline.cv import run_cv
    from comp.data.dataset import Dataset
    from comp.methods.unet import LearnedInstances
    from comp.pipeline.workspace import RunDir
    from tests.conftest import TINY_UNET

    teacher_yaml = tmp_path / "teach.yaml"
    raw = yaml.safe_load(TINY_UNET)
    teacher_yaml.write_text(yaml.safe_dump({**raw, "params": {**raw["params"], "train": {**raw["params"]["train"], "epochs": 60, "lr": 0.01}}}))
    exp = experiment_from_dict({**raw, "name": "student", "pseudo": {"teacher": str(teacher_yaml), "images": 3}}, tmp_path / "student.yaml")
    data = Dataset(tiny_phantom)
    events: list[tuple] = []
    load, fit = RunDir.fold_model, LearnedInstances.fit
    monkeypatch.setattr(RunDir, "fold_model", lambda self, f: (events.append(("load", self.path, f)), load(self, f))[1])
    monkeypatch.setattr(LearnedInstances, "fit", lambda self, train, ctx: (events.append(("fit", ctx.workdir, ctx.fold, train.pseudo)), fit(self, train, ctx))[1])

    runs = tmp_path / "runs"
    student = RunDir(run_cv(exp, data, runs=runs).run_dir)
    teacher = RunDir(next((runs / "teach").iterdir()))  # cross-validated first, on the student's folds
    assert teacher.finished and student.finished
    t_ids, t_folds = teacher.folds()
    s_ids, s_folds = student.folds()
    student_fits = [(i, e) for i, e in enumerate(events) if e[0] == "fit" and e[1].parent == student.path]
    assert [e[2] for _, e in student_fits] == [0, 1]
    for i, (_, _, k, pseudo) in student_fits:
        loads = [e for e in events[:i] if e[0] == "load"]
        # The labels of this fold were made by the teacher's fold-k model alone, just before this fit...
        assert loads and loads[-1][1:] == (teacher.path, k) and sum(e[2] == k for e in loads) == 1
        # ...which trained on none of the images the student is scored on in fold k.
        assert not set(t_ids[t_folds != k]) & set(s_ids[s_folds == k])
        assert pseudo is not None and 0 < len(pseudo.ids) <= 3
        assert set(pseudo.ids) <= set(data.unlabelled) and pseudo.y.shape == (len(pseudo.ids), 512, 512)
        assert pseudo.y.any()
    assert all(e[3] is None for e in events if e[0] == "fit" and e[1].parent == teacher.path)
    assert len(list((teacher.path / "pseudo").glob("fold*.npz"))) == 2  # cached for the next student


def test_a_teacher_on_other_folds_is_refused(tmp_path: Path) -> None:
    from comp.pipeline.cv import make_folds
    from comp.pipeline.pseudo import check_folds
    from comp.pipeline.workspace import RunDir

    ann = np.arange(0, 24, 2)
    ours = make_folds(len(ann), 3, 0)
    teacher = RunDir(tmp_path / "t")
    teacher.path.mkdir()
    teacher.write_folds([f"{i}.png" for i in range(24)], ann, ours)
    check_folds(teacher, ann, ours)  # the same folds: accepted
    teacher.write_folds([f"{i}.png" for i in range(24)], ann, make_folds(len(ann), 3, 1))
    with pytest.raises(UserError, match="folds differ"):
        check_folds(teacher, ann, ours)


def test_confidence_ranks_a_sharp_map_above_a_hesitant_one() -> None:
    from comp.pipeline.pseudo import confidence

    sharp = np.zeros((32, 32))
    sharp[8:24, 8:24] = 0.97
    hesitant = np.where(sharp > 0, 0.6, 0.3)
    assert confidence(sharp) == 1.0
    assert confidence(hesitant) < 0.1
    assert confidence(np.zeros((8, 8))) == 0.0  # nothing predicted: never kept


def test_pseudo_section_is_checked_and_leaves_other_digests_alone(tmp_path: Path) -> None:
    from comp.pipeline.config import experiment_from_dict
    from tests.conftest import TINY_UNET

    raw = yaml.safe_load(TINY_UNET)
    plain = experiment_from_dict(dict(raw), tmp_path / "a.yaml")
    off = experiment_from_dict({**raw, "pseudo": {"images": 50}}, tmp_path / "a.yaml")
    on = experiment_from_dict({**raw, "pseudo": {"teacher": "unet_cpu"}}, tmp_path / "a.yaml")
    assert plain.digest() == off.digest() != on.digest()
    with pytest.raises(UserError, match="does not train on pseudo-labels"):
        experiment_from_dict({"method": "smooth_watershed", "pseudo": {"teacher": "unet_cpu"}}, tmp_path / "w.yaml")
    with pytest.raises(UserError, match="pseudo.imgs"):
        experiment_from_dict({**raw, "pseudo": {"imgs": 3}}, tmp_path / "a.yaml")


def test_a_teacher_chain_that_loops_back_is_one_clear_error(tmp_path: Path, tiny_phantom: Path) -> None:
    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv
    from comp.data.dataset import Dataset
    from tests.conftest import TINY_UNET

    raw = yaml.safe_load(TINY_UNET)
    for me, other in (("a", "b"), ("b", "a")):  # a learns from b, b from a
        (tmp_path / f"{me}.yaml").write_text(yaml.safe_dump({**raw, "name": me, "pseudo": {"teacher": str(tmp_path / f"{other}.yaml")}}))
    with pytest.raises(UserError, match="leads back to itself: a -> b -> a"):
        run_cv(load_experiment(str(tmp_path / "a.yaml")), Dataset(tiny_phantom), runs=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing trained, no folder made


def test_a_teacher_that_predicts_no_maps_is_refused_before_its_cv(tmp_path: Path, tiny_phantom: Path) -> None:
    """A non-learned teacher was refused only after its whole CV had run; now before anything runs. `../` is no name."""
    from comp.pipeline.config import load_experiment
    from comp.pipeline.cv import run_cv
    from comp.data.dataset import Dataset
    from tests.conftest import TINY_UNET

    raw = yaml.safe_load(TINY_UNET)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**raw, "name": "s", "pseudo": {"teacher": "smooth_watershed"}}))
    with pytest.raises(UserError, match="predicts no maps"):
        run_cv(load_experiment(str(tmp_path / "s.yaml")), Dataset(tiny_phantom), runs=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="pseudo.teacher '../unet_cpu' may only use letters"):
        load_experiment(str(tmp_path / "s.yaml"), ["pseudo.teacher=../unet_cpu"])
