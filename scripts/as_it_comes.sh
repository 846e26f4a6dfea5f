#!/usr/bin/env bash
# The challenge data as it comes (issue 23): CV of the results suite's methods on stand-ins rendered with a window
# per slice, and on the proxy with random, inferred and true scan groups (the leak table). Each row is one
# `comp cv` run with the suite's 3 folds and seed 0; the one-window rows are the results table's (`make results`).
# `resolution`: each method fitted on every annotated slice of one data set and scored on another's (`comp transfer`):
# native <-> coarse phantoms, the proxy onto both and the phantom onto the proxy. `extra`: CV of the fitted methods with
# the other stand-in's annotated slices in every training part (`cv --extra`), against the same CV without.
# `features`: the hybrid with and without its merger's position features, with average linkage, and with relative border features (FEATURE_METHODS), CV and transfer both ways.
# `noise`: the fitted methods re-fitted with other seeds (`cv.fit_seed`, the folds unchanged) on the proxy rendered both
# ways: how far a CV figure moves with the fit's own noise, against the per-slice change it is compared with. A
# student's teacher is re-fitted with the same seed (its run is the unet_cpu row's).
# Usage: scripts/as_it_comes.sh [per-slice|leak|diagnose|resolution|extra|features|networks|noise|merger|noisy-fit|rounds|all] (default all); METHODS="..." to narrow. Data:
# `make proxy`, then
#   python -m comp data proxy --out data/proxy_ps   --window-per-slice -3100:-1000 1000:3100
#   python -m comp data phantom --out data/phantom_ps --n-train 1000 --n-labelled 200 --n-test 100 --window-per-slice -3100:-1000 1000:3100
#   python -m comp data phantom --out data/phantom_s1        --n-train 300 --n-labelled 100 --n-test 10 --seed 1
#   python -m comp data phantom --out data/phantom_s1_coarse --n-train 300 --n-labelled 100 --n-test 10 --seed 1 --coarse 4
#   python -m comp data proxy   --out data/proxy_n15 --noise-hu 15
# (data/phantom, the embedded phantom, is made by any command run without --data.) Since 2026-12-07 the proxy is made
# noisy by default (15 HU, docs/data.md): the rows measured before then used `make proxy NOISE_HU=0` and `--noise-hu 0`
# on the proxy_ps command.
# Rows go to runs/as_it_comes.tsv and runs/as_it_comes_transfer.tsv (done rows are kept: rerun to resume).
set -euo pipefail
PY=${PY:-.venv/bin/python}
FOLDS=${FOLDS:-3}
WHAT=${1:-all}
METHODS=${METHODS:-baseline_watershed_stretched smooth_watershed hybrid unet_cpu}
OUT=runs/as_it_comes.tsv
LOG=${LOG:-/tmp/as_it_comes.log}  # each run's output (the run folder is read from it): one per concurrent invocation
mkdir -p runs
[ -f $OUT ] || printf 'table\texperiment\tdata\tgroups\tmean_ari\timage_std\tminutes\trun\n' > $OUT
row() {  # table data groups experiment [more --set values]
  local table=$1 data=$2 groups=$3 exp=$4 name s sets=()
  shift 4
  for s in "$@"; do sets+=(--set "$s"); done
  name=$(basename "$data")
  grep -qP "^$table\t$exp\t$name\t$groups\t" $OUT && return 0
  local t0=$(date +%s)
  $PY -m comp cv "$exp" --data "$data" --folds "$FOLDS" --set "cv.groups=$groups" "${sets[@]}" > $LOG
  local run=$(grep -oP '^\S+ on \S+ \(\K[^)]+' $LOG | tail -1)
  $PY -c "import json, sys; s = json.load(open(sys.argv[1] + '/cv.json')); print(f\"$table\t$exp\t$name\t$groups\t{s['mean_ari']:.4f}\t{s['std_ari']:.4f}\t$(( ($(date +%s) - t0) / 60 ))\t{sys.argv[1]}\")" "$run" >> $OUT
  tail -1 $OUT
}
# Cheapest answers first: the per-slice proxy, the inferred groups, then the per-slice phantom and random folds.
# The one-window and true-groups rows are the results table's (`make results`, same folds and seeds).
case "$WHAT" in per-slice|all) for exp in $METHODS; do row per-slice data/proxy_ps auto "$exp"; done;; esac
case "$WHAT" in leak|all) for exp in $METHODS; do row leak data/proxy inferred "$exp"; done;; esac
case "$WHAT" in per-slice|all) for exp in $METHODS; do row per-slice data/phantom_ps auto "$exp"; done;; esac
case "$WHAT" in leak|all) for exp in $METHODS; do row leak data/proxy none "$exp"; done;; esac
# Where the hybrid's per-slice loss comes from: the per-slice step on one-window slices (its calibration and
# re-rendering alone, the slices' own precision kept).
case "$WHAT" in diagnose|all) row per-slice-step data/proxy file hybrid contrast.per_slice=true;; esac
# Resolution: the same slices of seed 1 rendered sharp and coarse (voxels 4 px wide), fitted on and scored from the
# embedded phantom (seed 0, native), and the proxy (3 mm voxels stretched ~4x) onto both.
TR=runs/as_it_comes_transfer.tsv
[ -f $TR ] || printf 'experiment\tfitted_on\tscored_on\tmean_ari\timage_std\tslices\tregions\tstructures\tsplit\tmerged\n' > $TR
table_rows() {  # the markdown rows of `comp transfer`'s table in $LOG, tab-separated (more sed -e expressions may follow)
  grep -P '^\| `' $LOG | sed -e 's/^| //' -e 's/ |$//' -e 's/`//g' -e 's/ | /\t/g' "$@"
}
transfer_row() {  # experiment fit-dir score-dir...
  local exp=$1 fit=$2 todo=() d
  shift 2
  for d in "$@"; do grep -qP "^$exp\t$(basename "$fit")\t$(basename "$d")\t" $TR || todo+=("$d"); done
  [ ${#todo[@]} -eq 0 ] && return 0
  $PY -m comp transfer "$exp" --fit "$fit" --score "${todo[@]}" > $LOG
  table_rows | tee -a $TR
}
case "$WHAT" in resolution|all) for exp in $METHODS; do
  transfer_row "$exp" data/phantom data/phantom_s1 data/phantom_s1_coarse data/proxy
  transfer_row "$exp" data/phantom_s1 data/phantom
  transfer_row "$exp" data/phantom_s1_coarse data/phantom
  transfer_row "$exp" data/proxy data/phantom data/phantom_s1_coarse
done; column -t -s $'\t' $TR;; esac
# Extra labelled data: the other stand-in's annotated slices in every training part, never scored.
case "$WHAT" in extra|all) for exp in ${EXTRA_METHODS:-hybrid unet_cpu}; do
  row extra-none data/proxy auto "$exp"
  row extra-phantom_s1 data/proxy auto "$exp" 'cv.extra=["data/phantom_s1"]'
  row extra-none data/phantom auto "$exp"
  row extra-proxy data/phantom auto "$exp" 'cv.extra=["data/proxy"]'
