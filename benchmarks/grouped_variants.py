"""Time the grouped kernel with a given accumulator-register budget (cells x channels a thread),
each result checked against torch in float64 first. One budget per process: the kernel module's
instantiation list is fixed at first use.

    cd benchmarks && PYTHONPATH=.. python grouped_variants.py --acc-regs 32
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from bench import TOL, case_inputs, default_cases, time_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acc-regs", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--only", default="kb72_strided_grouped,kb73_strided_grouped,big_volume_16to8,"
                    "trilinear_x2_depthwise")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)

    from cupyconvt import _grouped

    _grouped.GROUPED_ACC_REGS = args.acc_regs
    import cupy
    import torch

    from cupyconvt import _gpu

    ok = True
    for c in json.loads(default_cases().read_text())["cases"]:
        if c["name"] not in args.only.split(","):
            continue
        kw, x, w, b, p = case_inputs(c, args.dtype)
        plan = _gpu.select(p, args.dtype, _gpu.device_info(0), "grouped")
        out = cupy.full(p.out_shape, np.nan, dtype=args.dtype)
        plan.launch(x, w, b, out)
        xt, wt = torch.from_dlpack(x).double(), torch.from_dlpack(w).double()
        ref = torch.nn.functional.conv_transpose3d(
            xt, wt, None if b is None else torch.from_dlpack(b).double(), **kw
        )
        err = float((torch.from_dlpack(out).double() - ref).norm() / ref.norm())
        ok &= err <= TOL[args.dtype]
        ms = time_ms(lambda f=plan.launch, a=(x, w, b, out): f(*a), 3, args.repeat)
        print(f"acc_regs={args.acc_regs} {c['name']}: cot={plan.cot} {plan.tile} "
              f"smem={plan.shared_mem} {ms:.3f} ms err {err:.1e}", flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
