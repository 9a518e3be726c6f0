"""pydiff.cuda's host side, without a GPU: import, array recognition (DLPack, OrtValue) and errors."""

from __future__ import annotations

import numpy as np
import pytest

from pydiff import _C, cuda


def test_import_without_gpu_and_queries():
    assert isinstance(cuda.built(), bool)
    assert isinstance(cuda.available(), bool)
    if not cuda.built():
        assert not cuda.available()


def test_dlpack_info_reads_numpy_capsules():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    ptr, shape, strides, code, bits, lanes, read_only = _C.dlpack_info(a.__dlpack__())
    assert ptr == a.ctypes.data and shape == (2, 3, 4) and (code, bits, lanes) == (2, 32, 1)
    assert strides is None or strides == (12, 4, 1)
    v = a[:, 1:, ::2]  # an offset, strided view
    ptr, shape, strides, *_ = _C.dlpack_info(v.__dlpack__())
    assert ptr == v.ctypes.data and shape == (2, 2, 2) and strides == (12, 4, 2)
    h = np.zeros(3, np.float16)
    assert _C.dlpack_info(h.__dlpack__())[3:] == (2, 16, 1, False)


def test_dlpack_info_rejects_other_capsules():
    with pytest.raises(TypeError):
        _C.dlpack_info(object())


class FakeGpuArray:
    """A NumPy array that claims to live on CUDA device 3 through DLPack."""

    def __init__(self, a, device=(2, 3)):
        self.a, self.device = a, device

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        self.stream = stream  # the consumer's stream, for the producer to order its work before
        return self.a.__dlpack__()


def test_dlpack_device_arrays_are_recognised():
    a = np.zeros((2, 5), np.float32)
    fake = FakeGpuArray(a)
    v = cuda._from_dlpack(fake, "x")
    assert (v.ptr, v.shape, v.storage, v.device) == (a.ctypes.data, (2, 5), cuda.F32, 3)
    assert fake.stream == 1  # no stream given: the legacy default stream, 1 in DLPack (0 is banned)
    cuda._from_dlpack(fake, "x", stream=0x77)
    assert fake.stream == 0x77
    assert cuda._from_dlpack(FakeGpuArray(a.astype(np.float16)), "x").storage == cuda.F16


def test_dlpack_errors_name_the_argument():
    with pytest.raises(TypeError, match="model_output is a host array"):
        cuda._from_dlpack(FakeGpuArray(np.zeros(3, np.float32), device=(1, 0)), "model_output")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        cuda._from_dlpack(FakeGpuArray(np.zeros(3, np.float64)), "x")
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        cuda._from_dlpack(FakeGpuArray(np.zeros((4, 4), np.float32).T), "out")
    with pytest.raises(TypeError, match="not a CUDA GPU"):
        cuda._from_dlpack(FakeGpuArray(np.zeros(3, np.float32), device=(14, 0)), "x")


def test_host_arrays_are_refused_before_anything_else():
    with pytest.raises(TypeError, match="x is a host"):
        cuda.device_array(np.zeros(3, np.float32), "x")


@pytest.mark.skipif(cuda.built(), reason="checks the message of a build without the CUDA twin")
def test_without_the_cuda_module_the_error_says_how_to_build_it():
    with pytest.raises(ImportError, match="PYDIFF_CUDA=1"):
        cuda.device_array(FakeGpuArray(np.zeros(3, np.float32)), "x")
    with pytest.raises(ImportError, match="PYDIFF_CUDA=1"):
        cuda.workspace_bytes(4, 10)


def test_dlpack_read_only_and_version():
    a = np.zeros(4, np.float32)
    a.flags.writeable = False
    cap = a.__dlpack__(max_version=(1, 0))  # a versioned capsule, flagged read-only
    assert _C.dlpack_info(cap)[6] is True
    with pytest.raises(ValueError, match="out is read-only"):
        cuda._from_dlpack(
            type(
                "RO",
                (),
                {
                    "__dlpack_device__": lambda self: (2, 0),
                    "__dlpack__": lambda self, stream=None: a.__dlpack__(max_version=(1, 0)),
                },
            )(),
            "out",
            writable=True,
        )


def test_stream_handles():
    import ctypes

    assert cuda.stream_handle(np.int64(5)) == 5 and cuda.stream_handle(None) == 0
    numba_like = type("S", (), {"handle": ctypes.c_void_p(1234)})()
    assert cuda.stream_handle(numba_like) == 1234
    assert cuda.stream_handle(type("S", (), {"handle": ctypes.c_void_p(None)})()) == 0
    with pytest.raises(TypeError, match="stream must be"):
        cuda.stream_handle(True)


def test_empty_arrays_are_contiguous_whatever_their_strides():
    cuda._check_c_contiguous("x", (3, 0), (4, 12), 4)
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda._check_c_contiguous("x", (3, 2), (4, 12), 4)


# -- the CUDA wrapper's checks and plumbing, on a stand-in for the compiled module ---------------


class FakeCudaModule:
    """Records launches; every pointer below 2**62 lives on GPU 0, above on GPU 1."""

    def __init__(self):
        self.launches, self.waits = [], []

    @staticmethod
    def pointer_device(ptr):
        return 0 if ptr < 2**62 else 1

    def fused_step(self, *args):
        self.launches.append(args)

    def stream_wait(self, consumer, producer, device):
        self.waits.append((consumer, producer, device))

    def randn(self, *args):
        self.launches.append(args)


