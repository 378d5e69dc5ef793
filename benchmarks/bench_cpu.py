"""Benchmark the CPU backend (NumPy arrays) against PyTorch's CPU conv_transpose3d, in one process.

For each case of a JSON file (default: the GPU benchmark's, ../shared/bench/cases.json or the copy
in benchmarks/cases.json), at batch size --batch (default 1, so that the GPU-sized cases take
seconds rather than minutes on a few cores), it checks both results against PyTorch's float64
result on the same inputs, then times both with time.perf_counter (warm-up, then the median of
--repeat runs). Beside each time it puts the roofline floor, max(FLOPs / matmul rate, bytes / copy
bandwidth), both measured in this run with NumPy (np.matmul of two 2048 x 2048 matrices in the
accumulation dtype, np.copyto of 256 MiB). Prints a Markdown table, writes bench_cpu_<dtype>.json
and .png.

float16 and bfloat16 are accumulated in float32 by both libraries' CPU paths; where PyTorch has
no CPU kernel for a dtype, its columns are left out.

    PYTHONPATH=. python benchmarks/bench_cpu.py [--dtype float64] [--only trilinear_x2_depthwise]
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import TOL, case_parser, geomean, np_dtype, plot, table  # noqa: E402  (bench.py)

#: (title, row key, format), as bench.COLUMNS; the "torch" ones only where PyTorch ran.
COLUMNS = (
    ("case", "case", "{}"),
    ("N", "N", "{}"),
    ("ours ms", "ms", "{:.1f}"),
    ("torch ms", "torch_ms", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("GFLOP/s", "GFLOPs", "{:.1f}"),
    ("GB/s", "GBps", "{:.2f}"),
    ("floor ms", "floor_ms", "{:.1f}"),
    ("ours % of floor", "of_floor", "percent"),
    ("torch % of floor", "torch_of_floor", "percent"),
    ("rel err ours", "err", "{:.1e}"),
    ("rel err torch", "err_torch", "{:.1e}"),
)
TORCH_COLUMNS = frozenset({"torch_ms", "speedup", "torch_of_floor", "err_torch"})


def time_ms(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    """Median wall-clock milliseconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(times))


