#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh carries to a GPU machine without network (into .gpu/, which
# should be git-ignored, e.g. `echo /.gpu/ >> .git/info/exclude`):
#   bash benchmarks/gpu_prepare.sh [SHAPES_BASE_RUN]      (default runs/shapes_base)
# .gpu/wheels: diffusers and importlib_metadata for Python 3.12 (the per-step comparison);
# .gpu/shapes_base: the run's EMA weights alone, in float16 (13 MB instead of 54: the package ships
# them rounded to float16 anyway), loadable by pydiff.training.trainer.load_run_model.
set -euo pipefail
run=${1:-runs/shapes_base}
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
