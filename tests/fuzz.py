"""A seeded generator of random conv_transpose3d problems for the fuzz suite (tests/test_fuzz.py).

``problem(seed, index)`` depends on ``(seed, index)`` alone (``np.random.default_rng([seed,
index])``), so any problem of a run can be rebuilt and run by itself. A problem fixes every
argument (shapes, stride, padding, output_padding, dilation, groups, bias), the dtype, the layout,
the float32 precision, the API (arrays or torch tensors), a forced kernel family or the
selector's choice, and how each array lies in memory (:class:`View`): contiguous, off a 16-byte
boundary, strided inside a larger buffer (negative steps too), or with its axes permuted. About
15% are backward problems. Sizes are mostly tiny or small, with a share of "medium" problems of
16 to 64 channels a group, where the tensor-core and implicit-GEMM tiles are exercised.

A problem is a function of (seed, index) and of this file: a change to the draws here changes
the problems of every seed, so a repro line holds for the version of this file that printed it.

Every draw is valid (``ConvParams.from_args`` checks it) and kept cheap for the float64
reference: at most :data:`MAX_OUT` output elements and :data:`MAX_MACS` multiply-adds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from cupyconvt._params import ConvParams
from cupyconvt._select import FAMILIES, eligible

DTYPES = ("float64", "float32", "float16", "bfloat16")
LAYOUTS = ("NCDHW", "NDHWC")
PRECISIONS = ("highest", "high", "medium")
NEEDS = ("input", "weight", "bias")
VIEW_KINDS = ("contiguous", "offset", "strided", "permuted")
#: The fuzz seed of the default run (``CUPYCONVT_FUZZ_SEED`` overrides it).
DEFAULT_SEED = 20261124

#: Bounds that keep each problem's float64 reference cheap (a few ms to a few tens of ms).
MAX_OUT = 1_000_000
MAX_MACS = 30_000_000
#: Backward problems: smaller, and at most this many gradient terms summed into one grad_bias
#: or grad_weight element (float16 sums of 20000 terms of mean <= 0.5 stay far from 65504).
MAX_OUT_BACKWARD = 200_000
MAX_SUM_BACKWARD = 20_000

#: How often each eligible family is forced, relative to the others.
FORCE_WEIGHT = {"tc": 6, "igemm": 2, "depthwise": 3, "grouped": 2, "direct": 1}

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class View:
    """How an array of a given shape lies in memory.

    The array's axes are stored in the order ``perm`` (memory axis j holds array axis
    ``perm[j]``); along memory axis j its elements are ``steps[j]`` apart (negative: reversed),
    after ``pads[j]`` unused leading positions; the buffer starts ``offset`` elements into a flat
    allocation (offset views: an odd number, off every 16-byte boundary). Every element of
    the buffer outside the array, and :data:`GUARD` elements after it, hold NaN.
    """

    kind: str = "contiguous"
    perm: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    offset: int = 0

    def __str__(self) -> str:
        parts = [self.kind]
        if self.perm and list(self.perm) != sorted(self.perm):
            parts.append(f"perm={self.perm}")
        if any(s != 1 for s in self.steps) or any(self.pads):
            parts.append(f"steps={self.steps} pads={self.pads}")
        if self.offset:
            parts.append(f"offset={self.offset}")
        return " ".join(parts)


#: NaN elements after every buffer, checked after the call for stray writes.
GUARD = 3


@dataclass(frozen=True)
class FuzzProblem:
    """One random problem; ``str()`` gives all its arguments and a command that reruns it."""

    seed: int
    index: int
    op: str  # "forward" or "backward"
    size_class: str  # "tiny", "small" or "medium"
    group_kind: str  # "dense", "grouped", "depthwise" or "depthwise_mult"
    padding_kind: str  # "none", "some" or "crop" (as much as leaves a non-empty output)
    N: int | None  # None: unbatched x
    C_in: int
    C_out: int
    groups: int
    size: Triple
    kernel: Triple
    stride: Triple
    padding: Triple
    output_padding: Triple
    dilation: Triple
    bias: bool
    dtype: str
    precision: str
    layout: str  # of x and the result; backward problems are NCDHW
    api: str  # "array" (NumPy or CuPy) or "torch"
    family: str | None  # a forced kernel family (forward, arrays API), else the selector's
    needs: tuple[str, ...]  # backward: the gradients asked for
    x_view: View
    w_view: View
    b_view: View | None
    gy_view: View | None  # backward: grad_out
    out_view: View | None  # forward, arrays API: a NaN-poisoned out= (None: out=None)
    means: tuple[float, float, float]  # of x, w and grad_out: nonzero, so a dropped tap shows

    # --- shapes and arguments -----------------------------------------------------------

    @property
    def x_shape(self) -> tuple[int, ...]:
        """x's shape in NCDHW terms (unbatched: no N)."""
        return ((self.N,) if self.N is not None else ()) + (self.C_in, *self.size)

    @property
    def w_shape(self) -> tuple[int, ...]:
        return (self.C_in, self.C_out // self.groups, *self.kernel)

    @property
    def kwargs(self) -> dict:
        """The convolution's arguments (an int where all three axes agree, as users pass)."""
        kw = {}
        for name in ("stride", "padding", "output_padding", "dilation"):
            v = getattr(self, name)
            kw[name] = v[0] if v[0] == v[1] == v[2] else v
        kw["groups"] = self.groups
        return kw

    @cached_property
    def params(self) -> ConvParams:
        return ConvParams.from_args(
            self.x_shape, self.w_shape, (self.C_out,) if self.bias else None, **self.kwargs
        )

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The result's shape in NCDHW terms."""
        return self.params.out_shape

    def in_layout(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """An NCDHW shape as laid out in ``self.layout``."""
        if self.layout == "NDHWC":
            return shape[:-4] + shape[-3:] + shape[-4:-3]
        return shape

    @property
    def repro(self) -> str:
        return (
            f"CUPYCONVT_FUZZ_SEED={self.seed} CUPYCONVT_FUZZ_INDICES={self.index} "
            f'python -m pytest tests/test_fuzz.py -k "{test_id(self.index)}"'
        )

    def __str__(self) -> str:
        p = self.params
        what = "forward"
        if self.op == "backward":
            what = "backward needs=" + (",".join(self.needs) or "()")
        family = "" if self.op == "backward" else f", family={self.family or 'selector'}"
        lines = [
            f"fuzz problem seed={self.seed} index={self.index}: {what}, {self.dtype}, "
            f"precision={self.precision}, layout={self.layout}, api={self.api}"
            f"{family} ({self.size_class}, {self.group_kind}, padding {self.padding_kind})",
            f"  x {self.in_layout(self.x_shape)} [{self.x_view}], w {self.w_shape} "
            f"[{self.w_view}]" + (f", bias ({self.C_out},) [{self.b_view}]" if self.bias else ""),
            f"  stride={self.stride} padding={self.padding} output_padding={self.output_padding} "
            f"dilation={self.dilation} groups={self.groups} -> out "
            f"{self.in_layout(p.out_shape)}, C_in_g={p.C_in_g} C_out_g={p.C_out_g}, "
            f"useful MACs={p.useful_macs}",
        ]
        if self.op == "backward":
            lines.append(f"  grad_out [{self.gy_view}]")
        elif self.api == "array":
            out = "None" if self.out_view is None else f"NaN-poisoned [{self.out_view}]"
            lines.append(f"  out={out}")
        lines.append(
            f"  data means x={self.means[0]:.3f} w={self.means[1]:.3f} grad_out={self.means[2]:.3f}"
        )
        lines.append(f"  repro: {self.repro}")
        return "\n".join(lines)

    # --- data ----------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray | None]:
        """Fresh random data of the problem in its dtype (NCDHW): ``x``, ``w``, ``b`` (or None)
        and, for backward problems, ``gy``. Drawn in float64 and rounded once to the dtype; the
        same (seed, index) gives the same bits."""
        rng = np.random.default_rng([self.seed, self.index, 1])
        dt = np_dtype(self.dtype)
        mx, mw, mg = self.means
        data: dict[str, np.ndarray | None] = {
            "x": rng.normal(mx, 1.0, self.x_shape).astype(dt),
            "w": rng.normal(mw, 1.0, self.w_shape).astype(dt),
            "b": rng.normal(0.0, 1.0, self.C_out).astype(dt) if self.bias else None,
        }
        if self.op == "backward":
            data["gy"] = rng.normal(mg, 1.0, self.out_shape).astype(dt)
        return data


def test_id(index: int) -> str:
    """The pytest id of a problem's test: unique as a ``-k`` substring."""
    return f"p{index:05d}"


test_id.__test__ = False  # a helper, not a test, though its name starts with "test"


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def env_indices(count_var: str, default: int) -> list[int]:
    """The problem indices a run tests: ``CUPYCONVT_FUZZ_INDICES`` if set (comma-separated
    indices and ``start:stop`` ranges, e.g. ``17,1000:2000``: a long run split in parts), else
    ``range(count)`` with the count from ``count_var``."""
    listed = os.environ.get("CUPYCONVT_FUZZ_INDICES", "").strip()
    if not listed:
        return list(range(int(os.environ.get(count_var, default))))
    indices: list[int] = []
    for item in filter(None, (v.strip() for v in listed.split(","))):
        start, _, stop = item.partition(":")
        indices.extend(range(int(start), int(stop)) if stop else [int(start)])
    return indices


def env_seed() -> int:
    return int(os.environ.get("CUPYCONVT_FUZZ_SEED", DEFAULT_SEED))


# --- placing arrays in memory --------------------------------------------------------------


def _bits_dtype(dtype: np.dtype) -> np.dtype:
    """A signed integer dtype of the same size: buffers are filled and copied as raw bits, which
    every array library (and DLPack) handles for every float dtype, bfloat16 included."""
    return np.dtype({2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize])


def nan_bits(dtype: np.dtype) -> int:
    return int(np.array(np.nan, dtype=dtype).view(_bits_dtype(dtype)))


@dataclass
class Placed:
    """An array placed in memory as a :class:`View` says, with the raw buffer around it.

    ``array`` is the view of ``shape`` and dtype (NumPy or CuPy); ``bits`` the whole flat
    allocation as raw integers, ``bits_view`` the array's elements within it (as integers: a
    torch tensor is made from it); ``start``/``stop`` bound the buffer's data region in
    ``bits``, past the leading offset and before the trailing guard.
    """

    array: object
    bits: object
    bits_view: object
    start: int
    stop: int


def place(xp, a: np.ndarray, view: View) -> Placed:
    """``a``'s values in a new array laid out as ``view`` says, on ``xp`` (numpy or cupy); the
    rest of the allocation holds NaN."""
    a = np.ascontiguousarray(a)
    r = a.ndim
    perm = view.perm or tuple(range(r))
    steps = view.steps or (1,) * r
    pads = view.pads or (0,) * r
    mem_shape = [a.shape[j] for j in perm]
    extent = [pads[j] + abs(steps[j]) * mem_shape[j] for j in range(r)]
    n = int(np.prod(extent))
    bits_dt = _bits_dtype(a.dtype)
    flat = xp.full(view.offset + n + GUARD, nan_bits(a.dtype), dtype=bits_dt)
    index = []
    for j in range(r):
        m, s, pad = mem_shape[j], steps[j], pads[j]
        if s > 0:
            index.append(slice(pad, pad + s * (m - 1) + 1, s))
        else:  # reversed: the first element sits at the far end
            last = pad + (-s) * (m - 1)
            index.append(slice(last, pad - 1 if pad > 0 else None, s))
    inverse = tuple(int(v) for v in np.argsort(perm))

    def lay(buf):
        return buf[view.offset : view.offset + n].reshape(extent)[tuple(index)].transpose(inverse)

    bits_view = lay(flat)
    bits_view[...] = xp.asarray(a.view(bits_dt))
    array = lay(flat.view(a.dtype))
    assert array.shape == a.shape
    return Placed(array, flat, bits_view, view.offset, view.offset + n)


# --- the generator ------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options, weights=None):
    """One of ``options`` (weights need not sum to 1)."""
    if weights is None:
        return options[int(rng.integers(len(options)))]
    w = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _draw_geometry(rng: np.random.Generator, op: str) -> dict | None:
    """Shapes and arguments of one problem, or None where the draw is over budget."""
    size_class = _pick(
        rng, ("tiny", "small", "medium"), (40, 35, 25) if op == "forward" else (50, 38, 12)
    )
    group_kind = _pick(rng, ("dense", "grouped", "depthwise", "depthwise_mult"), (45, 25, 15, 15))
    medium = size_class == "medium"
    max_c = {"tiny": 4, "small": 12, "medium": 64}[size_class]

    def channels() -> int:
        if not medium:  # 8 now and then: one 16-byte vector of float16, what tc runs
            return 8 if rng.random() < 0.15 else int(rng.integers(1, max_c + 1))
        if rng.random() < 0.6:  # whole 16-byte vectors of float16: the tensor cores run them
            return int(rng.integers(2, 9)) * 8
        return int(rng.integers(16, 65))

    if group_kind in ("dense", "grouped"):
        groups = 1 if group_kind == "dense" else int(rng.integers(2, 3 if medium else 5))
        cig, cog = channels(), channels()
    else:
        groups = (
            channels() if medium else int(rng.integers(1 if size_class == "tiny" else 2, max_c + 1))
        )
        cig = 1
        cog = 1 if group_kind == "depthwise" else int(rng.integers(2, 5))

    n = _pick(rng, (None, 0, 1, 2, 3), (15, 10, 35, 25, 15))
    if medium and n is not None:
        n = min(n, 2)
    max_size = {"tiny": 5, "small": 12, "medium": 14}[size_class]
    max_k = 3 if medium else 5
    padding_kind = _pick(rng, ("none", "some", "crop"), (35, 50, 15))
    # Depthwise layers are often 2x upsamplers (stride 2, the same 2-4 taps on every axis,
    # dilation 1): the depthwise family runs those and nothing else.
    upsampler = group_kind.startswith("depthwise") and rng.random() < 0.4
    taps = int(rng.integers(2, 5)) if upsampler else 0
    size, k, s, p, op_, d = [], [], [], [], [], []
    for _ in range(3):
        size.append(int(rng.integers(2 if medium else 1, max_size + 1)))
        if upsampler:
            k.append(taps)
            s.append(2)
            d.append(1)
        else:
            k.append(int(rng.integers(1, max_k + 1)))
            s.append(_pick(rng, (1, 2, 3, 4), (35, 35, 15, 15)))
            d.append(_pick(rng, (1, 2, 3), (60, 25, 15)))
        limit = max(s[-1], d[-1])
        op_.append(0 if rng.random() < 0.5 else int(rng.integers(0, limit)))
        full = (size[-1] - 1) * s[-1] + d[-1] * (k[-1] - 1) + op_[-1] + 1
        p_max = (full - 1) // 2  # the most that leaves an output of at least one voxel
        if padding_kind == "none":
            p.append(0)
        elif padding_kind == "some":
            p.append(int(rng.integers(0, min(p_max, 3) + 1)))
        else:  # crop everything it can on some axes, a little on the others
            p.append(p_max if rng.random() < 0.6 else int(rng.integers(0, p_max + 1)))
    geometry = dict(
        size_class=size_class,
        group_kind=group_kind,
        padding_kind=padding_kind,
        N=n,
        C_in=cig * groups,
        C_out=cog * groups,
        groups=groups,
        size=tuple(size),
        kernel=tuple(k),
        stride=tuple(s),
        padding=tuple(p),
        output_padding=tuple(op_),
        dilation=tuple(d),
    )
    x_shape = ((n,) if n is not None else ()) + (cig * groups, *size)
    params = ConvParams.from_args(
        x_shape,
        (cig * groups, cog, *k),
        None,
        stride=tuple(s),
        padding=tuple(p),
        output_padding=tuple(op_),
        groups=groups,
        dilation=tuple(d),
    )
    batch = max(params.N if params.batched else 1, 1)
    out_voxels = int(np.prod(params.out_size))
    in_voxels = int(np.prod(params.in_size))
    out_elems = batch * params.C_out * out_voxels
    if op == "forward":
        ok = out_elems <= MAX_OUT and params.useful_macs <= MAX_MACS
    else:
        ok = (
            out_elems <= MAX_OUT_BACKWARD
            and params.useful_macs <= MAX_MACS // 2
            and batch * max(out_voxels, in_voxels) <= MAX_SUM_BACKWARD
        )
    return geometry if ok else None


def _draw_view(
    rng: np.random.Generator, ndim: int, kind: str, channel_axis: int | None, allow_reversed: bool
) -> View:
    """A :class:`View` of ``kind`` for an array of ``ndim`` axes."""
    if kind == "contiguous":
        return View()
    if kind == "offset":
        # Odd: off a 16-byte boundary (and an 8-byte one) for every itemsize.
        return View("offset", offset=_pick(rng, (1, 3, 5)))
    if kind == "strided":
        steps = [int(_pick(rng, (1, 2, 3), (50, 35, 15))) for _ in range(ndim)]
        pads = [int(rng.integers(0, 2)) for _ in range(ndim)]
        if all(s == 1 for s in steps):
            steps[int(rng.integers(ndim))] = 2
        if allow_reversed and rng.random() < 0.3:
            axis = int(rng.integers(ndim))
            steps[axis] = -steps[axis]
        return View("strided", steps=tuple(steps), pads=tuple(pads), offset=int(rng.integers(0, 4)))
    # permuted: channels moved to the other end (channels-last memory for NCDHW, channels-first
    # for NDHWC), else a random order of the axes
    identity = list(range(ndim))
    if channel_axis is not None and rng.random() < 0.6:
        perm = [a for a in identity if a != channel_axis]
        if channel_axis == ndim - 1:  # NDHWC: channels go first (after N)
            perm.insert(ndim - 4, channel_axis)
        else:
            perm.append(channel_axis)
    else:
        perm = list(rng.permutation(ndim))
        if perm == identity:
            perm = identity[::-1]
    offset = int(rng.integers(0, 4)) if rng.random() < 0.3 else 0
    return View("permuted", perm=tuple(int(v) for v in perm), offset=offset)


def problem(seed: int, index: int) -> FuzzProblem:
    """The problem ``index`` of the run with ``seed``; depends on nothing else."""
    rng = np.random.default_rng([seed, index])
    op = "backward" if rng.random() < 0.15 else "forward"
    geometry = None
    while geometry is None:
        geometry = _draw_geometry(rng, op)
    has_bias = op == "forward" and bool(rng.random() < 0.5)
    dtype = _pick(rng, DTYPES, (20, 40, 20, 20))
    precision = _pick(rng, PRECISIONS)
    api = "torch" if rng.random() < 0.1 else "array"
    layout = "NDHWC" if op == "forward" and api == "array" and rng.random() < 0.35 else "NCDHW"
    batched = geometry["N"] is not None
    x_ndim = 5 if batched else 4
    if layout == "NCDHW":
        channel_axis = 1 if batched else 0
    else:
        channel_axis = x_ndim - 1
    reversed_ok = api == "array"

    def view_for(ndim, weights, channel_axis=None):
        kind = _pick(rng, VIEW_KINDS, weights)
        return _draw_view(rng, ndim, kind, channel_axis, reversed_ok)

    x_view = view_for(x_ndim, (40, 20, 20, 20), channel_axis)
    w_view = view_for(5, (70, 10, 10, 10))
    b_view = view_for(1, (80, 10, 10, 0)) if has_bias else None
    gy_view = view_for(x_ndim, (40, 20, 20, 20), channel_axis) if op == "backward" else None
    out_view = None
    if op == "forward" and api == "array" and rng.random() < 0.75:
        out_view = view_for(x_ndim, (80, 20, 0, 0))
    needs = NEEDS
    if op == "backward":
        r = rng.random()
        if r < 0.05:
            needs = ()
        elif r < 0.45:
            mask = rng.random(3) < 0.5
            if not mask.any() or mask.all():
                mask = np.zeros(3, bool)
                mask[int(rng.integers(3))] = True
            needs = tuple(n for n, m in zip(NEEDS, mask, strict=True) if m)
    means = tuple(float(rng.choice([-1, 1]) * rng.uniform(0.1, 0.5)) for _ in range(3))
    prob = FuzzProblem(
        seed=seed,
        index=index,
        op=op,
        **geometry,
        bias=has_bias,
        dtype=dtype,
        precision=precision,
        layout=layout,
        api=api,
        family=None,
        needs=needs,
        x_view=x_view,
        w_view=w_view,
        b_view=b_view,
        gy_view=gy_view,
        out_view=out_view,
        means=means,
    )
    if op == "forward" and api == "array" and rng.random() < 0.35:
        # The tensor-core family applies to fewest problems: favour it where it does.
        families = [f for f in FAMILIES if eligible(prob.params, dtype, f, precision)]
        weights = [FORCE_WEIGHT[f] for f in families]
        prob = replace(prob, family=_pick(rng, families, weights))
    return prob
