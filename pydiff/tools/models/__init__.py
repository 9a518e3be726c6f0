"""PyTorch networks (only needed to train and export; the runtime never imports this)."""

from pydiff.tools.models.unet import PRESETS, UNet, UNetConfig, build_model

__all__ = ["UNet", "UNetConfig", "PRESETS", "build_model"]
