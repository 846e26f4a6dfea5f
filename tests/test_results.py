"""`make results` on a tiny suite: every row is measured and the README's marked table is replaced."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_UNET

from comp.results import END, START, Suite, run_results



def test_results_fill_the_readme_table(tiny_phantom: Path, tmp_path: Path) -> None:
    exp = tmp_path / "tinyres.yaml"
    exp.write_text("name: tinyres\n" + TINY_UNET)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold table\n{END}\n\nafter\n")
    suite = Suite(folds=2, trials=2, datasets={"tiny": str(tiny_phantom)}, baseline="baseline_watershed", fg_cc=str(exp), singles=[str(exp)])
    out = run_results(suite, tmp_path / "runs", reuse=True, readme=readme)
    table = out.read_text()
    for label in ("official watershed baseline", "official baseline, contrast-stretched (auto)", "fg U-Net + connected components",
                  "single model", "best ensemble (tuned)"):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.split("|")]
        assert "±" in cells[3] and float(cells[4]) >= -1, line  # CV ARI and a held-out ARI (the phantom ships Y_test)
    text = readme.read_text()
    assert "old table" not in text and table in text and text.startswith("# title") and text.endswith("after\n")
    assert len(list((tmp_path / "runs" / "tinyres").glob("*/cv.json"))) == 1  # reused, not rerun
