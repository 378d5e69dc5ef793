"""2x trilinear upsampling of a volume too big for memory: Zarr in, Zarr out, block by block.

The volume is read from a Zarr array ``(C, D, H, W)`` (or ``(D, H, W)``) one chunk at a time,
upsampled 2x by the trilinear transposed convolution of ``upsample_volume.py`` (depthwise,
stride 2, kernel 4, padding 1, clamp-to-edge borders) with ``cupyconvt.dask``, and written to a
Zarr array with ``dask.array.to_zarr``. Neither the volume nor the result is ever whole in host
or device memory: each task holds one input block plus a one-voxel halo and its output block.
Without an input path, a synthetic microscopy-like volume (nuclei as Gaussian blobs, a smooth
background, noise) is written to a temporary Zarr store first, also block by block.

    python examples/big_volume.py [INPUT.zarr] [--size 128] [--chunk 64] [--channels 2]
                                  [--output upsampled.zarr] [--gpu | --cluster] [--check]

``--gpu`` runs the blocks on the GPU (CuPy chunks) and reports the peak device memory;
``--cluster`` spreads them over every GPU of the machine with ``dask_cuda.LocalCUDACluster``.
``--check`` compares a few random output blocks (or all of a small volume) with an unchunked
``cupyconvt.conv_transpose3d`` of just that region.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cupyconvt

try:
    import dask.array as da
    from dask.callbacks import Callback
    from dask.diagnostics import ProgressBar

    import cupyconvt.dask as ctd
except ImportError:
    sys.exit("this example needs dask and zarr: pip install '.[dask]'")

from upsample_volume import trilinear_weight  # the same kernel, from the sibling example

#: Up to this many voxels the check compares the whole result, beyond it --check-blocks regions.
WHOLE_CHECK_VOXELS = 64**3


def synthetic_block(block_info=None, *, shape, seed) -> np.ndarray:
    """One block of the synthetic volume: channel 0 nuclei (Gaussian blobs), channel 1 a smooth
    random field, further channels blobs of other sizes; all with a little noise.

    Every block is computed from its own coordinates and the seed alone, so blocks can be made
    in any order and the volume never exists whole.
    """
    loc = block_info[None]["array-location"]
    c0, c1 = loc[0]
    grid = np.meshgrid(*(np.arange(a, b, dtype=np.float32) for a, b in loc[1:]), indexing="ij")
    n = max(shape[1:])
    out = np.empty([b - a for a, b in loc], np.float32)
    for c in range(c0, c1):
        rng = np.random.default_rng([seed, c])
        if c == 1:
            field = np.zeros(grid[0].shape, np.float32)
            for _ in range(6):  # a few low-frequency plane waves
                k = rng.normal(0, 4 * np.pi / n, 3).astype(np.float32)
                field += np.cos(
                    sum(ki * g for ki, g in zip(k, grid, strict=True)) + rng.uniform(0, 6.3)
                )
            vol = 0.5 + 0.1 * field
        else:
            radius = n / 32 * (1 + c / 2)
            count = max(8, int(np.prod(shape[1:]) / (5 * radius) ** 3))
            centres = rng.uniform(0, 1, (count, 3)) * np.array(shape[1:])
            brightness = rng.uniform(0.4, 1.0, count)
            vol = np.full(grid[0].shape, 0.1, np.float32)
            lo = np.array([a for a, _ in loc[1:]]) - 4 * radius
            hi = np.array([b for _, b in loc[1:]]) + 4 * radius
            near = np.all((centres >= lo) & (centres < hi), axis=1)
            for z, bright in zip(centres[near], brightness[near], strict=True):
                d2 = sum((g - zi) ** 2 for g, zi in zip(grid, z, strict=True))
                vol += bright * np.exp(-d2 / (2 * radius**2))
        noise = np.random.default_rng([seed, c, *(a for a, _ in loc[1:])])
        out[c - c0] = vol + 0.02 * noise.standard_normal(vol.shape, dtype=np.float32)
    return out


def write_synthetic(path: str, size: int, chunk: int, channels: int, seed: int) -> None:
    shape = (channels, size, size, size)
    vol = da.map_blocks(
        synthetic_block,
        shape=shape,
        seed=seed,
        chunks=da.core.normalize_chunks((channels, chunk, chunk, chunk), shape),
        dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), np.float32),
    )
    print(f"writing a synthetic {shape} float32 volume to {path}")
    with ProgressBar():
        da.to_zarr(vol, path)


def upsample2x(x: da.Array, w) -> da.Array:
    """``(C, D, H, W) -> (C, 2D, 2H, 2W)``, trilinear with clamp-to-edge borders.

    Edge-padding by one voxel and cropping two output voxels from each side makes the border
    voxels interpolate against a copy of the edge instead of zeros (see upsample_volume.py).
    """
    padded = da.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1)), mode="edge")
    up = ctd.conv_transpose3d(padded, w, stride=2, padding=1, groups=x.shape[0])
    return up[:, 2:-2, 2:-2, 2:-2]


def reference_region(x_host: da.Array, w: np.ndarray, region: list[tuple[int, int]]) -> np.ndarray:
    """The output ``region`` (one ``(start, stop)`` per spatial axis) by one unchunked call on
    just the input it needs: edge-padded input ``[f0//2 - 1, f1//2 + 3)`` per axis (clamped to
    the padded volume) covers every tap of every output in ``[f0, f1)``."""
    n = x_host.shape[1:]
    lo = [max(0, f0 // 2 - 1) for f0, _ in region]
    hi = [min(s + 2, f1 // 2 + 3) for (_, f1), s in zip(region, n, strict=True)]
    # Padded index i holds original voxel clip(i - 1, 0, n - 1): read the original box, then
    # repeat its edge voxels where the box reaches past the volume.
    box = tuple(slice(max(a - 1, 0), min(b - 1, s)) for a, b, s in zip(lo, hi, n, strict=True))
    sub = x_host[(slice(None), *box)].compute().astype(np.float64)
    pads = [(max(0, 1 - a), max(0, b - 1 - s)) for a, b, s in zip(lo, hi, n, strict=True)]
    sub = np.pad(sub, [(0, 0), *pads], mode="edge")
    up = cupyconvt.conv_transpose3d(sub, w.astype(np.float64), stride=2, padding=1,
                                    groups=sub.shape[0])  # fmt: skip
    crop = tuple(
        slice(f0 + 2 - 2 * a, f1 + 2 - 2 * a) for (f0, f1), a in zip(region, lo, strict=True)
    )
    return up[(slice(None), *crop)]


def check(x_host: da.Array, out_path: str, w: np.ndarray, blocks: int, seed: int) -> float:
    """Max relative error of the written result against unchunked calls on a few regions."""
    y = da.from_zarr(out_path)
    if np.prod(y.shape) <= WHOLE_CHECK_VOXELS:
        regions = [[(0, s) for s in y.shape[1:]]]
    else:
        rng = np.random.default_rng(seed)
        regions = []
        for _ in range(blocks):
            # A random chunk-sized region, aligned to nothing in particular: it crosses blocks.
            size = [min(c, s) for c, s in zip(y.chunksize[1:], y.shape[1:], strict=True)]
            start = [
                int(rng.integers(0, s - c + 1)) for c, s in zip(size, y.shape[1:], strict=True)
            ]
            regions.append([(a, a + c) for a, c in zip(start, size, strict=True)])
    err = 0.0
    for region in regions:
        ref = reference_region(x_host, w, region)
        got = np.asarray(y[(slice(None), *(slice(a, b) for a, b in region))])
        err = max(err, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
    print(f"checked {len(regions)} region(s) of {y.shape} against unchunked calls: "
          f"max relative error {err:.2e}")  # fmt: skip
    return err


class DevicePeak(Callback):
    """Samples the CuPy memory pool after every task: peak bytes in use and held."""

    def __init__(self):
        import cupy

        super().__init__()
        self.pool = cupy.get_default_memory_pool()
        self.used = self.held = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.used = max(self.used, self.pool.used_bytes())
        self.held = max(self.held, self.pool.total_bytes())


def run_cluster(store) -> None:
    """Compute ``store`` on a LocalCUDACluster: one worker process per GPU."""
    try:
        from dask_cuda import LocalCUDACluster
        from distributed import Client, progress
    except ImportError:
        sys.exit("--cluster needs dask_cuda (pip install dask-cuda)")
    with LocalCUDACluster() as cluster, Client(cluster) as client:
        print(f"cluster: {len(client.scheduler_info()['workers'])} GPU worker(s)")
        future = client.compute(store)
        progress(future)
        future.result()

        def pool_bytes():
            import cupy

            return cupy.get_default_memory_pool().total_bytes()

        for worker, held in client.run(pool_bytes).items():
            print(f"  {worker}: CuPy pool holds {held / 2**20:.0f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", nargs="?", help="Zarr array (C, D, H, W) or (D, H, W); default: "
                    "a synthetic volume in a temporary store")  # fmt: skip
    ap.add_argument("--component", help="array inside the Zarr group (e.g. 0 for OME-Zarr)")
    ap.add_argument("--output", default="upsampled.zarr", help="Zarr array to write")
    ap.add_argument("--size", type=int, default=128, help="synthetic volume side")
    ap.add_argument("--chunk", type=int, default=64, help="block side (input voxels)")
    ap.add_argument("--channels", type=int, default=2, help="synthetic volume channels")
    ap.add_argument("--gpu", action="store_true", help="CuPy chunks on the current GPU")
    ap.add_argument("--cluster", action="store_true", help="every GPU, via dask_cuda")
    ap.add_argument("--check", action="store_true", help="verify against unchunked calls")
    ap.add_argument("--check-blocks", type=int, default=3, help="regions --check compares")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = None
    src = args.input
    if src is None:
        tmp = tempfile.mkdtemp(prefix="big_volume_")
        src = str(Path(tmp) / "volume.zarr")
        write_synthetic(src, args.size, args.chunk, args.channels, args.seed)
    try:
        x = da.from_zarr(src, component=args.component)
        if x.ndim == 3:
            x = x[None]
        x = x.rechunk((x.shape[0], args.chunk, args.chunk, args.chunk))
        c = x.shape[0]
        w = trilinear_weight(c).astype(x.dtype)
        x_host, w_run = x, w
        use_gpu = args.gpu or args.cluster
        if use_gpu:
            import cupy

            x = x.map_blocks(cupy.asarray)
            # Locally, w goes to the GPU once. A cluster gets it as NumPy (tiny: 64 weights a
            # channel) and each task copies it to its own GPU.
            if not args.cluster:
                w_run = cupy.asarray(w)
        y = upsample2x(x, w_run)
        if use_gpu:
            y = y.map_blocks(cupy.asnumpy)
        y = y.rechunk((c, 2 * args.chunk, 2 * args.chunk, 2 * args.chunk))
        shutil.rmtree(args.output, ignore_errors=True)
        store = da.to_zarr(y, args.output, compute=False)
        where = "every GPU (dask_cuda)" if args.cluster else "GPU" if args.gpu else "CPU"
        print(f"upsampling {x.shape} in blocks of {x.chunksize} -> {y.shape} on {where}")

        t0 = time.perf_counter()
        if args.cluster:
            run_cluster(store)
        elif args.gpu:
            with ProgressBar(), DevicePeak() as peak:
                store.compute()
        else:
            with ProgressBar():
                store.compute()
        seconds = time.perf_counter() - t0
        voxels = int(np.prod(y.shape))
        print(f"wrote {args.output}: {voxels / 1e6:.1f} M output voxels in {seconds:.2f} s, "
              f"{voxels / seconds / 1e6:.1f} M voxels/s (read, compute and write)")  # fmt: skip
        if args.gpu and not args.cluster:
            print(f"peak device memory: {peak.used / 2**20:.1f} MiB in use, "
                  f"{peak.held / 2**20:.1f} MiB held by the CuPy pool")  # fmt: skip
        if args.check:
            err = check(x_host, args.output, w, args.check_blocks, args.seed)
            if err > 1e-5:
                print("MISMATCH")
                return 1
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
