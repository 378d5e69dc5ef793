"""Time implicit-GEMM tile variants (cupyconvt/_igemm.py) on benchmark shapes, each checked first
against torch's float64 conv_transpose3d on the same inputs (NaN-poisoned output).

    PYTHONPATH=. python benchmarks/igemm_variants.py --dtype float32 [--only kb61_cube_k3,...]
"""

# The lambdas in the loops are timed (called) at once, inside their iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CUPY_TF32", "0")
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import TOL, case_inputs, time_ms  # noqa: E402  (benchmarks/bench.py, beside this script)

from cupyconvt._igemm import GemmTile, IgemmPlan, igemm_module, igemm_tiles  # noqa: E402

EXTRA = {
    "float32": (
        GemmTile(256, 24, 16, 8, 6, 2, 4, 4),
        GemmTile(256, 32, 8, 8, 4, 4, 2, 8),  # the production tile before 128x32
        GemmTile(256, 16, 8, 8, 4, 4, 4, 8),  # the production tile before 256x16 k16
        GemmTile(64, 128, 8, 8, 8, 4, 3, 8),
        GemmTile(128, 128, 16, 8, 8, 2, 1, 8),
        GemmTile(128, 16, 8, 8, 4, 4, 8, 8),
        GemmTile(512, 16, 8, 16, 4, 2, 3, 8),
    ),
    "float64": (),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default="")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--tiles", default="", help="comma-separated BMxBN filters, e.g. 128x64")
    ap.add_argument("--cases", type=Path, default=Path(__file__).parent / "cases.json")
    args = ap.parse_args()
    import cupy
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    dtype = args.dtype
    extra = EXTRA.get(dtype, ())
    module = igemm_module(dtype, extra)
    tiles = igemm_tiles(dtype) + tuple(t for t in extra if t not in igemm_tiles(dtype))
    sm = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    cases = json.loads(args.cases.read_text())["cases"]
    cases = [c for c in cases if not args.only or c["name"] in args.only.split(",")]
    ok_all = True
    for c in cases:
        kw, x, w, b, p = case_inputs(c, dtype)
        xt, wt = torch.from_dlpack(x), torch.from_dlpack(w)
        bt = None if b is None else torch.from_dlpack(b)
        f = torch.nn.functional.conv_transpose3d
        ref = f(xt.double(), wt.double(), None if bt is None else bt.double(), **kw)
        rnorm = float(ref.norm())
        torch_ms = time_ms(lambda: f(xt, wt, bt, **kw), 2, args.repeat)
        flops = 2 * p.useful_macs
        picked = IgemmPlan.build(p, dtype, sm).tile
        print(f"{c['name']}: cuDNN {torch_ms:.3f} ms ({flops / torch_ms / 1e9:.1f} TFLOP/s)",
              flush=True)  # fmt: skip
        pk = IgemmPlan.build(p, dtype, sm)
        if pk.phases:
            from cupyconvt._compile import get_function
            from cupyconvt._plans import acc_dtype

            wp = cupy.empty(p.groups * pk.phases * pk.max_taps * pk.ci_pad * pk.co_pad,
                            dtype=acc_dtype(dtype))  # fmt: skip
            ext = (np.int32(pk.phases), np.int32(pk.max_taps), np.int32(pk.ci_pad),
                   np.int32(pk.co_pad))  # fmt: skip
            fn = get_function(module, module.name_expressions[0])
            pack_ms = time_ms(lambda: fn(pk.pack_grid, (256, 1, 1),
                                         (w, wp, pk.table.get(), pk.geom.get(), *ext)), 3,
                              args.repeat)  # fmt: skip
            print(f"  pack {pack_ms:.4f} ms ({wp.size} packed)", flush=True)
            del wp
        if pk.fill_grid is not None:
            fill_out = cupy.empty(p.out_shape, dtype=dtype)
            fn = get_function(module, module.name_expressions[1])
            fill_ms = time_ms(lambda: fn(pk.fill_grid, (256, 1, 1),
                                         (b, fill_out, pk.tapless.get(), pk.geom.get())), 3,
                              args.repeat)  # fmt: skip
            print(f"  tapless fill {fill_ms:.4f} ms", flush=True)
        for t in tiles:
            if args.tiles and f"{t.BM}x{t.BN}" not in args.tiles.split(","):
                continue
            plan = IgemmPlan.build(p, dtype, sm, tile=t)
            out = cupy.full(p.out_shape, np.nan, dtype=dtype)
            plan.launch(x, w, b, out, module)
            err = float((torch.from_dlpack(out).double() - ref).norm()) / rnorm
            again = cupy.full(p.out_shape, np.nan, dtype=dtype)
            plan.launch(x, w, b, again, module)
            rep = bool((again == out).all())
            good = err <= TOL[dtype] and rep
            ok_all &= good
            ms = time_ms(lambda plan=plan, out=out: plan.launch(x, w, b, out, module), 3,
                         args.repeat)  # fmt: skip
            mark = "*" if t == picked else " "
            print(f"  {mark} {t.BM}x{t.BN} k{t.BK} {t.TM}x{t.TN} st{t.STAGES} mb{t.MINB} "
                  f"ku{t.KU} thr{t.threads()} grid{plan.grid}: {ms:.3f} ms "
                  f"{flops / ms / 1e9:.1f} TFLOP/s err {err:.1e} rep {rep} "
                  f"{'OK' if good else 'FAIL'}", flush=True)  # fmt: skip
            del out, again
        del ref
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    print("all correct:", ok_all)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
