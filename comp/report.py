"""Reports: the leaderboard of every CV run and ensemble, and a static HTML page per run or ensemble."""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from comp.errors import UserError, atomic_write_text
from comp.rundir import FoldDir, RunDir, Workspace



def _run_command(run: Path, summary: dict) -> str:
    """The command stored with a run, else the one that reproduces its config (older runs)."""
    if summary.get("command"):
        return summary["command"]
    cfg = RunDir(run).config()
    data = summary.get("dataset", {})
    data_arg = "" if data.get("name") == "phantom" else f" --data {data.get('root', '?')}"
    sets = "".join(f" --set {k}={v}" for k, v in _overrides(summary["experiment"], cfg))
    return f"python -m comp cv {summary['experiment']}{data_arg} --folds {cfg['cv']['folds']}{sets}  # reconstructed"


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _overrides(name: str, cfg: dict) -> list[tuple[str, object]]:
    """Parameters where a run's stored config differs from its experiment file today (its --set overrides)."""
    from comp.config import load_experiment

    try:
        now = _flatten({"params": load_experiment(name).to_dict()["params"]})
    except UserError:
        return []
    then = _flatten({"params": cfg.get("params", {})})
    return [(k, json.dumps(v) if isinstance(v, list) else v) for k, v in then.items() if k in now and now[k] != v]


def _group_cell(pg: dict | None) -> str:
    """A run's per-group scores as a leaderboard cell: worst group's ARI / standard error (n groups)."""
    if not pg or not pg.get("groups"):
        return "—"
    return f"{min(g['ari'] for g in pg['groups']):.4f} / {pg['se']:.4f} ({len(pg['groups'])} {pg['by']}s)"


def leaderboard_rows(runs: Path) -> list[dict]:
    """One row per finished CV run and per ensemble file, best first within each data set."""
    rows = []
    for run in RunDir.finished_under(runs):
        s = run.summary()
        rows.append(
            {
                "kind": "cv",
                "name": s["experiment"],
                "data": s.get("dataset", {}).get("name", "?"),
                "folds": len(s.get("folds", [])),
                "images": s.get("n_images", 0),
                "oof_ari": s["mean_ari"],
                "honest": s["mean_ari"],  # out-of-fold: each fold fitted without its images
                "std": s["std_ari"],
                "groups": _group_cell(s.get("per_group")),
                "path": str(run.path),
                "command": _run_command(run.path, s),
            }
        )
    from comp.ensemble import load_ensemble

    for path in sorted(Workspace(runs).ensembles.glob("*.yaml")):
        try:
            e = load_ensemble(str(path), runs)
        except UserError as err:  # a broken file is named and left out, never the whole leaderboard
            print(f"skipped {err}", file=sys.stderr, flush=True)
            continue
        if e.oof_ari is None:
            continue
        rows.append(
            {
                "kind": "ensemble",
                "name": e.name,
                "data": e.data.get("name", "?"),
                "folds": "",
                "images": "",
                "oof_ari": e.oof_ari,
                "honest": e.nested_ari,  # None: tuned or selected before nested estimates existed
                "std": e.oof_std or 0.0,
                "groups": "",
                "path": str(path),
                "command": e.commands,  # selection, then the tune call whose settings are stored
            }
        )
    return sorted(rows, key=lambda r: (r["data"], r["honest"] is None, -(r["honest"] if r["honest"] is not None else r["oof_ari"])))


