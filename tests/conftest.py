"""Shared test configuration: GPU tests skip cleanly, decided at collection (never at import)."""

from __future__ import annotations

import pytest


def _gpu_reason() -> str | None:
    try:
        from pydiff import cuda
    except ImportError as e:  # pragma: no cover
        return f"pydiff.cuda does not import: {e}"
    if not cuda.built():
        return "pydiff was built without the CUDA twin (PYDIFF_CUDA=1)"
    try:
        import torch
    except ImportError:
        return "the GPU tests drive device arrays through torch, which is not installed"
    if not torch.cuda.is_available() or not cuda.available():
        return "no CUDA GPU visible"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _gpu_reason()
    if reason:
        for it in gpu_items:
            it.add_marker(pytest.mark.skip(reason=reason))
