"""Benchmark cupyconvt.conv_transpose3d against PyTorch (cuDNN) on the same GPU, in one process.

For each case of a JSON file (default: ../shared/bench/cases.json beside the repo, else the copy
in benchmarks/cases.json) it checks both results against a float64 reference, then times both
with CUDA events (warm-up, then the median of --repeat runs), with cudnn.benchmark on. Beside
each time it puts the roofline floor, max(FLOPs / FMA peak, bytes / copy bandwidth), both
ceilings measured in this run: a device-to-device copy and a cuBLAS matrix product (torch.matmul)
in the same dtype and precision. Prints a Markdown table, writes bench_<dtype>.json and .png
(bench_float32_<precision>.* for --precision high or medium).

Modes:
  float64, float32 (--precision highest, the default): IEEE arithmetic on both sides, TF32 off;
    correct when the error is within TOL[dtype].
  float16, bfloat16: cuDNN is timed in NCDHW and in channels_last_3d and the faster counts;
    ours is timed in NCDHW (the speedup) and in NDHWC (layout="NDHWC", the best-layout speedup).
    Correct when the error is within TOL[dtype] and at most twice cuDNN's own (NCDHW) error
    against the same float64 reference (FlashAttention's bar), or within the float32 bar.
  float32 --precision high (3xTF32): against cuDNN with TF32 off, with the float32 bar; ours at
    precision "highest" is timed too (vs highest = its time / ours).
  float32 --precision medium (TF32): against cuDNN with TF32 on; correct when the error is within
    TOL_MEDIUM and at most twice cuDNN's (or within the float32 bar: cuDNN keeps some layers
    in IEEE float32).

    PYTHONPATH=. python benchmarks/bench.py --dtype float32 [--only kb61_cube_k3,...]
    PYTHONPATH=. python benchmarks/bench.py --dtype float16      # or bfloat16
    PYTHONPATH=. python benchmarks/bench.py --precision high     # or medium (float32 only)
    PYTHONPATH=. python benchmarks/bench.py --families   # every eligible kernel family too
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
#: float32 at precision "medium" (TF32, 10 mantissa bits in the products).
TOL_MEDIUM = 5e-3
PRECISIONS = ("highest", "high", "medium")
HALF = ("float16", "bfloat16")
#: Columns of the table: (title, row key, format). Those in OPTIONAL appear only when some row
#: has the key (the half-precision and precision-mode runs); the rest are always there.
COLUMNS = (
    ("case", "case", "{}"),
    ("kernel", "family", "{}"),
    ("ours ms", "ms", "{:.3f}"),
    ("ours NDHWC ms", "ms_ndhwc", "{:.3f}"),
    ("ours highest ms", "ms_highest", "{:.3f}"),
    ("cuDNN ms", "torch_ms", "{:.3f}"),
    ("cuDNN layout", "torch_layout", "{}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("best-layout speedup", "speedup_best", "{:.2f}x"),
    ("vs highest", "vs_highest", "{:.2f}x"),
    ("TFLOP/s", "TFLOPs", "{:.1f}"),
    ("GB/s", "GBps", "{:.0f}"),
    ("floor ms", "floor_ms", "{:.3f}"),
    ("ours % of floor", "of_floor", "percent"),
    ("cuDNN % of floor", "torch_of_floor", "percent"),
    ("rel err ours", "err", "{:.1e}"),
    ("rel err cuDNN", "err_torch", "{:.1e}"),
    ("err ratio", "err_ratio", "{:.2f}"),
)
OPTIONAL = frozenset(
    {"ms_ndhwc", "ms_highest", "torch_layout", "speedup_best", "vs_highest", "err_ratio"}
)


def default_cases() -> Path:
    shared = ROOT.parent / "shared" / "bench" / "cases.json"
    return shared if shared.exists() else ROOT / "benchmarks" / "cases.json"


def resolve_precision(dtype: str, precision: str | None) -> str:
    """The float32 precision mode of a run: ``None`` means "highest"; any other dtype has none."""
    if precision is None:
        return "highest"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision={precision} is not one of {', '.join(PRECISIONS)}")
    if dtype != "float32":
        raise ValueError(
            f"--precision={precision} applies to --dtype float32 only, not --dtype {dtype}: "
            "leave --precision out"
        )
    return precision


def out_stem(dtype: str, precision: str) -> str:
    """Output file name without suffix: bench_<dtype>, or bench_float32_<precision>."""
    return f"bench_{dtype}" if precision == "highest" else f"bench_{dtype}_{precision}"


def mode_label(dtype: str, precision: str) -> str:
    """The run's dtype and, for float32 below "highest", its precision (titles and headers)."""
    if precision == "highest":
        return dtype
    return f"{dtype} precision={precision} ({'3xTF32' if precision == 'high' else 'TF32'})"


