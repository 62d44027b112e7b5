#!/usr/bin/env bash
# Issue #37: the fine-tuned backbone rows beside the scratch U-Net on a dense data set, the full protocol
# (lr on validation with all labels, then 5 / 10 / 20 / all labelled images x 3 seeds, flip test).
# usage: benchmarks/backbone_dense.sh OUT DATA TASK HEAD [probe options...]
#   e.g. benchmarks/backbone_dense.sh runs/m37/wbc wbc-seg segmentation conv --backbone-crop 48 48
# The probe journals every finished fit (OUT/probe/fits.jsonl): run the same line again with --resume after an
# interruption and only the missing fits run.
set -euo pipefail
out=${1:?usage: backbone_dense.sh OUT DATA TASK HEAD [probe options]}; data=$2; task=$3; head=$4; shift 4
[ -f "$out/features/manifest.json" ] || \
  imagen-transfer features --model source=cifar10 --data "$data" --baselines none --out "$out/features"
head_args=(); [ "$task" = segmentation ] && head_args=(--head "$head")
imagen-transfer probe --features "$out/features" --task "$task" "${head_args[@]}" --scratch --flip-test \
    --backbone cifar10 --sets scratch backbone backbone-scratch --seeds 3 --out "$out/probe" "$@"
