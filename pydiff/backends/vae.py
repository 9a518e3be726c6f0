"""A latent package's autoencoder at run time (ONNX Runtime, no torch): latents to images and back.

The scaling is diffusers' (`AutoencoderKL.config.scaling_factor`, `shift_factor`): the diffusion
stage samples ``z = (E(image) - shift_factor) * scaling_factor``, and images are
``D(z / scaling_factor + shift_factor)``, float32 NCHW in [-1, 1] (Rombach et al. 2022, Sec. 4.3.2).
"""

from __future__ import annotations

import numpy as np

from pydiff.backends.ort import create_session
from pydiff.errors import ModelOutputError, NetworkRunError, PackageError
from pydiff.package import Package, VaeSpec

__all__ = ["Autoencoder", "load_vae"]


def _check_io(session, path, inp: str, out: str) -> None:
    ins = [i.name for i in session.get_inputs()]
    outs = [o.name for o in session.get_outputs()]
    if ins != [inp] or out not in outs:
        raise PackageError(
            f"{path}: a VAE network takes [{inp!r}] and outputs {out!r}; this one {ins} -> {outs}"
        )


def _run(session, path, out: str, feeds: dict) -> np.ndarray:
    """One run, ONNX Runtime's own failures named as the network's."""
    try:
        (y,) = session.run([out], feeds)
    except Exception as e:  # ONNX Runtime's own exception types
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise NetworkRunError(f"the VAE ({path.name}): ONNX Runtime failed: {first}") from e
    return np.asarray(y, np.float32)


class Autoencoder:
    """The decoder (and optional encoder) of a package's `vae` entry; thread-safe (ORT sessions are)."""

    def __init__(self, spec: VaeSpec, providers=None, session_options=None, required=()):
        self.spec = spec
        providers = providers or ["CPUExecutionProvider"]
        self.decoder = create_session(spec.decoder, providers, session_options, required=required)
        _check_io(self.decoder, spec.decoder, "latent", "image")
        self.encoder = None
        if spec.encoder is not None:
            self.encoder = create_session(spec.encoder, providers, session_options, required=required)
            _check_io(self.encoder, spec.encoder, "image", "latent")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents float32 [B, C, h, w] (as the stage samples them) -> images float32 [B, 3, H, W]
        in the decoder's range (about [-1, 1]; not clipped here)."""
        s = self.spec
        z = (
            np.asarray(latents, np.float32) / np.float32(s.scaling_factor) + np.float32(s.shift_factor)
        ).astype(np.float32)
        img = _run(self.decoder, s.decoder, "image", {"latent": np.ascontiguousarray(z)})
        if img.ndim != 4 or img.shape[:2] != (z.shape[0], 3):
            raise ModelOutputError(
                f"the VAE decoder ({s.decoder.name}): returned shape {img.shape} for latents {z.shape}; "
                f"expected [{z.shape[0]}, 3, H, W]"
            )
        if not np.all(np.isfinite(img)):
            raise ModelOutputError(f"the VAE decoder ({s.decoder.name}): NaN or Inf in its output")
        return img

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images float32 [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] as the stage samples them
        (the posterior's mean: deterministic; diffusers' img2img draws from the posterior)."""
        s = self.spec
        if self.encoder is None:
            raise ValueError("this package's VAE has no encoder (manifest vae.encoder): it makes images only")
        z = _run(self.encoder, s.encoder, "latent", {"image": np.ascontiguousarray(images, np.float32)})
        z = ((z - np.float32(s.shift_factor)) * np.float32(s.scaling_factor)).astype(np.float32)
        if not np.all(np.isfinite(z)):
            raise ModelOutputError(f"the VAE encoder ({s.encoder.name}): NaN or Inf in its output")
        return z


def load_vae(package: Package, providers=None, session_options=None, required=()) -> Autoencoder | None:
    """The package's autoencoder, or None for a pixel-space package."""
    if package.vae is None:
        return None
    return Autoencoder(package.vae, providers, session_options, required)
