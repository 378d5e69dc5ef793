"""Time every eligible kernel family on the benchmark cases (a tuning aid for the selector).

Usage: python scripts/families.py [--dtype float32] [--only NAME,...]
Prints, per case, the median CUDA-event time of each family and of cuDNN, and which one the
selector picks. The benchmark proper is benchmarks/bench.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cupy
import numpy as np

from cupyconvt import _gpu
from cupyconvt._params import ConvParams
from cupyconvt._select import FAMILIES, eligible, select

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, warmup: int = 2, repeat: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    shared = ROOT.parent / "shared/bench/cases.json"
    cases = json.loads((shared if shared.exists() else ROOT / "benchmarks/cases.json").read_text())
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    dev = _gpu.device_info(0)
    rng = cupy.random.default_rng(0)
    for c in cases["cases"]:
        if not args.only or c["name"] in args.only.split(","):
            print(run_case(c, args.dtype, dev, rng, torch), flush=True)
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()


def run_case(c: dict, dtype: str, dev, rng, torch) -> str:
    kw = dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"],
              groups=c["groups"], dilation=c["dilation"])  # fmt: skip
    x = rng.standard_normal((c["N"], c["C_in"], *c["in"]), dtype=np.float64).astype(dtype)
    w = rng.standard_normal((c["C_in"], c["C_out"] // c["groups"], *c["k"])).astype(dtype)
    b = rng.standard_normal(c["C_out"]).astype(dtype) if c["bias"] else None
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **kw)
    ref = torch.nn.functional.conv_transpose3d(
        torch.from_dlpack(x).double(), torch.from_dlpack(w).double(),
        None if b is None else torch.from_dlpack(b).double(), **kw,
    )  # fmt: skip
    row = [f"{c['name']:24s} pick={select(p, dtype, dev).family:8s}"]
    for fam in FAMILIES:
        if not eligible(p, dtype, fam) or (fam == "direct" and p.useful_macs > 5e10):
            row.append(f"{fam}=  -   ")
            continue
        out = cupy.full(p.out_shape, np.nan, dtype=dtype)
        _gpu.conv_transpose3d(x, w, b, p, out, family=fam)
        got = torch.from_dlpack(out).double()
        err = float((got - ref).norm() / ref.norm())
        ms = median_ms(lambda fam=fam, out=out: _gpu.conv_transpose3d(x, w, b, p, out, fam))
        row.append(f"{fam}={ms:8.3f}ms err={err:.1e}")
    xt, wt = torch.from_dlpack(x), torch.from_dlpack(w)
    bt = None if b is None else torch.from_dlpack(b)
    f = torch.nn.functional.conv_transpose3d
    row.append(f"cudnn={median_ms(lambda: f(xt, wt, bt, **kw)):8.3f}ms")
    return "  ".join(row)


if __name__ == "__main__":
    main()