class CaiArray:
    """A device array by __cuda_array_interface__ v3 (the memory is host memory: nothing runs)."""

    def __init__(
        self, shape, dtype=np.float32, *, stream=None, read_only=False, ptr=None, mask=None, base=None
    ):
        self.a = base if base is not None else np.zeros(shape, dtype)
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": np.dtype(dtype).str,
            "strides": None,
            "version": 3,
            "data": (ptr if ptr is not None else self.a.ctypes.data, read_only),
            "stream": stream,
            "mask": mask,
        }


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCudaModule()
    monkeypatch.setattr(cuda, "_C_cuda", fake)
    return fake


def _step_args(B=2, **kw):
    p = _C.StepParams()
    x, mo, out = CaiArray((B, 3, 4)), CaiArray((2 * B, 3, 4)), CaiArray((B, 3, 4))
    return (x, mo, p), dict(out=out, guidance_scale=2.0, **kw)


def test_producer_streams_are_waited_for_on_the_device(fake_cuda):
    B = 2
    p = _C.StepParams()
    x = CaiArray((B, 3, 4), stream=0x51)  # written on another stream: wait for it
    mo = CaiArray((2 * B, 3, 4), stream=0x51)  # the same producer: one wait
    out = CaiArray((B, 3, 4), stream=0x77)  # the launch stream itself: no wait
    cuda.fused_step(x, mo, p, out=out, guidance_scale=2.0, stream=0x77)
    assert fake_cuda.waits == [(0x77, 0x51, 0)]
    fake_cuda.waits.clear()
    cuda.fused_step(
        CaiArray((B, 3, 4), stream=1), CaiArray((2 * B, 3, 4)), p, out=CaiArray((B, 3, 4)), guidance_scale=2.0
    )  # 1 is the legacy default stream, which 0 means
    assert fake_cuda.waits == []
    assert fake_cuda.launches[-1][-1] == 0  # launched on the arrays' GPU


def test_written_arrays_must_be_writable_and_unmasked(fake_cuda):
    (x, mo, p), kw = _step_args()
    kw["out"] = CaiArray((2, 3, 4), read_only=True)
    with pytest.raises(ValueError, match="out is read-only"):
        cuda.fused_step(x, mo, p, **kw)
    (x, mo, p), kw = _step_args()
    with pytest.raises(ValueError, match="x has a mask"):
        cuda.fused_step(CaiArray((2, 3, 4), mask=object()), mo, p, **kw)
    assert fake_cuda.launches == []


def test_outputs_may_alias_an_input_exactly_not_partly(fake_cuda):
    (x, mo, p), kw = _step_args()
    kw["out"] = CaiArray((2, 3, 4), base=x.a)  # in place: fine
    cuda.fused_step(x, mo, p, **kw)
    big = np.zeros((3, 3, 4), np.float32)
    shifted = CaiArray((2, 3, 4), base=big, ptr=big.ctypes.data + 48)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        cuda.fused_step(CaiArray((2, 3, 4), base=big), mo, p, out=shifted, guidance_scale=2.0)
    assert len(fake_cuda.launches) == 1


def test_raw_buffers_are_checked(fake_cuda):
    (x, mo, p), kw = _step_args()
    with pytest.raises(TypeError, match="nonfinite is a host"):
        cuda.fused_step(x, mo, p, nonfinite=np.zeros(1, np.int64), **kw)
    with pytest.raises(TypeError, match="nonfinite must be int64"):
        cuda.fused_step(x, mo, p, nonfinite=CaiArray((1,), np.int32), **kw)
    table = CaiArray((_C.STEP_PARAMS_BYTES,), np.uint8)
    with pytest.raises(ValueError, match="step_counter has 0 bytes"):
        cuda.fused_step(x, mo, p, param_table=table, step_counter=CaiArray((0,), np.int32), **kw)
    with pytest.raises(TypeError, match="step_counter must be int32"):
        cuda.fused_step(x, mo, p, param_table=table, step_counter=CaiArray((1,), np.int64), **kw)
    far = CaiArray((1,), np.int64, ptr=2**62)  # on GPU 1, x on GPU 0
    with pytest.raises(ValueError, match="nonfinite is on GPU 1 but x is on GPU 0"):
        cuda.fused_step(x, mo, p, nonfinite=far, **kw)
    assert fake_cuda.launches == []


def test_the_cuda_wrapper_checks_params_as_the_cpu_twin(fake_cuda):
    (x, mo, p), kw = _step_args()
    p.prediction_type = 3
    with pytest.raises(ValueError, match="prediction_type must be 0"):
        cuda.fused_step(x, mo, p, **kw)
    p.prediction_type, p.threshold_mode, p.dynamic_ratio = 0, 2, 1.5
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        cuda.fused_step(x, mo, p, **kw)
    with pytest.raises(ValueError, match="prediction_type"):  # and the rows of a step table
        bad = _C.StepParams()
        bad.prediction_type = 7
        _C.pack_step_params([bad])
    assert fake_cuda.launches == []
