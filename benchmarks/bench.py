"""Benchmark cupyconvt.conv_transpose3d against torch (cuDNN) on one GPU, with measured ceilings.

The copy bandwidth and the FMA peak of the dtype are measured first, in the same run on the same
GPU; each case is then checked against a float64 reference and timed with CUDA events. float32 is
IEEE float32 on both sides: this script sets CUPY_TF32=0 before CuPy is imported and turns torch's
TF32 switches off, so the float32 peak is the non-TF32 (FP32 FMA) one.

    python benchmarks/bench.py --dtype float16 --only kb61_cube_k3,tiny_latency
    python -m benchmarks.bench --dry-run
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CUPY_PREIMPORTED = "cupy" in sys.modules  # then CUPY_TF32 below comes too late: warn
os.environ["CUPY_TF32"] = "0"  # before CuPy is imported: the float32 matmul peak without TF32

if __package__ in (None, ""):  # run as a script: make `import cupyconvt` work without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupyconvt  # noqa: E402
from cupyconvt import ConvParams  # noqa: E402

try:  # --help and --dry-run work without CuPy and torch
    import cupy
except ImportError:
    cupy = None
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None

DTYPES = ("float32", "float64", "float16", "bfloat16")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # as tests/oracle.py
HALF = ("float16", "bfloat16")
SEED = 1234  # case i uses SEED + i
COPY_BYTES = 1 << 30  # 1 GiB: far beyond L2 (50 MB on H100), so the copy runs at HBM bandwidth
GEMM_N = 8192  # 8192^3 matmul: >= ~1 ms even in fp16, long enough to reach cuBLAS's peak
CEILING_REPEAT = 20  # the ceilings are long, steady kernels: fewer timed runs suffice
ROTATE_BELOW_BYTES = 100e6  # inputs under ~2x H100's L2 are rotated between copies ...
ROTATE_COPIES = 3  # ... this many, so a timed call does not find its inputs in L2


HERE = Path(__file__).resolve().parent
SHARED_CASES = HERE.parents[1] / "shared/bench/cases.json"  # ../shared next to the checkout
DEFAULT_CASES = SHARED_CASES if SHARED_CASES.exists() else HERE / "cases.json"


@dataclass(frozen=True)
class Case:
    """One benchmark problem, as cases.json describes it."""

    name: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    kwargs: dict[str, Any]  # stride, padding, output_padding, groups, dilation

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Case:
        kw: dict[str, Any] = {k: tuple(d[k]) for k in ("stride", "padding", "output_padding")}
        kw |= {"groups": int(d["groups"]), "dilation": tuple(d["dilation"])}
        w_shape = (d["C_in"], d["C_out"] // d["groups"], *d["k"])
        bias = (d["C_out"],) if d["bias"] else None
        return cls(d["name"], (d["N"], d["C_in"], *d["in"]), w_shape, bias, kw)

    @property
    def params(self) -> ConvParams:
        return ConvParams.from_args(self.x_shape, self.w_shape, self.bias_shape, **self.kwargs)


def load_cases(path: Path, only: str | None) -> list[Case]:
    """Read cases.json; keep only the names in ``only`` (comma-separated) if given."""
    cases = [Case.from_json(d) for d in json.loads(path.read_text())["cases"]]
    if not only:
        return cases
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    if unknown := wanted - {c.name for c in cases}:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    return [c for c in cases if c.name in wanted]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="cases JSON file")
    p.add_argument("--only", metavar="NAME[,NAME...]", help="run only these cases")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--repeat", type=int, default=50, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="for bench_<dtype>.json/png")
    p.add_argument("--no-torch", action="store_true", help="skip the torch timing comparison")
    p.add_argument("--dry-run", action="store_true", help="list the cases; touch no GPU")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    return args


def dry_run(cases: list[Case], dtype: str) -> None:
    """Print each case's useful GFLOP and minimum traffic (MB) without touching a GPU."""
    print(f"{'case':<24} {'output shape':<24} {'useful GFLOP':>12} {f'min MB ({dtype})':>18}")
    for c in cases:
        p = c.params
        gflop, mb = 2 * p.useful_macs / 1e9, p.min_bytes(ITEMSIZE[dtype]) / 1e6
        print(f"{c.name:<24} {str(p.out_shape):<24} {gflop:>12.4g} {mb:>18.4g}")


@dataclass
class Timing:
    """CUDA-event times of one function, in milliseconds."""

    median: float
    min: float
    all: list[float]


