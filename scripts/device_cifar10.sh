#!/usr/bin/env bash
# The CIFAR-10 GPU session in one command: the trainer's throughput (float against U3 with its
# budgets) and then full 160-epoch rows of the CIFAR-10 tables, float first, until a time
# limit; everything it produced is packed into $OUT. Written for a lent GPU machine whose
# Python lacks ml_collections and tensorboardX (carried as wheels in .whl/) and which reads
# the CIFAR-10 archive from data/ (both git-ignored; see results/perf.md for the copy steps).
#
#   bash scripts/device_cifar10.sh ROWS_SECONDS [ROW,ROW,...]
#
# ROWS_SECONDS bounds the rows' part: the runner starts no row after it and then stops the
# running one, which checkpoints (a second call of this script resumes it). Set
# BENCH=0 to skip the throughput benchmark (e.g. when resuming), SMOKE=1 for a 2-step check
# of the whole script (on a CPU too).
set -uo pipefail
cd "$(dirname "$0")/.."
rows_s=${1:?usage: device_cifar10.sh ROWS_SECONDS [ROWS]}
rows=${2:-float,t3_ours_w_amax_uniform,t3_ours_w_uniform,t3_fixed_w2_uniform,t3_tqt_w2_uniform,t3_fixed_w2a4_uniform,t3_tqt_w2a4_uniform,t3_ours_w_asum_uniform}
start=$(date +%s)
source scripts/device_env.sh

if [ "${SMOKE:-0}" = 1 ]; then
  bench=(--steps 6 --steps_per_call 2 --warmup 1)
  protocol=(--smoke --runs_dir runs/cifar10_smoke)
else
  bench=(--steps 1170 --steps_per_call 390 --warmup 1)
  protocol=()
fi

if [ "${BENCH:-1}" = 1 ]; then
  echo "== throughput: float vs U3 with budgets, batch 128 =="
  timeout 120 python3 scripts/bench_train.py "${bench[@]}" --json "$OUT/bench_train.json" \
    2>&1 | grep -v "met every budget" | tail -n 8
fi

echo "== rows: $rows (until $rows_s s) =="
timeout -s TERM -k 60 "$rows_s" python3 scripts/reproduce_cifar10.py --rows "$rows" \
  --deadline_s "$((rows_s - 60))" --results_dir "$OUT/results" "${protocol[@]}"
echo "rows exit status $?"

# $OUT returns at most 8 files: one archive of the run folders (no checkpoints) and results.
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=best --exclude=final \
  runs/cifar10* 2>/dev/null
tar czf "$OUT/results.tgz" -C "$OUT" results 2>/dev/null && rm -rf "$OUT/results"
echo "done in $(( $(date +%s) - start )) s"
