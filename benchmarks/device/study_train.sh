#!/usr/bin/env bash
# Device call 1 of the transfer study (docs/results.md): GPU throughput / MFU, then every training run of the study
# with its evaluation samples. Expects .devdata/ (carried): the diffusers wheel (+ importlib_metadata), pneumoniamnist.npz
# and the MiniLM caption embeddings (cache/text), so the machine needs neither the registry nor the MiniLM weights.
# The tree plus .devdata plus the fp16 Inception (43.7 MB) exceed the 64 MiB a call carries, so KID is measured by
# study_measure.sh in a second call on the same machine: issue it within the 30 s the machine stays warm. The archive
# of call 1 leaves out the trained cascades (26 MB each), so the samples come back (~4 MB) even if call 2 misses.
source "$(dirname "$0")/setup.sh"
python3 -c "import torch, diffusers, peft, accelerate, transformers, torchmetrics; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
timeout 120 python3 benchmarks/gpu_mfu.py --batch 512 --steps 60 --out $OUT/mfu.json 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -20
STUDY="--steps 600 --batch-size 128 --eval-every 100 --n-eval 256 --out runs/study-gpu"
timeout ${STUDY_TIMEOUT:-400} python3 -m imagen_transfer study transfer $STUDY --jobs ${JOBS:-6} --skip-measure 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -15
ls runs/study-gpu; nvidia-smi --query-gpu=memory.used --format=csv,noheader
tar czf $OUT/study-train.tgz --exclude=checkpoints --exclude=tensorboard --exclude=cascade --exclude='*.tmp*' -C runs study-gpu
ls -la $OUT