def _time_events(fn: Callable[[], Any], warmup: int, repeat: int, event: Callable[[], Any],
                 elapsed: Callable[[Any, Any], float]) -> Timing:  # fmt: skip
    """Warm up, then record an event pair around each call; synchronize once at the end."""
    for _ in range(warmup):
        fn()
    pairs = [(event(), event()) for _ in range(repeat)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    pairs[-1][1].synchronize()
    times = [elapsed(start, end) for start, end in pairs]
    return Timing(statistics.median(times), min(times), times)


def time_ms(fn: Callable[[], Any], warmup: int, repeat: int) -> Timing:
    """Time ``fn`` with ``cupy.cuda.Event`` pairs on CuPy's current stream."""
    return _time_events(fn, warmup, repeat, cupy.cuda.Event, cupy.cuda.get_elapsed_time)


def time_torch_ms(fn: Callable[[], Any], warmup: int, repeat: int) -> Timing:
    """Time ``fn`` with ``torch.cuda.Event`` pairs on torch's current stream."""
    return _time_events(fn, warmup, repeat, lambda: torch.cuda.Event(enable_timing=True),
                        lambda start, end: start.elapsed_time(end))  # fmt: skip


def randn(rng: Any, shape: tuple[int, ...], dtype: str) -> Any:
    """Standard-normal CuPy array of ``dtype``, drawn in float32 (float64 for float64)."""
    a = rng.standard_normal(shape, dtype=cupy.float64 if dtype == "float64" else cupy.float32)
    if dtype == "bfloat16":  # CuPy 14 represents bfloat16 with ml_dtypes' NumPy dtype
        import ml_dtypes

        return a.astype(ml_dtypes.bfloat16)
    return a.astype(dtype, copy=False)


def as_torch(a: Any) -> Any:
    """A torch view of a CuPy array (None stays None; bfloat16 crosses DLPack as int16)."""
    if a is None or a.dtype.name != "bfloat16":
        return None if a is None else torch.from_dlpack(a)
    return torch.from_dlpack(a.view("int16")).view(torch.bfloat16)


def free_memory() -> None:
    """Hand cached device memory of both libraries back between cases."""
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def copy_bandwidth(rng: Any) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    a = rng.standard_normal(COPY_BYTES // 4, dtype=cupy.float32)  # 4 bytes per float32
    b = cupy.empty_like(a)
    return 2 * a.nbytes / (time_ms(lambda: cupy.copyto(b, a), 2, CEILING_REPEAT).median * 1e6)


def matmul_peak(rng: Any, dtype: str) -> tuple[float, str]:
    """TFLOP/s of a GEMM_N^3 cuBLAS matmul in ``dtype`` (2 flops per multiply-add), and how."""
    m, n = randn(rng, (GEMM_N, GEMM_N), dtype), randn(rng, (GEMM_N, GEMM_N), dtype)
    try:
        t, via = time_ms(lambda: m @ n, 2, CEILING_REPEAT), "cupy"
    except (TypeError, NotImplementedError):  # a CuPy without bfloat16 matmul: cuBLAS via torch
        mt, nt = as_torch(m), as_torch(n)
        t, via = time_torch_ms(lambda: mt @ nt, 2, CEILING_REPEAT), "torch"
    return 2 * GEMM_N**3 / (t.median * 1e9), f"{GEMM_N}^3 {dtype} matmul via {via} (cuBLAS)"


def measure_ceilings(dtype: str) -> dict[str, Any]:
    """Copy bandwidth (GB/s) and FMA peak (TFLOP/s) of ``dtype``, measured on this GPU now."""
    rng = cupy.random.default_rng(SEED)
    ceil: dict[str, Any] = {"copy_GBps": copy_bandwidth(rng), "copy_bytes": COPY_BYTES}
    ceil["fma_TFLOPs"], ceil["gemm"] = matmul_peak(rng, dtype)
    ceil["cupy_tf32"] = os.environ["CUPY_TF32"]
    free_memory()
    return ceil


def make_inputs(case: Case, dtype: str, seed: int, copies: int) -> list[tuple[Any, Any, Any]]:
    """``copies`` sets of (x, w, bias): the same values at different addresses."""
    rng = cupy.random.default_rng(seed)
    x, w = randn(rng, case.x_shape, dtype), randn(rng, case.w_shape, dtype)
    b = None if case.bias_shape is None else randn(rng, case.bias_shape, dtype)
    extra = [tuple(None if a is None else a.copy() for a in (x, w, b)) for _ in range(copies - 1)]
    return [(x, w, b), *extra]


def rel_err(a: Any, ref: Any) -> float:
    """||a - ref|| / ||ref|| of torch tensors in float64; NaN if ``a`` is not finite."""
    return float(((a.double() - ref).norm() / ref.norm()).item())


def check(case: Case, dtype: str, xwb: tuple[Any, Any, Any], with_torch: bool) -> dict[str, Any]:
    """Bitwise determinism of ours, and both results' errors vs a float64 torch reference."""
    ours = cupyconvt.conv_transpose3d(*xwb, **case.kwargs)
    again = cupyconvt.conv_transpose3d(*xwb, **case.kwargs)
    same = bool(cupy.array_equal(ours.view(cupy.uint8), again.view(cupy.uint8)))
    res: dict[str, Any] = {"deterministic": same, "rel_err_torch": None}
    del again
    if torch is None:  # no reference without torch
        return res | {"rel_err_ours": None, "within_tol": None}
    xt, wt, bt = (as_torch(a) for a in xwb)
    up = [None if t is None else t.double() for t in (xt, wt, bt)]  # float64: no copy
    ref = F.conv_transpose3d(*up, **case.kwargs)
    res["rel_err_ours"] = rel_err(as_torch(ours), ref)
    res["within_tol"] = res["rel_err_ours"] <= TOL[dtype]  # False for NaN too
    del ours, up
    if with_torch:
        theirs = ref if dtype == "float64" else F.conv_transpose3d(xt, wt, bt, **case.kwargs)
        res["rel_err_torch"] = rel_err(theirs, ref)
    return res


def _rotating(fn: Callable[..., Any], sets: list[tuple[Any, ...]]) -> Callable[[], Any]:
    """A no-argument call of ``fn`` on the next input set, round robin."""
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


def time_case(case: Case, sets: list[tuple[Any, Any, Any]], dtype: str,
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Timings of ours and of torch; half dtypes time torch in NCDHW and channels_last_3d."""
    ours = _rotating(lambda x, w, b: cupyconvt.conv_transpose3d(x, w, b, **case.kwargs), sets)
    res: dict[str, Any] = {"ours": asdict(time_ms(ours, args.warmup, args.repeat))}
    if args.no_torch:
        return res
    layouts = {"torch_ncdhw": [tuple(as_torch(a) for a in s) for s in sets]}
    if dtype in HALF:
        cl = torch.channels_last_3d
        layouts["torch_channels_last_3d"] = [
            (x.to(memory_format=cl), w.to(memory_format=cl), b)
            for x, w, b in layouts["torch_ncdhw"]
        ]
    for name, tsets in layouts.items():
        fn = _rotating(lambda x, w, b: F.conv_transpose3d(x, w, b, **case.kwargs), tsets)
        res[name] = asdict(time_torch_ms(fn, args.warmup, args.repeat))
    res["torch_best"] = min(layouts, key=lambda k: res[k]["median"])
    return res


def metrics(p: ConvParams, dtype: str, t: dict[str, Any], ceil: dict[str, Any]) -> dict[str, Any]:
    """Speedup, useful TFLOP/s, GB/s, the roofline floor and the fraction of it reached."""
    flop, nbytes = 2 * p.useful_macs, p.min_bytes(ITEMSIZE[dtype])
    floor_ms = max(flop / (ceil["fma_TFLOPs"] * 1e9), nbytes / (ceil["copy_GBps"] * 1e6))
    ours = t["ours"]["median"]
    torch_ms = t[t["torch_best"]]["median"] if "torch_best" in t else None
    return {"ours_ms": ours, "torch_ms": torch_ms,
            "speedup": None if torch_ms is None else torch_ms / ours,
            "TFLOPs": flop / (ours * 1e9), "GBps": nbytes / (ours * 1e6),
            "floor_ms": floor_ms, "frac_of_floor": floor_ms / ours,
            "torch_frac_of_floor": None if torch_ms is None else floor_ms / torch_ms,
            "useful_flop": flop, "min_bytes": nbytes}  # fmt: skip


def run_case(case: Case, index: int, args: argparse.Namespace,
             ceil: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Check, time and score one case, then free its memory."""
    p, size = case.params, ITEMSIZE[args.dtype]
    in_bytes = p.min_bytes(size) - size * math.prod(p.out_shape5)
    copies = ROTATE_COPIES if in_bytes < ROTATE_BELOW_BYTES else 1
    sets = make_inputs(case, args.dtype, SEED + index, copies)
    row: dict[str, Any] = {"case": case.name, "out_shape": p.out_shape, "input_copies": copies}
    row |= check(case, args.dtype, sets[0], not args.no_torch)
    free_memory()
    row["timings"] = time_case(case, sets, args.dtype, args)
    del sets
    free_memory()
    return row | metrics(p, args.dtype, row["timings"], ceil)


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def progress_line(i: int, n: int, r: dict[str, Any]) -> str:
    flags = "  !! REL ERR ABOVE TOLERANCE" if r["within_tol"] is False else ""
    flags += "" if r["deterministic"] else "  !! NOT BITWISE REPRODUCIBLE"
    return (f"[{i}/{n}] {r['case']:<24} ours {r['ours_ms']:.3f} ms  torch "
            f"{fmt(r['torch_ms'], '.3f')} ms  x{fmt(r['speedup'], '.2f')}  "
            f"{100 * r['frac_of_floor']:.0f}% of floor  rel err {fmt(r['rel_err_ours'], '.1e')}"
            f"{flags}")  # fmt: skip


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["case", "ours ms", "torch ms", "speedup", "TFLOP/s", "GB/s", "floor ms", "% of floor",
            "rel err ours", "rel err torch"]  # fmt: skip
    cols = [("ours_ms", ".3f"), ("torch_ms", ".3f"), ("speedup", ".2f"), ("TFLOPs", ".1f"),
            ("GBps", ".0f"), ("floor_ms", ".3f"), ("pct", ".0f"), ("rel_err_ours", ".1e"),
            ("rel_err_torch", ".1e")]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        r = r | {"pct": 100 * r["frac_of_floor"]}
        lines.append("| " + " | ".join([r["case"]] + [fmt(r[k], s) for k, s in cols]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Two horizontal bar charts: speedup over torch (log x) and % of the roofline floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 1.5 + 0.4 * len(rows)), sharey=True)
    ax1.barh(ys, [r["speedup"] or math.nan for r in rows], color="tab:green")
    if any(r["speedup"] for r in rows):
        ax1.set_xscale("log")
    ax1.axvline(1, color="k", lw=1)
    ax1.set(yticks=ys, yticklabels=[r["case"] for r in rows], xlabel="speedup (torch ms / ours ms)")
    ax1.invert_yaxis()
    h = 0.4  # bar height: two bars per case
    ax2.barh([y - h / 2 for y in ys], [100 * r["frac_of_floor"] for r in rows], h, label="ours")
    torch_pct = [100 * (r["torch_frac_of_floor"] or math.nan) for r in rows]
    ax2.barh([y + h / 2 for y in ys], torch_pct, h, label="torch")
    ax2.set(xlabel="% of roofline floor (higher is better)")
    ax2.legend(loc="lower right")
    fig.suptitle(f"conv_transpose3d, {meta['dtype']}, {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Device, date and library versions of this run."""
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    versions = {"cupyconvt": cupyconvt.__version__, "cupy": cupy.__version__,
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                "python": sys.version.split()[0]}  # fmt: skip
    if torch is not None:
        versions |= {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    return {"device": name.decode() if isinstance(name, bytes) else name, "dtype": args.dtype,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repeat": args.repeat, "warmup": args.warmup, "cases_file": str(args.cases),
            "versions": versions}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = load_cases(args.cases, args.only)
    if args.dry_run:
        dry_run(cases, args.dtype)
        return 0
    if cupy is None:
        raise SystemExit("CuPy is not installed: only --dry-run works without it")
    if CUPY_PREIMPORTED:
        print("warning: CuPy was imported before CUPY_TF32=0 was set", file=sys.stderr)
    if torch is None:
        print("torch is not installed: no torch timings, no float64 reference", flush=True)
        args.no_torch = True
    else:  # cuDNN autotuning on; TF32 off for float32/float64 (half dtypes keep the defaults)
        torch.backends.cudnn.benchmark = True
        if args.dtype not in HALF:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    meta = run_meta(args)
    print(f"{meta['device']}, {args.dtype}: measuring ceilings ...", flush=True)
    meta["ceilings"] = ceil = measure_ceilings(args.dtype)
    ceilings = f"copy {ceil['copy_GBps']:.0f} GB/s, FMA {ceil['fma_TFLOPs']:.1f} TFLOP/s"
    print(f"{ceilings} ({ceil['gemm']}, CUPY_TF32={ceil['cupy_tf32']})", flush=True)
    rows = []
    for i, case in enumerate(cases):
        rows.append(run_case(case, i, args, ceil))
        print(progress_line(i + 1, len(cases), rows[-1]), flush=True)
    logs = [math.log(r["speedup"]) for r in rows if r["speedup"]]
    meta["geomean_speedup"] = math.exp(statistics.fmean(logs)) if logs else None
    print(f"\n{markdown_table(rows)}\n")
    print(f"geomean speedup over torch: {fmt(meta['geomean_speedup'], '.2f')}")
    bad = [r for r in rows if r["within_tol"] is False or not r["deterministic"]]
    meta["flagged"] = [r["case"] for r in bad]
    if meta["flagged"]:
        print(f"FLAGGED (error above {TOL[args.dtype]:g} or not reproducible): {meta['flagged']}")
    print(f"device: {meta['device']}   date: {meta['date_utc']}   ceilings: {ceilings}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_{args.dtype}"
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
    plot(rows, meta, Path(f"{stem}.png"))
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
