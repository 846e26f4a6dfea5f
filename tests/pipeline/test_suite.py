"""`make results` on a tiny suite: every row is measured and the README's marked table is replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_UNET

from comp.pipeline.suite import END, START, Suite, run_results


@pytest.mark.slow
def test_results_fill_the_readme_table(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "tinyres.yaml"
    exp.write_text("name: tinyres\n" + TINY_UNET)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold table\n{END}\n\nafter\n")
    from comp.data.phantom import generate

    other = generate(tmp_path / "other", n_train=4, n_labelled=4, n_test=1, seed=11, workers=2)
    suite = Suite(folds=2, trials=2, datasets={"tiny": str(tiny_phantom)}, baseline="baseline_watershed", fg_cc=str(exp), singles=[str(exp)],
                  transfer={"tiny": str(other)})  # fmt: skip
    out = run_results(suite, tmp_path / "runs", reuse=True, readme=readme)
    table = out.read_text()
    assert "tiny -> other ARI" in table.splitlines()[0]
    for label in ("official watershed baseline", "official baseline, contrast-stretched (auto)", "fg U-Net + connected components",
                  "single model", "best ensemble (tuned)"):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.split("|")]
        assert "±" in cells[3] and float(cells[4]) >= -1, line  # CV ARI and a held-out ARI (the phantom ships Y_test)
        assert -1 <= float(cells[5]) <= 1, line  # fitted on the tiny phantom, scored on the other one
    text = readme.read_text()
    assert "old table" not in text and table in text and text.startswith("# title") and text.endswith("after\n")
    assert len(list((tmp_path / "runs" / "tinyres").glob("*/cv.json"))) == 1  # reused, not rerun
    # The machine is named beside the time (a network's digits depend on the CPU's kernels), and in every run record.
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    assert f"torch {torch.__version__} with {kernels} kernels" in table.splitlines()[-1]
    record = json.loads(next((tmp_path / "runs" / "tinyres").glob("*/cv.json")).read_text())
    assert record["machine"]["cpu_kernels"] == kernels and record["machine"]["threads"] == torch.get_num_threads()


@pytest.mark.slow
def test_results_offer_only_the_listed_singles_regions(tiny_phantom: Path, tmp_path: Path, monkeypatch) -> None:
    import comp.pipeline.suite

    class Offered(Exception):
        """The stand-in tune has recorded what the suite offers it: nothing after it is under test here."""

    seen: list[list[Path]] = []

    def offered(*a, **k):
        seen.append(k["region_runs"])
        raise Offered

    monkeypatch.setattr(comp.pipeline.suite, "tune", offered)
    exp = tmp_path / "tinyreg.yaml"
    exp.write_text("name: tinyreg\n" + TINY_UNET)
    singles = [str(exp), "baseline_watershed_stretched", "baseline_watershed"]
    for offered, want in ((None, {"baseline_watershed_stretched", "baseline_watershed"}), (["baseline_watershed"], {"baseline_watershed"})):
        suite = Suite(folds=2, trials=1, datasets={"tiny": str(tiny_phantom)}, fg_cc=str(exp), singles=singles, regions_from=offered)
        with pytest.raises(Offered):
            run_results(suite, tmp_path / "runs", reuse=True, readme=None)
        assert {p.parent.name for p in seen[-1]} == want


def test_a_suite_offering_regions_of_no_single_is_refused(tmp_path: Path) -> None:
    import pytest

    from comp.core.errors import UserError
    from comp.pipeline.suite import load_suite

    path = tmp_path / "suite.yaml"
    path.write_text("singles: [hybrid, unet_cpu]\nregions_from: [smooth_watershed]\n")
    with pytest.raises(UserError, match="regions_from: 'smooth_watershed' is not one of the singles") as err:
        load_suite(str(path))
    assert err.value.where == str(path)
    path.write_text("singles: [hybrid, unet_cpu]\nregions_from: [hybrid]\n")
    assert load_suite(str(path)).regions_from == ["hybrid"]


def test_a_suites_merger_kind_is_read_and_a_bad_linkage_refused(tmp_path: Path) -> None:
    import pytest

    from comp.core.errors import UserError
    from comp.methods.merge import MergeKind
    from comp.pipeline.suite import _merge_flags, load_suite

    path = tmp_path / "suite.yaml"
    path.write_text("singles: [hybrid]\nmerge: {linkage: average, relative: true}\n")
    suite = load_suite(str(path))
    assert suite.merge == MergeKind("average", True)
    assert _merge_flags(suite.merge) == (" --linkage average --relative-features", " LINKAGE=average RELATIVE=1")
    assert _merge_flags(MergeKind()) == ("", "")
    assert _merge_flags(MergeKind(calibrate=True)) == (" --calibrate", " CALIBRATE=1")
    assert _merge_flags(MergeKind(drop=("int_mean", "raw_max"))) == (" --drop-features int_mean raw_max", ' DROP="int_mean raw_max"')
    path.write_text("singles: [hybrid]\nmerge: {drop: [border_grad, sizes]}\n")
    with pytest.raises(UserError, match="merge: unknown feature 'sizes'"):
        load_suite(str(path))
    path.write_text("singles: [hybrid]\nmerge: {linkage: single}\n")
    with pytest.raises(UserError, match="merge: linkage must be one of classifier, average"):
        load_suite(str(path))


def test_a_suite_is_a_delta_of_its_base(tmp_path: Path) -> None:
    """`base: NAME` reads the suite beside it first; the file's own keys win; a loop is one clear error."""
    import pytest

    from comp.core.errors import UserError
    from comp.pipeline.suite import load_suite, results_file

    (tmp_path / "main.yaml").write_text("folds: 4\nsingles: [hybrid]\ndatasets: {phantom: ''}\n")
    (tmp_path / "variant.yaml").write_text("base: main\ndatasets: {proxy_ps: data/proxy_ps}\n")
    suite = load_suite(str(tmp_path / "variant.yaml"))
    assert (suite.folds, suite.singles, suite.datasets) == (4, ["hybrid"], {"proxy_ps": "data/proxy_ps"})
    assert results_file(tmp_path, str(tmp_path / "variant.yaml")).name == "results-variant.md"
    assert results_file(tmp_path, "experiments/suites/results_cpu.yaml").name == "results.md"
    (tmp_path / "main.yaml").write_text("base: variant\n")
    with pytest.raises(UserError, match="leads back to itself"):
        load_suite(str(tmp_path / "variant.yaml"))


