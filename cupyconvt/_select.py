"""The one place that decides which kernel, with which launch configuration, runs a problem.

Every kernel the runtime can launch is listed by :func:`all_modules`; the NVRTC compile test
builds exactly that list, so a kernel that CI has not compiled cannot be selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ._compile import KernelModule, get_function
from ._params import ConvParams

#: C++ storage type of each supported dtype (kernels/common.cuh).
CPP_TYPE = {
    "float16": "cct::half_t",
    "bfloat16": "cct::bf16_t",
    "float32": "float",
    "float64": "double",
}

DIRECT = KernelModule(
    "direct.cu",
    tuple(f"conv_transpose3d_direct<{t}>" for t in CPP_TYPE.values()),
)


def all_modules() -> list[KernelModule]:
    """Every kernel module the runtime may compile (what the CI compile test builds)."""
    return [DIRECT]


@dataclass(frozen=True)
class DeviceInfo:
    """The properties of a GPU that selection depends on."""

    id: int
    name: str
    compute_capability: int  # major * 10 + minor
    sm_count: int
    max_shared_per_block_optin: int


@dataclass(frozen=True)
class Plan:
    """A chosen kernel and its launch configuration for one problem on one device."""

    module: KernelModule
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0

    def launch(self, args: tuple[Any, ...]) -> None:
        """Launch on the current CuPy stream and device."""
        fn = get_function(self.module, self.name)
        fn(self.grid, self.block, args, shared_mem=self.shared_mem)


#: Direct kernel: threads per block, and resident blocks per SM that the grid-stride loop fills.
_DIRECT_THREADS = 256
_DIRECT_BLOCKS_PER_SM = 8


def _direct_plan(p: ConvParams, dtype: str, dev: DeviceInfo) -> Plan:
    total = p.N * p.C_out * p.out_size[0] * p.out_size[1] * p.out_size[2]
    blocks = min(-(-total // _DIRECT_THREADS), dev.sm_count * _DIRECT_BLOCKS_PER_SM)
    return Plan(
        module=DIRECT,
        name=f"conv_transpose3d_direct<{CPP_TYPE[dtype]}>",
        grid=(max(blocks, 1), 1, 1),
        block=(_DIRECT_THREADS, 1, 1),
    )


@lru_cache(maxsize=1024)
def select(p: ConvParams, dtype: str, dev: DeviceInfo) -> Plan:
    """Choose the kernel and launch configuration for ``p`` in ``dtype`` on ``dev``."""
    return _direct_plan(p, dtype, dev)
