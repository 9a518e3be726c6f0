#!/usr/bin/env bash
# The ONNX Runtime CUDA part of the GPU check (issue 3), for a GPU machine whose onnxruntime is the
# CPU build: installs onnxruntime-gpu from a tarball of its unpacked wheel, builds pydiff with the
# CUDA twin, runs all of tests/gpu (the ORT CUDA IO binding, graph capture and image-parity tests
# among them) and the CUDA-graph benchmark, and writes the logs and ort-graph.json to RESULTS_DIR:
#   bash benchmarks/gpu_ort_check.sh RESULTS_DIR ORT_TARBALL [WHEELS_DIR] [SHAPES_BASE_RUN]
# ORT_TARBALL: `tar cJf ort.tar.xz -C <unzipped onnxruntime_gpu wheel> .` (1.31.1 for CUDA 13: 204 MB;
# `bash benchmarks/gpu_prepare.sh RUN --ort` writes it as 25 MB parts in .gpu/ort, to send one per call
# where a call carries less, and `cat` together there). The CUDA provider's libraries (cuBLAS, cuDNN,
# cuFFT, cuRAND) come from the machine's nvidia-* wheels.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_ort_check.sh RESULTS_DIR ORT_TARBALL [WHEELS_DIR] [SHAPES_BASE_RUN]}")
tarball=$(realpath "${2:?the onnxruntime-gpu tarball}")
wheels=${3:+$(realpath "$3")}
ckpt=${4:+$(realpath "$4")}
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
site=/tmp/pydiff-ort-gpu
rm -rf "$site" && mkdir -p "$site" && tar xJf "$tarball" -C "$site" || { echo "cannot unpack $tarball"; exit 1; }
if [ -n "$wheels" ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/pydiff-wheels "$wheels"/*.whl
  site=$site:/tmp/pydiff-wheels
fi
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
nvlibs=$($py -c "
import os, nvidia
dirs = {r for p in nvidia.__path__ for r, _, fs in os.walk(p) if any(f.startswith('lib') and '.so' in f for f in fs)}
print(':'.join(sorted(dirs)))")
export LD_LIBRARY_PATH=$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
$py -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  2>&1 | tee "$out/ort-stages.txt"

export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
[ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDACXX=/usr/local/cuda/bin/nvcc
cd "$repo"
if ! PYDIFF_CUDA=1 timeout 400 $py -m pip install --no-build-isolation --no-deps --no-index . > "$out/ort-build.log" 2>&1; then
  echo "BUILD FAILED"; tail -40 "$out/ort-build.log"; exit 1
fi
cd /tmp  # the installed pydiff, not the source tree
timeout 300 $py -m pytest -q -p no:cacheprovider -rs "$repo/tests/gpu" > "$out/ort-tests.txt" 2>&1
echo "tests exit $?" | tee -a "$out/ort-stages.txt"
tail -12 "$out/ort-tests.txt"
fp16=$repo/.gpu/base16.onnx   # the float16 rewrite of the bundled base (gpu_prepare.sh --ort)
[ -f "$fp16" ] || fp16=
PYTHONUNBUFFERED=1 timeout 300 $py "$repo/benchmarks/bench_gpu.py" --only graph ${ckpt:+--checkpoint "$ckpt"} \
  ${fp16:+--fp16-onnx "$fp16"} \
  --json "$out/ort-graph.json" > "$out/ort-bench.txt" 2>&1
echo "bench exit $?" | tee -a "$out/ort-stages.txt"
grep -v "plugin EP\|Memcpy nodes" "$out/ort-bench.txt" | tail -8
