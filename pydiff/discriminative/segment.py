"""An ensemble of small per-pixel MLP classifiers on diffusion features (Baranchuk et al. 2022,
Sec. 4: pixel classifiers, the prediction their majority; their disagreement the uncertainty),
inference in NumPy from a safetensors file (`pydiff.tools.discriminative.segmentation` trains it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pydiff.errors import PackageError


class PixelEnsemble:
    """Members' weights `[(W, b), ...]` per layer (ReLU between), features standardised by
    `mean`/`std` [D]. `predict(feats [B, D, H, W])` -> (labels [B, H, W], disagreement [B, H, W])."""

    def __init__(
        self, members: list[list[tuple[np.ndarray, np.ndarray]]], mean, std, meta: dict | None = None
    ):
        if not members:
            raise ValueError("members: an ensemble needs at least one MLP")
        self.members = [
            [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in m] for m in members
        ]
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.meta = dict(meta or {})
        self.dim = self.members[0][0][0].shape[0]
        self.num_classes = self.members[0][-1][0].shape[1]

    def logits(self, feats: np.ndarray) -> np.ndarray:
        """[M, B, K, H, W] logits of each member."""
        f = np.asarray(feats, np.float32)
        if f.ndim != 4 or f.shape[1] != self.dim:
            raise ValueError(f"feats: expected [B, {self.dim}, H, W], got {f.shape}")
        b, d, h, w = f.shape
        z = (f.transpose(0, 2, 3, 1).reshape(-1, d) - self.mean) / self.std
        out = []
        for layers in self.members:
            a = z
            for i, (wt, bias) in enumerate(layers):
                a = a @ wt + bias
                if i < len(layers) - 1:
                    a = np.maximum(a, 0)
            out.append(a.reshape(b, h, w, -1).transpose(0, 3, 1, 2))
        return np.stack(out)

    def predict(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        votes = self.logits(feats).argmax(axis=2)  # [M, B, H, W]
        counts = np.stack([(votes == k).sum(0) for k in range(self.num_classes)], axis=1)
        labels = counts.argmax(axis=1)
        disagreement = 1.0 - counts.max(axis=1) / len(self.members)
        return labels, disagreement.astype(np.float32)

    def save(self, path) -> None:
        tensors = {"mean": self.mean, "std": self.std}
        for i, layers in enumerate(self.members):
            for j, (w, b) in enumerate(layers):
                tensors[f"m{i}.l{j}.weight"], tensors[f"m{i}.l{j}.bias"] = w, b
        meta = {
            "members": str(len(self.members)),
            "layers": str(len(self.members[0])),
            "meta": json.dumps(self.meta),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "PixelEnsemble":
        path = Path(path)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            m, n = int(meta["members"]), int(meta["layers"])
            members = [
                [(tensors[f"m{i}.l{j}.weight"], tensors[f"m{i}.l{j}.bias"]) for j in range(n)]
                for i in range(m)
            ]
            return cls(members, tensors["mean"], tensors["std"], json.loads(meta.get("meta", "{}")))
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
            raise PackageError(f"{path}: not a pixel-ensemble file ({e})") from None
