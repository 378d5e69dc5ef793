"""One table of sample problems and one of error inputs, shared by the CPU, GPU and torch tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class Case:
    """A small conv_transpose3d problem: x is (N, C_in, *size) (unbatched when N is None)."""

    name: str
    N: int | None
    C_in: int
    C_out: int
    size: tuple[int, int, int]
    k: tuple[int, int, int]
    kwargs: dict = field(default_factory=dict)
    bias: bool = False

    @property
    def groups(self) -> int:
        return self.kwargs.get("groups", 1)

    @property
    def x_shape(self) -> tuple[int, ...]:
        return ((self.N,) if self.N is not None else ()) + (self.C_in, *self.size)

    @property
    def w_shape(self) -> tuple[int, ...]:
        return (self.C_in, self.C_out // self.groups, *self.k)

    def arrays(self, rng: np.random.Generator, dtype=np.float64):
        """Fresh random inputs (never zeros) in ``dtype``."""
        x = rng.standard_normal(self.x_shape).astype(dtype)
        w = rng.standard_normal(self.w_shape).astype(dtype)
        b = rng.standard_normal(self.C_out).astype(dtype) if self.bias else None
        return x, w, b

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("plain_k3", 2, 3, 4, (4, 5, 6), (3, 3, 3)),
    Case("k1", 1, 5, 3, (3, 4, 5), (1, 1, 1), bias=True),
    Case("asym_kernel", 2, 4, 2, (3, 4, 5), (2, 3, 4)),
    Case("stride2", 2, 3, 2, (3, 4, 5), (3, 3, 3), dict(stride=2)),
    Case("stride_asym", 1, 2, 3, (3, 4, 3), (3, 2, 4), dict(stride=(1, 2, 3))),
    Case("stride_gt_kernel", 1, 2, 2, (3, 3, 3), (2, 2, 2), dict(stride=3)),
    Case("padding", 2, 3, 2, (4, 4, 5), (3, 3, 3), dict(padding=1)),
    Case("padding_asym", 1, 2, 3, (4, 5, 6), (3, 5, 3), dict(stride=2, padding=(0, 2, 1))),
    Case("output_padding", 1, 3, 2, (3, 4, 5), (3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    Case("output_padding_gt_padding", 1, 2, 2, (3, 3, 4), (2, 3, 3),
         dict(stride=3, padding=(0, 1, 0), output_padding=(2, 1, 1))),
    Case("dilation", 1, 3, 2, (4, 4, 4), (3, 3, 3), dict(dilation=2)),
    Case("dilation_asym", 2, 2, 2, (3, 4, 5), (2, 3, 2), dict(dilation=(1, 2, 3), padding=(0, 1, 2))),
    Case("dilation_stride", 1, 4, 4, (3, 4, 3), (3, 3, 3),
         dict(stride=2, dilation=2, padding=1, output_padding=1)),
    Case("output_padding_from_dilation", 1, 2, 3, (3, 3, 3), (2, 2, 2),
         dict(stride=1, dilation=3, output_padding=2)),
    Case("groups2", 2, 4, 6, (3, 4, 5), (3, 3, 3), dict(groups=2), bias=True),
    Case("groups_strided", 1, 6, 9, (3, 3, 4), (3, 2, 3), dict(groups=3, stride=2, padding=1)),
    Case("depthwise", 2, 4, 4, (4, 5, 6), (4, 4, 4), dict(groups=4, stride=2, padding=1)),
    Case("depthwise_multiplier", 1, 3, 6, (3, 4, 4), (3, 3, 3), dict(groups=3, stride=(2, 1, 2))),
    Case("bias", 2, 3, 5, (3, 3, 3), (2, 2, 2), dict(stride=2), bias=True),
    Case("unbatched", None, 3, 2, (3, 4, 5), (3, 3, 3), dict(stride=2, padding=1), bias=True),
    Case("odd_sizes", 3, 5, 7, (1, 7, 2), (1, 3, 2), dict(stride=(3, 1, 2), padding=(0, 1, 0))),
    Case("size_one", 1, 1, 1, (1, 1, 1), (1, 1, 1)),
    Case("big_padding_crop", 1, 2, 2, (5, 5, 5), (3, 3, 3), dict(stride=2, padding=3)),
    Case("everything", 2, 6, 4, (3, 4, 3), (3, 2, 3),
         dict(stride=(2, 3, 1), padding=(1, 0, 2), output_padding=(1, 2, 0), groups=2,
              dilation=(1, 2, 2)), bias=True),
]  # fmt: skip


# (x shape, w shape, bias shape or None, kwargs, exception, regex of the message)
ERROR_INPUTS = [
    ((3, 4, 4, 4), (3, 2, 3, 3, 3), None, {}, None, None),  # unbatched 4D is fine: control row
    ((3, 4, 4), (3, 2, 3, 3, 3), None, {}, ValueError, r"x must be 5D .* got 3D"),
    ((1, 2, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {}, ValueError, r"x must be 5D .* got 6D"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3), None, {}, ValueError, r"w must be 5D"),
    ((1, 3, 4, 4, 4), (4, 2, 3, 3, 3), None, {}, ValueError,
     r"channel mismatch: x has C_in=3 channels but w.shape\[0\]=4"),
    ((1, 6, 4, 4, 4), (6, 2, 3, 3, 3), None, {"groups": 4}, ValueError, r"groups=4 must divide C_in=6"),
    ((1, 6, 4, 4, 4), (6, 2, 3, 3, 3), None, {"groups": 0}, ValueError, r"groups=0 must be >= 1"),
    ((1, 3, 4, 4, 4), (3, 0, 3, 3, 3), None, {}, ValueError, r"C_out/groups\) must be >= 1"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 0, 3), None, {}, ValueError, r"kernel size w.shape\[3\]=0"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"stride": 0}, ValueError, r"stride\[0\]=0 must be >= 1"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"stride": (1, -1, 1)}, ValueError,
     r"stride\[1\]=-1 must be >= 1"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"dilation": (1, 1, 0)}, ValueError,
     r"dilation\[2\]=0 must be >= 1"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"padding": -1}, ValueError,
     r"padding\[0\]=-1 must be >= 0"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"stride": 2, "output_padding": (0, 2, 0)},
     ValueError, r"output_padding\[1\]=2 must be smaller than max\(stride\[1\], dilation\[1\]\)=2"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"output_padding": 1}, ValueError,
     r"output_padding\[0\]=1 must be smaller than max\(stride\[0\], dilation\[0\]\)=1"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"output_padding": -1}, ValueError,
     r"output_padding\[0\]=-1 must be >= 0"),
    ((1, 3, 2, 4, 4), (3, 2, 1, 3, 3), None, {"padding": (1, 0, 0)}, ValueError,
     r"output depth size would be 0 \(must be > 0\)"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), (5,), {}, ValueError, r"bias must have shape \(C_out,\)=\(2,\)"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), (1, 2), {}, ValueError, r"bias must have shape"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"stride": (1, 2)}, ValueError,
     r"stride must be an int or a sequence of 3 ints, got 2 values"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"stride": 1.5}, TypeError, r"stride must be an int"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"padding": True}, TypeError,
     r"padding must be an int, got bool"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"groups": 1.0}, TypeError, r"groups must be an int"),
    ((1, 3, 4, 4, 4), (3, 2, 3, 3, 3), None, {"dilation": "2"}, TypeError,
     r"dilation must be an int or a sequence of 3 ints"),
    ((1, 0, 4, 4, 4), (0, 2, 3, 3, 3), None, {}, ValueError, r"C_in=0 channels"),
    ((1, 3, 4, 0, 4), (3, 2, 3, 3, 3), None, {}, ValueError, r"x height size is 0"),
]  # fmt: skip


@st.composite
def random_cases(
    draw, max_size: int = 5, max_n: int = 2, max_channels: int = 3, bias: bool = False
) -> Case:
    """Random valid problems for hypothesis: every argument drawn per axis, within PyTorch's
    rules (``output_padding < max(stride, dilation)``, padding at most half the full extent).
    ``max_channels`` bounds the channels per group; ``bias`` draws one too."""
    groups = draw(st.integers(1, 3))
    cig = draw(st.integers(1, max_channels))
    cog = draw(st.integers(1, max_channels))
    n = draw(st.one_of(st.none(), st.integers(1, max_n)))
    size, k, s, p, op, d = [], [], [], [], [], []
    for _ in range(3):
        size.append(draw(st.integers(1, max_size)))
        k.append(draw(st.integers(1, 4)))
        s.append(draw(st.integers(1, 3)))
        d.append(draw(st.integers(1, 3)))
        op.append(draw(st.integers(0, max(s[-1], d[-1]) - 1)))
        full = (size[-1] - 1) * s[-1] + d[-1] * (k[-1] - 1) + op[-1] + 1
        p.append(draw(st.integers(0, max(0, (full - 1) // 2))))
    kwargs = dict(stride=tuple(s), padding=tuple(p), output_padding=tuple(op), groups=groups,
                  dilation=tuple(d))  # fmt: skip
    has_bias = draw(st.booleans()) if bias else False
    return Case("fuzz", n, cig * groups, cog * groups, tuple(size), tuple(k), kwargs, has_bias)
