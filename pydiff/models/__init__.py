"""PyTorch networks (only needed to train and export; the runtime never imports this)."""
from .unet import UNet, UNetConfig, PRESETS, build_model

__all__ = ["UNet", "UNetConfig", "PRESETS", "build_model"]
