"""The problems that scripts/sanitize.py runs under compute-sanitizer, and which kernel
specializations each one launches, worked out on the CPU.

A kernel specialization is one (KernelModule, name expression) pair of
``cupyconvt._select.all_modules()`` or ``cupyconvt._backward_gpu.all_backward_modules()``: exactly
what the runtime can launch, and what CI compiles. :func:`launches` builds a problem's plans as
the runtime does (``select``, ``input_plan``, ``weight_plan``, ``bias_plan``, for a device given
by hand, an H100 by default) and follows each plan's ``launch`` to list the kernels it calls;
:func:`missing` lists the specializations that no problem launches
(tests/test_sanitize_coverage.py asserts there are none). The sanitizer run records what really
launched and checks it against :func:`launches`, problem by problem.

The problems are tiny, since the sanitizers slow kernels 10-100x (racecheck more), and each
exercises edges: sizes 1 and primes, odd strides and dilations, padding that crops,
output_padding, asymmetric kernels, every group layout (one group, several channels a group,
depthwise, depthwise with a multiplier), channel counts that are not multiples of a tile, batch 1
and 2, unbatched inputs, NDHWC, bias or none, inputs off a 16-byte boundary, and every dtype and
float32 precision. They come in four kinds:

- ``natural``: the selector's own choice, on shapes a layer would have;
- a forced family (``family``): the direct kernel, and the grouped kernel planned as for a GPU of
  no SMs (``sm_count=0``), where it takes its first-choice channels-per-thread and cells-per-thread
  variant (on a tiny problem it trades those for more blocks: sizing the problem up would cost
  more under the sanitizers than it tells);
- a forced tile (``tile``, ``data_tile``, ``weight_tile``, ``path``, ``splits``): one problem for
  every tile of the tensor-core, implicit-GEMM and gradient tables, generated from the tables
  themselves, so a tile added to a table gets a problem; one that no tiny problem can run (a halo
  tile whose input box never fits) makes :func:`problems` raise;
- the tensor-core tiles twice, once for each output layout of the GEMM (NCDHW in place, and
  channels-last: NDHWC callers and NCDHW results that go through a workspace and a transpose).

Importing this module needs neither a GPU nor CuPy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from cupyconvt._backward_gpu import (
    NARROW_VARIANTS,
    STAGED_VARIANTS,
    TAP_INNER,
    DataTile,
    GradInputPlan,
    WeightTile,
    all_backward_modules,
    bias_plan,
    data_tiles,
    input_plan,
    weight_plan,
    weight_tiles,
)
from cupyconvt._compile import KernelModule
from cupyconvt._depthwise import dw_module
from cupyconvt._grouped import grouped_module
from cupyconvt._igemm import GemmTile, IgemmPlan, igemm_tiles
from cupyconvt._params import ConvParams
from cupyconvt._patch import PATCH_TILES, PatchPlan, PatchTile
from cupyconvt._plans import CPP_TYPE
from cupyconvt._select import DeviceInfo, all_modules, eligible, select
from cupyconvt._tc import (
    _BITS,
    MODES,
    TcPlan,
    TcTile,
    layout_module,
    prep_transpose_grid,
    tc_tiles,
    wg_tiles,
)

Kernel = tuple[KernelModule, str]
IntOrTriple = int | tuple[int, int, int]

#: The device the coverage is worked out for: an H100 SXM (what scripts/sanitize.py runs on).
H100 = DeviceInfo(
    id=0,
    name="NVIDIA H100 80GB HBM3 (nominal)",
    compute_capability=90,
    sm_count=132,
    max_shared_per_block_optin=232448,
)

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Problem:
    """One forward or backward call: its arguments, and what (if anything) it forces."""

    name: str
    x_shape: tuple[int, ...]  # NCDHW (N, C_in, D, H, W), or unbatched (C_in, D, H, W)
    C_out: int
    kernel: tuple[int, int, int]
    stride: IntOrTriple = 1
    padding: IntOrTriple = 0
    output_padding: IntOrTriple = 0
    groups: int = 1
    dilation: IntOrTriple = 1
    bias: bool = False  # forward only
    dtype: str = "float32"
    layout: str = "NCDHW"  # forward only: how x and the result lie in memory
    precision: str = "highest"
    #: Forward: force a kernel family ("direct", "depthwise", "grouped", "igemm", "tc"), or None.
    family: str | None = None
    #: Forward: force a tile (a TcTile or a GemmTile; the family follows from it).
    tile: Any = None
    #: Plan as for a GPU of this many SMs (None: the device's). 0 makes the grouped family take
    #: its first-choice variant; 1 makes the direct kernel loop over its grid-stride.
    sm_count: int | None = None
    #: Backward: the gradients to compute (empty: a forward problem).
    needs: tuple[str, ...] = ()
    path: str | None = None  # grad_input: force "staged", "narrow" or "igemm"
    staged_variant: tuple[int, int, int] | None = None  # grad_input: force a staged variant
    data_tile: DataTile | None = None  # grad_input: force an implicit-GEMM tile
    weight_tile: WeightTile | None = None  # grad_weight: force a tile
    splits: int | None = None  # grad_weight: force the number of voxel splits
    #: Pass x (and grad_out) as views this many elements into a larger buffer: off the
    #: 16-byte boundary that vector copies need.
    x_offset: int = 0
    kind: str = field(default="", compare=False)  # a short tag for the tables: natural, ...

    @property
    def backward(self) -> bool:
        return bool(self.needs)

    @property
    def w_shape(self) -> tuple[int, ...]:
        c_in = self.x_shape[1] if len(self.x_shape) == 5 else self.x_shape[0]
        return (c_in, self.C_out // self.groups, *self.kernel)

    @property
    def kwargs(self) -> dict[str, Any]:
        """stride, padding, output_padding, groups and dilation, as the public API takes them."""
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    groups=self.groups, dilation=self.dilation)  # fmt: skip

    @property
    def params(self) -> ConvParams:
        """The validated problem (raises as the public API would on bad arguments)."""
        bias_shape = (self.C_out,) if self.bias else None
        return ConvParams.from_args(self.x_shape, self.w_shape, bias_shape, **self.kwargs)

    def __str__(self) -> str:
        return self.name


# --------------------------------------------------------------------------------------------
# What a problem launches.


def _device(dev: DeviceInfo, sm_count: int | None) -> DeviceInfo:
    """``dev``, or a copy of it with another SM count (one object per count: select() caches
    plans by device identity)."""
    if sm_count is None or sm_count == dev.sm_count:
        return dev
    return _device_with(dev, sm_count)


@cache
def _device_with(dev: DeviceInfo, sm_count: int) -> DeviceInfo:
    return replace(dev, sm_count=sm_count)


def forward_plan(pr: Problem, dev: DeviceInfo = H100) -> Any:
    """The plan the runtime runs for a forward problem (its forced family or tile, if any)."""
    p, dev = pr.params, _device(dev, pr.sm_count)
    cc = dev.compute_capability
    if isinstance(pr.tile, TcTile):
        if not eligible(p, pr.dtype, "tc", pr.precision, cc):
            raise ValueError(f"{pr}: the tensor-core family cannot run it")
        return TcPlan.build(p, pr.dtype, pr.precision, dev.sm_count, tile=pr.tile)
    if isinstance(pr.tile, PatchTile):
        if not PatchPlan.eligible(p, pr.dtype, cc):
            raise ValueError(f"{pr}: the patch GEMM cannot run it")
        return PatchPlan.build(p, pr.dtype, dev.sm_count, tile=pr.tile)
    if isinstance(pr.tile, GemmTile):
        if not eligible(p, pr.dtype, "igemm", pr.precision, cc):
            raise ValueError(f"{pr}: the implicit-GEMM family cannot run it")
        return IgemmPlan.build(p, pr.dtype, dev.sm_count, tile=pr.tile)
    if pr.tile is not None:
        raise TypeError(f"{pr}: tile must be a TcTile, PatchTile or GemmTile, got {pr.tile!r}")
    return select(p, pr.dtype, dev, pr.family, pr.precision)


def backward_plans(pr: Problem, dev: DeviceInfo = H100) -> tuple[Any, Any, Any]:
    """The (grad_input, grad_weight, grad_bias) plans the runtime runs (None where not needed),
    with the arguments cupyconvt._backward_gpu passes them, so unforced ones are the cached
    plans it would use."""
    p, dev = pr.params, _device(dev, pr.sm_count)
    gi = gw = gb = None
    if "input" in pr.needs:
        gi = input_plan(p, pr.dtype, pr.path, pr.data_tile, dev.max_shared_per_block_optin,
                        TAP_INNER, dev.sm_count, pr.staged_variant)  # fmt: skip
    if "weight" in pr.needs:
        if pr.weight_tile is None and pr.splits is None:
            gw = weight_plan(p, pr.dtype)
        else:
            gw = weight_plan(p, pr.dtype, pr.weight_tile, pr.splits)
    if "bias" in pr.needs:
        gb = bias_plan(p, pr.dtype)
    return gi, gw, gb


def _transpose(itemsize: int) -> Kernel:
    return layout_module(), f"batched_transpose<{_BITS[itemsize]}>"


def _size(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_launches(plan: Any, channels_last: bool = False) -> list[Kernel]:
    """The kernels ``plan.launch`` calls, in order (a plan's kernels() lists what it may call)."""
    if isinstance(plan, PatchPlan):
        if plan.grid[0] == 0:
            return []
        gemm_cf, gemm_cl, gemm_cf_in, transpose = plan.kernels()
        if channels_last:
            return [gemm_cl]
        return [gemm_cf_in] if plan.reads_ncdhw else [transpose, gemm_cf]  # else x transposed
    if plan.family == "tc":
        if plan.grid[0] == 0:
            return []
        (m, prep), (_, ncdhw), (_, ndhwc), transpose = plan.kernels()
        direct = channels_last or plan.ncdhw_in_place
        p = plan.p
        spatial = p.in_size[0] * p.in_size[1] * p.in_size[2]
        # tc_prep packs the weights and transposes an NCDHW x in one launch, unless the x tiles
        # do not fit its grid.
        tgrid = prep_transpose_grid(p.N, p.C_in, spatial, plan.pack_grid[0])
        out = [] if channels_last or tgrid[0] else [transpose]
        out += [(m, prep), (m, ndhwc if channels_last or not direct else ncdhw)]
        return out + ([] if direct else [transpose])  # the workspace back to NCDHW
    if plan.family == "igemm":
        pack, gemm, fill = plan.kernels()
        out = [fill] if plan.fill_grid is not None else []
        if plan.phases and plan.grid[0] and plan.grid[2]:
            out += [pack, gemm]
        return out
    return list(plan.kernels())  # direct, grouped: one kernel


def launches(pr: Problem, dev: DeviceInfo = H100) -> list[Kernel]:
    """Every kernel launch of the problem's call, in order, as cupyconvt's GPU backend makes
    them (cupyconvt/_gpu.py and _backward.py: empty arrays launch nothing; the CUDA-core families
    read and write NCDHW, so NDHWC callers get a transpose on each side)."""
    p = pr.params
    if pr.backward:
        gi, gw, gb = backward_plans(pr, dev)
        out: list[Kernel] = []
        if p.N == 0:
            return out
        if gi is not None and _size(p.x_shape5):
            out += gi.kernels()
        if gw is not None:
            gemm, reduce = gw.kernels()
            # direct(): one split in the accumulator dtype. It asks NumPy for the dtype, which
            # knows bfloat16 only once ml_dtypes is imported; bfloat16 sums in float32 anyway.
            direct = pr.dtype != "bfloat16" and gw.direct()
            out += [gemm] if direct else [gemm, reduce]
        if gb is not None and _size(p.out_shape5):
            out += gb.kernels()
        return out
    if _size(p.out_shape) == 0:
        return []
    plan = forward_plan(pr, dev)
    channels_last = pr.layout == "NDHWC"
    if plan.family == "tc":
        return plan_launches(plan, channels_last)
    if not channels_last:
        return plan_launches(plan)
    t = _transpose(ITEMSIZE[pr.dtype])
    return [t, *plan_launches(plan), t]


# --------------------------------------------------------------------------------------------
# Every specialization, readable labels, coverage.


def all_specializations() -> list[Kernel]:
    """Every (module, name expression) the runtime can launch, in the compile test's order."""
    out, seen = [], set()
    for m in all_modules() + all_backward_modules():
        for name in m.name_expressions:
            if (m, name) not in seen:
                seen.add((m, name))
                out.append((m, name))
    return out


@cache
def _labels() -> dict[Kernel, str]:
    specs = all_specializations()
    owners: dict[str, int] = {}
    for _, name in specs:
        owners[name] = owners.get(name, 0) + 1
    labels = {}
    for m, name in specs:
        text = f"{m.filename}:{name}"
        if owners[name] > 1:  # e.g. each tensor-core tile's module has the same weight pack
            tag = next((n for n in m.name_expressions if owners[n] == 1), m.name_expressions[-1])
            text += f" [module of {tag}]"
        labels[(m, name)] = text
    return labels


def label(kernel: Kernel) -> str:
    """A readable, unique name for a specialization ("?" marks one the lists do not hold)."""
    m, name = kernel
    return _labels().get(kernel) or f"{m.filename}:{name} [? not in all_modules()]"


def coverage(problems_: Sequence[Problem] | None = None, dev: DeviceInfo = H100) -> set[Kernel]:
    """The specializations that the problems launch, worked out on the CPU."""
    covered: set[Kernel] = set()
    for pr in problems() if problems_ is None else problems_:
        covered.update(launches(pr, dev))
    return covered


def missing(problems_: Sequence[Problem] | None = None, dev: DeviceInfo = H100) -> list[Kernel]:
    """The specializations the runtime can launch that none of the problems launches."""
    covered = coverage(problems_, dev)
    return [k for k in all_specializations() if k not in covered]


def quick(problems_: Sequence[Problem] | None = None, dev: DeviceInfo = H100) -> list[Problem]:
    """A subset that still launches every specialization the whole set launches: greedily the
    problem that adds the most, earlier ones first on a tie (about one problem a specialization
    for the tile tables; the edge-case variety of the rest goes)."""
    pool = list(problems() if problems_ is None else problems_)
    sets = [set(launches(pr, dev)) for pr in pool]
    left = set().union(*sets)
    chosen: list[int] = []
    while left:
        best = max(range(len(pool)), key=lambda i: (len(sets[i] & left), -i))
        chosen.append(best)
        left -= sets[best]
    return [pool[i] for i in sorted(chosen)]


# --------------------------------------------------------------------------------------------
# The problems.


@dataclass(frozen=True)
class Geometry:
    """Spatial sizes and arguments: (D, H, W) and per-axis kernel, stride, padding, ..."""

    name: str
    in_size: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride: IntOrTriple = 1
    padding: IntOrTriple = 0
    output_padding: IntOrTriple = 0
    dilation: IntOrTriple = 1

    def args(self) -> dict[str, Any]:
        return dict(kernel=self.kernel, stride=self.stride, padding=self.padding,
                    output_padding=self.output_padding, dilation=self.dilation)  # fmt: skip


#: Tiny geometries (output size in the comments), each with its own edges. NCDHW tensor-core
#: results are written in place where at least half the stride phases have taps: all but s3k2
#: and k1s2 (8 of 27 and 1 of 8), which go through a workspace; those two also leave phases with
#: no tap for the implicit GEMM's fill kernel.
GEOMETRIES = (
    Geometry("k3", (3, 4, 5), (3, 3, 3)),  # 5x6x7
    Geometry("s2p1op1", (3, 4, 5), (3, 3, 3), 2, 1, 1),  # 6x8x10
    Geometry("s3k2", (2, 3, 4), (2, 2, 2), 3, (0, 1, 0), (2, 1, 1)),  # 7x7x12
    Geometry("dil", (4, 3, 2), (2, 3, 2), (1, 2, 1), (1, 2, 0), (0, 1, 1), (3, 1, 2)),  # 5x4x5
    Geometry("size1", (1, 5, 1), (1, 3, 2), (1, 2, 3), (0, 1, 0), (0, 1, 2)),  # 1x10x4
    Geometry("crop", (3, 3, 3), (3, 3, 3), 2, 2, 1),  # 4x4x4: padding crops the border taps
    Geometry("prime", (2, 5, 7), (2, 1, 5), (2, 1, 3), (1, 0, 2), (1, 0, 2)),  # 3x5x21
    Geometry("k1s2", (3, 4, 5), (1, 1, 1), 2, 0, 1),  # 6x8x10, only one phase has a tap
    Geometry("k4s2", (2, 3, 3), (4, 4, 4), 2, 1),  # 4x6x6
)
GEOMETRY = {g.name: g for g in GEOMETRIES}


def _x_shape(n: int | None, c_in: int, g: Geometry) -> tuple[int, ...]:
    return ((n,) if n is not None else ()) + (c_in, *g.in_size)


def _first(what: str, candidates: Iterable[Problem], ok: Callable[[Problem, Any], bool]) -> Problem:
    """The first candidate whose plan builds and passes ``ok``."""
    for pr in candidates:
        try:
            plan = forward_plan(pr) if not pr.backward else backward_plans(pr)
        except ValueError:  # e.g. a halo tile whose input box does not fit
            continue
        if ok(pr, plan):
            return pr
    raise LookupError(f"no tiny problem runs {what}: add a geometry or channel count that fits")


#: The most elements an input or result of a generated problem may have: the sanitizers slow
#: every access, and a few blocks a kernel exercise as many code paths as thousands.
MAX_ELEMENTS = 32768


def _small(pr: Problem) -> bool:
    p = pr.params
    return max(_size(p.x_shape5), _size(p.out_shape5)) <= MAX_ELEMENTS


def _short(dtype: str) -> str:
    return {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}[dtype]


def _natural() -> list[Problem]:
    """The selector's own choices on shapes a layer would have, edges included."""
    G = GEOMETRY
    specs = [
        # name, dtype, N, C_in, C_out, groups, geometry, extra
        ("c3to5", "float32", 2, 3, 5, 1, "k3", dict(bias=True)),
        ("depthwise_mult2", "float64", 1, 6, 12, 6, "s2p1op1", {}),
        ("c16_ndhwc", "float16", 2, 16, 16, 1, "k4s2", dict(layout="NDHWC", bias=True)),
        ("grouped_c16x24", "bfloat16", 1, 32, 48, 2, "dil", {}),
        ("tf32_crop", "float32", 2, 16, 16, 1, "crop", dict(precision="medium", bias=True)),
        ("3xtf32_c64", "float32", 1, 64, 64, 1, "k3", dict(precision="high")),
        ("3xtf32_narrow", "float32", 1, 16, 24, 1, "s2p1op1", dict(precision="high")),
        ("igemm_tapless", "float32", 2, 12, 20, 1, "s3k2", dict(bias=True)),
        ("igemm_prime", "float64", 1, 9, 17, 1, "prime", {}),
        ("unbatched", "float32", None, 2, 3, 1, "size1", dict(bias=True)),
        ("depthwise_ndhwc", "float16", 1, 8, 8, 8, "k1s2", dict(layout="NDHWC")),
        ("f64_ndhwc", "float64", 2, 3, 2, 1, "dil", dict(layout="NDHWC", bias=True)),
        ("grouped_2x3", "float32", 2, 6, 9, 3, "crop", dict(bias=True)),
        ("bf16_c5to7", "bfloat16", 1, 5, 7, 1, "s2p1op1", {}),
        ("f16_c8to16_grouped", "float16", 2, 16, 32, 2, "prime", dict(bias=True)),
        ("tc_ncdhw_workspace", "float16", 1, 16, 16, 1, "k1s2", {}),
        ("misaligned_x_tc_ndhwc", "float16", 2, 16, 24, 1, "s2p1op1",
         dict(layout="NDHWC", x_offset=1, bias=True)),
    ]  # fmt: skip
    out = [
        Problem(f"fwd/natural/{_short(dt)}/{name}", _x_shape(n, ci, G[g]), co, groups=grp,
                dtype=dt, kind="natural", **G[g].args(), **extra)
        for name, dt, n, ci, co, grp, g, extra in specs
    ]  # fmt: skip
    # Degenerate sizes: one voxel in, one channel; a kernel larger than the input.
    out += [
        Problem("fwd/natural/f32/one_voxel", (2, 1, 1, 1, 1), 1, (1, 1, 1), kind="natural"),
        Problem(
            "fwd/natural/f64/one_voxel_k3s2",
            (1, 1, 1, 1, 1),
            2,
            (3, 3, 3),
            stride=2,
            bias=True,
            dtype="float64",
            kind="natural",
        ),  # fmt: skip
        # W = 8: a 16-byte aligned x takes the grouped kernel's vector copies; off by one
        # element it takes the scalar ones.
        Problem(
            "fwd/natural/f32/misaligned_x_grouped",
            (1, 4, 3, 2, 8),
            4,
            (3, 3, 3),
            padding=1,
            groups=2,
            x_offset=1,
            kind="natural",
        ),  # fmt: skip
        Problem(
            "fwd/natural/f32/aligned_x_grouped",
            (1, 4, 3, 2, 8),
            4,
            (3, 3, 3),
            padding=1,
            groups=2,
            kind="natural",
        ),  # fmt: skip
    ]
    return out


def _direct() -> list[Problem]:
    out = []
    for i, dt in enumerate(CPP_TYPE):
        g1, g2 = GEOMETRIES[(2 * i) % len(GEOMETRIES)], GEOMETRIES[(2 * i + 3) % len(GEOMETRIES)]
        out.append(Problem(f"fwd/direct/{_short(dt)}/grouped_{g1.name}", _x_shape(2, 6, g1), 9,
                           groups=3, bias=True, dtype=dt, family="direct", kind="direct",
                           **g1.args()))  # fmt: skip
        # One block looping over its grid-stride; depthwise with a multiplier.
        out.append(Problem(f"fwd/direct/{_short(dt)}/depthwise_mult2_{g2.name}",
                           _x_shape(None if i % 2 else 1, 4, g2), 8, groups=4, dtype=dt,
                           layout="NCDHW" if i % 2 else "NDHWC", family="direct", sm_count=1,
                           kind="direct", **g2.args()))  # fmt: skip
    return out


_GROUPED_NAME = re.compile(r"grouped_conv_transpose3d<[^,]+, (\d+), (\d+), (\d+)>")
#: (C_in_g, groups): several channels one group, a few a group, depthwise, depthwise x multiplier.
_GROUP_LAYOUTS = ((3, 1), (2, 3), (1, 4), (4, 2), (1, 3))
#: Per-axis (in, kernel, stride, padding, output_padding, dilation) for h and w.
_HW = (
    ((3, 3, 1, 1, 0, 1), (5, 3, 1, 0, 0, 1)),
    ((4, 2, 2, 0, 1, 1), (4, 3, 2, 1, 1, 1)),
    ((2, 3, 1, 0, 0, 2), (7, 2, 3, 0, 1, 1)),
    ((5, 1, 3, 0, 2, 1), (3, 1, 1, 0, 0, 1)),
    ((3, 2, 1, 0, 0, 1), (8, 3, 2, 1, 1, 1)),
)


def _grouped_candidates(dt: str, cot: int, vq: int, pw: int, i: int) -> Iterable[Problem]:
    """Problems for the grouped variant (COT, VQ): C_out_g within COT (and above COT / 2), and
    along d a number of cells a phase within VQ (and below 2 VQ)."""
    co_gs = {1: (1,), 2: (2,), 4: (3, 4)}.get(cot, (5, 13, 8))
    qs = {1: (1,), 2: (3, 2), 4: (5, 7, 4)}.get(vq, (11, 8, 13))
    for j in range(i, i + 12):
        co_g, q = co_gs[j % len(co_gs)], qs[j % len(qs)]
        ci_g, groups = _GROUP_LAYOUTS[j % len(_GROUP_LAYOUTS)]
        h, w = _HW[j % len(_HW)]
        # Along d: stride 1 and kernel k make q cells of q - k + 1 inputs; stride 2 and kernel 2
        # make q cells a phase of q inputs.
        if j % 2 and q > 1:
            d = (q - min(3, q) + 1, min(3, q), 1, 0, 0, 1)
        else:
            d = (q, 2, 2, 0, 0, 1) if q > 1 else (1, 1 + j % 2, 1, 0, 0, 1)
        n = (None, 1, 2)[j % 3]
        yield Problem(
            f"fwd/grouped/{_short(dt)}/cot{cot}_vq{vq}" + ("_pw2" if pw == 2 else ""),
            ((n,) if n else ()) + (ci_g * groups, d[0], h[0], w[0]),
            co_g * groups,
            (d[1], h[1], w[1]),
            stride=(d[2], h[2], w[2]),
            padding=(d[3], h[3], w[3]),
            output_padding=(d[4], h[4], w[4]),
            dilation=(d[5], h[5], w[5]),
            groups=groups,
            bias=j % 2 == 0,
            dtype=dt,
            layout="NDHWC" if j % 5 == 4 else "NCDHW",
            family="grouped",
            sm_count=0,
            kind="grouped",
        )


def _grouped() -> list[Problem]:
    """Every grouped kernel variant (output channels a thread COT x cells a thread VQ x w-phases a
    thread PW, 2 only for a w stride of 2), planned
    with sm_count=0 so the first-choice variant is kept: COT is the smallest one covering
    C_out_g, VQ the largest that the cells along d and the register budget allow."""
    out = []
    for dt in CPP_TYPE:
        for i, name in enumerate(grouped_module(dt).name_expressions):
            match = _GROUPED_NAME.match(name)
            if match is None:
                raise ValueError(f"unexpected grouped kernel name {name!r}")
            cot, vq, pw = (int(v) for v in match.groups())
            out.append(_first(
                f"grouped {dt} COT={cot} VQ={vq} PW={pw}", _grouped_candidates(dt, cot, vq, pw, i),
                lambda pr, plan, v=(cot, vq, pw): (
                    _small(pr) and (plan.cot, plan.tile.vq, plan.tile.pw) == v
                ),
            ))  # fmt: skip
    return out


_DW_NAME = re.compile(r"dw2_conv_transpose3d<[^,]+, (\d+), (\d), (\d), (\d)>")


def _depthwise() -> list[Problem]:
    """Every depthwise kernel specialization (taps an axis K, padding parity per axis): padding
    b or b + 2 an axis, odd and even output widths, a channel multiplier, batch 1, 2 and none,
    NDHWC, inputs off a 16-byte boundary; columns of one cell (sm_count=None: an H100 spreads a
    tiny problem over the most blocks) and of the longest (sm_count=0)."""
    out = []
    for dt in CPP_TYPE:
        for i, name in enumerate(dw_module(dt).name_expressions):
            match = _DW_NAME.match(name)
            if match is None:
                raise ValueError(f"unexpected depthwise kernel name {name!r}")
            k, bd, bh, bw = (int(v) for v in match.groups())
            pad = (bd + 2 * (i % 2 and k > 2), bh, bw + 2 * (i % 3 == 0 and k > 2))
            size = (3 + i % 2, 2 + i % 3, 5 + i % 4)
            mult = 1 + i % 2
            n = (None, 1, 2)[i % 3]
            out.append(Problem(
                f"fwd/depthwise/{_short(dt)}/k{k}_b{bd}{bh}{bw}",
                ((n,) if n else ()) + (2, *size),
                2 * mult,
                (k, k, k),
                stride=2,
                padding=pad,
                output_padding=(i % 2, 0, (i // 2) % 2),
                groups=2,
                bias=i % 2 == 0,
                dtype=dt,
                layout="NDHWC" if i % 5 == 4 else "NCDHW",
                x_offset=1 if i % 7 == 3 else 0,
                family="depthwise",
                sm_count=0 if i % 4 == 1 else None,
                kind="depthwise",
            ))  # fmt: skip
    return out


def _gemm_name(t: GemmTile) -> str:
    return f"{t.BM}x{t.BN}k{t.BK}st{t.STAGES}"


def _igemm_candidates(dt: str, t: GemmTile, i: int) -> Iterable[Problem]:
    c_in_g = (5, 11, 3, 17, 8, 13)[i % 6]
    c_out_g = (max(1, t.BN - 3), t.BN + 5, 7)[i % 3]
    for j in range(i, i + len(GEOMETRIES)):
        g = GEOMETRIES[j % len(GEOMETRIES)]
        groups = (1, 2, 1, 3)[j % 4]
        yield Problem(
            f"fwd/igemm/{_short(dt)}/{_gemm_name(t)}",
            _x_shape((1, 2, None)[i % 3], c_in_g * groups, g),
            c_out_g * groups,
            groups=groups,
            bias=i % 2 == 0,
            dtype=dt,
            layout="NDHWC" if i % 4 == 3 else "NCDHW",
            tile=t,
            kind="igemm",
            **g.args(),
        )


def _igemm() -> list[Problem]:
    """Every implicit-GEMM tile, and per dtype the weight pack and the fill of tapless phases."""
    out = []
    for k, dt in enumerate(CPP_TYPE):
        for i, t in enumerate(igemm_tiles(dt)):
            what = f"igemm {dt} {_gemm_name(t)}"
            out.append(_first(what, _igemm_candidates(dt, t, i + 2 * k), lambda pr, _: _small(pr)))
        g = GEOMETRY["k1s2"]  # seven of eight phases have no tap: the fill kernel writes them
        out.append(Problem(f"fwd/igemm/{_short(dt)}/tapless_fill", _x_shape(2, 9, g), 16,
                           bias=True, dtype=dt, family="igemm", kind="igemm",
                           **g.args()))  # fmt: skip
    return out


def _tc_candidates(dt: str, prec: str, t: TcTile, target: str, i: int) -> Iterable[Problem]:
    """Problems for a tensor-core tile: C_in_g a whole number of 16-byte vectors, below and
    above BK; C_out_g below, above and well below BN; a channels-last caller for half of the
    "ndhwc" targets, an NCDHW result through the workspace for the other half."""
    vec = 16 // ITEMSIZE[dt]
    c_in_gs = (vec, 3 * vec, 5 * vec, 9 * vec, 2 * vec)
    ndhwc_caller = target == "ndhwc" and i % 2 == 0
    for j in range(i, i + len(GEOMETRIES) * len(c_in_gs)):
        g = GEOMETRIES[j % len(GEOMETRIES)]
        c_in_g = c_in_gs[(i + (j - i) // len(GEOMETRIES)) % len(c_in_gs)]
        c_out_g = (max(1, t.BN - 3), t.BN + 5, 7)[j % 3]
        groups = (1, 2, 1, 3)[i % 4] if c_out_g < 64 else 1
        yield Problem(
            f"fwd/tc/{_short(dt)}/{prec}/{t.name()}/{target}",
            _x_shape((1, 2, None)[i % 3], c_in_g * groups, g),
            c_out_g * groups,
            groups=groups,
            bias=j % 2 == 1,
            dtype=dt,
            precision=prec,
            layout="NDHWC" if ndhwc_caller else "NCDHW",
            tile=t,
            kind="tc",
            **g.args(),
        )


def _tc_fits(target: str) -> Callable[[Problem, Any], bool]:
    def ok(pr: Problem, plan: Any) -> bool:
        layout_ok = pr.layout == "NDHWC" or plan.ncdhw_in_place == (target == "ncdhw")
        return layout_ok and _small(pr)

    return ok


def _tc() -> list[Problem]:
    """Every tensor-core tile, in each (dtype, precision) mode, with each output layout of its
    GEMM: NCDHW written in place, and channels-last (an NDHWC caller, or an NCDHW result that
    goes through a workspace where most phases have no tap)."""
    out = []
    for k, (dt, prec) in enumerate(MODES):
        for i, t in enumerate(tc_tiles(dt) + wg_tiles(dt)):
            for target in ("ncdhw", "ndhwc"):
                # i + 5 k: another shape for the same tile in another mode
                cands = _tc_candidates(dt, prec, t, target, i + 5 * k)
                out.append(_first(f"tc {dt}/{prec} {t.name()} {target}", cands, _tc_fits(target)))
        # wgmma tiles staging one K chunk of channels at a time (kernels/wgmma.cu restages)
        for i, t in enumerate(wg_tiles(dt)):
            split = replace(t, CT=t.BK)
            cands = (pr for pr in _tc_candidates(dt, prec, split, "ndhwc", i + 5 * k + 1)
                     if pr.params.C_in_g > t.BK)  # fmt: skip
            out.append(_first(f"tc {dt}/{prec} {split.name()}", cands, _tc_fits("ndhwc")))
    return out


#: Geometries whose kernel equals their stride (kernels/patch.cu): 2 x 2 x 2 patches (kW even:
#: NCDHW results stored as element pairs) and 1 x 2 x 3 ones (kW odd: element by element), the
#: kernel-1 axis with a dilation that does not matter. An NCDHW x of the first is transposed
#: (D*H*W = 90), of the second read as it is (120, whole 8-voxel groups).
PATCH_GEOMETRIES = (
    Geometry("k2s2", (3, 5, 6), (2, 2, 2), 2),
    Geometry("k123s123", (3, 5, 8), (1, 2, 3), (1, 2, 3), dilation=(2, 1, 1)),
)


def _patch() -> list[Problem]:
    """Every patch-GEMM tile in both dtypes and layouts, NCDHW with both geometries (x read as
    it is, and transposed): two row tiles (the last one partial),
    planned for one SM in half the problems so that a block walks both; columns short of the
    tile; C_in_g 24 (a partial K chunk for BK 32 and 64, two for 16); C_out_g odd (NDHWC element
    by element) or even (NDHWC pairs); two groups in some."""
    out = []
    for k, dt in enumerate(("float16", "bfloat16")):
        for i, t in enumerate(PATCH_TILES):
            for j, layout in enumerate(("NCDHW", "NDHWC", "NCDHW")):
                g = PATCH_GEOMETRIES[(i + k + min(j, 1)) % len(PATCH_GEOMETRIES)]
                groups = 2 if (i + k) % 3 == 0 else 1
                c_out_g = ((13, 14) if groups == 1 else (7, 8))[(i + j) % 2]
                n = -(-(t.BM + 22) // (g.in_size[0] * g.in_size[1] * g.in_size[2]))
                out.append(Problem(
                    f"fwd/patch/{_short(dt)}/{t.name()}/{layout.lower()}/{g.name}",
                    _x_shape(n, 24 * groups, g), c_out_g * groups, groups=groups,
                    bias=(i + j) % 2 == 0, dtype=dt, layout=layout, tile=t,
                    sm_count=1 if (i + j + k) % 2 else None, kind="patch", **g.args()))  # fmt: skip
    return out


def _backward() -> list[Problem]:
    """Per dtype: every grad_input path (staged and narrow variants, implicit-GEMM tiles) and every
    grad_weight tile, paired up problem by problem, with grad_bias each time; grad_weight
    written directly (one split, float32/float64) once. Then a few unforced ones."""
    out = []
    c_out_gs = (3, 7, 10, 17, 2, 5)
    narrow_c_in_g = {1: 1, 2: 2, 4: 3}  # the narrow variant's CI covers C_in_g; else CI = 8
    for dt in CPP_TYPE:
        inputs = [("narrow", v, None) for v in NARROW_VARIANTS]
        inputs += [("staged", v, None) for v in STAGED_VARIANTS]
        inputs += [("igemm", None, t) for t in data_tiles(dt)]
        weights = weight_tiles(dt)
        for i in range(max(len(inputs), len(weights))):
            path, variant, dtile = inputs[i % len(inputs)]
            wtile = weights[i % len(weights)]
            groups = (1, 2, 1, 3)[i % 4]
            if dtile is not None:
                c_in_g = (max(1, dtile.BN - 3), dtile.BN + 5, 5)[i % 3]
                what = f"in-{dtile.BM}x{dtile.BN}"
            else:
                c_in_g = narrow_c_in_g.get(variant[0], (5, 13)[i % 2])
                what = f"in-{path}" + "x".join(map(str, variant))
            c_out_g = c_out_gs[i % len(c_out_gs)]
            splits = 1 if i == 0 else None  # float32/float64: the GEMM writes grad_weight
            what += f"+w-{wtile.BM}x{wtile.BN}" + ("-1split" if splits else "")
            # the geometry of the turn, or (staged variants, whose box grows with the stride)
            # the next one whose box fits
            for j in range(len(GEOMETRIES)):
                g = GEOMETRIES[(i + 2 + j) % len(GEOMETRIES)]
                pr = Problem(
                    f"bwd/{_short(dt)}/{what}/{g.name}",
                    _x_shape((1, 2, None)[i % 3], c_in_g * groups, g), c_out_g * groups,
                    groups=groups, dtype=dt, needs=("input", "weight", "bias"), path=path,
                    staged_variant=variant if path == "staged" else None,
                    data_tile=dtile, weight_tile=wtile, splits=splits, kind="backward",
                    **g.args())  # fmt: skip
                if path != "staged" or GradInputPlan.staged_eligible(
                    pr.params, dt, H100.max_shared_per_block_optin, variant
                ):
                    break
            out.append(pr)
    G = GEOMETRY
    specs = [
        ("f32_grouped", "float32", 2, 4, 6, 2, "s2p1op1", ("input", "weight", "bias"), 0),
        ("f64_depthwise", "float64", 1, 5, 5, 5, "dil", ("input", "weight", "bias"), 0),
        ("f16_unbatched", "float16", None, 24, 16, 1, "s3k2", ("input", "weight"), 0),
        ("bf16_weight_bias", "bfloat16", 2, 16, 32, 1, "k3", ("weight", "bias"), 0),
        ("f32_misaligned", "float32", 2, 6, 4, 1, "crop", ("input", "weight", "bias"), 1),
        ("f16_input_only", "float16", 1, 40, 24, 2, "k4s2", ("input",), 0),
    ]  # fmt: skip
    out += [
        Problem(f"bwd/natural/{name}", _x_shape(n, ci, G[g]), co, groups=grp, dtype=dt,
                needs=needs, x_offset=off, kind="backward", **G[g].args())
        for name, dt, n, ci, co, grp, g, needs, off in specs
    ]  # fmt: skip
    return out


@cache
def _problems() -> tuple[Problem, ...]:
    out = _natural() + _direct() + _grouped() + _depthwise() + _igemm() + _tc() + _patch()
    out += _backward()
    big = [pr.name for pr in out if not _small(pr)]
    if big:
        raise ValueError(f"problems with more than {MAX_ELEMENTS} elements in x or out: {big}")
    names = [pr.name for pr in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"problem names are not unique: {dupes}")
    return tuple(out)


def problems() -> list[Problem]:
    """Every sanitizer problem (built once: a few seconds on the CPU)."""
    return list(_problems())


def select_problems(
    quick_: bool = False, only: Sequence[str] = (), dev: DeviceInfo = H100
) -> list[Problem]:
    """The problems a run takes: all, or the :func:`quick` subset; ``only`` keeps those whose
    name contains one of the given strings."""
    chosen = quick(problems(), dev) if quick_ else problems()
    if only:
        chosen = [pr for pr in chosen if any(s in pr.name for s in only)]
    return chosen
