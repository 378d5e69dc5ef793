"""Benchmark cupyconvt.conv_transpose3d against PyTorch (cuDNN) on the same GPU, in one process.

For each case of a JSON file (default: ../shared/bench/cases.json beside the repo, else the copy
in benchmarks/cases.json) it checks both results against a float64 reference, then times both
with CUDA events (warm-up, then the median of --repeat runs), with cudnn.benchmark on and TF32
off. Beside each time it puts the roofline floor, max(FLOPs / FMA peak, bytes / copy bandwidth),
both ceilings measured in this run: a device-to-device copy and a cuBLAS matrix product in the
same dtype. Prints a Markdown table, writes bench_<dtype>.json and bench_<dtype>.png.

    PYTHONPATH=. python benchmarks/bench.py --dtype float32 [--only kb61_cube_k3,...]
    PYTHONPATH=. python benchmarks/bench.py --families   # every eligible kernel family too
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("CUPY_TF32", "0")  # the float32 ceiling is IEEE float32, as our kernels

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def default_cases() -> Path:
    shared = ROOT.parent / "shared" / "bench" / "cases.json"
    return shared if shared.exists() else ROOT / "benchmarks" / "cases.json"


def time_ms(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn`` on the current CuPy stream, by CUDA events."""
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


def ceilings(dtype: str) -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and matrix-product rate, measured here."""
    import cupy

    rng = cupy.random.default_rng(1)
    a = rng.standard_normal(2**28 // 4, dtype=np.float32)  # 256 MiB, several times the L2
    b = cupy.empty_like(a)
    copy_ms = time_ms(lambda: cupy.copyto(b, a), 3, 20)
    n = 4096 if dtype == "float64" else 8192
    m1 = rng.standard_normal((n, n), dtype=np.float64 if dtype == "float64" else np.float32)
    m1 = m1.astype(dtype)
    m2 = m1.T.copy()
    mm_ms = time_ms(lambda: cupy.matmul(m1, m2), 2, 10)
    return {"copy_GBps": 2 * a.nbytes / copy_ms / 1e6, "fma_TFLOPs": 2 * n**3 / mm_ms / 1e9}


def rel_err(a: Any, ref: Any) -> float:
    a = a.double()
    return float((a - ref).norm() / ref.norm()) if bool(a.isfinite().all()) else float("nan")


def case_inputs(c: dict, dtype: str) -> tuple[dict, Any, Any, Any, Any]:
    """A case's keyword arguments, its inputs as CuPy arrays (random, seeded, never zeros: x, w,
    bias or None) and its ConvParams. Every benchmark script draws the same inputs."""
    import cupy

    from cupyconvt._params import ConvParams

    kw = dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"],
              groups=c["groups"], dilation=c["dilation"])  # fmt: skip
    rng = cupy.random.default_rng(0)
    x = rng.standard_normal((c["N"], c["C_in"], *c["in"]), dtype=np.float64).astype(dtype)
    w = rng.standard_normal((c["C_in"], c["C_out"] // c["groups"], *c["k"])).astype(dtype)
    b = rng.standard_normal(c["C_out"]).astype(dtype) if c["bias"] else None
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **kw)
    return kw, x, w, b, p


def run_case(c: dict, dtype: str, args: argparse.Namespace, ceil: dict, torch: Any) -> dict:
    import cupy

    from cupyconvt import _gpu, conv_transpose3d
    from cupyconvt._select import FAMILIES, eligible

    kw, x, w, b, p = case_inputs(c, dtype)
    xt, wt = torch.from_dlpack(x), torch.from_dlpack(w)
    bt = None if b is None else torch.from_dlpack(b)
    f = torch.nn.functional.conv_transpose3d
    ref = f(xt.double(), wt.double(), None if bt is None else bt.double(), **kw)

    out = cupy.full(p.out_shape, np.nan, dtype=dtype)
    conv_transpose3d(x, w, b, **kw, out=out)
    again = conv_transpose3d(x, w, b, **kw)
    row: dict[str, Any] = {
        "case": c["name"],
        "err": rel_err(torch.from_dlpack(out), ref),
        "err_torch": rel_err(f(xt, wt, bt, **kw), ref),
        "bitwise_repeatable": bool((again == out).all()),
    }
    row["ok"] = row["err"] <= TOL[dtype] and row["bitwise_repeatable"]
    del ref
    row["ms"] = time_ms(lambda: conv_transpose3d(x, w, b, **kw, out=out), args.warmup, args.repeat)
    row["torch_ms"] = time_ms(lambda: f(xt, wt, bt, **kw), args.warmup, args.repeat)
    flops = 2 * p.useful_macs
    nbytes = p.min_bytes(np.dtype(dtype).itemsize)
    row["floor_ms"] = max(flops / ceil["fma_TFLOPs"] / 1e9, nbytes / ceil["copy_GBps"] / 1e6)
    row.update(
        speedup=row["torch_ms"] / row["ms"],
        TFLOPs=flops / row["ms"] / 1e9,
        GBps=nbytes / row["ms"] / 1e6,
        of_floor=row["floor_ms"] / row["ms"],
        torch_of_floor=row["floor_ms"] / row["torch_ms"],
        family=_gpu.select(p, dtype, _gpu.device_info(x.device.id)).family,
    )
    if args.families:
        row["families_ms"] = {
            fam: time_ms(lambda fam=fam: _gpu.conv_transpose3d(x, w, b, p, out, fam), 2, 10)
            for fam in FAMILIES
            if eligible(p, dtype, fam) and not (fam == "direct" and p.useful_macs > 5e10)
        }
    return row


def table(rows: list[dict]) -> str:
    head = ("| case | kernel | ours ms | cuDNN ms | speedup | TFLOP/s | GB/s | floor ms "
            "| ours % of floor | cuDNN % of floor | rel err ours | rel err cuDNN |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['family']} | {r['ms']:.3f} | {r['torch_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['TFLOPs']:.1f} | {r['GBps']:.0f} | {r['floor_ms']:.3f} | "
            f"{100 * r['of_floor']:.0f}% | {100 * r['torch_of_floor']:.0f}% | {r['err']:.1e} | "
            f"{r['err_torch']:.1e} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    y = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    ax1.barh(y, [r["speedup"] for r in rows], color="tab:green")
    ax1.axvline(1, color="k", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("speedup over cuDNN (log)")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax2.barh(y - 0.2, [100 * r["of_floor"] for r in rows], 0.4, label="cupyconvt")
    ax2.barh(y + 0.2, [100 * r["torch_of_floor"] for r in rows], 0.4, label="cuDNN")
    ax2.set_xlabel("% of roofline floor (higher is better)")
    ax2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path, default=default_cases())
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--dtype", default="float32", choices=sorted(TOL))
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--families", action="store_true", help="also time every kernel family")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args(argv)

    import cupy
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = json.loads(args.cases.read_text())["cases"]
    cases = [c for c in cases if not args.only or c["name"] in args.only.split(",")]
    ceil = ceilings(args.dtype)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"{name}: copy {ceil['copy_GBps']:.0f} GB/s, {args.dtype} matmul "
          f"{ceil['fma_TFLOPs']:.1f} TFLOP/s", flush=True)  # fmt: skip
    rows = []
    for i, c in enumerate(cases, 1):
        r = run_case(c, args.dtype, args, ceil, torch)
        rows.append(r)
        fams = " ".join(f"{k}={v:.3f}" for k, v in r.get("families_ms", {}).items())
        print(f"[{i}/{len(cases)}] {c['name']}: {r['ms']:.3f} ms vs cuDNN {r['torch_ms']:.3f} ms "
              f"({r['speedup']:.2f}x) err {r['err']:.1e} {fams}", flush=True)  # fmt: skip
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    geo = float(np.exp(np.mean(np.log([r["speedup"] for r in rows]))))
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {"device": name, "date": when, "dtype": args.dtype, "ceilings": ceil,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "cupy": cupy.__version__, "geomean_speedup": geo, "repeat": args.repeat}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_{args.dtype}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, args.out / f"bench_{args.dtype}.png", f"{name}, {args.dtype}, {when}")
    print(f"\n{name}, {args.dtype}, {when}; torch {torch.__version__}, cuDNN "
          f"{meta['cudnn']}, CuPy {cupy.__version__}; copy {ceil['copy_GBps']:.0f} GB/s, "
          f"matmul {ceil['fma_TFLOPs']:.1f} TFLOP/s\n")  # fmt: skip
    print(table(rows))
    print(f"\ngeometric-mean speedup over cuDNN: {geo:.2f}x; all correct: "
          f"{all(r['ok'] for r in rows)}")  # fmt: skip
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
