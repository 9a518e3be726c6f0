"""Whole sampling runs on the GPU with no host work between steps, optionally replayed as a CUDA graph.

A step is the network on static device buffers (torch), then pydiff's fused CUDA step, which reads
its scalars from a device table at the row of a device step counter and advances the counter. No
step depends on the host, so one step captured as a CUDA graph replays for every step of a run:

    from pydiff.cuda_graph import StepPlan, GraphSampler
    plan = StepPlan.from_sampler(pydiff.make_sampler("dpmpp_2m", schedule, 25), seed=0)  # host only
    runner = GraphSampler(net, plan, shape=(8, 3, 16, 16), guidance_scale=5.0, graph=True)
    x0 = runner.run(x_T)                      # a torch CUDA tensor in, a new one out

`net(x, t)` takes the static input batch (``[2B, ...]`` = ``[x; x]`` with guidance: close over the
stacked ``[cond; uncond]`` conditioning) and float32 timesteps, enqueues its work on torch's current
stream, and returns the prediction. A torch module does; so does a backend's stage through
`pydiff.backends.stage_network.StageNetwork`, TensorRT's engine or ONNX Runtime's CUDA provider on
the runner's stream:

    s = torch.cuda.Stream()
    pipe = pydiff.load(path, providers="cuda", stream=s)          # or backend="tensorrt"
    net = StageNetwork(pipe.backend.model("base"), {"encoder_hidden_states": states, ...})
    runner = GraphSampler(net, plan, shape=(8, 3, 16, 16), guidance_scale=5.0, stream=s)

`StepPlan.run_cpu` is the same run on the CPU twin: the readable reference the GPU run is tested
against, and itself tested to equal `pydiff.sample` bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pydiff import cuda, ops
from pydiff.samplers.base import NonFiniteError, Sampler


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The host-side schedule of one run: per step the native StepParams fields and the network's t."""

    rows: tuple  # one dict of StepParams fields per step
    timesteps: np.ndarray  # float32 [T], the network's timestep at each step
    uses_history: bool  # a multistep solver: x0 of the previous step feeds the next

    @classmethod
    def from_sampler(cls, sampler: Sampler, seed: int, start_step: int = 0) -> "StepPlan":
        n = len(sampler.timesteps)
        if not 0 <= start_step < n:
            raise ValueError(f"start_step must be in [0, {n - 1}], got {start_step}")
        rows = []
        for i in range(start_step, n):
            f = sampler.params(i, seed)
            if i == start_step:
                f["c_d"] = 0.0  # no previous x0 yet (as Sampler.step does)
            rows.append(f)
        for key in ("prediction_type", "threshold_mode", "dynamic_ratio", "sample_max_value", "clip_range"):
            if len({r[key] for r in rows}) != 1:
                raise ValueError(f"every step of a plan must share {key}")
        ts = np.asarray([sampler.timesteps[i] for i in range(start_step, n)], np.float32)
        return cls(tuple(rows), ts, bool(sampler.uses_x0_history))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def threshold_mode(self) -> int:
        return self.rows[0]["threshold_mode"]

    def table(self) -> bytes:
        """The rows as the native struct's bytes, for the device table."""
        from pydiff import _C

        return _C.pack_step_params([ops.step_params(**r) for r in self.rows])

    def run_cpu(self, model, x_T: np.ndarray, guidance_scale=None) -> np.ndarray:
        """The plan on the CPU twin: model(x [B or 2B, ...], t [B or 2B]) on NumPy arrays."""
        x = np.array(x_T, np.float32, copy=True)
        B = x.shape[0]
        guided = guidance_scale is not None
        x0_prev = np.zeros_like(x) if self.uses_history else None
        x0_out = np.empty_like(x) if self.uses_history else None
        for row, t in zip(self.rows, self.timesteps):
            xin = np.concatenate([x, x]) if guided else x
            out = np.asarray(model(xin, np.full(xin.shape[0], t, np.float32)), np.float32)
            x, bad = ops.fused_step(
                x, out, ops.step_params(**row), guidance_scale=guidance_scale, x0_prev=x0_prev, x0_out=x0_out
            )
            if bad:
                raise NonFiniteError(f"step at t={int(t)}: NaN or Inf")
            if self.uses_history:
                x0_prev, x0_out = x0_out, x0_prev
        assert x.shape[0] == B
        return x


