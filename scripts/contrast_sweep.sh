#!/usr/bin/env bash
# Contrast sweep (issue 12): CV of experiments under contrast.window = none, auto (its default HU
# window), and each HU window both fixed and through auto's calibration; same folds and seeds. The fixed windows are given in HU and turned into grey levels with the data
# set's known rendering (the stand-ins: -1000..1000 HU -> 0..255), so `auto` is compared with the
# windows it tries to find. Usage: scripts/contrast_sweep.sh [EXP...]
#   (default: baseline_watershed_stretched smooth_watershed); DATA=data/proxy, FOLDS=3;
#   rows go to runs/contrast_sweep.tsv (done rows are kept: rerun to resume), the table to runs/contrast_sweep.md
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/proxy}
FOLDS=${FOLDS:-3}
RENDER=${RENDER:-"-1000 1000"}  # the data set's HU window
HU_WINDOWS=${HU_WINDOWS:-"-600,600 -350,450 -250,350 -160,240 -100,200"}
OUT=runs/contrast_sweep.tsv
mkdir -p runs
[ -f $OUT ] || printf 'experiment\tdata\twindow\tgrey\tmean_ari\timage_std\tfold_std\trun\n' > $OUT
name=$(basename "$DATA")

grey() {  # "lo,hi" in HU -> "[glo,ghi]" in grey levels under RENDER
  $PY -c "import sys; r0, r1 = map(float, '$RENDER'.split()); lo, hi = map(float, sys.argv[1].split(',')); g = lambda v: round((v - r0) / (r1 - r0) * 255, 1); print(f'[{g(lo)},{g(hi)}]')" "$1"
}

for exp in ${@:-baseline_watershed_stretched smooth_watershed}; do
  # Each HU window twice: fixed (grey levels from the known rendering) and `auto@` (grey levels estimated
  # from the histogram): the gap between the two is what auto's calibration costs.
  for w in none auto $HU_WINDOWS $(printf 'auto@%s ' $HU_WINDOWS); do
    grep -qP "^$exp\t$name\t$w\t" $OUT && continue  # resume: done rows are kept
    case $w in
      none|auto) sets=(--set "contrast.window=$w") ;;
      auto@*) sets=(--set contrast.window=auto --set "contrast.hu=[${w#auto@}]") ;;
      *) sets=(--set "contrast.window=$(grey "$w")") ;;
    esac
    log=$($PY -m comp cv $exp --data "$DATA" --folds $FOLDS "${sets[@]}" | tee /dev/stderr)
    run=$(grep -oP "^$exp on \S+ \(\K[^)]+" <<< "$log")
    $PY - "$exp" "$name" "$w" "$run" <<'PYEOF' >> $OUT
import sys
from comp.pipeline.workspace import RunDir
exp, data, w, run = sys.argv[1:5]
s, grey = RunDir(run).summary(), RunDir(run).config()["contrast_resolved"]["window"]
print(f"{exp}\t{data}\t{w}\t{grey[0]:.1f}..{grey[1]:.1f}\t{s['mean_ari']:.4f}\t{s['std_ari']:.4f}\t{s['fold_std']:.4f}\t{run}")
PYEOF
  done
done
$PY - <<'PYEOF'
import csv
from pathlib import Path
rows = sorted(csv.DictReader(open("runs/contrast_sweep.tsv"), delimiter="\t"), key=lambda r: r["experiment"])  # stable: run order within one
out = ["| experiment | data | contrast.window | grey window | CV ARI ± fold std |", "|---|---|---|---|---|"]
for r in rows:
    w = r["window"] if r["window"] in ("none", "auto") else f"{r['window'].replace(',', '..')} HU".replace("@", " ")
    out.append(f"| {r['experiment']} | {r['data']} | {w} | {r['grey']} | {float(r['mean_ari']):.4f} ± {float(r['fold_std']):.4f} |")
Path("runs/contrast_sweep.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
PYEOF
