"""One launch that gathers a ``cupyconvt.dask`` input slab from the CuPy blocks it spans.

A slab (an output block's input block plus its halo) is, along each spatial axis, the
concatenation of pieces of consecutive input blocks: up to 3 x 3 x 3 boxes from 27 blocks with
the usual halos, more where blocks are smaller than the halo. Assembling it by one CuPy slice
assignment per box cost a strided elementwise copy and some 30 us of host time per box;
``kernels/slab.cu`` copies every box in one launch, from a table of the boxes' addresses and
strides (a few hundred bytes, copied to the device asynchronously by ``cupy.asarray``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_launcher
from ._tc import _BITS  # the unsigned type of each itemsize, as for the layout transposes

THREADS = 256
_MAX_BLOCKS = 1 << 20


@cache
def slab_module() -> KernelModule:
    return KernelModule("slab.cu", tuple(f"gather_slab<{t}>" for t in _BITS.values()))


def gatherable(boxes: Sequence[Any], device_id: int) -> bool:
    """Whether :func:`gather` can read every box: CuPy arrays on ``device_id`` whose rows along
    W are contiguous (any other strides)."""
    for b in boxes:
        if b.data.device_id != device_id or b.ndim != 5:
            return False
        if b.shape[4] > 1 and b.strides[4] != b.dtype.itemsize:
            return False
        if any(s % b.dtype.itemsize for s in b.strides):
            return False
    return True


def gather(
    cupy: Any,
    boxes: Sequence[Any],
    pieces: Sequence[Sequence[tuple[int, int]]],
    lens: Sequence[int],
) -> Any:
    """The C-contiguous slab ``(N, C, *lens)`` made of ``boxes``.

    ``pieces[a]`` lists, per spatial axis ``a``, each piece's ``(start in its block, length)``
    in slab order; ``boxes`` are the block arrays of the Pd x Ph x Pw boxes, row-major, each a
    5D CuPy array on the current device that :func:`gatherable` accepts. Only the part of each
    block that its pieces name is read.
    """
    first = boxes[0]
    itemsize = first.dtype.itemsize
    table: list[int] = []
    for axis_pieces in pieces:
        pos = 0
        for start, length in axis_pieces:
            table += (pos, length, start)
            pos += length
    for b in boxes:
        table.append(b.data.ptr)
        table += (s // itemsize for s in b.strides[:4])
    n, c = first.shape[:2]
    slab = cupy.empty((n, c, *lens), dtype=first.dtype)
    planes = n * c * lens[0]
    if planes * lens[1] * lens[2] == 0:
        return slab
    dev_table = cupy.asarray(np.array(table, dtype=np.int64))  # asynchronous, through pinned memory
    fn = get_launcher(slab_module(), f"gather_slab<{_BITS[itemsize]}>")
    grid = (min(planes, _MAX_BLOCKS), 1, 1)  # a block a plane (n, c, d)
    args = (slab.data.ptr, dev_table.data.ptr, n, c, *lens, *(len(p) for p in pieces))
    fn(grid, (THREADS, 1, 1), args)
    # dev_table goes back to CuPy's pool when it is dropped here; the pool hands it out again
    # only to work later on this stream, which runs after the kernel.
    return slab
