"""A backend's stage network as a `pydiff.cuda_graph.GraphSampler` network (torch CUDA buffers)."""

from __future__ import annotations

import numpy as np

from pydiff.package import input_dtype


class StageNetwork:
    """A backend's stage (TensorRT or ONNX Runtime) as a GraphSampler network: `net(x, t)` enqueues one
    call on torch's current stream, writing one static output buffer, with no host synchronisation.

    `cond`: the stage's other inputs by name (``[2B, ...]`` = ``[cond; uncond]`` with guidance), NumPy
    arrays (copied to the GPU once, here) or torch CUDA tensors (kept). ONNX Runtime sessions must be
    loaded with the runner's stream (`pydiff.load(..., providers="cuda", stream=s)`): its CUDA provider
    computes on the stream it was created with, and the call is refused on any other one. One shape
    per instance: the output buffer's address is what a captured graph replays.
    """

    def __init__(self, stage_model, cond=None, *, device="cuda"):
        import torch  # lazily: torch's CUDA tensors are the device buffers; the runtime does not need it

        if not callable(getattr(stage_model, "run_device", None)):
            raise TypeError(
                f"stage_model: expected a backend's stage model (pipe.backend.model(name)) with "
                f"run_device, got {type(stage_model).__name__}"
            )
        self.torch, self.stage_model = torch, stage_model
        self.device = torch.device(device)
        self.cond = {}
        for name, value in (cond or {}).items():
            if isinstance(value, torch.Tensor):
                if value.device != self.device:
                    raise ValueError(f"cond[{name!r}]: on {value.device}, the network runs on {self.device}")
                self.cond[name] = value.contiguous()
            else:
                self.cond[name] = torch.from_numpy(np.ascontiguousarray(value, input_dtype(name))).to(
                    self.device
                )
        self.out = None

    def __call__(self, x, t):
        torch = self.torch
        if self.out is None:
            for name, value in self.cond.items():
                if value.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"cond[{name!r}]: batch {value.shape[0]}, the network input's is "
                        f"{x.shape[0]} (with guidance: [cond; uncond], twice the images)"
                    )
            self.out = torch.empty(tuple(x.shape), dtype=torch.float32, device=self.device)
        elif tuple(self.out.shape) != tuple(x.shape):
            raise ValueError(
                f"this StageNetwork serves shape {tuple(self.out.shape)}, not {tuple(x.shape)}: "
                f"make one per shape"
            )
        self.stage_model.run_device(
            x, t, self.cond, out=self.out, stream=torch.cuda.current_stream(self.device)
        )
        return self.out
