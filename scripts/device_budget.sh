#!/usr/bin/env bash
# The budget study's GPU rows in one call (about 13 minutes of an H200): Table 3's uniform
# rows at full length (160 epochs, docs/method.md §8) with BatchNorm recalibrated before every
# evaluation (train.bn_recalibration=20):
#
#   float                          the float ResNet-20 every row starts from (first)
#   t3_fixed_w2_uniform            fixed 2-bit weights
#   t3_ours_w_uniform_mpdnn        ours, weight budget, mpdnn's recipe
#   t3_ours_w_amax_uniform_mpdnn   ours, weight + act-max budget, mpdnn's recipe
#   t3_ours_w_uniform @ lr 0.01    ours, weight budget, the paper's recipe at lr 0.01 (the
#                                  authors' *_RLR runs)
#
# The four quantized rows run side by side on the one GPU (a ResNet-20 step is launch-bound:
# results/perf.md), each process with a fifth of its memory. Everything comes back in $OUT:
# the row JSONs, the runs without checkpoints, and the float net's final parameters
# (float_final.tgz, ~1 MB: commit it as results/cifar10/float_final/ so quantized rows can
# start from a real float ResNet-20 on any machine). Written for a lent GPU machine whose
# Python lacks ml_collections and tensorboardX (carried as wheels in .whl/) and which reads
# CIFAR-10 from data/cifar10-jpeg.tar.gz (both git-ignored; results/perf.md has the steps).
#
#   bash scripts/device_budget.sh [SECONDS]      # default 720: rows stop (checkpointed) then
#   SMOKE=1 bash scripts/device_budget.sh 300    # the same calls, 2 steps a row (any CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
limit_s=${1:-720}
start=$(date +%s)
source scripts/device_env.sh
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.18}

runs=runs/cifar10
protocol=()
if [ "${SMOKE:-0}" = 1 ]; then
  runs=runs/cifar10_smoke
  protocol=(--smoke)
fi
common=(--set train.bn_recalibration=20 --set train.progress=false "${protocol[@]}")
left() { echo $(( limit_s - ($(date +%s) - start) )); }

echo "== float (until $(left) s) =="
timeout -s TERM -k 60 "$(left)" python3 scripts/reproduce_cifar10.py --rows float \
  --runs_dir "$runs" --results_dir "$OUT/results" "${common[@]}"
echo "float exit status $?"

echo "== four quantized rows side by side (until $(left) s) =="
mkdir -p "${runs}_lr001"
[ -e "${runs}_lr001/float" ] || ln -s "$PWD/$runs/float" "${runs}_lr001/float"
deadline=$(( $(left) - 60 ))
timeout -s TERM -k 60 "$(left)" python3 scripts/reproduce_cifar10.py \
  --rows t3_fixed_w2_uniform,t3_ours_w_uniform_mpdnn,t3_ours_w_amax_uniform_mpdnn --jobs 3 \
  --runs_dir "$runs" --results_dir "$OUT/results" --deadline_s "$deadline" "${common[@]}" &
mpdnn_pid=$!
timeout -s TERM -k 60 "$(left)" python3 scripts/reproduce_cifar10.py --rows t3_ours_w_uniform \
  --runs_dir "${runs}_lr001" --results_dir "$OUT/results_lr001" --deadline_s "$deadline" \
  --set optim.learning_rate=0.01 "${common[@]}"
echo "paper row (lr 0.01) exit status $?"
wait "$mpdnn_pid"
echo "mpdnn rows exit status $?"

# $OUT returns at most 8 files: archives of the results, the runs (no checkpoints) and the
# float net's final parameters.
tar czf "$OUT/float_final.tgz" -C "$runs/float" final 2>/dev/null
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=best --exclude=final \
  "$runs" "${runs}_lr001" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$OUT" results results_lr001 2>/dev/null \
  && rm -rf "$OUT/results" "$OUT/results_lr001"
echo "done in $(( $(date +%s) - start )) s"
