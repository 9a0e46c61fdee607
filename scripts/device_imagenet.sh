#!/usr/bin/env bash
# The GPU checks of MobileNetV2 and ResNet-18 in one command (not yet run: the lease of the
# session that wrote it was spent on the CIFAR-10 throughput and rows). Training throughput of
# float vs quantized MobileNetV2 and ResNet-18 on synthetic 224x224 ImageNet-shaped data
# (batch 256, bfloat16 conv operands, the budgets of mpdnn.configs.imagenet), then the
# torchvision conversion check (torch and torchvision are installed on the lent machines).
# Results land in $OUT.
#
#   bash scripts/device_imagenet.sh            # about 6 minutes on one H100/H200
#
# Like scripts/device_cifar10.sh it installs the wheels carried in .whl/ when the machine's
# Python lacks ml_collections (see results/perf.md for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
for model in mobilenet_v2 resnet18; do
  echo "== $model: float vs U3 with budgets, batch 256, bfloat16 operands =="
  timeout 240 python3 scripts/bench_train.py --model "$model" --batch 256 --steps 60 \
    --steps_per_call 20 --warmup 1 --compute_dtype bfloat16 \
    --json "$OUT/bench_train_$model.json" 2>&1 | grep -v "met every budget" | tail -n 6
done
echo "== torchvision conversion =="
timeout 120 python3 scripts/check_torchvision_conversion.py --out "$OUT/convert_torchvision" \
  2>&1 | tail -n 8
