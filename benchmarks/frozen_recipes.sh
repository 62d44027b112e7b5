#!/usr/bin/env bash
# Issue #37: the frozen-feature recipes side by side on one CIFAR-10 subset (DDAE's in-domain protocol, smaller):
# the base stage (16 px) and the SR stage (32 px), one noise draw against four, the base's maps kept whole
# (`--spatial`: flattened, not averaged over the grid), each probed with and without the three best views
# concatenated. Same images, same seeds, same heads; wall time and disk of each extraction logged.
# usage: benchmarks/frozen_recipes.sh OUT [LIMIT]   (LIMIT images per split, default 5000; one thread)
set -euo pipefail
out=${1:?usage: frozen_recipes.sh OUT [LIMIT]}; limit=${2:-5000}
mkdir -p "$out"
run() {  # name, then features arguments
  local name=$1; shift
  local start=$(date +%s)
  imagen-transfer features --model source=cifar10 --data cifar10 --splits train test --limit "$limit" \
      --baselines none --out "$out/$name" "$@"
  local mid=$(date +%s)
  imagen-transfer probe --features "$out/$name" --concat 3 > /dev/null
  echo "{\"name\": \"$name\", \"args\": \"$*\", \"features_s\": $((mid - start)), \"probe_s\": $(( $(date +%s) - mid )), \"bytes\": $(du -sb "$out/$name"/*.safetensors | awk '{s+=$1} END {print s}')}" >> "$out/timings.jsonl"
}
run base-k1 --stage base
run sr-k1 --stage sr
run base-k4 --stage base --noise-draws 4
run base-spatial --stage base --spatial --blocks down1 down2 mid up0 --timesteps 10 100  # 1.1 GB for 10,000 images
