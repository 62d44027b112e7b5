#!/usr/bin/env bash
# Issue #19's GPU path: train the source cascade's two stages from scratch on one GPU, side by side, in bf16 at large
# batch, within about 8 minutes, and bring the weights back (fp16) for the CPU to evaluate like any other model:
#   base  1,000,000 images (1,954 steps x 512), epsilon prediction;
#   SR      400,000 images (1,563 steps x 256), v prediction (the target the CPU run found the SR stage needs).
# Each process is cut at STAGE_TIMEOUT seconds; a cut run ships its last checkpoint's EMA weights (checkpoints every
# 250 steps; its card then counts the steps logged, up to one checkpoint interval more than the shipped weights
# saw). Expects .devdata/ from prepare_devdata.sh (carried). Back in $OUT: source-base.tgz.a?, source-sr.tgz.a?
# (run folders without checkpoints or tensorboard, cascade in fp16, in 15 MB parts) and log.txt. Then, here:
#   cat source-base.tgz.a? | tar xz -C runs && cat source-sr.tgz.a? | tar xz -C runs
#   python scripts/ship_source.py --base runs/gpu-base --sr runs/gpu-sr --label "gpu ..." --out /tmp/cifar10-gpu
# DRY=1 runs the same script on a CPU in seconds (2 steps, batch 8) to check it end to end.
set -u
source "$(dirname "$0")/setup.sh"
export IMAGEN_TRANSFER_DATA=/tmp/itdata  # the zip is unpacked outside the tree, which a later call would carry
mkdir -p $IMAGEN_TRANSFER_DATA
[ -f /tmp/itdata/cifar10-jpg.zip ] || python3 benchmarks/device/jpeg_pack.py unpack .devdata/cifar10-jpg.pack /tmp/itdata/cifar10-jpg.zip
RUNS=runs
if [ "${DRY:-0}" = 1 ]; then
  BASE="train.steps=2 train.batch_size=8"; SR="train.steps=2 train.batch_size=8"; EVERY=1; STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}
  RUNS=$(mktemp -d /tmp/itruns.XXXX)
else
  BASE="train.steps=1954 train.batch_size=512"; SR="train.steps=1563 train.batch_size=256"; EVERY=250
fi
COMMON="train.lr=5e-4 train.warmup_steps=200 train.mixed_precision=auto train.threads=null train.val_every=$EVERY
        train.checkpoint_every=$EVERY train.sample_every=0 train.log_every=$EVERY"
stage() {  # stage NAME "overrides": one pretrain process for one stage, cut at STAGE_TIMEOUT
  timeout ${STAGE_TIMEOUT:-450} python3 -m imagen_transfer pretrain --config configs/cifar10-small.yaml \
      --set "train.stages=[$1]" $2 $COMMON --out $RUNS/gpu-$1 2>&1 | tr '\r' '\n' | grep -v "it/s\]" > $RUNS/log-$1.txt
}
mkdir -p $RUNS
stage base "$BASE" & stage sr "$SR loss.prediction_type=v_prediction" & wait
tail -n 5 $RUNS/log-base.txt $RUNS/log-sr.txt > $OUT/log.txt
for name in base sr; do  # each stage's cascade in fp16: the run's own, or (a run cut by the timeout) its last checkpoint's
  run=$RUNS/gpu-$name
  if [ -f $run/cascade/cascade.json ]; then
    python3 -c "import sys, torch; from imagen_transfer.cascade import load_cascade, save_cascade
save_cascade(load_cascade(sys.argv[1]), sys.argv[1], dtype=torch.float16, overwrite=True)" $run/cascade
  elif ls -d $run/checkpoints/$name/step-* >/dev/null 2>&1; then
    echo "$name: cut by the timeout, shipping its last checkpoint" >> $OUT/log.txt
    python3 scripts/checkpoint_cascade.py $run --stage $name --out $run/cascade --fp16 >> $OUT/log.txt 2>&1
  else
    echo "$name: no checkpoint (cut before its first); nothing to ship" >> $OUT/log.txt
  fi
done
for name in base sr; do  # in 15 MB parts: a file coming back holds at most 16 MiB
  tar czf - --exclude=checkpoints --exclude=tensorboard --exclude='*.tmp*' -C $RUNS gpu-$name | split -b 15M - $OUT/source-$name.tgz.
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null
cat $OUT/log.txt; ls -la $OUT
