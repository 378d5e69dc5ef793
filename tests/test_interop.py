"""torch.Tensor in, torch.Tensor out (CPU tensors here; CUDA tensors in test_gpu.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from cases import CASES
from conftest import need
from oracle import TOL, conv_transpose3d_oracle, rel_err

import cupyconvt


def test_import_does_not_import_torch_or_cupy():
    code = "import sys, cupyconvt; print('torch' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("case", CASES[::3], ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_torch_cpu_tensors(case, dtype, rng):
    torch = need("torch", "torch")
    tdt = getattr(torch, dtype)
    x, w, b = (None if a is None else torch.from_numpy(a).to(tdt) for a in case.arrays(rng))
    got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    assert isinstance(got, torch.Tensor) and got.dtype == tdt and got.device.type == "cpu"
    ref = conv_transpose3d_oracle(
        x.double().numpy(), w.double().numpy(), None if b is None else b.double().numpy(),
        **case.kwargs,
    )  # fmt: skip
    assert rel_err(got.double().numpy(), ref) <= TOL[dtype]
    expect = torch.nn.functional.conv_transpose3d(
        x.double(), w.double(), None if b is None else b.double(), **case.kwargs
    )
    assert got.shape == expect.shape


def test_torch_cpu_reads_inputs_without_copy(rng):
    torch = need("torch", "torch")
    from cupyconvt._interop import _to_numpy

    for dt in (torch.float32, torch.bfloat16):
        t = torch.randn(2, 3, 4, 4, 4).to(dt)
        assert _to_numpy(t).__array_interface__["data"][0] == t.data_ptr()


def test_torch_non_contiguous_and_errors(rng):
    torch = need("torch", "torch")
    x = torch.randn(2, 8, 5, 6, 7, dtype=torch.float64)[:, ::2].transpose(2, 4)
    w = torch.randn(4, 3, 2, 3, 2, dtype=torch.float64)
    got = cupyconvt.conv_transpose3d(x, w, stride=2)
    ref = torch.nn.functional.conv_transpose3d(x, w, stride=2)
    assert rel_err(got.numpy(), ref.numpy()) <= TOL["float64"]
    with pytest.raises(TypeError, match="x is a torch.Tensor but w is ndarray"):
        cupyconvt.conv_transpose3d(x, w.numpy())
    with pytest.raises(TypeError, match="w has dtype float32 but x has dtype float64"):
        cupyconvt.conv_transpose3d(x, w.float())
    with pytest.raises(TypeError, match="x has unsupported dtype int32"):
        cupyconvt.conv_transpose3d(x.int(), w.int())
    with pytest.raises(ValueError, match=r"output_padding\[0\]=2 must be smaller"):
        cupyconvt.conv_transpose3d(x, w, stride=2, output_padding=2)
    empty = cupyconvt.conv_transpose3d(x[:0], w, stride=2)
    assert isinstance(empty, torch.Tensor) and empty.shape == (0, *ref.shape[1:])


def test_numpy_bfloat16_through_ml_dtypes(rng):
    ml_dtypes = need("ml_dtypes", "ml_dtypes")
    x = rng.standard_normal((1, 2, 3, 3, 3)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((2, 2, 2, 2, 2)).astype(ml_dtypes.bfloat16)
    got = cupyconvt.conv_transpose3d(x, w, stride=2)
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    assert rel_err(got, conv_transpose3d_oracle(x, w, stride=2)) <= TOL["bfloat16"]
