"""A static HTML report per run or ensemble."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.figures import histogram_png, overlay_png, plot_curves, pyplot, save_figure
from comp.core.log import LOG
from comp.core.metric import mean_counts, region_counts
from comp.core.store import FoldDir
from comp.data.calibration import evenly_spaced
from comp.methods.compose import segment
from comp.methods.merge import MergeKind, fit_merging, load_merger
from comp.nets.targets import blend
from comp.pipeline.ensemble import is_ensemble, load_ensemble, merger_path
from comp.pipeline.oof import OOF, has_maps
from comp.pipeline.workspace import RunDir, Workspace
from comp.report.leaderboard import leaderboard_rows, transfer_rows


@dataclass
class ReportInput:
    """What a report shows, gathered from a CV run or an ensemble."""

    title: str
    data_name: str
    ids: np.ndarray  # X_train indices of the OOF images
    scores: np.ndarray
    predict: Callable[[int], np.ndarray]  # OOF position -> predicted instance map
    runs: list[Path]  # CV runs whose training curves are shown
    experiment: str = ""  # whose transfer records are shown (an experiment's name, or "ensemble NAME")


def _from_run(run: Path) -> ReportInput:
    """A CV run: stored OOF scores and predictions."""
    rd = RunDir(run)
    s = rd.summary()
    packs = [rd.fold_pack(f) for f in range(len(s["folds"]))]
    ids = np.concatenate([p["ids"] for p in packs])
    preds = [p["pred"] for p in packs]
    offsets = np.cumsum([0] + [len(p["ids"]) for p in packs])

    def predict(i: int) -> np.ndarray:
        f = int(np.searchsorted(offsets, i, side="right") - 1)
        return preds[f][i - offsets[f]]

    scores = np.concatenate([p["scores"] for p in packs])
    title = f"{s['experiment']} — {run.name}: OOF ARI {s['mean_ari']:.4f} ± {s['std_ari']:.4f}"
    return ReportInput(title, s.get("dataset", {}).get("name", "?"), ids, scores, predict, [run], s["experiment"])


def _from_ensemble(name: str, runs: Path, data) -> ReportInput:
    """An ensemble: per-image OOF scores and predictions recomputed from its members' cached maps."""

    spec = load_ensemble(name, runs)
    members = [Path(m.run) for m in spec.members]
    oof = OOF.load(members, data)
    weights = [m.weight for m in spec.members]
    # Each OOF image is merged by the classifier of its fold, which never saw it: honest pictures.
    merger = load_merger(merger_path(name, runs)) if spec.merge.enabled else None
    if merger is not None and not set(map(int, np.unique(oof.folds))) <= set(merger.models):

        LOG.info(f"{merger_path(name, runs)} holds no per-fold models: refitting them for the OOF pictures")
        merger.models = {**fit_merging(oof, weights, spec.post, kind=MergeKind(merger.linkage, merger.relative)).models, -1: merger.models[-1]}
    scores = oof.scores(weights, spec.post, merger, desc="score ensemble", regions=spec.regions)

    def predict(i: int) -> np.ndarray:
        maps = blend([m.maps[i] for m in oof.members], weights)
        return segment(maps, oof.images[i], spec.post, merger, int(oof.folds[i]), spec.regions, oof.given(i, spec.regions))

    title = f"ensemble {spec.name}: OOF ARI {scores.mean():.4f} ± {scores.std():.4f} ({len(members)} members)"
    return ReportInput(title, spec.data.get("name", "?"), oof.members[0].ids, scores, predict, members, f"ensemble {spec.name}")


