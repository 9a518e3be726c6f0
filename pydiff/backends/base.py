"""What every backend provides."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from pydiff.package import Package, Stage, input_dtype


class StageModel:
    """Callable `model(x_t [B,C,H,W] f32, t [B] f32, cond: dict name -> [B,...]) -> [B,C,H,W] f32`.

    `cond` may carry keys the stage does not take (e.g. "low_res" for a base stage); only the
    stage's manifest `inputs` are passed to the network.
    """

    def __init__(self, stage: Stage):
        self.stage = stage

    def input_values(self, x, t, cond: Mapping | None) -> dict:
        """The stage's network inputs by name, as given (host or device arrays), unconverted."""
        values = {"sample": x, "timestep": t}
        cond = cond or {}
        for name in self.stage.inputs:
            if name in values:
                continue
            if name not in cond:
                raise ValueError(
                    f"stage {self.stage.name!r} needs the input {name!r}, which the pipeline did not provide"
                )
            values[name] = cond[name]
        return values

    def feeds(self, x: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray] | None) -> dict:
        """`input_values` as C-contiguous host arrays of the format's dtypes; `t` broadcast to [B]."""
        feeds = self.input_values(x, t, cond)
        feeds["timestep"] = np.broadcast_to(np.asarray(t, np.float32), (np.shape(x)[0],))
        return {name: np.ascontiguousarray(v, dtype=input_dtype(name)) for name, v in feeds.items()}

    def __call__(self, x, t, cond=None):  # pragma: no cover - abstract
        raise NotImplementedError


class Backend:
    """A package's networks on one runtime. Subclasses fill `name`, `stage_models`, `providers`."""

    name: str = "?"

    def __init__(self, package: Package):
        self.package = package
        self.stage_models: dict[str, StageModel] = {}
        self.text_encoder = None  # object with .encode(list[str]) -> (states, mask) or None

    def model(self, stage_name: str) -> StageModel:
        return self.stage_models[stage_name]

    def describe(self) -> dict:
        return {"backend": self.name}
