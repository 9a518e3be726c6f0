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
    ptr, shape, strides, code, bits, lanes = _C.dlpack_info(a.__dlpack__())
    assert ptr == a.ctypes.data and shape == (2, 3, 4) and (code, bits, lanes) == (2, 32, 1)
    assert strides is None or strides == (12, 4, 1)
    v = a[:, 1:, ::2]  # an offset, strided view
    ptr, shape, strides, *_ = _C.dlpack_info(v.__dlpack__())
    assert ptr == v.ctypes.data and shape == (2, 2, 2) and strides == (12, 4, 2)
    h = np.zeros(3, np.float16)
    assert _C.dlpack_info(h.__dlpack__())[3:] == (2, 16, 1)


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
        assert stream == -1  # pydiff asks for no producer-side synchronisation
        return self.a.__dlpack__()


def test_dlpack_device_arrays_are_recognised():
    a = np.zeros((2, 5), np.float32)
    v = cuda._from_dlpack(FakeGpuArray(a), "x")
    assert (v.ptr, v.shape, v.storage, v.device) == (a.ctypes.data, (2, 5), cuda.F32, 3)
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