done;; esac
# Which merger features carry to data they were not fitted on: the position features (where a pair sits in the
# body) dropped, against the hybrid as it is.
# The hybrid's own rows: its proxy CV is the results table's, its transfers the resolution rows'.
case "$WHAT" in features|all) for exp in ${FEATURE_METHODS:-hybrid_nopos hybrid_average hybrid_relative hybrid_relative_average hybrid_vote}; do
  row features data/proxy auto "$exp"
  transfer_row "$exp" data/proxy data/phantom
  transfer_row "$exp" data/phantom data/proxy
done;; esac
# Networks that keep touching structures apart off their training scan: unet_cpu's variants (e.g. resolution
# augmentation) against its own rows (its proxy CV is the results table's, its transfers the resolution rows').
case "$WHAT" in networks|all) for exp in ${NETWORK_METHODS:-unet_cpu_res}; do
  row networks data/proxy auto "$exp"
  transfer_row "$exp" data/proxy data/phantom data/phantom_s1_coarse
  transfer_row "$exp" data/phantom data/proxy
done;; esac
# The results suite's ensemble on the same seed's runs: the student's maps (greedy selection kept it alone on all
# four data sets) tuned with superpixels and the hybrid's regions offered, 12 trials; its row is the nested estimate.
run_of() {  # table experiment data-name: the run folder of that row of $OUT
  grep -P "^$1\t$2\t$3\t" $OUT | cut -f8
}
ensemble_row() {  # table data [runs-table [tune flags...]]: the ensemble on the runs of runs-table's rows (default: table's)
  local table=$1 data=$2 from=${3:-$1} name
  shift $(( $# < 3 ? $# : 3 ))
  name=$(basename "$data")
  grep -qP "^$table\tensemble\t$name\t" $OUT && return 0
  local t0=$(date +%s) ens="$table-$name"
  $PY -m comp ensemble "$(run_of "$from" unet_cpu_pseudo "$name")" --data "$data" --name "$ens" --max-steps 1 --force > $LOG
  $PY -m comp tune "$ens" --data "$data" --trials 12 --regions-from "$(run_of "$from" hybrid "$name")" "$@" >> $LOG
  $PY -c "import yaml, sys; e = yaml.safe_load(open(sys.argv[1])); print(f\"$table\tensemble\t$name\tauto\t{e['nested_ari']:.4f}\t{e['oof_std']:.4f}\t$(( ($(date +%s) - t0) / 60 ))\t{sys.argv[1]}\")" "runs/ensembles/$ens.yaml" >> $OUT
  tail -1 $OUT
}
case "$WHAT" in noise|all) for fs in ${FIT_SEEDS:-0 1 2}; do for exp in ${NOISE_METHODS:-unet_cpu hybrid unet_cpu_pseudo}; do
  for data in data/proxy data/proxy_ps; do
    case "$exp" in *_pseudo) row "noise-s$fs" "$data" auto "$exp" "cv.fit_seed=$fs" "pseudo.teacher_set=[\"cv.fit_seed=$fs\"]";;
                   *) row "noise-s$fs" "$data" auto "$exp" "cv.fit_seed=$fs";; esac
  done
