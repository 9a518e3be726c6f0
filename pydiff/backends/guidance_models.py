"""Guidance models run by ONNX Runtime (no torch): each gives a ``guidance_fn`` for pydiff.sample.

A guidance model's ONNX network outputs the input gradient guidance needs (docs/model-package.md,
``guidance_models``):

- ``kind: "classifier"``: (sample [B, C, H, W], timestep [B], class_labels int64 [B]) ->
  grad [B, C, H, W] = grad_x log p(y | x_t, t), and optionally log_prob [B]. Classifier guidance
  (Dhariwal & Nichol 2021): the guidance_fn returns ``s * grad``; pydiff.sample shifts the DDPM mean
  by Sigma * s * grad and uses eps - sqrt(1 - abar) * s * grad for DDIM / DPM-Solver++.

    gm = ClassifierGuidance("pydiff/bundled/digits/classifier.onnx")
    x0 = pydiff.sample(model, x_T, schedule=..., guidance_fn=gm.guidance_fn(labels, scale=4.0))

- ``kind: "clip"``: (sample, timestep, encoder_hidden_states [B, L, D], encoder_attention_mask
  [B, L]) -> grad = grad_x f(x_t, t) . g(c) (and optionally similarity [B]). CLIP guidance (GLIDE,
  Nichol et al. 2022, Sec. 3.2): the guidance_fn returns ``s * grad``, used as above.
"""

from __future__ import annotations

import os

import numpy as np

from pydiff.backends.ort import create_session
from pydiff.package import GUIDANCE_KINDS

__all__ = ["ClassifierGuidance", "CLIPGuidance", "load_guidance_model", "GUIDANCE_KINDS"]


def _session(path, providers=None, session_options=None):
    return create_session(path, providers or ["CPUExecutionProvider"], session_options, required=())


def _scales(scale, B: int, what: str) -> np.ndarray:
    """A number or [B] numbers -> float32 [B, 1, 1, 1]-broadcastable [B]."""
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(B, float(s))
    if s.shape != (B,):
        raise ValueError(f"{what}: expected a number or {B} numbers, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: must be finite")
    return s.astype(np.float32)


def _checked_session(onnx_path, session, providers, session_options, inputs, what, output):
    """(session, output names) of a guidance network whose inputs are exactly `inputs` (sorted)."""
    session = session if session is not None else _session(onnx_path, providers, session_options)
    names = [i.name for i in session.get_inputs()]
    if sorted(names) != inputs:
        raise ValueError(f"{onnx_path}: {what} network takes {inputs}; this one takes {names}")
    outs = [o.name for o in session.get_outputs()]
    if output not in outs:
        raise ValueError(f"{onnx_path}: no output {output!r} (outputs {outs})")
    return session, outs


