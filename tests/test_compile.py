"""Every kernel the runtime can select compiles with NVRTC, for sm_80 and sm_90, from the exact
source and options the runtime hands to cupy.RawModule. Needs no GPU: NVRTC is a library."""

from __future__ import annotations

import pytest
from conftest import need

from cupyconvt._compile import every_module
from cupyconvt._select import all_modules

ARCHS = ["sm_80", "sm_90"]


def _nvrtc():
    return need("cuda.bindings.nvrtc", "nvrtc")


def _log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 \n")


def _targets() -> list:
    """(module, arch) pairs: a module built for sm_90a (Hopper's wgmma) runs on 9.0 alone."""
    return [
        pytest.param(m, a, id=f"{m.filename}-{a}")
        for m in every_module()
        for a in ARCHS
        if a == "sm_90" or "--gpu-architecture=sm_90a" not in m.options
    ]


@pytest.mark.parametrize(("module", "arch"), _targets())
def test_kernel_compiles_with_nvrtc(module, arch):
    nvrtc = _nvrtc()
    source = module.source()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), module.filename.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    try:
        for name in module.name_expressions:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, name.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        opts = [o.encode() for o in module.options] + [f"--gpu-architecture={arch}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _log(nvrtc, prog)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{module.filename} ({arch}):\n{log}"
        assert "warning" not in log.lower(), f"{module.filename} ({arch}) warns:\n{log}"
        for name in module.name_expressions:
            err, lowered = nvrtc.nvrtcGetLoweredName(prog, name.encode())
            assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS and lowered, name
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS and size > 0
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def test_every_selectable_kernel_is_listed():
    """The selector only names kernels that all_modules() lists (and so CI compiles)."""
    from cases import CASES

    from cupyconvt._params import ConvParams
    from cupyconvt._select import CPP_TYPE, FAMILIES, DeviceInfo, eligible, select

    listed = {(m, n) for m in all_modules() for n in m.name_expressions}
    dev = DeviceInfo(0, "test", 90, 132, 227 * 1024)
    for case in CASES:
        p = ConvParams.from_args(case.x_shape, case.w_shape, None, **case.kwargs)
        for dtype in CPP_TYPE:
            for family in (None, *FAMILIES):
                if family is None or eligible(p, dtype, family):
                    for kernel in select(p, dtype, dev, family).kernels():
                        assert kernel in listed
