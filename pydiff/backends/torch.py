"""PyTorch backend (torch imported lazily, only when this backend is chosen).

Model packages carry ONNX networks only, so the torch modules come from the caller:
`TorchBackend(package, modules={"base": net, "sr64": net2})`, or `pydiff.load(path,
backend="torch", modules=...)`; `pydiff.tools.training.load_torch_modules({"base": "runs/shapes_base"})`
makes them from pydiff training runs (safetensors checkpoints, EMA weights). Each module is called with keyword arguments named like the
stage's ONNX inputs (`sample`, `timestep`, `encoder_hidden_states`, ...) and returns the
prediction tensor (or a tuple / object whose first element / `.sample` is it). The text encoder
still runs on ONNX Runtime (it is frozen and shared by both backends).

Across backends the same seed gives images that agree to within the networks' own float32
disagreement (docs: 1e-3 absolute in [-1, 1] pixel units for the bundled packages).
"""

from __future__ import annotations

import numpy as np

from pydiff.backends.base import Backend, StageModel
from pydiff.backends.ort import default_providers
from pydiff.backends.text_encoder import load_text_encoder
from pydiff.errors import PackageError
from pydiff.package import Package


class TorchStageModel(StageModel):
    def __init__(self, stage, module, device):
        super().__init__(stage)
        self.module = module
        self.device = device

    def __call__(self, x, t, cond=None):
        import torch  # lazily: the [torch] extra, needed by this backend only

        feeds = self.feeds(x, t, cond)
        kwargs = {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in feeds.items()}
        with torch.inference_mode():
            out = self.module(**kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        out = out.detach().to("cpu", torch.float32).numpy()
        if out.shape != x.shape:
            raise RuntimeError(
                f"stage {self.stage.name!r}: the module returned shape {out.shape} "
                f"for a sample of shape {x.shape}"
            )
        return out


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        package: Package,
        modules=None,
        device: str | None = None,
        providers: list[str] | None = None,
        session_options=None,
    ):
        import torch  # lazily: the [torch] extra, needed by this backend only

        super().__init__(package)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        modules = dict(modules or {})
        unknown = [k for k in modules if k not in package.stage_names]
        if unknown:
            raise ValueError(
                f"modules given for unknown stage(s) {unknown}; the package has {package.stage_names}"
            )
        for stage in package.stages:
            mod = modules.get(stage.name)
            if mod is None:
                raise PackageError(
                    f"{package.manifest_path}: stage {stage.name!r} has only an ONNX network; the "
                    f"torch backend needs a torch.nn.Module for it: "
                    f"pydiff.load(path, backend='torch', modules={{{stage.name!r}: module, ...}})"
                )
            if not isinstance(mod, torch.nn.Module):
                raise TypeError(
                    f"modules[{stage.name!r}] must be a torch.nn.Module, got {type(mod).__name__}"
                )
            mod = mod.to(self.device).eval()
            self.stage_models[stage.name] = TorchStageModel(stage, mod, self.device)
        self.text_encoder = load_text_encoder(package, providers or default_providers(), session_options)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}