def matmul_specs(dtype: str, precision: str) -> list[tuple[str, str, bool]]:
    """The matrix products to measure, as (ceilings key, torch dtype, TF32 allowed).

    "fma_TFLOPs" is the FMA ceiling of the floor: the same dtype and precision as the
    comparison (IEEE float32 for "high", whose 3xTF32 is float32-accurate; TF32 for "medium";
    a tensor-core GEMM for float16/bfloat16). "high" also reports the TF32 rate.
    """
    if precision == "medium":
        return [("fma_TFLOPs", dtype, True)]
    specs = [("fma_TFLOPs", dtype, False)]
    if precision == "high":
        specs.append(("tf32_TFLOPs", dtype, True))
    return specs


def np_dtype(name: str) -> np.dtype:
    """NumPy dtype of a dtype name; "bfloat16" is ml_dtypes' (named only once it is imported)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def bfloat16_bits(u32: Any) -> Any:
    """bfloat16 bit patterns (uint16) of float32 bit patterns (uint32), rounded to nearest even.

    For finite values; works on NumPy and CuPy arrays alike (integer arithmetic only), so no
    bfloat16 arithmetic support is needed from CuPy.
    """
    lsb = (u32 >> np.uint32(16)) & np.uint32(1)
    return ((u32 + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)


def cast(a: Any, dtype: str) -> Any:
    """A CuPy array in ``dtype``, rounded to nearest (bfloat16 from float32 bits, see above)."""
    if dtype != "bfloat16":
        return a.astype(dtype)
    a32 = a.astype(np.float32)
    return bfloat16_bits(a32.view(np.uint32)).view(np_dtype("bfloat16"))


def nan_filled(shape: tuple[int, ...], dtype: str) -> Any:
    """A CuPy array of NaNs (bfloat16's quiet NaN written as bits)."""
    import cupy

    if dtype == "bfloat16":
        return cupy.full(shape, 0x7FC0, dtype=cupy.uint16).view(np_dtype(dtype))
    return cupy.full(shape, np.nan, dtype=dtype)


def to_torch(a: Any, torch: Any) -> Any:
    """A zero-copy torch view of a CuPy array (bfloat16 crosses DLPack as int16)."""
    if a.dtype.name == "bfloat16":
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def bitwise_equal(a: Any, b: Any) -> bool:
    """Whether two arrays hold the same bits (as unsigned integers of the same width)."""
    u = f"u{a.dtype.itemsize}"
    return bool((a.view(u) == b.view(u)).all())


def ndhwc_shape(ncdhw: tuple[int, ...]) -> tuple[int, ...]:
    """(N, C, D, H, W) -> (N, D, H, W, C)."""
    n, c, *spatial = ncdhw
    return (n, *spatial, c)


def relative_bar(dtype: str, precision: str) -> bool:
    """Whether accuracy is also judged against cuDNN's own error in the same low precision."""
    return dtype in HALF or precision == "medium"


def tolerance(dtype: str, precision: str) -> float:
    return TOL_MEDIUM if precision == "medium" else TOL[dtype]


def err_ok(err: float, err_torch: float, dtype: str, precision: str) -> bool:
    """Within the dtype's tolerance and, in low precision, at most twice cuDNN's error (both
    against the same float64 reference), or within the float32 bar. NaN is never ok.

    The float32 bar is the floor of the relative test because cuDNN computes some layers in IEEE
    float32 even with TF32 allowed (grouped ones, on the H100 of 2026-11), and an error of 1e-7
    is no fault of a result that was allowed TF32.
    """
    ok = err <= tolerance(dtype, precision)
    if relative_bar(dtype, precision):
        ok = ok and err <= max(2 * err_torch, TOL["float32"])
    return bool(ok)


def err_ratio(err: float, err_torch: float) -> float:
    """Our error over cuDNN's (0 when both are exact, inf when only cuDNN's is)."""
    if err_torch > 0:
        return err / err_torch
    return 0.0 if err == 0 else math.inf


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def time_ms(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn`` on the current CuPy stream, by CUDA events.

    torch work is timed here too: main() checks that torch's current stream is CuPy's current
    stream (both the legacy default stream unless a script changes it), so the events bracket it.
    """
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def check_same_stream(torch: Any) -> None:
    """Raise unless torch and CuPy enqueue on one stream (what time_ms relies on)."""
    import cupy

    ours, theirs = cupy.cuda.get_current_stream().ptr, torch.cuda.current_stream().cuda_stream
    if ours != theirs:
        raise RuntimeError(
            f"CuPy's current stream ({ours:#x}) is not torch's ({theirs:#x}): CuPy events would "
            "not time torch's work"
        )


def ceilings(dtype: str, precision: str, torch: Any) -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and matrix-product rates, measured here."""
    import cupy

    rng = cupy.random.default_rng(1)
    a = rng.standard_normal(2**28 // 4, dtype=np.float32)  # 256 MiB, several times the L2
    b = cupy.empty_like(a)
    copy_ms = time_ms(lambda: cupy.copyto(b, a), 3, 20)
    ceil = {"copy_GBps": 2 * a.nbytes / copy_ms / 1e6}
    n = 4096 if dtype == "float64" else 8192
    gen = torch.Generator(device="cuda").manual_seed(1)
    saved = torch.backends.cuda.matmul.allow_tf32
    for key, name, tf32 in matmul_specs(dtype, precision):
        m1 = torch.randn((n, n), dtype=getattr(torch, name), device="cuda", generator=gen)
        m2, prod = m1.T.contiguous(), torch.empty_like(m1)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            mm_ms = time_ms(lambda m1=m1, m2=m2, prod=prod: torch.matmul(m1, m2, out=prod), 2, 10)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        ceil[key] = 2 * n**3 / mm_ms / 1e9
        del m1, m2, prod
    return ceil


def rel_err(a: Any, ref: Any) -> float:
    a = a.double()
    return float((a - ref).norm() / ref.norm()) if bool(a.isfinite().all()) else float("nan")


def case_inputs(c: dict, dtype: str) -> tuple[dict, Any, Any, Any, Any]:
    """A case's keyword arguments, its inputs as CuPy arrays (random, seeded, never zeros: x, w,
    bias or None) and its ConvParams. Every benchmark script draws the same inputs: the same
    float64 draws in every dtype, rounded to nearest (bfloat16 arrays are ml_dtypes.bfloat16)."""
    import cupy

    from cupyconvt._params import ConvParams

    kw = dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"],
              groups=c["groups"], dilation=c["dilation"])  # fmt: skip
    rng = cupy.random.default_rng(0)
    x = cast(rng.standard_normal((c["N"], c["C_in"], *c["in"]), dtype=np.float64), dtype)
    w = cast(rng.standard_normal((c["C_in"], c["C_out"] // c["groups"], *c["k"])), dtype)
    b = cast(rng.standard_normal(c["C_out"]), dtype) if c["bias"] else None
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **kw)
    return kw, x, w, b, p


def chosen_family(p: Any, dtype: str, precision: str, device_id: int) -> str:
    """The kernel family the selector picks for ``p`` at ``precision``."""
    from cupyconvt import _gpu

    dev = _gpu.device_info(device_id)
    try:
        return _gpu.select(p, dtype, dev, precision=precision).family
    except TypeError:  # a library whose select() has no precision: "highest" is all it does
        if precision != "highest":
            raise
        return _gpu.select(p, dtype, dev).family


def run_case(c: dict, dtype: str, precision: str, args: argparse.Namespace, ceil: dict,
             torch: Any) -> dict:  # fmt: skip
    import cupy

    from cupyconvt import _gpu, conv_transpose3d
    from cupyconvt._select import FAMILIES, eligible

    half = dtype in HALF
    ours = {} if precision == "highest" else {"precision": precision}  # "highest": today's call
    kw, x, w, b, p = case_inputs(c, dtype)
    xt, wt = to_torch(x, torch), to_torch(w, torch)
    bt = None if b is None else to_torch(b, torch)
    f = torch.nn.functional.conv_transpose3d
    ref = f(xt.double(), wt.double(), None if bt is None else bt.double(), **kw)

    out = nan_filled(p.out_shape, dtype)
    conv_transpose3d(x, w, b, **kw, **ours, out=out)
    again = conv_transpose3d(x, w, b, **kw, **ours)
    row: dict[str, Any] = {
        "case": c["name"],
        "err": rel_err(to_torch(out, torch), ref),
        "err_torch": rel_err(f(xt, wt, bt, **kw), ref),
        "bitwise_repeatable": bitwise_equal(again, out),
    }
    del again
    if half:  # channels-last on both sides: cuDNN's channels_last_3d and our layout="NDHWC"
        xt_cl, wt_cl = (t.contiguous(memory_format=torch.channels_last_3d) for t in (xt, wt))
        row["err_torch_cl"] = rel_err(f(xt_cl, wt_cl, bt, **kw), ref)
        x_nd = cupy.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
        out_nd = nan_filled(ndhwc_shape(p.out_shape), dtype)
        conv_transpose3d(x_nd, w, b, **kw, out=out_nd, layout="NDHWC")
        row["err_ndhwc"] = rel_err(to_torch(out_nd, torch).permute(0, 4, 1, 2, 3), ref)
    errs = [row[k] for k in ("err", "err_ndhwc") if k in row]
    row["ok"] = row["bitwise_repeatable"] and all(
        err_ok(e, row["err_torch"], dtype, precision) for e in errs
    )
    if relative_bar(dtype, precision):
        row["err_ratio"] = err_ratio(row["err"], row["err_torch"])
    del ref

    reps = args.warmup, args.repeat
    row["ms"] = time_ms(lambda: conv_transpose3d(x, w, b, **kw, **ours, out=out), *reps)
    row["torch_ms"] = time_ms(lambda: f(xt, wt, bt, **kw), *reps)
    if half:
        row["ms_ndhwc"] = time_ms(
            lambda: conv_transpose3d(x_nd, w, b, **kw, out=out_nd, layout="NDHWC"), *reps
        )
        row["torch_ms_ncdhw"] = row["torch_ms"]
        row["torch_ms_cl"] = time_ms(lambda: f(xt_cl, wt_cl, bt, **kw), *reps)
        cl_wins = row["torch_ms_cl"] < row["torch_ms_ncdhw"]
        row["torch_layout"] = "channels_last_3d" if cl_wins else "NCDHW"
        row["torch_ms"] = min(row["torch_ms_ncdhw"], row["torch_ms_cl"])
    if precision == "high":
        row["ms_highest"] = time_ms(lambda: conv_transpose3d(x, w, b, **kw, out=out), *reps)
    flops = 2 * p.useful_macs
    nbytes = p.min_bytes(np_dtype(dtype).itemsize)
    row["floor_ms"] = max(flops / ceil["fma_TFLOPs"] / 1e9, nbytes / ceil["copy_GBps"] / 1e6)
    row.update(
        speedup=row["torch_ms"] / row["ms"],
        TFLOPs=flops / row["ms"] / 1e9,
        GBps=nbytes / row["ms"] / 1e6,
        of_floor=row["floor_ms"] / row["ms"],
        torch_of_floor=row["floor_ms"] / row["torch_ms"],
        family=chosen_family(p, dtype, precision, x.device.id),
    )
    if half:
        row["speedup_best"] = row["torch_ms"] / min(row["ms"], row["ms_ndhwc"])
    if precision == "high":
        row["vs_highest"] = row["ms_highest"] / row["ms"]
    if args.families:
        row["families_ms"] = {
            fam: time_ms(lambda fam=fam: _gpu.conv_transpose3d(x, w, b, p, out, fam, **ours), 2, 10)
            for fam in FAMILIES
            if eligible(p, dtype, fam, **ours) and not (fam == "direct" and p.useful_macs > 5e10)
        }
    return row


def _cell(r: dict, key: str, fmt: str) -> str:
    if key not in r:
        return "-"
    return f"{100 * r[key]:.0f}%" if fmt == "percent" else fmt.format(r[key])


def table(rows: list[dict], columns: tuple = COLUMNS, optional: frozenset = OPTIONAL) -> str:
    """Markdown table of the rows; the columns of ``optional`` only where some row has them."""
    cols = [c for c in columns if c[1] not in optional or any(c[1] in r for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k, fmt) for _, k, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The closing lines: geometric-mean speedup, correctness, and the mode's extra means."""
    lines = [f"geometric-mean speedup over cuDNN: {geomean([r['speedup'] for r in rows]):.2f}x; "
             f"all correct: {all(r['ok'] for r in rows)}"]  # fmt: skip
    if all("speedup_best" in r for r in rows):
        best = geomean([r["speedup_best"] for r in rows])
        lines.append(f"geometric-mean speedup, our faster layout over cuDNN's: {best:.2f}x")
    if all("vs_highest" in r for r in rows):
        vs = geomean([r["vs_highest"] for r in rows])
        lines.append(f"geometric-mean speedup over our precision=highest: {vs:.2f}x")
    return "\n".join(lines)


def ceiling_text(ceil: dict, dtype: str, precision: str) -> str:
    """The ceilings as the headers show them (with the TF32 rate where it was measured)."""
    kind = "tf32" if precision == "medium" else dtype
    text = f"copy {ceil['copy_GBps']:.0f} GB/s, {kind} matmul {ceil['fma_TFLOPs']:.1f} TFLOP/s"
    if "tf32_TFLOPs" in ceil:
        text += f", tf32 matmul {ceil['tf32_TFLOPs']:.1f} TFLOP/s"
    return text


def progress(r: dict) -> str:
    """One case's line while the run goes."""
    text = (f"{r['case']}: {r['ms']:.3f} ms vs cuDNN {r['torch_ms']:.3f} ms "
            f"({r['speedup']:.2f}x) err {r['err']:.1e}")  # fmt: skip
    if "ms_ndhwc" in r:
        text += f"; NDHWC {r['ms_ndhwc']:.3f} ms ({r['speedup_best']:.2f}x best)"
        text += f"; cuDNN NCDHW {r['torch_ms_ncdhw']:.3f}, channels_last_3d {r['torch_ms_cl']:.3f}"
    if "ms_highest" in r:
        text += f"; highest {r['ms_highest']:.3f} ms ({r['vs_highest']:.2f}x)"
    if "err_ratio" in r:
        text += f"; err ratio {r['err_ratio']:.2f}"
    fams = " ".join(f"{k}={v:.3f}" for k, v in r.get("families_ms", {}).items())
    return f"{text} {fams}" if fams else text


def plot(rows: list[dict], path: Path, title: str, other: str = "cuDNN") -> None:
    """Speedup over ``other`` and the fraction of the roofline floor, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    y = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    ax1.barh(y, [r["speedup"] for r in rows], color="tab:green")
    ax1.axvline(1, color="k", lw=1)
    ax1.set_xscale("log")
    ax1.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))  # 0.5x, 1x, 2x, 4x, ...
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel(f"speedup over {other} (log)")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax2.barh(y - 0.2, [100 * r["of_floor"] for r in rows], 0.4, label="cupyconvt")
    ax2.barh(y + 0.2, [100 * r["torch_of_floor"] for r in rows], 0.4, label=other)
    ax2.set_xlabel("% of roofline floor (higher is better)")
    ax2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def case_parser(doc: str, repeat: int) -> argparse.ArgumentParser:
    """The options every benchmark over the cases takes: --cases, --only, --dtype, --repeat,
    --warmup and --out; ``doc`` (the script's docstring) gives the help text."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cases", type=Path, default=default_cases())
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--dtype", default="float32", choices=sorted(TOL))
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = case_parser(__doc__, repeat=30)
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="float32 only: highest (IEEE, the default), high (3xTF32), "
                         "medium (TF32)")  # fmt: skip
    ap.add_argument("--families", action="store_true", help="also time every kernel family")
    args = ap.parse_args(argv)
    try:
        args.precision = resolve_precision(args.dtype, args.precision)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype, precision = args.dtype, args.precision

    import cupy
    import torch

    check_same_stream(torch)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = precision == "medium"  # cuDNN in the mode's precision
    torch.backends.cuda.matmul.allow_tf32 = False  # ceilings() sets it per product
    cases = json.loads(args.cases.read_text())["cases"]
    cases = [c for c in cases if not args.only or c["name"] in args.only.split(",")]
    ceil = ceilings(dtype, precision, torch)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    label = mode_label(dtype, precision)
    print(f"{name}: {ceiling_text(ceil, dtype, precision)}", flush=True)
    rows = []
    for i, c in enumerate(cases, 1):
        r = run_case(c, dtype, precision, args, ceil, torch)
        rows.append(r)
        print(f"[{i}/{len(cases)}] {progress(r)}", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {"device": name, "date": when, "dtype": dtype, "precision": precision,
            "ceilings": ceil, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "cupy": cupy.__version__, "geomean_speedup": geomean([r["speedup"] for r in rows]),
            "repeat": args.repeat}  # fmt: skip
    for key in ("speedup_best", "vs_highest"):
        if all(key in r for r in rows):
            meta[f"geomean_{key}"] = geomean([r[key] for r in rows])
    stem = out_stem(dtype, precision)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, args.out / f"{stem}.png", f"{name}, {label}, {when}")
    print(f"\n{name}, {label}, {when}; torch {torch.__version__}, cuDNN {meta['cudnn']}, "
          f"CuPy {cupy.__version__}; {ceiling_text(ceil, dtype, precision)}\n")  # fmt: skip
    print(table(rows))
    print(f"\n{summary(rows)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
