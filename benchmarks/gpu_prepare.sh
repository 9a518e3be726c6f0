#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh carries to a GPU machine without network (into .gpu/, which
# should be git-ignored, e.g. `echo /.gpu/ >> .git/info/exclude`):
#   bash benchmarks/gpu_prepare.sh [SHAPES_BASE_RUN] [--ort]      (default run: runs/shapes_base)
# .gpu/wheels: diffusers and importlib_metadata for Python 3.12 (the per-step comparison);
# .gpu/shapes_base: the run's EMA weights alone, in float16 (13 MB instead of 54: the package ships
# them rounded to float16 anyway), loadable by pydiff.tools.training.trainer.load_run_model.
# --ort: also onnxruntime-gpu ($ORT_GPU_VERSION, default 1.31.1: the CUDA 13 build checked on an H200) for
# benchmarks/gpu_ort_check.sh, as .gpu/ort/part.NN pieces of 25 MB of one tar.xz of the unpacked wheel
# (without its TensorRT provider library) and .gpu/ort/sha256: a machine that takes at most 64 MiB per
# call gets one piece per call (`cp .gpu/ort/part.NN /tmp/ortparts/`, carrying that piece), then
# `cat /tmp/ortparts/part.* > /tmp/ort.tar.xz` before gpu_ort_check.sh; and .gpu/base16.onnx, the
# float16 rewrite of the bundled base network (7 MB; carry it with the last part).
set -euo pipefail
run=runs/shapes_base
ort=0
for a in "$@"; do
  if [ "$a" = "--ort" ]; then ort=1; else run=$a; fi
done
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels .gpu/shapes_base
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpu/wheels "diffusers==$(python -c 'import diffusers; print(diffusers.__version__)')" \
  importlib_metadata
python - "$run" <<'PY'
import shutil, sys
from safetensors import safe_open
from safetensors.torch import save_file
run = sys.argv[1]
with safe_open(f"{run}/final.safetensors", "pt") as f:
    meta = f.metadata()
    ema = {k: f.get_tensor(k).half() for k in f.keys() if k.startswith("ema.")}
save_file(ema, ".gpu/shapes_base/final.safetensors", metadata=meta)
shutil.copy(f"{run}/config.json", ".gpu/shapes_base/config.json")
print(f"wrote .gpu/shapes_base ({len(ema)} tensors)")
PY
if [ "$ort" = 1 ]; then
  tmp=$(mktemp -d)
  version=${ORT_GPU_VERSION:-1.31.1}
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$tmp" "onnxruntime-gpu==$version"
  mkdir "$tmp/x" && (cd "$tmp/x" && python -m zipfile -e "$tmp"/onnxruntime_gpu-*.whl . \
    && rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so)
  rm -rf .gpu/ort && mkdir -p .gpu/ort
  tar cf - -C "$tmp/x" . | xz -T0 -6 > "$tmp/ort.tar.xz"
  (cd .gpu/ort && split -b 25000000 -d -a 2 "$tmp/ort.tar.xz" part. && sha256sum "$tmp/ort.tar.xz" | cut -c1-64 > sha256)
  rm -rf "$tmp"
  echo "wrote .gpu/ort: onnxruntime-gpu $version in $(ls .gpu/ort/part.* | wc -l) parts"
  # the float16 rewrite of the bundled base network, for the ORT CUDA fp16 rows of the graph benchmark
  pydiff export float16 pydiff/bundled/shapes/base.onnx .gpu/base16.onnx
fi
