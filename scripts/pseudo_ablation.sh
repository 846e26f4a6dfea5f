#!/usr/bin/env bash
# Pseudo-labelling ablation (issue 14): unet_cpu without pseudo-labels (its own epochs and the student's) and
# with them (unet_cpu_pseudo), at 100% and 25% of the annotated training slices (the teacher at the same
# budget), 3 shared folds, seed 0;
# held-out ARI where the data set ships test labels (the phantom). Finished runs are reused: rerun to resume.
# Usage: scripts/pseudo_ablation.sh   (DATASETS="phantom proxy", BUDGETS="1.0 0.25"); table: runs/pseudo_ablation.md
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATASETS=${DATASETS:-"phantom proxy"} BUDGETS=${BUDGETS:-"1.0 0.25"} $PY - <<'PYEOF'
import os

from comp.pipeline.config import load_experiment
from comp.pipeline.cv import finished_run, run_cv
from comp.data.sets import resolve_data
from comp.core.atomic import atomic_write_text
from comp.pipeline.suite import held_out_single
from comp.pipeline.workspace import RUNS

runs, folds, rows = RUNS, 3, []
# The student may train fewer epochs than its teacher (it sees more slices an epoch): the teacher's recipe at
# the student's epochs separates what the pseudo-labels earn from what the shorter schedule does.
epochs = load_experiment("unet_cpu_pseudo").params.train.epochs
for ds in os.environ["DATASETS"].split():
    data = resolve_data(None if ds == "phantom" else f"data/{ds}")
    for budget in map(float, os.environ["BUDGETS"].split()):
        sets = [] if budget == 1.0 else [f"params.train.budget={budget}"]
        cells = []
        # (experiment, tag of its held-out files, extra overrides): one column each
        for name, tag, extra in (("unet_cpu", "", []), ("unet_cpu", f"-e{epochs}", [f"params.train.epochs={epochs}"]),
                                 ("unet_cpu_pseudo", "", [f"pseudo.teacher_set={sets}"] if sets else [])):
            exp = load_experiment(name, sets + extra)
            res = finished_run(exp, data, folds, runs) or run_cv(exp, data, folds, runs, command=f"python -m comp cv {name} --folds {folds} " + " ".join(f"--set '{s}'" for s in sets + extra))
            held = held_out_single(f"{name}-b{budget}{tag}", res.run_dir, data, runs)
            cells.append(f"{res.mean:.4f} ± {res.std:.4f}" + (f" (held-out {held:.4f})" if held is not None else ""))
            print(f"[{ds} {budget:.0%}] {name} {' '.join(extra)}: CV {res.mean:.4f} held-out {held} ({res.run_dir})", flush=True)
        rows.append(f"| {ds} | {budget:.0%} | {cells[0]} | {cells[1]} | {cells[2]} |")
table = (f"| data | budget | unet_cpu | unet_cpu, {epochs} epochs | unet_cpu_pseudo ({epochs} epochs) |\n|---|---|---|---|---|\n"
         + "\n".join(rows) + "\n")
atomic_write_text(RUNS / "pseudo_ablation.md", table)
print(table)
PYEOF
