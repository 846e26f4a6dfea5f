#!/usr/bin/env bash
# Resolution trade-off (issue 14): CV of a learned experiment at several working resolutions, the
# training crop kept at half the resolution (the same field of view per crop), same folds and seeds.
# Usage: scripts/resolution_sweep.sh [EXP] (default unet_cpu); DATA=data/proxy, FOLDS=3,
# RESOLUTIONS="256 384 512". Rows go to runs/resolution_sweep.tsv (done rows are kept: rerun to resume).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/proxy}
FOLDS=${FOLDS:-3}
EXP=${1:-unet_cpu}
OUT=runs/resolution_sweep.tsv
mkdir -p runs
[ -f $OUT ] || printf 'experiment\tdata\tresolution\tcrop\tmean_ari\timage_std\tminutes\trun\n' > $OUT
name=$(basename "$DATA")
for r in ${RESOLUTIONS:-256 384 512}; do
  grep -qP "^$EXP\t$name\t$r\t" $OUT && continue
  crop=$((r / 2))
  t0=$(date +%s)
  $PY -m comp cv "$EXP" --data "$DATA" --folds "$FOLDS" --set "params.train.resolution=$r" --set "params.train.crop=$crop" > /tmp/resolution_sweep.log
  run=$(grep -oP '^\S+ on \S+ \(\K[^)]+' /tmp/resolution_sweep.log | tail -1)
  $PY -c "import json, sys; s = json.load(open(sys.argv[1] + '/cv.json')); print(f\"$EXP\t$name\t$r\t$crop\t{s['mean_ari']:.4f}\t{s['std_ari']:.4f}\t$(( ($(date +%s) - t0) / 60 ))\t{sys.argv[1]}\")" "$run" >> $OUT
  tail -1 $OUT
done
column -t -s $'\t' $OUT
