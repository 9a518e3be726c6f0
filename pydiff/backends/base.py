"""What every backend provides."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..package import Package, Stage


class StageModel:
    """Callable `model(x_t [B,C,H,W] f32, t [B] f32, cond: dict name -> [B,...]) -> [B,C,H,W] f32`.

    `cond` may carry keys the stage does not take (e.g. "low_res" for a base stage); only the
    stage's manifest `inputs` are passed to the network.
    """

    def __init__(self, stage: Stage):
        self.stage = stage

    def feeds(self, x: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray] | None) -> dict:
        feeds = {"sample": np.ascontiguousarray(x, dtype=np.float32),
                 "timestep": np.ascontiguousarray(np.broadcast_to(np.asarray(t, np.float32),
                                                                  (x.shape[0],)))}
        cond = cond or {}
        for name in self.stage.inputs:
            if name in feeds:
                continue
            if name not in cond:
                raise ValueError(f"stage {self.stage.name!r} needs the input {name!r}, "
                                 f"which the pipeline did not provide")
            dtype = np.int64 if name == "class_labels" else np.float32
            feeds[name] = np.ascontiguousarray(cond[name], dtype=dtype)
        return feeds

    def __call__(self, x, t, cond=None):  # pragma: no cover - abstract
        raise NotImplementedError


class Backend:
    """A package's networks on one runtime. Subclasses fill `name`, `stage_models`, `providers`."""

    name: str = "?"

    def __init__(self, package: Package):
        self.package = package
        self.stage_models: dict[str, StageModel] = {}
        self.text_encoder = None   # object with .encode(list[str]) -> (states, mask) or None

    def model(self, stage_name: str) -> StageModel:
        return self.stage_models[stage_name]

    def describe(self) -> dict:
        return {"backend": self.name}