def _curves(run_dirs: list[Path], out: Path) -> list[str]:
    """Training loss / validation ARI per fold and pretraining loss PNGs; returns their file names."""
    names = []
    for r, run in enumerate(run_dirs):
        hist = RunDir(run).histories()
        if hist:
            plot_curves({k: ([h["epoch"] + 1 for h in v], [h["loss"] for h in v]) for k, v in hist.items()}, out / f"train_loss_{r}.png", f"training loss — {run.parent.name}", "loss")
            val = {k: ([h["epoch"] + 1 for h in v if "val_ari" in h], [h["val_ari"] for h in v if "val_ari" in h]) for k, v in hist.items()}
            plot_curves(val, out / f"val_ari_{r}.png", f"validation ARI — {run.parent.name}", "ARI")
            names += [f"train_loss_{r}.png", f"val_ari_{r}.png"]
        cfg = RunDir(run).config()
        weights = str(cfg.get("params", {}).get("model", {}).get("encoder_weights", "none"))
        if weights.endswith(".pt"):
            folder = Path(weights[:-3])  # runs/pretrain/NAME.pt -> its pretrainings, one folder per digest
            kept = [FoldDir(d).history for d in folder.iterdir()] if folder.is_dir() else []
            found = sorted((h for h in kept if h.is_file()), key=lambda p: p.stat().st_mtime)
            if found:
                h = json.loads(found[-1].read_text())
                plot_curves({"pretext": ([e["epoch"] + 1 for e in h], [e["loss"] for e in h])}, out / f"pretrain_{r}.png", f"pretraining — {Path(weights).stem}", "loss")
                names.append(f"pretrain_{r}.png")
    return names


def _html_table(rows: list[dict]) -> str:
    """Leaderboard rows as an HTML table."""
    head = "<tr><th>#</th><th>kind</th><th>name</th><th>OOF ARI</th><th>command</th></tr>"
    body = "".join(
        f"<tr><td>{i + 1}</td><td>{r['kind']}</td><td>{html.escape(r['name'])}</td><td>{r['oof_ari']:.4f} ± {r['std']:.4f}</td>"
        f"<td><code>{html.escape(r['command'])}</code></td></tr>"
        for i, r in enumerate(rows)
    )
    return f"<table>{head}{body}</table>"


DIAG_IMAGES = 100  # OOF images (evenly spaced) whose regions are counted: an ensemble re-segments each one


