"""The driver-launch layer (cupyconvt/_launch.py) on the CPU: every kernel's signature matches its
``__global__`` declaration, and arguments pack at the C ABI's offsets. The launches themselves run
in every GPU test."""

import re
import struct

import pytest

from cupyconvt import _launch
from cupyconvt._compile import kernel_dir

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?"
                     r"(\w+)\s*\(([^)]*)\)", re.S)  # fmt: skip


def _letter(param: str) -> str:
    """Signature letter of one C parameter declaration."""
    decl = " ".join(param.split())
    if "*" in decl:
        return "p"
    words = decl.replace("const ", "").split()
    if words[0] in ("i64", "long"):
        return "q"
    if words[0] == "int":
        return "i"
    raise AssertionError(f"parameter type not handled by the launcher: {decl!r}")


def declared_signatures() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(kernel_dir().glob("*.cu*")):
        for name, params in _GLOBAL.findall(path.read_text(encoding="utf-8")):
            sig = "".join(_letter(p) for p in params.split(","))
            assert found.setdefault(name, sig) == sig, (name, path.name)
    return found


def test_signatures_match_the_kernel_sources():
    declared = declared_signatures()
    assert len(declared) >= 18  # every kernel file was parsed
    assert declared == _launch.SIGNATURES


def test_signature_lookup_strips_template_arguments():
    assert _launch.signature("wg_patch_gemm<cct::half_t, 128, 64, 1, 4, 2>") == "pppppiiii"
    with pytest.raises(KeyError, match="no launch signature"):
        _launch.signature("not_a_kernel<float>")


@pytest.mark.parametrize(
    ("sig", "offsets", "size"),
    [
        ("ppqqq", (0, 8, 16, 24, 32), 40),
        ("ppppppiiiip", (0, 8, 16, 24, 32, 40, 48, 52, 56, 60, 64), 72),
        ("pppqi", (0, 8, 16, 24, 32), 36),
        ("ppi", (0, 8, 16), 20),
        ("ipi", (0, 8, 16), 20),
    ],
)
def test_param_layout_follows_natural_alignment(sig, offsets, size):
    fmt, got_offsets, got_size = _launch.param_layout(sig)
    assert (got_offsets, got_size) == (offsets, size)
    buf = bytearray(got_size)
    values = list(range(1, len(sig) + 1))
    struct.pack_into(fmt, buf, 0, *values)
    for c, off, v in zip(sig, got_offsets, values, strict=True):
        assert int.from_bytes(buf[off : off + (4 if c == "i" else 8)], "little", signed=True) == v


def test_param_layout_rejects_unknown_letters():
    with pytest.raises(ValueError, match="use letters p, i, q"):
        _launch.param_layout("pf")
    with pytest.raises(struct.error):
        struct.pack_into(_launch.param_layout("pi")[0], bytearray(16), 0, 1, 2**31)


def test_ptr_of_none_and_of_objects_with_data():
    class Mem:
        ptr = 4096

    class Arr:
        data = Mem()

    assert _launch.ptr(None) == 0
    assert _launch.ptr(Arr()) == 4096
    assert _launch.ptr(Mem()) == 4096


def _fake_cupy(monkeypatch, fail_with):
    """A stand-in for ``cupy.cuda`` whose first launchKernel raises ``fail_with`` (a status)."""
    import sys
    import types

    calls = []

    class CUDADriverError(RuntimeError):
        def __init__(self, status):
            super().__init__(f"status {status}")
            self.status = status

    def launch_kernel(*args):
        calls.append(("launch", args[0]))
        if sum(c[0] == "launch" for c in calls) == 1:
            raise CUDADriverError(fail_with)

    driver = types.SimpleNamespace(CUDADriverError=CUDADriverError, launchKernel=launch_kernel)
    runtime = types.SimpleNamespace(getDevice=lambda: 3,
                                    setDevice=lambda d: calls.append(("setDevice", d)))  # fmt: skip
    cuda = types.ModuleType("cupy.cuda")
    cuda.driver, cuda.runtime = driver, runtime
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    fn = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=1234))
    return _launch.Launcher(fn, "pi"), calls, CUDADriverError


def test_launch_without_a_current_context_binds_one_and_retries(monkeypatch):
    """CUDA_ERROR_INVALID_CONTEXT (a thread whose first CUDA work is the launch): the launcher
    makes the current device's primary context current (cudaSetDevice) and launches again."""
    launcher, calls, _ = _fake_cupy(monkeypatch, _launch._CUDA_ERROR_INVALID_CONTEXT)
    launcher((1, 1, 1), (32, 1, 1), (0, 7))
    assert calls == [("launch", 1234), ("setDevice", 3), ("launch", 1234)]


def test_other_launch_errors_are_raised(monkeypatch):
    launcher, calls, error = _fake_cupy(monkeypatch, 1)  # CUDA_ERROR_INVALID_VALUE
    with pytest.raises(error):
        launcher((1, 1, 1), (32, 1, 1), (0, 7))
    assert calls == [("launch", 1234)]
