"""The pure helpers of benchmarks/bench.py: argument rules, file names, the table, the accuracy bar
and the bfloat16 rounding of the inputs. The last test needs a GPU (the inputs live in CuPy)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py, as the other benchmark scripts import it)

#: The table as it was before the half-precision and precision-mode columns: a float32 or
#: float64 run at precision "highest" must still print exactly this.
OLD_HEAD = (
    "| case | kernel | ours ms | cuDNN ms | speedup | TFLOP/s | GB/s | floor ms "
    "| ours % of floor | cuDNN % of floor | rel err ours | rel err cuDNN |"
)


def _row(**extra) -> dict:
    row = dict(case="kb61_cube_k3", family="igemm", ms=7.76, torch_ms=15.194, speedup=1.958,
               TFLOPs=33.6, GBps=109.2, floor_ms=5.05, of_floor=0.651, torch_of_floor=0.332,
               err=6.3e-07, err_torch=6.3e-07, ok=True)  # fmt: skip
    row.update(extra)
    return row


def _parse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_precision_is_float32_only(capsys, dtype, precision):
    err = _parse_error(capsys, ["--dtype", dtype, "--precision", precision])
    assert f"--precision={precision} applies to --dtype float32 only, not --dtype {dtype}" in err
    with pytest.raises(ValueError, match="float32 only"):
        bench.resolve_precision(dtype, precision)


def test_precision_choices(capsys):
    assert "invalid choice: 'low'" in _parse_error(capsys, ["--precision", "low"])
    with pytest.raises(ValueError, match="--precision=low is not one of highest, high, medium"):
        bench.resolve_precision("float32", "low")


@pytest.mark.parametrize("dtype", sorted(bench.TOL))
def test_precision_defaults_to_highest(dtype):
    assert bench.resolve_precision(dtype, None) == "highest"
    args = bench.parse_args(["--dtype", dtype])
    assert (args.dtype, args.precision) == (dtype, "highest")


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_precision_with_float32(precision):
    assert bench.parse_args(["--precision", precision]).precision == precision


def test_help_needs_no_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--precision {highest,high,medium}" in text and "channels_last_3d" in text


@pytest.mark.parametrize(
    "dtype, precision, stem, label",
    [
        ("float32", "highest", "bench_float32", "float32"),
        ("float64", "highest", "bench_float64", "float64"),
        ("float16", "highest", "bench_float16", "float16"),
        ("bfloat16", "highest", "bench_bfloat16", "bfloat16"),
        ("float32", "high", "bench_float32_high", "float32 precision=high (3xTF32)"),
        ("float32", "medium", "bench_float32_medium", "float32 precision=medium (TF32)"),
    ],
)
def test_output_names_and_titles(dtype, precision, stem, label):
    assert bench.out_stem(dtype, precision) == stem
    assert bench.mode_label(dtype, precision) == label


def test_matmul_ceilings_per_mode():
    assert bench.matmul_specs("float64", "highest") == [("fma_TFLOPs", "float64", False)]
    assert bench.matmul_specs("float32", "highest") == [("fma_TFLOPs", "float32", False)]
    assert bench.matmul_specs("float32", "high") == [
        ("fma_TFLOPs", "float32", False),
        ("tf32_TFLOPs", "float32", True),
    ]
    assert bench.matmul_specs("float32", "medium") == [("fma_TFLOPs", "float32", True)]
    for half in ("float16", "bfloat16"):
        assert bench.matmul_specs(half, "highest") == [("fma_TFLOPs", half, False)]


def test_ceiling_text():
    ceil = {"copy_GBps": 2835.2, "fma_TFLOPs": 51.74}
    assert bench.ceiling_text(ceil, "float32", "highest") == (
        "copy 2835 GB/s, float32 matmul 51.7 TFLOP/s"
    )
    assert bench.ceiling_text(ceil, "float32", "medium").startswith("copy 2835 GB/s, tf32 matmul")
    text = bench.ceiling_text({**ceil, "tf32_TFLOPs": 370.0}, "float32", "high")
    assert text.endswith("float32 matmul 51.7 TFLOP/s, tf32 matmul 370.0 TFLOP/s")


def test_table_of_a_highest_run_is_unchanged():
    lines = bench.table([_row()]).splitlines()
    assert lines == [
        OLD_HEAD,
        "|" + "---|" * 12,
        "| kb61_cube_k3 | igemm | 7.760 | 15.194 | 1.96x | 33.6 | 109 | 5.050 | 65% | 33% "
        "| 6.3e-07 | 6.3e-07 |",
    ]


def test_table_half_precision_columns():
    row = _row(ms_ndhwc=6.5, torch_layout="channels_last_3d", speedup_best=2.338, err_ratio=1.04)
    head, rule, line = bench.table([row]).splitlines()
    titles = [t.strip() for t in head.strip("|").split("|")]
    assert titles == [
        "case", "kernel", "ours ms", "ours NDHWC ms", "cuDNN ms", "cuDNN layout", "speedup",
        "best-layout speedup", "TFLOP/s", "GB/s", "floor ms", "ours % of floor",
        "cuDNN % of floor", "rel err ours", "rel err cuDNN", "err ratio",
    ]  # fmt: skip
    assert rule == "|" + "---|" * len(titles)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(titles)
    assert cells[3:8] == ["6.500", "15.194", "channels_last_3d", "1.96x", "2.34x"]
    assert cells[-1] == "1.04"


def test_table_precision_high_columns():
    head, _, line = bench.table([_row(ms_highest=15.6, vs_highest=2.01)]).splitlines()
    titles = [t.strip() for t in head.strip("|").split("|")]
    assert "ours highest ms" in titles and "vs highest" in titles
    assert "err ratio" not in titles and "cuDNN layout" not in titles
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[titles.index("vs highest")] == "2.01x"
    assert cells[titles.index("ours highest ms")] == "15.600"


def test_table_column_missing_from_a_row():
    rows = [_row(err_ratio=1.5), _row(case="tiny_latency")]
    last = bench.table(rows).splitlines()[-1]
    assert last.startswith("| tiny_latency |") and last.endswith("| - |")


def test_summary():
    rows = [_row(speedup=2.0), _row(speedup=8.0, ok=False)]
    assert bench.summary(rows) == "geometric-mean speedup over cuDNN: 4.00x; all correct: False"
    rows = [_row(speedup=2.0, speedup_best=4.0, vs_highest=1.0), _row(speedup_best=1.0)]
    text = bench.summary(rows).splitlines()
    assert len(text) == 2 and text[1].endswith("faster layout over cuDNN's: 2.00x")


@pytest.mark.parametrize(
    "dtype, precision, relative", [("float16", "highest", True), ("bfloat16", "highest", True),
                                   ("float32", "medium", True), ("float32", "high", False),
                                   ("float32", "highest", False), ("float64", "highest", False)],
)  # fmt: skip
def test_accuracy_bar(dtype, precision, relative):
    tol = bench.TOL_MEDIUM if precision == "medium" else bench.TOL[dtype]
    assert bench.tolerance(dtype, precision) == tol
    assert bench.relative_bar(dtype, precision) is relative
    # within the tolerance but three times cuDNN's error: only the relative bar rejects it
    assert bench.err_ok(0.9 * tol, 0.3 * tol, dtype, precision) is (not relative)
    assert bench.err_ok(0.9 * tol, 0.45 * tol, dtype, precision)
    # twice cuDNN's error but over the tolerance: rejected either way
    assert not bench.err_ok(1.1 * tol, tol, dtype, precision)
    assert not bench.err_ok(float("nan"), tol, dtype, precision)
    # at float32 accuracy, however accurate cuDNN was (it may keep IEEE float32 under TF32)
    f32 = min(tol, bench.TOL["float32"])
    assert bench.err_ok(f32, f32 / 100, dtype, precision)


def test_err_ratio():
    assert bench.err_ratio(2e-3, 1e-3) == pytest.approx(2.0)
    assert bench.err_ratio(0.0, 0.0) == 0.0
    assert bench.err_ratio(1e-3, 0.0) == math.inf
    assert math.isnan(bench.err_ratio(float("nan"), 1e-3))


def test_ndhwc_shape():
    assert bench.ndhwc_shape((2, 64, 66, 68, 70)) == (2, 66, 68, 70, 64)


def test_bfloat16_rounding_matches_ml_dtypes(rng):
    ml_dtypes = need("ml_dtypes", "ml_dtypes")
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    a = bits.view(np.float32)
    a = np.concatenate([a[np.isfinite(a)], rng.standard_normal(10_000).astype(np.float32)])
    # exact ties: 1 + 2^-8 rounds down to even 1.0, 1 + 3 * 2^-8 up to 1 + 2^-6, and the
    # subnormal 2^-134 (half of bfloat16's smallest step) down to 0
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2.0**-134], dtype=np.float32)
    a = np.concatenate([a, ties])
    got = bench.bfloat16_bits(a.view(np.uint32))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, a.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert bench.np_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    assert bench.np_dtype("float16").itemsize == 2


@pytest.mark.gpu
def test_case_inputs_bfloat16_are_rounded_float32_inputs():
    """bfloat16 inputs are the float32 ones rounded to nearest, and cross to torch unchanged."""
    ml_dtypes = need("ml_dtypes", "ml_dtypes")
    torch = need("torch", "torch")
    import cupy

    cases = json.loads((Path(bench.__file__).parent / "cases.json").read_text())["cases"]
    c = next(c for c in cases if c["name"] == "tiny_latency")
    _, x32, w32, b32, _ = bench.case_inputs(c, "float32")
    kw, x, w, b, p = bench.case_inputs(c, "bfloat16")
    assert p.out_shape == (1, 4, 16, 16, 16) and kw["stride"] == [2, 2, 2]
    for lo, hi in ((x, x32), (w, w32), (b, b32)):
        assert lo.dtype == np.dtype(ml_dtypes.bfloat16) and lo.shape == hi.shape
        want = cupy.asnumpy(hi).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(cupy.asnumpy(lo.view(cupy.uint16)), want.view(np.uint16))
        t = bench.to_torch(lo, torch)
        assert t.dtype == torch.bfloat16 and t.is_cuda
        np.testing.assert_array_equal(t.float().cpu().numpy(), want.astype(np.float32))
    nan = bench.nan_filled((3, 2), "bfloat16")
    assert nan.dtype == np.dtype(ml_dtypes.bfloat16)
    assert bool(torch.isnan(bench.to_torch(nan, torch)).all())
    zeros = cupy.zeros((3, 2), dtype=cupy.uint16).view(nan.dtype)
    assert bench.bitwise_equal(nan, nan.copy()) and not bench.bitwise_equal(nan, zeros)
