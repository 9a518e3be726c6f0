"""ONNX Runtime backend: one InferenceSession per stage, created once and shared by all calls."""
from __future__ import annotations

from ..package import Package, PackageError, check_stage_io, check_text_encoder_io
from .base import Backend, StageModel


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider",) if p in available]
    return providers + ["CPUExecutionProvider"]


def _session(path, providers, session_options):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for corrupt/truncated files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackageError(f"{path}: ONNX Runtime cannot load this model ({msg})") from None


def load_text_encoder(package: Package, providers, session_options=None):
    """The package's TextEncoder (ORT session checked against the format), or None."""
    te = package.text_encoder
    if te is None:
        return None
    from ..text_encoder import TextEncoder

    try:
        enc = TextEncoder(str(te.onnx), str(te.tokenizer), te.max_length, providers=providers,
                          session_options=session_options)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackageError(f"{te.onnx} / {te.tokenizer}: cannot load the text encoder ({msg})") from None
    check_text_encoder_io(package, enc.session)
    return enc


class OrtStageModel(StageModel):
    def __init__(self, stage, session):
        super().__init__(stage)
        self.session = session
        self._outputs = [stage.output]

    def __call__(self, x, t, cond=None):
        (out,) = self.session.run(self._outputs, self.feeds(x, t, cond))
        if out.shape != x.shape:
            raise RuntimeError(f"stage {self.stage.name!r}: the network returned shape {out.shape} "
                               f"for a sample of shape {x.shape}")
        return out


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, package: Package, providers: list[str] | None = None,
                 session_options=None):
        super().__init__(package)
        self.providers = list(providers) if providers else default_providers()
        self.text_encoder = load_text_encoder(package, self.providers, session_options)
        for stage in package.stages:
            sess = _session(stage.onnx, self.providers, session_options)
            check_stage_io(package, stage, sess)
            self.stage_models[stage.name] = OrtStageModel(stage, sess)

    def describe(self) -> dict:
        sess = next(iter(self.stage_models.values())).session
        return {"backend": self.name, "providers": list(sess.get_providers())}
