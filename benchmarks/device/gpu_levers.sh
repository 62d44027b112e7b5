#!/usr/bin/env bash
# One device call (~8 minutes on an H100) for issue #9's GPU half: training images/s and MFU of our loop's GPU levers
# (eager bf16, torch.compile, torch.compile reduce-overhead = CUDA graphs) against the plain diffusers loop, for the
# shipped 16 px base stage at batch 512 and for a fresh GPU-sized 64 px stage (`base64` preset) at batch 128.
# Expects .devdata/ (carried, see study_train.sh): the diffusers wheel (+ importlib_metadata), pneumoniamnist.npz and
# the MiniLM caption embeddings (cache/text). Results: $OUT/mfu-small.json, $OUT/mfu-base64.json.
source "$(dirname "$0")/setup.sh"
timeout 300 python3 benchmarks/gpu_mfu.py --batch 512 --steps 90 --variants eager compile cuda_graphs \
    --out $OUT/mfu-small.json 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -30
timeout 240 python3 benchmarks/gpu_mfu.py --preset base64 --batch 128 --steps 30 --variants eager cuda_graphs \
    --out $OUT/mfu-base64.json 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -30
ls -la $OUT
