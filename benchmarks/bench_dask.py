"""Chunked against unchunked on one GPU: the cost of going through cupyconvt.dask.

For layers on volumes that fit on the GPU (2x trilinear upsampling, depthwise k4 s2 p1, with 8
and with 4 channels; a dense k3 s2 p1 decoder layer), it times one ``cupyconvt.conv_transpose3d``
call on the whole CuPy array against ``cupyconvt.dask.conv_transpose3d`` on the same array cut into
blocks: every output block computed and kept as a block on the GPU (``.persist()``: what a
pipeline that hands blocks on, to a store say, pays), with dask's single-threaded ("sync") and
threaded schedulers, and ``.compute()`` into one CuPy array (which adds dask's concatenation of
the blocks). Every variant is timed the same way: wall clock around the call and a device
synchronization, median of --repeat runs after a warm-up. The chunked result is checked bitwise
against the unchunked one (kernel family pinned on both sides).

    PYTHONPATH=. python benchmarks/bench_dask.py [--size 256] [--chunk 128] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupyconvt.dask  # noqa: E402
from cupyconvt._api import params_for  # noqa: E402
from cupyconvt._gpu import conv_transpose3d as gpu_conv  # noqa: E402
from cupyconvt._gpu import device_info  # noqa: E402
from cupyconvt._select import select  # noqa: E402


def wall_ms(fn: Any, cupy: Any, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


#: (name, C_in, C_out, kernel side, keyword arguments, input side, block side); None: --size and
#: --chunk.
LAYERS = (
    ("trilinear_x2_depthwise C8", 8, 8, 4, dict(stride=2, padding=1, groups=8), None, None),
    ("dense k3s2 C16->8", 16, 8, 3, dict(stride=2, padding=1, output_padding=1), None, None),
    ("trilinear_x2_depthwise C4", 4, 4, 4, dict(stride=2, padding=1, groups=4), 512, 256),
)


def run_layer(layer: tuple, size: int, chunk: int, repeat: int, rng: Any) -> tuple[str, bool]:
    """One table row (Markdown) and whether the chunked result equals the unchunked bitwise."""
    import cupy
    import dask

    name, c_in, c_out, k, kw, layer_size, layer_chunk = layer
    size, chunk = layer_size or size, layer_chunk or chunk
    groups = kw.get("groups", 1)
    x = cupy.asarray(rng.standard_normal((1, c_in, size, size, size), dtype=np.float32))
    w = cupy.asarray(rng.standard_normal((c_in, c_out // groups, k, k, k), dtype=np.float32))
    p = params_for(x.shape, w.shape, None, kw.get("stride", 1), kw.get("padding", 0),
                   kw.get("output_padding", 0), groups, 1)  # fmt: skip
    family = select(p, "float32", device_info(x.data.device_id)).family
    whole = gpu_conv(x, w, None, p, family=family)
    xd = da_from_array(x, chunk)
    yd = cupyconvt.dask.conv_transpose3d(xd, w, family=family, **kw)
    chunked = yd.compute(scheduler="sync")
    same = bool((chunked.view(cupy.uint32) == whole.view(cupy.uint32)).all())
    del chunked, whole
    ms = {"whole": wall_ms(lambda: gpu_conv(x, w, None, p, family=family), cupy, 2, repeat)}
    for scheduler in ("sync", "threads"):
        with dask.config.set(scheduler=scheduler):
            ms[scheduler] = wall_ms(yd.persist, cupy, 1, repeat)
    with dask.config.set(scheduler="sync"):
        ms["array"] = wall_ms(yd.compute, cupy, 1, repeat)
    blocks = int(np.prod(xd.numblocks))
    cells = " | ".join(
        f"{ms[k]:.2f} ({ms['whole'] / ms[k]:.0%})" for k in ("sync", "threads", "array")
    )
    row = (f"| {name} | {size}^3 / {chunk}^3 | {family} | {ms['whole']:.2f} | {cells} | {blocks} "
           f"| {same} |")  # fmt: skip
    return row, same


def da_from_array(x: Any, chunk: int) -> Any:
    """``x`` as a Dask array of ``chunk``^3 blocks (views of ``x``: no copies)."""
    import dask.array as da

    return da.from_array(x, chunks=(1, x.shape[1], chunk, chunk, chunk), asarray=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256, help="input side")
    ap.add_argument("--chunk", type=int, default=128, help="block side")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    import cupy
    import dask

    rng = np.random.default_rng(0)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"{name}, float32, dask {dask.__version__}, CuPy {cupy.__version__}")
    print("| layer | input / blocks | family | unchunked ms | blocks, sync scheduler ms "
          "(throughput vs unchunked) | blocks, threaded scheduler | one array (sync) | blocks "
          "| bitwise equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    ok, skipped = True, []
    for layer in LAYERS:
        try:
            row, same = run_layer(layer, args.size, args.chunk, args.repeat, rng)
        except cupy.cuda.memory.OutOfMemoryError as e:
            # e.g. --size 512 for the 8-channel layers: the whole result, the chunked one and
            # their concatenation are 32 GiB each. Reported, and the other layers still run.
            row, same = f"| {layer[0]} | did not fit on the GPU: {e} |", True
            skipped.append(layer[0])
        print(row, flush=True)
        ok &= same
        cupy.get_default_memory_pool().free_all_blocks()
    print("all bitwise equal:", ok, f"(not run: {', '.join(skipped)})" if skipped else "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
