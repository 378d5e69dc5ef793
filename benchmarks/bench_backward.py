"""Benchmark the gradients of conv_transpose3d (cupyconvt._backward_gpu) against cuDNN.

For each case of a JSON file (the one benchmarks/bench.py uses) it draws x and w as bench.py does
(``case_inputs``) and a random gy, computes the three gradients with torch in float64 as the
reference (``aten.convolution_backward``, transposed), checks ours and cuDNN's in the run's dtype
against it, and checks that ours are bitwise repeatable. Then it times grad_input and grad_weight,
ours and cuDNN's (``aten.convolution_backward`` asked for that one gradient; cudnn.benchmark on,
TF32 off) with CUDA events: warm-up, then the median of --repeat runs. Prints a Markdown table
with the geometric-mean speedups and writes bench_backward_<dtype>.json.

Correct: float32/float64 within TOL[dtype] of the reference; float16/bfloat16 also at most twice
cuDNN's own error (or within the float32 bar), as in bench.py.

    PYTHONPATH=. python benchmarks/bench_backward.py --dtype float32 [--only kb61_cube_k3,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import (  # noqa: E402  (benchmarks/bench.py, beside this script)
    bitwise_equal,
    case_inputs,
    case_parser,
    cast,
    check_same_stream,
    err_ok,
    geomean,
    rel_err,
    time_ms,
    to_torch,
)

#: Columns of the table: (title, row key, format).
COLUMNS = (
    ("case", "case", "{}"),
    ("grad_input kernel", "path_in", "{}"),
    ("ours ms", "in_ms", "{:.3f}"),
    ("cuDNN ms", "in_torch_ms", "{:.3f}"),
    ("speedup", "in_speedup", "{:.2f}x"),
    ("grad_weight kernel", "path_w", "{}"),
    ("ours ms ", "w_ms", "{:.3f}"),
    ("cuDNN ms ", "w_torch_ms", "{:.3f}"),
    ("speedup ", "w_speedup", "{:.2f}x"),
    ("TFLOP/s in / w", "tflops", "{}"),
    ("rel err in / w / b", "errs", "{}"),
    ("cuDNN rel err in / w", "errs_torch", "{}"),
)


def conv_backward(torch: Any, gy: Any, x: Any, w: Any, kw: dict, mask: list[bool]) -> tuple:
    """torch's gradients of conv_transpose3d (cuDNN on CUDA tensors) for the ``mask``ed inputs
    (x, w, bias)."""
    bias_sizes = [gy.shape[1]] if mask[2] else None
    return torch.ops.aten.convolution_backward(
        gy, x, w, bias_sizes, list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]),
        True, list(kw["output_padding"]), kw["groups"], mask,
    )  # fmt: skip


def describe_plans(p: Any, dtype: str, device_id: int) -> tuple[str, str]:
    """The grad_input path and tile, and the grad_weight tile and splits, that run ``p``."""
    from cupyconvt import _backward_gpu as bwd

    max_smem, sm_count = bwd.device_limits(device_id)
    pi = bwd.input_plan(p, dtype, None, None, max_smem, bwd.TAP_INNER, sm_count)
    if pi.path == "narrow":
        path_in = f"narrow CI={pi.variant[0]} VX={pi.variant[1]}"
    elif pi.path == "staged":
        ci, vh, vw = pi.variant
        path_in = f"staged CI={ci} {8 * vh}x{32 * vw}"
    else:
        path_in = f"igemm {pi.tile.BM}x{pi.tile.BN}x{pi.tile.BK}"
    pw = bwd.weight_plan(p, dtype)
    t = pw.tile
    return path_in, f"{t.BM}x{t.BN}x{t.BK} ks{t.KS}, {pw.splits} splits"


def variant_times(x: Any, w: Any, gy: Any, p: Any, dtype: str) -> dict[str, float]:
    """Milliseconds of every grad_input path and tile, and of every grad_weight tile (with the
    splits the planner gives it), for tuning the choices (--variants). The launches alone: no
    result allocation, no argument checks."""
    import cupy

    from cupyconvt import _backward_gpu as bwd

    gx = cupy.empty(p.x_shape5, dtype=gy.dtype)
    gw = cupy.empty(w.shape, dtype=gy.dtype)
    plans: dict[str, Any] = {}
    if bwd.GradInputPlan.narrow_eligible(p, dtype):
        plans["in narrow"] = bwd.input_plan(p, dtype, "narrow")
    for v in bwd.STAGED_VARIANTS:
        fits = bwd.GradInputPlan.staged_eligible(p, dtype, variant=v)
        if v[0] == bwd.narrow_variant(p)[0] and fits:
            plans[f"in staged {v}"] = bwd.input_plan(p, dtype, "staged", variant=v)
    for t in bwd.data_tiles(dtype):
        plans[f"in {t.BM}x{t.BN}x{t.BK}"] = bwd.input_plan(p, dtype, "igemm", t)
    times = {
        k: time_ms(lambda plan=plan: plan.launch(gy, w, gx), 2, 5) for k, plan in plans.items()
    }
    for t in bwd.weight_tiles(dtype):
        plan = bwd.weight_plan(p, dtype, t)
        key = f"w {t.BM}x{t.BN}x{t.BK}ks{t.KS}/{plan.splits}"
        times[key] = time_ms(lambda plan=plan: plan.launch(x, gy, gw), 2, 5)
    return times


def run_case(c: dict, dtype: str, args: argparse.Namespace, torch: Any) -> dict:
    import cupy

    from cupyconvt import _backward_gpu as bwd

    kw, x, w, _, p = case_inputs(c, dtype)
    rng = cupy.random.default_rng(1)
    gy = cast(rng.standard_normal(p.out_shape5, dtype="float64"), dtype)
    xt, wt, gyt = to_torch(x, torch), to_torch(w, torch), to_torch(gy, torch)
    ref = conv_backward(torch, gyt.double(), xt.double(), wt.double(), kw, [True, True, True])

    gx, gw, gb = bwd.grad_input(gy, w, p), bwd.grad_weight(x, gy, p), bwd.grad_bias(gy, p)
    errs = [rel_err(to_torch(a, torch), r) for a, r in zip((gx, gw, gb), ref, strict=True)]
    theirs = conv_backward(torch, gyt, xt, wt, kw, [True, True, True])
    errs_torch = [rel_err(a, r) for a, r in zip(theirs, ref, strict=True)]
    repeatable = all(
        bitwise_equal(a, b)
        for a, b in ((gx, bwd.grad_input(gy, w, p)), (gw, bwd.grad_weight(x, gy, p)),
                     (gb, bwd.grad_bias(gy, p)))
    )  # fmt: skip
    ok = repeatable and all(
        err_ok(e, et, dtype, "highest") for e, et in zip(errs, errs_torch, strict=True)
    )
    del ref, theirs, gx, gw, gb
    path_in, path_w = describe_plans(p, dtype, x.device.id)

    reps = args.warmup, args.repeat
    row: dict[str, Any] = {"case": c["name"], "path_in": path_in, "path_w": path_w}
    row["in_ms"] = time_ms(lambda: bwd.grad_input(gy, w, p), *reps)
    row["w_ms"] = time_ms(lambda: bwd.grad_weight(x, gy, p), *reps)
    row["in_torch_ms"] = time_ms(
        lambda: conv_backward(torch, gyt, xt, wt, kw, [True, False, False]), *reps
    )
    row["w_torch_ms"] = time_ms(
        lambda: conv_backward(torch, gyt, xt, wt, kw, [False, True, False]), *reps
    )
    flops = 2 * p.useful_macs
    row.update(
        in_speedup=row["in_torch_ms"] / row["in_ms"],
        w_speedup=row["w_torch_ms"] / row["w_ms"],
        in_TFLOPs=flops / row["in_ms"] / 1e9,
        w_TFLOPs=flops / row["w_ms"] / 1e9,
        err_in=errs[0], err_w=errs[1], err_b=errs[2],
        err_torch_in=errs_torch[0], err_torch_w=errs_torch[1], err_torch_b=errs_torch[2],
        bitwise_repeatable=repeatable, ok=ok,
    )  # fmt: skip
    if args.variants:
        row["variants_ms"] = variant_times(x, w, gy, p, dtype)
    row["tflops"] = f"{row['in_TFLOPs']:.1f} / {row['w_TFLOPs']:.1f}"
    row["errs"] = " / ".join(f"{e:.1e}" for e in errs)
    row["errs_torch"] = " / ".join(f"{e:.1e}" for e in errs_torch[:2])
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(t.strip() for t, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(f.format(r[k]) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict[str, float]:
    """Geometric-mean speedups over cuDNN: grad_input, grad_weight, and the two together."""
    both = [(r["in_torch_ms"] + r["w_torch_ms"]) / (r["in_ms"] + r["w_ms"]) for r in rows]
    return {
        "geomean_speedup_input": geomean([r["in_speedup"] for r in rows]),
        "geomean_speedup_weight": geomean([r["w_speedup"] for r in rows]),
        "geomean_speedup_both": geomean(both),
        "min_speedup": min(min(r["in_speedup"], r["w_speedup"]) for r in rows),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = case_parser(__doc__, repeat=20)
    ap.add_argument("--variants", action="store_true", help="also time every path and tile")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cupy
    import torch

    check_same_stream(torch)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = json.loads(args.cases.read_text())["cases"]
    cases = [c for c in cases if not args.only or c["name"] in args.only.split(",")]
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    rows = []
    for i, c in enumerate(cases, 1):
        r = run_case(c, args.dtype, args, torch)
        rows.append(r)
        print(f"[{i}/{len(cases)}] {r['case']}: grad_input {r['in_ms']:.3f} ms vs cuDNN "
              f"{r['in_torch_ms']:.3f} ({r['in_speedup']:.2f}x); grad_weight {r['w_ms']:.3f} ms "
              f"vs cuDNN {r['w_torch_ms']:.3f} ({r['w_speedup']:.2f}x); errs {r['errs']}; "
              f"ok {r['ok']}", flush=True)  # fmt: skip
        if "variants_ms" in r:
            print(
                "    " + ", ".join(f"{k} {v:.3f}" for k, v in r["variants_ms"].items()), flush=True
            )
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    means = summary(rows)
    meta = {"device": name, "date": when, "dtype": args.dtype, "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "cupy": cupy.__version__,
            "repeat": args.repeat, **means}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_backward_{args.dtype}.json"
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\n{name}, {args.dtype}, {when}; torch {torch.__version__}, cuDNN {meta['cudnn']}, "
          f"CuPy {cupy.__version__}\n")  # fmt: skip
    print(table(rows))
    print(f"\ngeometric-mean speedup over cuDNN: grad_input {means['geomean_speedup_input']:.2f}x, "
          f"grad_weight {means['geomean_speedup_weight']:.2f}x, both "
          f"{means['geomean_speedup_both']:.2f}x; slowest {means['min_speedup']:.2f}x; "
          f"all correct: {all(r['ok'] for r in rows)}")  # fmt: skip
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
