#!/usr/bin/env bash
# One device call (~10 minutes on an H200) for issue #22: checks the IF-I-XL rows of benchmarks/results/memory_cpu.md
# on a real GPU (peak allocated memory and seconds per step at 64 px, batch 1, T5-XXL-sized text states), then runs
# the GPU-throughput levers script in the same call. Expects .devdata/ (carried, see study_train.sh) for the wheels.
# Results: $OUT/memory-xl-gpu.md (+ .jsonl), $OUT/mfu-*.json.
source "$(dirname "$0")/setup.sh"
# LoRA and BitFit with frozen weights in bf16, with and without gradient checkpointing: the table says they fit 24 GB
timeout 300 python3 benchmarks/memory.py --device cuda --widths 704 --methods lora bitfit --precisions bf16+frozen \
    --steps 3 --threads 8 --rows $OUT/memory-xl-gpu.jsonl --out $OUT/memory-xl-gpu.md 2>&1 | tail -40
# full fine-tuning in bf16 with checkpointing on one 141 GB GPU: the per-parameter arithmetic says ~86 GB + activations
timeout 200 python3 benchmarks/memory.py --device cuda --widths 704 --methods full --precisions bf16 \
    --checkpointing on --steps 2 --threads 8 --rows $OUT/memory-xl-gpu.jsonl --out $OUT/memory-xl-gpu.md 2>&1 | tail -12
source "$(dirname "$0")/gpu_levers.sh"
