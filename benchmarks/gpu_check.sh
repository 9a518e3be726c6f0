#!/usr/bin/env bash
# The GPU check (issue 3), for a fresh GPU machine with PyTorch (CUDA) installed and no network:
#   bash benchmarks/gpu_check.sh RESULTS_DIR [WHEELS_DIR] [SHAPES_BASE_RUN]
# builds pydiff with the CUDA twin, runs tests/gpu (plus the host-side CUDA tests), then
# benchmarks/bench_gpu.py, then compute-sanitizer (memcheck, racecheck, synccheck) over
# benchmarks/gpu_sanitize.py, then the launch-shape experiment (benchmarks/cuda/step_launch.cu) with
# Nsight Compute's stall reasons at the smallest shape, and writes logs and gpu.json to RESULTS_DIR
# (eleven files or more: tar the folder where only a few files come back). WHEELS_DIR: wheels to install
# first without network (diffusers, for the per-step comparison). SHAPES_BASE_RUN: a training run of
# the shapes base stage (final.safetensors + config.json) for the CUDA-graph benchmark.
# Each stage has a time limit, so that a failure still leaves the other stages' results.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_check.sh RESULTS_DIR [WHEELS_DIR] [SHAPES_BASE_RUN]}")
wheels=${2:-}
ckpt=${3:+$(realpath "$3")}
wheels=${wheels:+$(realpath "$wheels")}
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}
stamp() { echo "== $(date +%T) $*" | tee -a "$out/stages.txt"; }

stamp "machine"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$out/stages.txt"

if [ -n "$wheels" ]; then
  stamp "wheels from $wheels"
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/pydiff-wheels "$wheels"/*.whl \
    > "$out/wheels.log" 2>&1 && export PYTHONPATH=/tmp/pydiff-wheels${PYTHONPATH:+:$PYTHONPATH}
fi

stamp "build (PYDIFF_CUDA=1)"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
[ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDACXX=/usr/local/cuda/bin/nvcc
if ! PYDIFF_CUDA=1 timeout 400 $py -m pip install --no-build-isolation --no-deps --no-index . > "$out/build.log" 2>&1; then
  stamp "BUILD FAILED"
  tail -40 "$out/build.log"
  exit 1
fi
cd /tmp  # the installed pydiff, not the source tree
$py -c "import pydiff.cuda as c; print('cuda built', c.built(), 'available', c.available())" 2>&1 \
  | tee -a "$out/stages.txt"

stamp "tests"
timeout 300 $py -m pytest -q -p no:cacheprovider -rs "$repo/tests/gpu" \
  "$repo/tests/test_cuda_graph_plan.py" "$repo/tests/test_cuda_host.py" > "$out/gpu-tests.txt" 2>&1
echo "tests exit $?" | tee -a "$out/stages.txt"
tail -30 "$out/gpu-tests.txt"

stamp "benchmarks"
PYTHONUNBUFFERED=1 timeout 400 $py "$repo/benchmarks/bench_gpu.py" --json "$out/gpu.json" \
  ${ckpt:+--checkpoint "$ckpt"} > "$out/bench.txt" 2>&1
echo "bench exit $?" | tee -a "$out/stages.txt"
cat "$out/bench.txt" | tail -40
stamp "compute-sanitizer"
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck synccheck; do
  timeout 100 "$san" --tool $tool --error-exitcode 3 $py "$repo/benchmarks/gpu_sanitize.py" \
    > "$out/sanitize-$tool.txt" 2>&1
  echo "$tool exit $?" | tee -a "$out/stages.txt"
  tail -4 "$out/sanitize-$tool.txt"
done
stamp "launch-shape experiment (benchmarks/cuda/step_launch.cu) and ncu at 4x3x64x64"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if timeout 120 ${CUDACXX:-nvcc} -std=c++17 --fmad=false -O3 -arch=sm_90 -I"$repo/csrc" -I"$repo/csrc/include" \
     "$repo/benchmarks/cuda/step_launch.cu" -o /tmp/step_launch; then
  timeout 60 /tmp/step_launch > "$out/step_launch.txt" 2>&1
  cat "$out/step_launch.txt"
  for k in "fused_step_kernel<" "lean_step_kernel<" "memory_only_kernel"; do
    timeout 60 "$ncu" --kernel-name-base demangled --kernel-name "regex:$k" --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section LaunchStats --section Occupancy /tmp/step_launch 4x3x64x64 \
      >> "$out/ncu-small.txt" 2>&1
    echo "ncu $k exit $?" | tee -a "$out/stages.txt"
  done
fi
stamp "done"
