#!/usr/bin/env bash
# The ensemble's mergers with and without `tune --calibrate`: a fresh unet_cpu proxy CV run (3 folds, seed 0), its maps
# with superpixels merged by fold classifiers (12 trials each), and each ensemble fitted on the proxy scored on the
# phantom (`comp transfer --ensemble`). Needs `make proxy`; about 25 min on 2 cores. Logs in /tmp/calens_*.log.
set -euo pipefail
PY=.venv/bin/python
$PY -m comp cv unet_cpu --data data/proxy --folds 3 > /tmp/calens_cv.log 2>&1
run=$(grep -oP '^\S+ on \S+ \(\K[^)]+' /tmp/calens_cv.log | tail -1)
echo "run $run"
for k in plain cal; do
  flags=(); [ $k = cal ] && flags=(--calibrate)
  $PY -m comp ensemble "$run" --data data/proxy --name "calens-$k" --max-steps 1 --force > /tmp/calens_$k.log 2>&1
  $PY -m comp tune "calens-$k" --data data/proxy --trials 12 "${flags[@]}" >> /tmp/calens_$k.log 2>&1
  grep -E "^tuned" /tmp/calens_$k.log
  date
done
for k in plain cal; do
  $PY -m comp transfer --ensemble "calens-$k" --fit data/proxy --score data/phantom > /tmp/calens_tr_$k.log 2>&1
  grep -P '^\| ' /tmp/calens_tr_$k.log
  date
done
