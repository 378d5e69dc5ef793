"""Time tensor-core tile variants (cupyconvt/_tc.py) on benchmark shapes, per dtype and float32
precision, each checked first against torch's float64 conv_transpose3d on the same inputs
(NaN-poisoned output), beside cuDNN in the matching mode (half precision: the faster of NCDHW and
channels_last_3d; "medium": TF32 on; "high": TF32 off).

    PYTHONPATH=. python benchmarks/tc_variants.py --modes float16,float32/high [--only kb61_cube_k3]
"""

# The lambdas in the loops are timed (called) at once, inside their iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import TOL, case_inputs, default_cases, time_ms  # noqa: E402  (beside this script)

from cupyconvt._tc import WG_TILES, TcPlan, TcTile, pick_tile, tc_tiles  # noqa: E402

#: Tiles tried beside the production ones (--extra).
EXTRA = {
    2: (TcTile(256, 64, 32, 4, 2, 3, 1, True), TcTile(128, 32, 32, 4, 1, 4, 3, True)),
    4: (TcTile(256, 64, 16, 4, 2, 3, 1, False), TcTile(128, 32, 16, 4, 1, 4, 3, False)),
}

#: Relative-norm bar per mode; half precision is also held to 2x cuDNN's own error.
MODE_TOL = {"float16": TOL["float16"], "bfloat16": TOL["bfloat16"], "float32/high": 1e-5,
            "float32/medium": 5e-3}  # fmt: skip


def cast(x: Any, dtype: str) -> Any:
    """A float32 CuPy array in ``dtype`` (bfloat16 rounded by torch, viewed through ml_dtypes)."""
    import cupy
    import torch

    if dtype != "bfloat16":
        return x.astype(dtype)
    import ml_dtypes

    t = torch.from_dlpack(x).to(torch.bfloat16).view(torch.int16)
    return cupy.from_dlpack(t).view(ml_dtypes.bfloat16)


