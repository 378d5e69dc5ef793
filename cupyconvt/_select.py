"""The one place that decides which kernel family, with which tile, runs a problem.

Every kernel the runtime can launch is listed by :func:`all_modules`; the NVRTC compile test
builds exactly that list, so a kernel that CI has not compiled cannot be selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import _autotune
from ._compile import KernelModule
from ._depthwise import DwPlan, dw_module
from ._grouped import GroupedPlan, grouped_module
from ._igemm import IgemmPlan, igemm_module
from ._params import ConvParams
from ._patch import PatchPlan, all_patch_modules
from ._plans import CPP_TYPE, DirectPlan, direct_module
from ._tc import TcPlan, all_tc_modules, layout_module

Plan = DirectPlan | DwPlan | GroupedPlan | IgemmPlan | TcPlan | PatchPlan
FAMILIES = ("tc", "igemm", "depthwise", "grouped", "direct")

#: A GEMM pays once both of its small dimensions fill a tile reasonably: below these channel
#: counts per group the table-driven gather (grouped.cu) moves the same bytes with less overhead.
IGEMM_MIN_C_IN_G = 8
IGEMM_MIN_C_OUT_G = 16
#: The tensor-core GEMM pays from 16 channels per group on both sides (an MMA tile is 16 x 8 x 16;
#: narrower layers are memory-bound and stay on the gather).
TC_MIN_CHANNELS = 16
#: The autotuner also times the direct kernel on problems this small (it is slow on big ones).
DIRECT_TUNE_MAX_MACS = 10**8


#: 3xTF32 ("high": three MMAs and the operand splits per product) beat the IEEE float32 GEMM
#: only with wide output tiles and long K (H100, 2026-11-24: kb68, C_out 64, K 2400: 1.19x;
#: vnet, C_out 128, K 2048: 1.17x; unet_k2s2, C_out 64, K 128: 0.70x; kb70, C_out 24: 0.84x).
#: Elsewhere "high" runs the IEEE kernels, which are at least as accurate.
HIGH_MIN_C_OUT_G = 64
HIGH_MIN_K = 1024


def _high_pays(p: ConvParams) -> bool:
    """Whether the phase GEMMs are wide (C_out_g) and long (K: taps a phase x C_in_g) enough."""
    voxels = p.N * p.C_in * p.C_out_g * p.in_size[0] * p.in_size[1] * p.in_size[2]
    phases = p.stride[0] * p.stride[1] * p.stride[2]
    taps_per_phase = p.useful_macs / max(1, voxels) / phases  # about: edges reach fewer taps
    return p.C_out_g >= HIGH_MIN_C_OUT_G and taps_per_phase * p.C_in_g >= 0.9 * HIGH_MIN_K


def all_modules() -> list[KernelModule]:
    """Every kernel module the runtime may compile (what the CI compile test builds)."""
    families = (direct_module, grouped_module, igemm_module, dw_module)
    return [f(d) for d in CPP_TYPE for f in families] + [
        layout_module(),
        *all_tc_modules(),
        *all_patch_modules(),
    ]


@dataclass(frozen=True, eq=False)
class DeviceInfo:
    """The properties of a GPU that selection depends on.

    One instance per device (``_gpu.device_info`` is cached), so it hashes and compares by
    identity: the plan cache looks it up on every call.
    """

    id: int
    name: str
    compute_capability: int  # major * 10 + minor
    sm_count: int
    max_shared_per_block_optin: int


def eligible(
    p: ConvParams, dtype: str, family: str, precision: str = "highest", cc: int = 90
) -> bool:
    """Whether ``family`` can run ``p`` at all (any problem runs on ``direct``). ``precision``
    (float32 only) and the compute capability ``cc`` matter to the tensor-core family alone."""
    if family == "tc":
        return TcPlan.eligible(p, dtype, precision, cc)
    if family == "igemm":
        return IgemmPlan.eligible(p, dtype)
    if family == "depthwise":
        return DwPlan.eligible(p, dtype)
    if family == "grouped":
        return GroupedPlan.eligible(p, dtype)
    if family == "direct":
        return True
    raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)}")


def set_autotune(on: bool | None) -> None:
    """Turn the autotuner on or off for this process (``None``: follow ``CUPYCONVT_AUTOTUNE``).

    With it on, the first call for a problem times every eligible kernel family on scratch
    inputs of the problem's size and caches the fastest on disk (``CUPYCONVT_CACHE_DIR``, else
    ``~/.cache/cupyconvt``), keyed by device name, dtype and problem; later calls and processes
    reuse it. Off by default: the heuristic needs no timing and no scratch memory.
    """
    _autotune.set_enabled(on)
    select.cache_clear()


def _problem(p: ConvParams) -> tuple:
    """What an autotune entry is keyed by, besides the device and dtype."""
    return (p.N, p.C_in, p.C_out, p.groups, p.in_size, p.kernel, p.stride, p.padding,
            p.output_padding, p.dilation, p.has_bias)  # fmt: skip


def _build(p: ConvParams, dtype: str, dev: DeviceInfo, family: str, precision: str) -> Plan:
    if family == "tc":
        # Layers whose kernel equals their stride run as one GEMM with the taps as columns.
        if PatchPlan.eligible(p, dtype, dev.compute_capability):
            return PatchPlan.build(p, dtype, dev.sm_count)
        return TcPlan.build(p, dtype, precision, dev.sm_count, cc=dev.compute_capability)
    if family == "igemm":
        return IgemmPlan.build(p, dtype, dev.sm_count)
    if family == "depthwise":
        return DwPlan.build(p, dtype, dev.sm_count)
    if family == "grouped":
        return GroupedPlan.build(p, dtype, dev.sm_count)
    return DirectPlan.build(p, dtype, dev.sm_count)


def _time_plan(plan: Plan, p: ConvParams, dtype: str, repeat: int = 5) -> float:
    """Median milliseconds of ``plan`` on scratch inputs of the problem (random, never zeros)."""
    import cupy
    import numpy as np

    from ._dtypes import dtype_name

    rng = cupy.random.default_rng(0)

    def rand(shape):
        a = rng.standard_normal(shape, dtype=np.float32)
        if dtype == "bfloat16":  # the top half of a float32 is a bfloat16
            import ml_dtypes

            return (a.view(np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)
        return a.astype(dtype)

    x, w = rand(p.x_shape5), rand((p.C_in, p.C_out_g, *p.kernel))
    b = rand((p.C_out,)) if p.has_bias else None
    out = cupy.empty(p.out_shape5, dtype=x.dtype)
    assert dtype_name(x.dtype) == dtype
    plan.launch(x, w, b, out)  # compile and warm up
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        plan.launch(x, w, b, out)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _autotuned_family(
    p: ConvParams, dtype: str, dev: DeviceInfo, families: list[str], precision: str
) -> str:
    """The fastest of ``families``, timed once per (device, dtype, precision, problem) and kept
    on disk."""
    tag = dtype if dtype != "float32" or precision == "highest" else f"{dtype}/{precision}"
    key = _autotune.problem_key(dev.name, tag, _problem(p))
    return _autotune.choose(
        key, families, lambda fam: _time_plan(_build(p, dtype, dev, fam, precision), p, dtype)
    )


@lru_cache(maxsize=1024)
def select(
    p: ConvParams,
    dtype: str,
    dev: DeviceInfo,
    family: str | None = None,
    precision: str = "highest",
) -> Plan:
    """Choose the kernel and launch configuration for ``p`` in ``dtype`` on ``dev``.

    ``precision`` ("highest", "high" or "medium") is the float32 policy: the tensor-core family
    runs float32 only under "high" (3xTF32) or "medium" (TF32); the other families compute IEEE
    float32 under any policy. ``family`` forces a kernel family (tests and benchmarks); it must
    be eligible. With autotuning on (``cupyconvt.set_autotune(True)`` or
    ``CUPYCONVT_AUTOTUNE=1``) the first call for a problem times every eligible family and the
    winner is cached on disk.
    """
    cc = dev.compute_capability
    if family is None:
        wide = p.C_in_g >= IGEMM_MIN_C_IN_G and p.C_out_g >= IGEMM_MIN_C_OUT_G
        order = ["igemm", "grouped"] if wide else ["grouped", "igemm"]
        if p.C_in_g == 1:  # the streaming 2x upsampler where it applies (eligible() decides)
            order.insert(0, "depthwise")
        if (
            p.C_in_g >= TC_MIN_CHANNELS
            and p.C_out_g >= TC_MIN_CHANNELS
            and (dtype != "float32" or precision != "high" or _high_pays(p))
        ):
            order.insert(0, "tc")
        if p.useful_macs < DIRECT_TUNE_MAX_MACS:
            order.append("direct")
        candidates = [f for f in order if eligible(p, dtype, f, precision, cc)]
        if not candidates:
            family = "direct"
        elif len(candidates) > 1 and _autotune.enabled():
            family = _autotuned_family(p, dtype, dev, candidates, precision)
        else:
            family = candidates[0]
    elif not eligible(p, dtype, family, precision, cc):
        raise ValueError(f"kernel family {family!r} cannot run this problem")
    return _build(p, dtype, dev, family, precision)
