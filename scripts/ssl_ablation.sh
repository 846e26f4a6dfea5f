#!/usr/bin/env bash
# SSL ablation (issue 5): each backbone x {random, mim, vicregl} x {100%, 25% budget} x {phantom, proxy},
# same 3 folds and seeds. Encoders are pretrained on each data set's own slices (pixels only).
# Usage: scripts/ssl_ablation.sh [BACKBONE...]   (default: mnv3 resnet18 effb0); rows go to runs/ssl_ablation.tsv
# Every cell reads one input channel (`contrast.channels=[]`, as unet_cpu_mim does), random init included: the
# pretraining configs build a one-channel stem, which does not load into unet_cpu's three input windows.
# TRANSFER=1: each cell's fold models also scored on the other stand-in's annotated slices, each alone and averaged
# (scripts/fold_transfer.py, rows in runs/ssl_transfer.tsv): the table gets a transfer column per init.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=runs/ssl_ablation.tsv
declare -A EXP=([mnv3]=unet_cpu [resnet18]=unet_resnet18_cpu [effb0]=unet_effb0_cpu)
DATASETS=${DATASETS:-"phantom proxy"}
BUDGETS=${BUDGETS:-"1.0 0.25"}
TRANSFER=${TRANSFER:-}
TR=runs/ssl_transfer.tsv
declare -A OTHER=([phantom]=data/proxy [proxy]=data/phantom)
mkdir -p runs
[ -f $OUT ] || printf 'backbone\tdata\tinit\tbudget\tmean_ari\timage_std\tfold_std\trun\n' > $OUT

row() {  # backbone data init budget -> appends the newest run's numbers
  $PY - "$@" <<'PYEOF' >> runs/ssl_ablation.tsv
import sys
from comp.pipeline.workspace import RUNS, RunDir
bb, data, init, budget, exp = sys.argv[1:6]
run = max((RunDir(d) for d in (RUNS / exp).iterdir() if RunDir(d).finished), key=lambda r: r.summary_file.stat().st_mtime)
s = run.summary()
print(f"{bb}\t{data}\t{init}\t{budget}\t{s['mean_ari']:.4f}\t{s['std_ari']:.4f}\t{s['fold_std']:.4f}\t{run.path}")
PYEOF
}
transfer_row() {  # backbone data init budget: the cell's run (its TSV row) scored on the other stand-in
  local run
  run=$(grep -P "^$1\t$2\t$3\t$4\t" $OUT | tail -1 | cut -f8)
  [ -f $TR ] && grep -qP "^$run\t" $TR && return 0
  $PY scripts/fold_transfer.py --score ${OTHER[$2]} --tsv $TR "$run"
}

for bb in ${@:-mnv3 resnet18 effb0}; do
  exp=${EXP[$bb]}
  for data in $DATASETS; do
    if [ "$data" = phantom ]; then dargs=(); runs=runs; else dargs=(--data data/$data); runs=runs/$data; fi
    for init in random mim vicregl; do
      sets=(--set 'contrast.channels=[]')
      if [ $init != random ] && [ "$(grep -cP "^$bb\t$data\t$init\t" $OUT)" -lt $(wc -w <<< "$BUDGETS") ]; then
        ckpt=$runs/pretrain/ssl_${init}_${bb}.pt
        [ -f "$ckpt" ] || $PY -m comp pretrain ssl_${init}_${bb} "${dargs[@]}" --runs $runs
        sets+=(--set params.model.encoder_weights=$ckpt)
      fi
      for budget in $BUDGETS; do
        if ! grep -qP "^$bb\t$data\t$init\t$budget\t" $OUT; then  # resume: done rows are kept
          $PY -m comp cv $exp "${dargs[@]}" --folds 3 "${sets[@]}" --set params.train.budget=$budget
          row $bb $data $init $budget $exp
        fi
        [ -z "$TRANSFER" ] || transfer_row $bb $data $init $budget
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
tr = Path("runs/ssl_transfer.tsv")
moved = {t["run"]: f"{float(t['averaged']):.4f} ({t['min']}-{t['max']})" for t in csv.DictReader(open(tr), delimiter="\t")} if tr.is_file() else {}
run = {(r["backbone"], r["data"], float(r["budget"]), r["init"]): r["run"] for r in rows}
inits = ("random", "mim", "vicregl")
head = "| backbone | data | budget | " + " | ".join(inits) + (" | " + " | ".join(f"{i} -> other" for i in inits) if moved else "") + " |"
out = [head, "|" + "---|" * (3 + len(inits) * (2 if moved else 1))]
for b, d, f in keys:
    cells = [cell.get((b, d, f, i), "—") for i in inits]
    if moved:
        cells += [moved.get(run.get((b, d, f, i)), "—") for i in inits]
    out.append(f"| {b} | {d} | {f:.0%} | " + " | ".join(cells) + " |")
Path("runs/ssl_ablation.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
PYEOF