def as_torch(a: Any) -> Any:
    import torch

    if a is None:
        return None
    if a.dtype.itemsize == 2 and a.dtype.name != "float16":  # ml_dtypes bfloat16
        import cupy

        return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def wg_candidates(p: Any) -> tuple[TcTile, ...]:
    """wgmma tiles of the narrowest width covering C_out_g (128 at most), with K chunks that pad
    C_in_g by at most a third."""
    bn = min((t.BN for t in WG_TILES if t.BN >= min(p.C_out_g, 128)), default=128)
    tiles = tuple(t for t in WG_TILES if t.BN == bn and t.KT == 1
                  and -(-p.C_in_g // t.BK) * t.BK * 3 <= 4 * p.C_in_g)  # fmt: skip
    return tiles + tuple(replace(t, MINB=3) for t in tiles if t.BM == 256)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="float16,bfloat16,float32/high,float32/medium")
    ap.add_argument("--only", default="")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument(
        "--tiles",
        default="",
        help="comma-separated tile names, e.g. 256x64k32h; 'extra': only the --extra/--wgmma tiles",
    )
    ap.add_argument("--all-tiles", action="store_true", help="every tile, not only the picked BN")
    ap.add_argument("--extra", action="store_true", help="also the EXTRA tiles")
    ap.add_argument(
        "--wgmma",
        action="store_true",
        help="also the Hopper wgmma tiles of the narrowest width >= C_out_g",
    )
    ap.add_argument("--cases", type=Path, default=default_cases())
    ap.add_argument(
        "--ncdhw-both",
        action="store_true",
        help="also time NCDHW results the other way (in place / via a workspace)",
    )
    args = ap.parse_args()
    import cupy
    import torch

    torch.backends.cudnn.benchmark = True
    sm = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    cases = json.loads(args.cases.read_text())["cases"]
    cases = [c for c in cases if not args.only or c["name"] in args.only.split(",")]
    f = torch.nn.functional.conv_transpose3d
    ok_all = True
    for c in cases:
        kw, x32, w32, b32, p = case_inputs(c, "float32")
        ref = f(*(None if a is None else torch.from_dlpack(a).double() for a in (x32, w32, b32)),
                **kw)  # fmt: skip
        rnorm = float(ref.norm())
        flops = 2 * p.useful_macs
        for mode in args.modes.split(","):
            dtype, _, precision = mode.partition("/")
            precision = precision or "highest"
            if not TcPlan.eligible(p, dtype, precision):
                print(f"{c['name']} {mode}: not eligible", flush=True)
                continue
            x, w = cast(x32, dtype), cast(w32, dtype)
            b = None if b32 is None else cast(b32, dtype)
            xt, wt, bt = as_torch(x), as_torch(w), as_torch(b)
            torch.backends.cudnn.allow_tf32 = precision == "medium"
            torch_ms = time_ms(lambda: f(xt, wt, bt, **kw), 2, args.repeat)
            t_out = f(xt, wt, bt, **kw)
            torch_err = float((t_out.double() - ref).norm()) / rnorm
            line = f"{c['name']} {mode}: cuDNN NCDHW {torch_ms:.3f} ms"
            if dtype != "float32":
                cl = torch.channels_last_3d
                xc, wc = xt.to(memory_format=cl), wt.to(memory_format=cl)
                cl_ms = time_ms(lambda: f(xc, wc, bt, **kw), 2, args.repeat)
                line += f", channels_last {cl_ms:.3f} ms"
                torch_ms = min(torch_ms, cl_ms)
            print(f"{line} ({flops / torch_ms / 1e9:.1f} TFLOP/s), err {torch_err:.1e}",
                  flush=True)  # fmt: skip
            tol = MODE_TOL[mode]
            if dtype != "float32" or precision == "medium":
                tol = min(tol, 2 * torch_err) if torch_err > 0 else tol
            picked = pick_tile(p, dtype)
            x_cl = cupy.ascontiguousarray(cupy.moveaxis(x, 1, -1))
            itemsize = 4 if dtype == "float32" else 2
            extra = EXTRA[itemsize] if args.extra else ()
            if args.wgmma and itemsize == 2:
                extra += wg_candidates(p)
            for t in tc_tiles(dtype) + extra:
                name = t.name()
                if args.tiles == "extra" and t not in extra:
                    continue
                if args.tiles not in ("", "extra") and name not in args.tiles.split(","):
                    continue
                if not args.tiles and not args.all_tiles and t.BN != picked.BN and t not in extra:
                    continue
                try:
                    plan = TcPlan.build(p, dtype, precision, sm, tile=t)
                except ValueError as e:  # a halo tile that does not fit
                    print(f"    {name}: {e}")
                    continue
                out = cupy.full(p.out_shape, np.nan, dtype=x.dtype)
                plan.launch(x, w, b, out)
                err = float((as_torch(out).double() - ref).norm()) / rnorm
                again = cupy.full(p.out_shape, np.nan, dtype=x.dtype)
                plan.launch(x, w, b, again)
                rep = bool((again.view(cupy.uint8) == out.view(cupy.uint8)).all())
                good = err <= tol and rep
                ok_all &= good
                ms = time_ms(lambda: plan.launch(x, w, b, out), 3, args.repeat)
                out_cl = cupy.empty(p.out_shape[:1] + p.out_shape[2:] + p.out_shape[1:2], x.dtype)
                ms_cl = time_ms(lambda: plan.launch(x_cl, w, b, out_cl, True), 3, args.repeat)
                mark = "*" if t == picked else " "
                box = "" if plan.box is None else f" box {plan.box.box}"
                print(f"  {mark} {name} {t.WM}x{t.WN}w st{t.STAGES} mb{t.MINB} smem {plan.smem}"
                      f"{box} grid{plan.grid}: NCDHW {ms:.3f} ms ({flops / ms / 1e9:.1f} TFLOP/s, "
                      f"{torch_ms / ms:.2f}x), NDHWC {ms_cl:.3f} ms ({torch_ms / ms_cl:.2f}x) "
                      f"err {err:.1e} rep {rep} {'OK' if good else 'FAIL'}",
                      flush=True)  # fmt: skip
                if args.ncdhw_both:
                    other = replace(plan, ncdhw_in_place=not plan.ncdhw_in_place)
                    out2 = cupy.full(p.out_shape, np.nan, dtype=x.dtype)
                    other.launch(x, w, b, out2)
                    same = bool((out2.view(cupy.uint8) == out.view(cupy.uint8)).all())
                    ok_all &= same
                    ms2 = time_ms(lambda: other.launch(x, w, b, out2), 3, args.repeat)
                    how = "in place" if other.ncdhw_in_place else "via workspace"
                    print(f"      NCDHW {how}: {ms2:.3f} ms (picked way {ms:.3f} ms), "
                          f"bitwise equal {same}", flush=True)  # fmt: skip
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
        del ref
    print("all correct:", ok_all)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
