"""Run one benchmark case a few times, for a profiler (ncu) or for host-overhead profiling.

PYTHONPATH=. ncu -k regex:igemm python benchmarks/profile_case.py kb61_cube_k3 --iters 2
PYTHONPATH=. python benchmarks/profile_case.py tiny_latency --host     # where host time goes
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time

from bench import case_inputs, default_cases  # noqa: E402  (run as a script from benchmarks/)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--family", default=None)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--host", action="store_true", help="profile host time per call")
    args = ap.parse_args(argv)

    import cupy

    import cupyconvt
    from cupyconvt import _gpu

    c = next(c for c in json.loads(default_cases().read_text())["cases"] if c["name"] == args.case)
    kw, x, w, b, p = case_inputs(c, args.dtype)
    out = cupy.empty(p.out_shape, dtype=args.dtype)

    def call():
        if args.family is None:
            cupyconvt.conv_transpose3d(x, w, b, **kw, out=out)
        else:
            _gpu.conv_transpose3d(x, w, b, p, out, args.family)

    call()
    cupy.cuda.Device().synchronize()
    if not args.host:
        for _ in range(args.iters):
            call()
        cupy.cuda.Device().synchronize()
        return 0
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    cupy.cuda.Device().synchronize()
    print(f"{args.case}: {1e6 * (time.perf_counter() - t0) / n:.1f} us per call (host loop)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    cupy.cuda.Device().synchronize()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