def write_leaderboard(runs: Path) -> Path:
    """Write runs/leaderboard.md (a table per data set) atomically and return its path."""
    rows = leaderboard_rows(runs)
    lines = ["# Leaderboard (per-image OOF ARI; ensembles and tuned settings ranked by their nested estimate)", ""]
    head = "| # | kind | name | honest OOF ARI | in-sample OOF ARI ± std | per scan block (or fold): worst / SE | folds | images | command | path |"
    for data in sorted({r["data"] for r in rows}):
        lines += [f"## data: {data}", "", head, "|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(r for r in rows if r["data"] == data):
            honest = f"{r['honest']:.4f}" if r["honest"] is not None else "—"
            lines.append(
                f"| {i + 1} | {r['kind']} | {r['name']} | {honest} | {r['oof_ari']:.4f} ± {r['std']:.4f} | {r['groups']} | {r['folds']} | {r['images']} "
                f"| `{r['command']}` | {r['path']} |"
            )
        lines.append("")
    lines += transfer_lines(runs)
    path = Workspace(runs).leaderboard
    atomic_write_text(path, "\n".join(lines))
    return path


def transfer_rows(runs: Path, experiment: str | None = None) -> list[dict]:
    """Transfer records (fitted on one data set, scored on another), best first per (fitted on, scored on)."""
    from comp.rundir import TransferRecord

    rows = [r for r in TransferRecord.all_under(runs) if experiment is None or r.get("experiment") == experiment]
    return sorted(rows, key=lambda r: (r.get("fit", ""), r.get("score", ""), -r.get("mean_ari", 0.0)))


def transfer_lines(runs: Path) -> list[str]:
    """The leaderboard's transfer table (none: no lines)."""
    rows = transfer_rows(runs)
    if not rows:
        return []
    out = ["## transfer: fitted on one data set, scored on another's annotated slices", "",
           "| fitted on | scored on | name | ARI ± std | slices | regions / structures | split | merged | path |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['fit']} | {r['score']} | {r['experiment']} | {r['mean_ari']:.4f} ± {r['std_ari']:.4f} | {r['n_images']} | "
                   f"{r['mean_regions']:.1f} / {r.get('true_regions', float('nan')):.1f} | {r.get('split', float('nan')):.1f} | "
                   f"{r.get('merged', float('nan')):.1f} | {r['path']} |")  # fmt: skip
    return out + [""]


# ----------------------------------------------------------------------------- HTML report

def _plt():
    """matplotlib with a file-only backend (no screen on a GPU box either)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    from comp.errors import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    _plt().close(fig)


def plot_curves(series: dict[str, tuple[list, list]], path: Path, title: str, ylabel: str) -> None:
    """Line plot of named (x, y) series as a PNG."""
    fig, ax = _plt().subplots(figsize=(5.5, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    """Instance ids -> colours (0 black), the same id always the same colour."""
    rng = np.random.default_rng(7)
    lut = np.concatenate([[[0, 0, 0]], rng.integers(60, 256, (255, 3))]).astype(np.uint8)
    return lut[labels]


def overlay_png(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    """Four panels: slice, truth, prediction, slice with truth (green) and predicted (red) region borders."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(image[..., None], 3, axis=2)
    rgb[find_boundaries(truth, mode="inner") & (truth > 0)] = (0, 220, 0)
    rgb[find_boundaries(pred, mode="inner") & (pred > 0)] = (255, 40, 40)
    fig, axes = _plt().subplots(1, 4, figsize=(12, 3.2))
    for ax, img, name in zip(axes, (image, _label_rgb(truth), _label_rgb(pred), rgb), ("slice", "truth", "prediction", "borders: truth green, prediction red")):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def histogram_png(scores: np.ndarray, path: Path, title: str) -> None:
    """Histogram of per-image OOF ARI."""
    fig, ax = _plt().subplots(figsize=(5.5, 3.2))
    ax.hist(scores, bins=np.linspace(min(0.0, float(scores.min())), 1, 26), color="#4477aa")
    ax.axvline(float(scores.mean()), color="k", ls="--", label=f"mean {scores.mean():.4f}")
    ax.set_xlabel("per-image ARI")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


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
    from comp.ensemble import OOF, load_ensemble, merger_path
    from comp.postprocess import blend, segment
    from comp.merge import load_merger

    spec = load_ensemble(name, runs)
    members = [Path(m.run) for m in spec.members]
    oof = OOF.load(members, data)
    weights = [m.weight for m in spec.members]
    # Each OOF image is merged by the classifier of its fold, which never saw it: honest pictures.
    merger = load_merger(merger_path(name, runs)) if spec.merge.enabled else None
    if merger is not None and not set(map(int, np.unique(oof.folds))) <= set(merger.models):
        from comp.merge import fit_merging  # a file of the first format holds the test model only: refit the folds'

        print(f"{merger_path(name, runs)} holds no per-fold models: refitting them for the OOF pictures", flush=True)
        merger.models = {**fit_merging(oof, weights, spec.post).models, -1: merger.models[-1]}
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
    """Predicted against true regions per OOF image, split and merged structures (comp.metric.region_counts): an
    HTML table and a scatter PNG."""
    from comp.contrast import evenly_spaced
    from comp.metric import mean_counts, region_counts

    pick = evenly_spaced(np.arange(len(target.ids)), DIAG_IMAGES)
    rows = [region_counts(data.y_train[int(target.ids[i])], target.predict(int(i))) for i in pick]
    mean = mean_counts(rows)
    fig, ax = _plt().subplots(figsize=(4.2, 4.0))
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
    from comp.ensemble import has_maps, is_ensemble, load_ensemble

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