class GraphSampler:
    """A plan run on the GPU for fixed shapes: eagerly (`graph=False`) or as CUDA-graph replays.

    Static device buffers hold x, the network input and the step state; `run` copies x_T in, runs
    every step with no host synchronisation, then checks the non-finite counter once. `stream`: the
    torch.cuda.Stream every step runs (and is captured) on, e.g. the one an ONNX Runtime session
    computes on; default: torch's current stream for eager steps, a side stream for the capture.
    Not thread-safe: one runner's buffers serve one `run` at a time (make a runner per thread).
    """

    def __init__(
        self,
        network,
        plan: StepPlan,
        *,
        shape,
        guidance_scale=None,
        graph: bool = True,
        device="cuda",
        stream=None,
    ):
        import torch  # lazily: the [torch] extra; CUDA graphs run on torch's streams and buffers

        if not cuda.available() or not torch.cuda.is_available():
            raise RuntimeError(
                "GraphSampler needs an NVIDIA GPU, the CUDA module (install with PYDIFF_CUDA=1) "
                "and a CUDA build of torch"
            )
        self.torch, self.cuda = torch, cuda
        self.network, self.plan, self.graph = network, plan, bool(graph)
        self.device = torch.device(device)
        shape = tuple(int(d) for d in shape)
        B = shape[0]
        self.guided = guidance_scale is not None
        nb = 2 * B if self.guided else B
        f32 = dict(device=self.device, dtype=torch.float32)
        self.x = torch.zeros(shape, **f32)
        self.x_next = torch.empty(shape, **f32)
        self.x_in = torch.empty((nb,) + shape[1:], **f32)
        self.t_in = torch.empty(nb, **f32)
        self.t_one = torch.empty(1, **f32)
        self.t_table = torch.from_numpy(plan.timesteps).to(self.device)
        self.table = torch.frombuffer(bytearray(plan.table()), dtype=torch.uint8).to(self.device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.nonfinite = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.x0_prev = torch.zeros(shape, **f32) if plan.uses_history else None
        self.x0_out = torch.zeros(shape, **f32) if plan.uses_history else None
        self.workspace = None
        if plan.threshold_mode == ops.DYNAMIC:
            nbytes = cuda.workspace_bytes(B, int(np.prod(shape[1:])))
            self.workspace = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self.guided and np.ndim(guidance_scale) > 0:
            self.scale = torch.as_tensor(np.asarray(guidance_scale, np.float32), device=self.device)
        else:
            self.scale = None if guidance_scale is None else float(guidance_scale)
        self.params0 = ops.step_params(**plan.rows[0])  # the mode and prediction type all rows share
        if stream is not None and not isinstance(stream, torch.cuda.Stream):
            raise TypeError(
                f"stream: expected a torch.cuda.Stream (torch.cuda.ExternalStream wraps a raw "
                f"handle), got {type(stream).__name__}"
            )
        self.stream = stream
        self._graph = None

    def _step(self) -> None:
        torch = self.torch
        B = self.x.shape[0]
        self.x_in[:B].copy_(self.x)
        if self.guided:
            self.x_in[B:].copy_(self.x)
        torch.index_select(self.t_table, 0, self.counter, out=self.t_one)
        self.t_in.copy_(self.t_one.expand_as(self.t_in))
        out = self.network(self.x_in, self.t_in)
        self.cuda.fused_step(
            self.x,
            out,
            self.params0,
            out=self.x_next,
            guidance_scale=self.scale,
            x0_prev=self.x0_prev,
            x0_out=self.x0_out,
            nonfinite=self.nonfinite,
            stream=torch.cuda.current_stream(self.device).cuda_stream,
            param_table=self.table,
            step_counter=self.counter,
            workspace=self.workspace,
        )
        self.x.copy_(self.x_next)
        if self.x0_prev is not None:
            self.x0_prev.copy_(self.x0_out)

    def _reset(self, x_T) -> None:
        self.x.copy_(x_T)
        self.counter.zero_()
        self.nonfinite.zero_()
        if self.x0_prev is not None:
            self.x0_prev.zero_()

    def capture(self) -> None:
        """Record one step as a CUDA graph (after a warm-up step on a side stream, as torch requires)."""
        with self.torch.cuda.device(self.device):  # streams and the capture belong to the runner's GPU
            self._capture()

    def _capture(self) -> None:
        torch = self.torch
        saved = self.x.clone()
        side = self.stream or torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.counter.zero_()
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.counter.zero_()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=self.stream):
                self._step()
        except RuntimeError as e:
            raise RuntimeError(
                f"the step could not be captured as a CUDA graph ({str(e).splitlines()[0]}): "
                f"the network synchronised, copied to the host or allocated during the step "
                f"(for ONNX Runtime: load with providers='cuda', stream=<the runner's stream>). "
                f"graph=False runs the same steps eagerly"
            ) from e
        self._graph = g
        self.x.copy_(saved)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def run(self, x_T):
        """x_0 from x_T (a device tensor of the runner's shape); one host synchronisation, at the end."""
        if tuple(x_T.shape) != tuple(self.x.shape):
            raise ValueError(f"x_T must have shape {tuple(self.x.shape)}, got {tuple(x_T.shape)}")
        if self.graph and self._graph is None:
            self.capture()
        with self.torch.cuda.device(self.device):
            return self._run(x_T)

    def _run(self, x_T):
        torch = self.torch
        caller = torch.cuda.current_stream(self.device)
        run_on = self.stream or caller
        run_on.wait_stream(caller)
        with torch.cuda.stream(run_on):
            self._reset(x_T)
            for _ in range(len(self.plan)):
                if self.graph:
                    self._graph.replay()
                else:
                    self._step()
            result = self.x.clone()
        caller.wait_stream(run_on)
        result.record_stream(caller)
        bad = int(self.nonfinite.item())
        if bad:
            raise NonFiniteError(
                f"{bad} non-finite values in the network's output or the update during the run"
            )
        return result


__all__ = ["StepPlan", "GraphSampler"]
