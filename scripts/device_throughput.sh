#!/usr/bin/env bash
# The GPU timings of the kernel-count work in one command (written and smoke-tested on a CPU;
# not yet run on a GPU). Training throughput of float vs U3 ResNet-20 with its budgets
# (scripts/bench_train.py, batch 128, one lax.scan of 390 steps per call):
#   1. the default update against optim.flat_update (mpdnn.optim.flat, vector sizes);
#   2. XLA's command buffers (CUDA graphs) off, and extended to loops and conditionals (the
#      scanned step is one while loop), against the default of part 1;
#   3. N processes side by side (scripts/bench_jobs.py), the rule for reproduce_cifar10 --jobs.
# Results land in $OUT as JSON with provenance.
#
#   bash scripts/device_throughput.sh            # about 8 minutes on one H100/H200
#   SMOKE=1 bash scripts/device_throughput.sh    # a 6-step check of the whole script (CPU too)
#
# Like scripts/device_cifar10.sh it installs the wheels carried in .whl/ when the machine's
# Python lacks ml_collections (see results/perf.md for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
if [ "${SMOKE:-0}" = 1 ]; then
  bench=(--steps 6 --steps_per_call 2 --warmup 1)
  jobs=1,2
else
  bench=(--steps 1170 --steps_per_call 390 --warmup 1)
  jobs=1,2,4
fi
start=$(date +%s)

echo "== 1. update: leafwise (default) vs optim.flat_update =="
timeout 240 python3 scripts/bench_train.py "${bench[@]}" --json "$OUT/bench_leafwise.json" \
  2>&1 | grep -v "met every budget" | tail -n 6
timeout 240 python3 scripts/bench_train.py "${bench[@]}" --flat_update \
  --json "$OUT/bench_flat.json" 2>&1 | grep -v "met every budget" | tail -n 6

echo "== 2. XLA command buffers: off, and with WHILE and CONDITIONAL =="
all=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
for variant in off loops; do
  if [ "$variant" = off ]; then flags="--xla_gpu_enable_command_buffer="; else
    flags="--xla_gpu_enable_command_buffer=$all"; fi
  echo "-- $variant: $flags"
  XLA_FLAGS="${XLA_FLAGS:-} $flags" timeout 200 python3 scripts/bench_train.py "${bench[@]}" \
    --cases float,u3_wa --json "$OUT/bench_cmdbuf_$variant.json" 2>&1 \
    | grep -v "met every budget" | tail -n 4
done

echo "== 3. processes side by side: --jobs $jobs =="
timeout 300 python3 scripts/bench_jobs.py "${bench[@]}" --jobs "$jobs" \
  --json "$OUT/bench_jobs.json" 2>&1 | tail -n 6
echo "done in $(( $(date +%s) - start )) s"
