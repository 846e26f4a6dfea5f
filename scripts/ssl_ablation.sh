#!/usr/bin/env bash
# SSL ablation (issue 5): each backbone x {random, mim, vicregl} x {100%, 25% budget} x {phantom, proxy},
# same 3 folds and seeds. Encoders are pretrained on each data set's own slices (pixels only).
# Usage: scripts/ssl_ablation.sh [BACKBONE...]   (default: mnv3 resnet18 effb0); rows go to runs/ssl_ablation.tsv
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/ssl_ablation.tsv
declare -A EXP=([mnv3]=unet_cpu [resnet18]=unet_resnet18_cpu [effb0]=unet_effb0_cpu)
DATASETS=${DATASETS:-"phantom proxy"}
BUDGETS=${BUDGETS:-"1.0 0.25"}
mkdir -p runs
[ -f $OUT ] || printf 'backbone\tdata\tinit\tbudget\tmean_ari\timage_std\tfold_std\trun\n' > $OUT

row() {  # backbone data init budget -> appends the newest run's numbers
  $PY - "$@" <<'PYEOF' >> runs/ssl_ablation.tsv
import sys
from comp.pipeline.workspace import RUNS, RunDir
bb, data, init, budget, exp = sys.argv[1:6]
run = max((RunDir(d) for d in (RUNS / exp).iterdir() if RunDir(d).finished), key=lambda r: r.summary_file.stat().st_mtime)
s = run.summary()
print(f"{bb}\t{data}\t{init}\t{budget}\t{s['mean_ari']:.4f}\t{s['std_ari']:.4f}\t{s['fold_std']:.4f}\t{run}")
PYEOF
}

for bb in ${@:-mnv3 resnet18 effb0}; do
  exp=${EXP[$bb]}
  for data in $DATASETS; do
    if [ "$data" = phantom ]; then dargs=(); runs=runs; else dargs=(--data data/$data); runs=runs/$data; fi
    for init in random mim vicregl; do
      sets=()
      if [ $init != random ] && [ "$(grep -cP "^$bb\t$data\t$init\t" $OUT)" -lt $(wc -w <<< "$BUDGETS") ]; then
        ckpt=$runs/pretrain/ssl_${init}_${bb}.pt
        [ -f "$ckpt" ] || $PY -m comp pretrain ssl_${init}_${bb} "${dargs[@]}" --runs $runs
        sets=(--set params.model.encoder_weights=$ckpt)
      fi
      for budget in $BUDGETS; do
        grep -qP "^$bb\t$data\t$init\t$budget\t" $OUT && continue  # resume: done rows are kept
        $PY -m comp cv $exp "${dargs[@]}" --folds 3 "${sets[@]}" --set params.train.budget=$budget
        row $bb $data $init $budget $exp
      done
    done
  done
done
# The README's table: one row per backbone x data x budget, one column per encoder init.
$PY - <<'PYEOF'
import csv
from pathlib import Path
rows = list(csv.DictReader(open("runs/ssl_ablation.tsv"), delimiter="\t"))
keys = sorted({(r["backbone"], r["data"], float(r["budget"])) for r in rows}, key=lambda k: (k[0], k[1], -k[2]))
cell = {(r["backbone"], r["data"], float(r["budget"]), r["init"]): f"{float(r['mean_ari']):.4f} ± {float(r['fold_std']):.4f}" for r in rows}
out = ["| backbone | data | budget | random | mim | vicregl |", "|---|---|---|---|---|---|"]
for b, d, f in keys:
    out.append(f"| {b} | {d} | {f:.0%} | " + " | ".join(cell.get((b, d, f, i), "—") for i in ("random", "mim", "vicregl")) + " |")
Path("runs/ssl_ablation.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
PYEOF
