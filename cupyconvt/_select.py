"""The one place that decides which kernel family, with which tile, runs a problem.

Every kernel the runtime can launch is listed by :func:`all_modules`; the NVRTC compile test
builds exactly that list, so a kernel that CI has not compiled cannot be selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ._compile import KernelModule
from ._params import ConvParams
from ._plans import (
    CPP_TYPE,
    DirectPlan,
    GroupedPlan,
    IgemmPlan,
    direct_module,
    grouped_module,
    igemm_module,
)

Plan = DirectPlan | GroupedPlan | IgemmPlan
FAMILIES = ("igemm", "grouped", "direct")

#: A GEMM pays once both of its small dimensions fill a tile reasonably: below these channel
#: counts per group the table-driven gather (grouped.cu) moves the same bytes with less overhead.
IGEMM_MIN_C_IN_G = 8
IGEMM_MIN_C_OUT_G = 16


def all_modules() -> list[KernelModule]:
    """Every kernel module the runtime may compile (what the CI compile test builds)."""
    return [f(d) for d in CPP_TYPE for f in (direct_module, grouped_module, igemm_module)]


@dataclass(frozen=True)
class DeviceInfo:
    """The properties of a GPU that selection depends on."""

    id: int
    name: str
    compute_capability: int  # major * 10 + minor
    sm_count: int
    max_shared_per_block_optin: int


def eligible(p: ConvParams, dtype: str, family: str) -> bool:
    """Whether ``family`` can run ``p`` at all (any problem runs on ``direct``)."""
    if family == "igemm":
        return IgemmPlan.eligible(p, dtype)
    if family == "grouped":
        return GroupedPlan.eligible(p, dtype)
    if family == "direct":
        return True
    raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)}")


@lru_cache(maxsize=1024)
def select(p: ConvParams, dtype: str, dev: DeviceInfo, family: str | None = None) -> Plan:
    """Choose the kernel and launch configuration for ``p`` in ``dtype`` on ``dev``.

    ``family`` forces a kernel family (tests and benchmarks); it must be eligible.
    """
    if family is None:
        wide = p.C_in_g >= IGEMM_MIN_C_IN_G and p.C_out_g >= IGEMM_MIN_C_OUT_G
        order = ("igemm", "grouped") if wide else ("grouped", "igemm")
        family = next((f for f in order if eligible(p, dtype, f)), "direct")
    elif not eligible(p, dtype, family):
        raise ValueError(f"kernel family {family!r} cannot run this problem")
    if family == "igemm":
        return IgemmPlan.build(p, dtype, dev.sm_count)
    if family == "grouped":
        return GroupedPlan.build(p, dtype)
    return DirectPlan.build(p, dtype, dev.sm_count)