class ClassifierGuidance:
    """A noise-aware classifier's exported input gradient, run with ONNX Runtime.

    Thread-safe (ONNX Runtime sessions are). ``num_classes`` bounds the labels when given.
    """

    kind = "classifier"
    INPUTS = ["class_labels", "sample", "timestep"]

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        output: str = "grad",
        num_classes: int | None = None,
        providers=None,
        session_options=None,
        session=None,
    ):
        self.path = str(onnx_path)
        self.session, outs = _checked_session(
            onnx_path, session, providers, session_options, self.INPUTS, "a classifier-guidance", output
        )
        self.num_classes = num_classes
        self.output = output
        self.has_log_prob = "log_prob" in outs

    def _feeds(self, x, t, labels):
        x = np.ascontiguousarray(x, dtype=np.float32)
        B = x.shape[0]
        t = np.ascontiguousarray(np.broadcast_to(np.asarray(t, np.float32), (B,)))
        y = np.asarray(labels)
        if y.dtype.kind not in "iu":
            raise TypeError(f"class labels must be integers, got {y.dtype}")
        y = np.ascontiguousarray(np.broadcast_to(y.astype(np.int64), (B,)))
        if self.num_classes is not None and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1}, got {y.min()}..{y.max()}")
        return {"sample": x, "timestep": t, "class_labels": y}

    def gradient(self, x: np.ndarray, t, labels) -> np.ndarray:
        """grad_x log p(y | x_t, t): x float32 [B, C, H, W], t [B] (or a number), labels int [B]."""
        (g,) = self.session.run([self.output], self._feeds(x, t, labels))
        return g

    def log_prob(self, x: np.ndarray, t, labels) -> np.ndarray:
        """log p(y | x_t, t) [B] (networks exported with a log_prob output)."""
        if not self.has_log_prob:
            raise ValueError(f"{self.path}: the network has no log_prob output")
        (lp,) = self.session.run(["log_prob"], self._feeds(x, t, labels))
        return lp

    def guidance_fn(self, labels, scale=1.0):
        """fn(x_t, t) -> scale * grad_x log p(labels | x_t, t), for pydiff.sample(guidance_fn=...).

        labels int [B]; scale a number or [B] per-sample scales (Dhariwal & Nichol's s)."""
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":  # before any cast: 2.9 must not become 2
            raise TypeError(f"class labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64).reshape(-1)

        def fn(x, t):
            B = x.shape[0]
            if labels.shape[0] not in (1, B):
                raise ValueError(f"{labels.shape[0]} class labels for a batch of {B}")
            s = _scales(scale, B, "classifier guidance scale")
            return s.reshape((B,) + (1,) * (x.ndim - 1)) * self.gradient(x, t, labels)

        return fn


class CLIPGuidance:
    """A noise-aware CLIP's exported gradient of f(x_t, t) . g(c), run with ONNX Runtime."""

    kind = "clip"
    INPUTS = ["encoder_attention_mask", "encoder_hidden_states", "sample", "timestep"]

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        output: str = "grad",
        providers=None,
        session_options=None,
        session=None,
    ):
        self.path = str(onnx_path)
        self.session, outs = _checked_session(
            onnx_path, session, providers, session_options, self.INPUTS, "a CLIP-guidance", output
        )
        self.output = output
        self.has_similarity = "similarity" in outs

    def _feeds(self, x, t, states, mask):
        x = np.ascontiguousarray(x, dtype=np.float32)
        B = x.shape[0]
        states = np.asarray(states, np.float32)
        mask = np.asarray(mask, np.float32)
        if states.ndim != 3 or mask.shape != states.shape[:2] or states.shape[0] not in (1, B):
            raise ValueError(f"text states {states.shape} / mask {mask.shape} do not fit a batch of {B}")
        if states.shape[0] == 1 and B > 1:
            states, mask = np.repeat(states, B, 0), np.repeat(mask, B, 0)
        t = np.ascontiguousarray(np.broadcast_to(np.asarray(t, np.float32), (B,)))
        return {
            "sample": x,
            "timestep": t,
            "encoder_hidden_states": np.ascontiguousarray(states),
            "encoder_attention_mask": np.ascontiguousarray(mask),
        }

    def gradient(self, x, t, states, mask) -> np.ndarray:
        """grad_x f(x_t, t) . g(c): x float32 [B, C, H, W], t [B], states [B, L, D], mask [B, L]."""
        (g,) = self.session.run([self.output], self._feeds(x, t, states, mask))
        return g

    def similarity(self, x, t, states, mask) -> np.ndarray:
        """f(x_t, t) . g(c) [B] (networks exported with a similarity output)."""
        if not self.has_similarity:
            raise ValueError(f"{self.path}: the network has no similarity output")
        (s,) = self.session.run(["similarity"], self._feeds(x, t, states, mask))
        return s

    def guidance_fn(self, states, mask, scale=1.0):
        """fn(x_t, t) -> scale * grad_x f(x_t, t) . g(c), for pydiff.sample(guidance_fn=...);
        states [B, L, D] / mask [B, L] from the package's text encoder (pydiff.backends.text_encoder)."""

        def fn(x, t):
            B = x.shape[0]
            s = _scales(scale, B, "CLIP guidance scale")
            return s.reshape((B,) + (1,) * (x.ndim - 1)) * self.gradient(x, t, states, mask)

        return fn


def load_guidance_model(spec, providers=None, session_options=None):
    """The runtime object for a package's guidance model entry (pydiff.package.GuidanceModelSpec)."""
    if spec.kind == "classifier":
        return ClassifierGuidance(
            spec.onnx,
            output=spec.output,
            num_classes=spec.num_classes,
            providers=providers,
            session_options=session_options,
        )
    if spec.kind == "clip":
        return CLIPGuidance(
            spec.onnx, output=spec.output, providers=providers, session_options=session_options
        )
    raise ValueError(
        f"{spec.onnx}: guidance model kind {spec.kind!r} has no runtime in this pydiff "
        f"(known: 'classifier', 'clip')"
    )
