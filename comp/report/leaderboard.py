"""The leaderboard of every CV run, ensemble and transfer."""

from __future__ import annotations

import json
from pathlib import Path

from comp.core.atomic import atomic_write_text
from comp.core.errors import UserError
from comp.core.log import LOG
from comp.pipeline.config import load_experiment
from comp.pipeline.ensemble import load_ensemble
from comp.pipeline.workspace import RunDir, TransferRecord, Workspace


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

    for path in sorted(Workspace(runs).ensembles.glob("*.yaml")):
        try:
            e = load_ensemble(str(path), runs)
        except UserError as err:  # a broken file is named and left out, never the whole leaderboard
            LOG.warning(f"skipped {err}")
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
