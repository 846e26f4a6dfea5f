"""Reports: the leaderboard of every CV run and ensemble under runs/."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from comp.errors import atomic_write_text

LEADERBOARD = "leaderboard.md"


def _run_command(run: Path, summary: dict) -> str:
    """The command stored with a run, else the one that reproduces its config (older runs)."""
    if summary.get("command"):
        return summary["command"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = summary.get("dataset", {})
    data_arg = "" if data.get("name") == "phantom" else f" --data {data.get('root', '?')}"
    return f"python -m comp cv {summary['experiment']}{data_arg} --folds {cfg['cv']['folds']}  # reconstructed; --set overrides not recorded"


def leaderboard_rows(runs: Path) -> list[dict]:
    """One row per finished CV run and per ensemble file, best first within each data set."""
    rows = []
    for cv in runs.glob("*/*/cv.json"):
        s = json.loads(cv.read_text())
        rows.append(
            {
                "kind": "cv",
                "name": s["experiment"],
                "data": s.get("dataset", {}).get("name", "?"),
                "folds": len(s.get("folds", [])),
                "images": s.get("n_images", 0),
                "oof_ari": s["mean_ari"],
                "std": s["std_ari"],
                "path": str(cv.parent),
                "command": _run_command(cv.parent, s),
            }
        )
    for path in sorted((runs / "ensembles").glob("*.yaml")):
        e = yaml.safe_load(path.read_text())
        if e.get("oof_ari") is None:
            continue
        rows.append(
            {
                "kind": "ensemble",
                "name": e["name"],
                "data": e.get("data", {}).get("name", "?"),
                "folds": "",
                "images": "",
                "oof_ari": e["oof_ari"],
                "std": e.get("oof_std") or 0.0,
                "path": str(path),
                "command": e.get("command", ""),
            }
        )
    return sorted(rows, key=lambda r: (r["data"], -r["oof_ari"]))


def write_leaderboard(runs: Path) -> Path:
    """Write runs/leaderboard.md (a table per data set) atomically and return its path."""
    rows = leaderboard_rows(runs)
    lines = ["# Leaderboard (mean ± std of per-image OOF ARI)", ""]
    for data in sorted({r["data"] for r in rows}):
        lines += [f"## data: {data}", "", "| # | kind | name | OOF ARI | folds | images | command | path |", "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(r for r in rows if r["data"] == data):
            lines.append(
                f"| {i + 1} | {r['kind']} | {r['name']} | {r['oof_ari']:.4f} ± {r['std']:.4f} | {r['folds']} | {r['images']} "
                f"| `{r['command']}` | {r['path']} |"
            )
        lines.append("")
    path = runs / LEADERBOARD
    atomic_write_text(path, "\n".join(lines))
    return path
