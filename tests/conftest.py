from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

try:  # torch 2.11 failed to import on the H100 machine when first imported mid-session, after
    # hypothesis and the test helpers; importing it first, where installed, avoids that.
    import torch  # noqa: F401
except ImportError:
    pass


def required(what: str) -> bool:
    """CI sets CUPYCONVT_REQUIRE_<WHAT>=1 so that a missing dependency fails instead of skipping."""
    return os.environ.get(f"CUPYCONVT_REQUIRE_{what.upper()}") == "1"


def need(module: str, what: str):
    """Import ``module`` or skip (fail when CI requires ``what``)."""
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if required(what):
            pytest.fail(f"{module} is required here (CUPYCONVT_REQUIRE_{what.upper()}=1)")
        raise


@pytest.fixture
def rng(request):
    """Fresh random data per test, reproducible from the test's name."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(params=["phases", "scatter"])
def cpu_path(request, monkeypatch):
    """Run a CPU-backend test through each of ``_cpu.py``'s two algorithms, whatever its size
    rule would pick: the phase products (where the weights are finite) and the tap-by-tap
    scatter."""
    from cupyconvt import _cpu

    monkeypatch.setattr(_cpu, "_phases_pay", lambda p: request.param == "phases")
    return request.param


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU with CuPy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def hopper():
    """CuPy on a GPU of compute capability 9.0 (the wgmma kernels are built for sm_90a), or skip."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA GPU")
    cc = int(cupy.cuda.Device().compute_capability)
    if cc != 90:
        pytest.skip(f"wgmma needs compute capability 9.0, this GPU is {cc}")
    return cupy
