"""Diffusion models for discriminative work (issue 26), on ONNX Runtime without torch.

- `features`: a stage network's decoder activations on noised images, per pixel (Baranchuk et al.
  2022, "Label-Efficient Semantic Segmentation with Diffusion Models"), streamed chunk by chunk;
- `PixelEnsemble`: the per-pixel MLP ensemble trained on those features (inference only);
- `purify`: DiffPure (Nie et al. 2022): diffuse an input to t* and denoise it.
The training, baselines, attacks and evaluations are in `pydiff.tools.discriminative`.
"""

from __future__ import annotations

from pydiff.discriminative.features import (
    FeatureExtractor,
    decoder_block_outputs,
    default_feature_graph,
    features,
    upsample_bilinear,
)
from pydiff.discriminative.purify import Purifier, purify
from pydiff.discriminative.segment import PixelEnsemble

__all__ = [
    "FeatureExtractor",
    "PixelEnsemble",
    "Purifier",
    "decoder_block_outputs",
    "default_feature_graph",
    "features",
    "purify",
    "upsample_bilinear",
]