done; done
for fs in ${FIT_SEEDS:-0 1 2}; do for data in data/proxy data/proxy_ps; do ensemble_row "noise-s$fs" "$data"; done; done
$PY scripts/noise_table.py $OUT;; esac
# The ensemble's mergers of another kind (MERGER_FLAGS, default average linkage + relative features) on the seed-0 runs
# of `noise`, both renderings of the proxy, and each ensemble fitted on the proxy scored on the phantom.
ensemble_transfer() {  # ensemble fit-dir score-dir
  grep -qP "^ensemble $1\t$(basename "$2")\t$(basename "$3")\t" $TR && return 0
  $PY -m comp transfer --ensemble "$1" --fit "$2" --score "$3" > $LOG
  table_rows | tee -a $TR
}
case "$WHAT" in merger|all) for data in data/proxy data/proxy_ps; do
  ensemble_row merger "$data" noise-s0 ${MERGER_FLAGS:---linkage average --relative-features}
done
ensemble_transfer noise-s0-proxy data/proxy data/phantom
ensemble_transfer merger-proxy data/proxy data/phantom;; esac
# Fitting on the noisy proxy (`comp data proxy --out data/proxy_n15 --noise-hu 15`): the hybrid and its transfer
# variants fitted on the smooth proxy and on the noisy one, scored on the *validation* phantom of seed 1 (never on the
# reported phantom, which only the transfer_noisy suite scores); the fixed methods beside them.
case "$WHAT" in noisy-fit|all) for exp in ${NOISY_METHODS:-baseline_watershed_stretched smooth_watershed hybrid hybrid_relative_average hybrid_carry}; do
  transfer_row "$exp" data/proxy data/phantom_s1
  transfer_row "$exp" data/proxy_n15 data/phantom_s1
done; column -t -s $'\t' $TR;; esac
# The hybrid's merger trained on 8 agglomeration stages (as until 2026-12-07) and on 16 (as many as it merges), its
# choice of (h, threshold) pooled over three held-out sets, and (the default since 2026-12-07) three classifiers of
# three draws averaged: fitted on the proxy with fit seeds 0-2, scored on the *validation* phantom of seed 1 (rows
# "EXP@sSEED"; rows measured before the bag as `hybrid@sN` are hybrid_nobag's: delete them before a rerun).
seeded_transfer() {  # experiment fit-dir score-dir fit-seed
  local tag="$1@s$4"
  grep -qP "^$tag\t$(basename "$2")\t$(basename "$3")\t" $TR && return 0
  $PY -m comp transfer "$1" --fit "$2" --score "$3" --set "cv.fit_seed=$4" > $LOG
  table_rows -e "s/^$1\t/$tag\t/" | tee -a $TR
}
case "$WHAT" in rounds|all) for fs in ${FIT_SEEDS:-0 1 2}; do for exp in ${ROUNDS_METHODS:-hybrid_rounds8 hybrid_nobag hybrid_repeats hybrid}; do
  seeded_transfer "$exp" data/proxy data/phantom_s1 "$fs"
done; done; grep -P '@s\d\t' $TR | column -t -s $'\t';; esac
column -t -s $'\t' $OUT