def regions_section(target: ReportInput, data, out: Path) -> str:
    """Predicted against true regions per OOF image, split and merged structures (comp.core.metric.region_counts): an
    HTML table and a scatter PNG."""

    pick = evenly_spaced(np.arange(len(target.ids)), DIAG_IMAGES)
    rows = [region_counts(data.y_train[int(target.ids[i])], target.predict(int(i))) for i in pick]
    mean = mean_counts(rows)
    fig, ax = pyplot().subplots(figsize=(4.2, 4.0))
    t, p = [r["true"] for r in rows], [r["predicted"] for r in rows]
    ax.scatter(t, p, s=10, c=target.scores[pick], cmap="viridis", vmin=0, vmax=1)
    hi = max(max(t), max(p)) + 1
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set_xlabel("annotated structures")
    ax.set_ylabel("predicted regions on them")
    ax.set_title("regions per OOF image (colour: ARI)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "regions.png")
    cells = "".join(f"<td>{mean[k]:.1f}</td>" for k in ("true", "predicted", "split", "merged"))
    return (f"<p>{len(rows)} OOF images: per image, annotated structures, predicted regions on their pixels, structures split "
            f"(two or more predicted regions each hold 10% of it) and merged (sharing their largest predicted region).</p>"
            f"<table><tr><th>structures</th><th>predicted regions</th><th>split</th><th>merged</th></tr><tr>{cells}</tr></table>"
            '<img src="regions.png" alt="regions">')  # fmt: skip


def _html_transfers(rows: list[dict]) -> str:
    """Transfer records as an HTML table (none: a line saying how to make one)."""
    if not rows:
        return "<p>none yet: <code>python -m comp transfer EXP --fit A --score B</code></p>"
    head = "<tr><th>fitted on</th><th>scored on</th><th>ARI</th><th>regions / structures</th><th>split</th><th>merged</th></tr>"
    body = "".join(f"<tr><td>{html.escape(r['fit'])}</td><td>{html.escape(r['score'])}</td><td>{r['mean_ari']:.4f} ± {r['std_ari']:.4f}</td>"
                   f"<td>{r['mean_regions']:.1f} / {r.get('true_regions', float('nan')):.1f}</td><td>{r.get('split', float('nan')):.1f}</td>"
                   f"<td>{r.get('merged', float('nan')):.1f}</td></tr>" for r in rows)  # fmt: skip
    return f"<table>{head}{body}</table>"


def build_report(target: ReportInput, data, runs: Path, out: Path, worst: int = 12) -> Path:
    """Write out/index.html with its PNGs: leaderboard, ARI histogram, regions, worst OOF images, curves."""
    out.mkdir(parents=True, exist_ok=True)
    histogram_png(target.scores, out / "oof_ari_hist.png", target.title)
    regions = regions_section(target, data, out)
    order = np.argsort(target.scores, kind="stable")[:worst]
    tiles = []
    for rank, i in enumerate(order):
        idx = int(target.ids[i])
        name = f"worst_{rank:02d}.png"
        overlay_png(data.x_train[idx], data.y_train[idx], target.predict(int(i)), out / name, f"{idx}.png — ARI {target.scores[i]:.3f}")
        tiles.append(name)
    curves = _curves(target.runs, out)
    board = [r for r in leaderboard_rows(runs) if r["data"] == target.data_name]
    img = lambda n: f'<img src="{n}" alt="{n}">'  # noqa: E731
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(target.title)}</title>
<style>body{{font-family:sans-serif;margin:24px;background:#fff;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #bbb;padding:3px 6px;text-align:left}} img{{max-width:100%;margin:4px 0}} code{{font-size:11px}}</style></head>
<body><h1>{html.escape(target.title)}</h1><p>data: {html.escape(target.data_name)} — {len(target.scores)} OOF images</p>
<h2>Leaderboard</h2>{_html_table(board)}
<h2>Transfer (fitted on one data set, scored on another)</h2>{_html_transfers(transfer_rows(runs, target.experiment))}
<h2>Per-image OOF ARI</h2>{img("oof_ari_hist.png")}
<h2>Regions: split and merged structures</h2>{regions}
<h2>Training and pretraining curves</h2>{"".join(img(n) for n in curves) or "<p>none (a non-learned method)</p>"}
<h2>The {len(tiles)} worst OOF images</h2>{"".join(img(n) for n in tiles)}
</body></html>"""
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def report(target: str | None, data, runs: Path) -> Path:
    """Report an ensemble name, a run folder or an experiment's newest run (default: ensemble 'default', else the newest run)."""

    if target is None:
        target = "default" if is_ensemble("default", runs) else None
    is_file = target is not None and (is_ensemble(target, runs) or target.endswith(".yaml"))
    members = [Path(m.run) for m in load_ensemble(target, runs).members] if is_file else []
    if is_file and not (len(members) == 1 and not has_maps(members[0])):
        inp, label = _from_ensemble(target, runs, data), f"ensemble-{Path(target).stem}"
    else:  # a run, or a tuned non-learned method: its CV run's out-of-fold predictions
        run = members[0] if members else _find_run(target, runs)
        inp, label = _from_run(run), f"{run.parent.name}-{run.name}"
    return build_report(inp, data, runs, Workspace(runs).report(label))


def _find_run(target: str | None, runs: Path) -> Path:
    """A run folder, or the newest finished run of an experiment (of any experiment when None)."""
    if target and Path(target).is_dir() and RunDir(Path(target)).finished:
        return Path(target)
    found = sorted((r.summary_file for r in RunDir.finished_under(runs) if target is None or r.experiment == target),
                   key=lambda p: p.stat().st_mtime)  # fmt: skip
    if not found:
        if target is None:
            raise UserError(runs, "nothing to report yet: no ensemble 'default' and no finished CV run (run `comp cv` first)")
        raise UserError(target, f"no finished CV run or ensemble of that name under {runs}/ to report")
    return found[-1].parent