def ceilings(dtype: str) -> dict[str, float]:
    """NumPy's copy bandwidth (bytes read + written) and matrix-product rate, measured here."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal(2**28 // 4, dtype=np.float32)  # 256 MiB, far more than the caches
    b = np.empty_like(a)
    copy_ms = time_ms(lambda: np.copyto(b, a), 1, 5)
    acc = np.float64 if dtype == "float64" else np.float32  # both CPU paths accumulate so
    n = 2048
    m1 = rng.standard_normal((n, n)).astype(acc)
    m2, prod = m1.T.copy(), np.empty_like(m1)
    mm_ms = time_ms(lambda: np.matmul(m1, m2, out=prod), 1, 5)
    return {"copy_GBps": 2 * a.nbytes / copy_ms / 1e6, "fma_GFLOPs": 2 * n**3 / mm_ms / 1e6}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    a = a.astype(np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref)) if np.isfinite(a).all() else np.nan


def run_case(c: dict, dtype: str, args: Any, ceil: dict, torch: Any) -> dict:
    import cupyconvt
    from cupyconvt._params import ConvParams

    kw = dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"],
              groups=c["groups"], dilation=c["dilation"])  # fmt: skip
    n = c["N"] if args.batch == 0 else args.batch
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((n, c["C_in"], *c["in"]))
    w64 = rng.standard_normal((c["C_in"], c["C_out"] // c["groups"], *c["k"]))
    b64 = rng.standard_normal(c["C_out"]) if c["bias"] else None
    dt_ = np_dtype(dtype)
    x, w = x64.astype(dt_), w64.astype(dt_)
    b = None if b64 is None else b64.astype(dt_)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **kw)

    def as_torch(a: np.ndarray | None, to: Any) -> Any:
        # through float64: torch takes no ml_dtypes.bfloat16 array (the values are exact in both)
        return None if a is None else torch.from_numpy(a.astype(np.float64)).to(to)

    ref = torch.nn.functional.conv_transpose3d(
        as_torch(x, torch.float64), as_torch(w, torch.float64), as_torch(b, torch.float64), **kw
    ).numpy()  # the reference: float64 on the inputs as rounded to dtype
    ours = cupyconvt.conv_transpose3d(x, w, b, **kw)
    r: dict[str, Any] = {"case": c["name"], "N": n, "err": rel_err(ours, ref)}
    r["ok"] = bool(r["err"] <= TOL[dtype])
    r["ms"] = time_ms(lambda: cupyconvt.conv_transpose3d(x, w, b, **kw), args.warmup, args.repeat)
    flops, nbytes = 2 * p.useful_macs, p.min_bytes(dt_.itemsize)
    r["GFLOPs"], r["GBps"] = flops / r["ms"] / 1e6, nbytes / r["ms"] / 1e6
    r["floor_ms"] = max(flops / ceil["fma_GFLOPs"] / 1e6, nbytes / ceil["copy_GBps"] / 1e6)
    r["of_floor"] = r["floor_ms"] / r["ms"]
    tdt = getattr(torch, dtype)
    tx, tw, tb = as_torch(x, tdt), as_torch(w, tdt), as_torch(b, tdt)
    try:
        theirs = torch.nn.functional.conv_transpose3d(tx, tw, tb, **kw)
    except RuntimeError as e:  # e.g. no CPU kernel for this dtype in this torch
        r["torch_error"] = str(e).splitlines()[0]
        return r
    r["err_torch"] = rel_err(theirs.double().numpy(), ref)
    r["torch_ms"] = time_ms(
        lambda: torch.nn.functional.conv_transpose3d(tx, tw, tb, **kw), args.warmup, args.repeat
    )
    r["speedup"] = r["torch_ms"] / r["ms"]
    r["torch_of_floor"] = r["floor_ms"] / r["torch_ms"]
    return r


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = case_parser(__doc__, repeat=5)
    ap.set_defaults(warmup=1)
    ap.add_argument("--batch", type=int, default=1, help="batch size of every case (0: the file's)")
    args = ap.parse_args(argv)
    import torch

    cases = json.loads(args.cases.read_text())["cases"]
    cases = [c for c in cases if not args.only or c["name"] in args.only.split(",")]
    ceil = ceilings(args.dtype)
    name = f"{cpu_name()}, {os.cpu_count()} logical cores"
    print(f"{name}: copy {ceil['copy_GBps']:.1f} GB/s, {args.dtype} matmul "
          f"{ceil['fma_GFLOPs']:.0f} GFLOP/s; torch {torch.__version__} on "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    rows = []
    for i, c in enumerate(cases, 1):
        r = run_case(c, args.dtype, args, ceil, torch)
        rows.append(r)
        vs = (f"torch {r['torch_ms']:.1f} ms ({r['speedup']:.2f}x)" if "torch_ms" in r
              else f"torch: {r['torch_error']}")  # fmt: skip
        print(f"[{i}/{len(cases)}] {r['case']}: {r['ms']:.1f} ms, {vs}, err {r['err']:.1e}",
              flush=True)  # fmt: skip
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    timed = [r for r in rows if "speedup" in r]
    speedup = geomean([r["speedup"] for r in timed]) if timed else None
    meta = {"device": name, "date": when, "dtype": args.dtype, "ceilings": ceil,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__, "repeat": args.repeat, "geomean_speedup": speedup}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_cpu_{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    if timed:
        plot(timed, args.out / f"{stem}.png", f"{name}, {args.dtype}, {when}", other="torch CPU")
    print(f"\n{name}, {args.dtype}, {when}; torch {torch.__version__}, NumPy {np.__version__}\n")
    print(table(rows, COLUMNS, TORCH_COLUMNS))
    if timed:
        print(f"\ngeometric-mean speedup over torch CPU: {meta['geomean_speedup']:.2f}x")
    print(f"all correct: {all(r['ok'] for r in rows)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
