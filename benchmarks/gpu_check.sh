#!/usr/bin/env bash
# One GPU check, for a fresh GPU machine with PyTorch installed and no network:
#   bash benchmarks/gpu_check.sh RESULTS_DIR [WHEELS_DIR]
# builds pydiff with the CUDA twin (wheels for the build come from WHEELS_DIR when given), runs
# tests/gpu, and writes the results there. Never run yet: the project has had no GPU so far.
set -euo pipefail
out=${1:?usage: gpu_check.sh RESULTS_DIR [WHEELS_DIR]}
wheels=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
find_links=()
[ -n "$wheels" ] && find_links=(--no-index --find-links "$wheels")
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
PYDIFF_CUDA=1 pip install --no-build-isolation "${find_links[@]}" . > "$out/build.log" 2>&1
python -c "import pydiff.cuda as c; print('cuda built', c.built(), 'available', c.available())" | tee "$out/info.txt"
(cd /tmp && pytest -q "$OLDPWD/tests/gpu" --junitxml="$out/gpu-tests.xml") 2>&1 | tee "$out/gpu-tests.txt"