def test_a_suite_without_an_fg_cc_experiment_has_no_such_row() -> None:
    from comp.pipeline.suite import load_suite, table_picks

    labels = lambda s: [label for label, _ in table_picks(s)]  # noqa: E731
    assert "fg U-Net + connected components" in labels(Suite(fg_cc="unet_fg_cc_cpu"))
    cut = load_suite(str(Path(__file__).parents[2] / "experiments/suites/results_cpu.yaml"))  # cut for time: make results under 60 min
    assert "fg U-Net + connected components" not in labels(cut) and [n for _, n in table_picks(cut)][:2] == [cut.baseline, cut.stretched]


def test_every_shipped_suite_loads_and_its_variants_keep_their_base_s_settings() -> None:
    from comp.pipeline.suite import load_suite

    suites = sorted((Path(__file__).parents[2] / "experiments/suites").glob("*.yaml"))
    loaded = {p.stem: load_suite(str(p)) for p in suites}  # a bad key or a transfer to an unknown data set raises
    assert {"results_cpu", "transfer", "transfer_noisy", "per_slice_noisy"} <= set(loaded)
    noisy = loaded["transfer_noisy"]
    assert noisy.transfer == {"phantom": "data/proxy_n15", "proxy_n15": ""} and noisy.singles == loaded["results_cpu"].singles
    cut = [n for n in loaded["results_cpu"].singles if n != "unet_cpu_pseudo"]  # transfer: under 60 min without the student
    assert loaded["transfer"].singles == cut and loaded["transfer_student"].singles == loaded["results_cpu"].singles
    assert set(loaded["per_slice_noisy"].datasets) == {"proxy_n15", "proxy_ps_n15"} and not loaded["per_slice_noisy"].transfer


def test_an_empty_regions_from_offers_no_runs_regions_unlike_a_missing_one(tmp_path: Path) -> None:
    from comp.pipeline.suite import _offers_regions, load_suite

    path = tmp_path / "s.yaml"
    path.write_text("singles: [hybrid, unet_cpu]\nregions_from: []\n")
    empty = load_suite(str(path))
    assert empty.regions_from == [] and not _offers_regions(empty, "hybrid", "hybrid")
    path.write_text("singles: [hybrid, unet_cpu]\n")
    assert _offers_regions(load_suite(str(path)), "hybrid", "hybrid")  # no key: every instance single's regions
