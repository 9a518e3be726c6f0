#!/usr/bin/env bash
# Guidance in an interval on the bundled shapes cascade: alignment (seen and held-out prompts) and
# the eval's wall time for each interval of the base stage (the SR stage runs unguided).
# Usage: bash benchmarks/guidance_interval_sweep.sh [N]   (N images per split, default 100)
set -euo pipefail
N=${1:-100}
OUT=benchmarks/results/guidance_interval
mkdir -p "$OUT"
for spec in all:all edm2:0.28,5.42 no_low:0.5,1e30 no_low1:1.0,1e30 no_high:0,5.42 no_high2:0,2.0; do
  name=${spec%%:*}; iv=${spec#*:}
  if [ "$iv" = all ]; then js='"all"'; else js="[${iv}]"; fi
  pydiff eval shapes --n "$N" --seed 0 --settings "{\"guidance_interval\": {\"base\": $js}}" > "$OUT/$name.json"
  echo "$name done"
done
