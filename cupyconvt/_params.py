"""Argument normalization, validation and output-size math for conv_transpose3d.

Everything here is pure Python: it runs (and is tested) without a GPU. Kernels and backends
receive a :class:`ConvParams` and never re-check what it guarantees.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property

Triple = tuple[int, int, int]
IntOrTriple = int | Sequence[int]

_AXES = ("depth", "height", "width")


def _as_int(name: str, value: object) -> int:
    """Accept Python and NumPy integers (not bools, not floats) and return an ``int``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def as_triple(name: str, value: IntOrTriple) -> Triple:
    """Normalize an int or a sequence of three ints into a triple ``(d, h, w)``."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got {value!r}")
    if isinstance(value, Sequence) or hasattr(value, "__len__"):
        items = list(value)  # type: ignore[arg-type]
        if len(items) != 3:
            raise ValueError(
                f"{name} must be an int or a sequence of 3 ints, got {len(items)} values: {value!r}"
            )
        return tuple(_as_int(f"{name}[{i}]", v) for i, v in enumerate(items))  # type: ignore[return-value]
    v = _as_int(name, value)
    return (v, v, v)


def _check_min(name: str, triple: Triple, minimum: int) -> None:
    for i, v in enumerate(triple):
        if v < minimum:
            raise ValueError(f"{name}[{i}]={v} must be >= {minimum}")


def _taps_hitting_output(n_in: int, k: int, s: int, p: int, dil: int, n_out: int) -> int:
    """Number of (input index, tap) pairs along one axis whose target lies inside the output."""
    count = 0
    for kk in range(k):
        # o = i*s - p + kk*dil must lie in [0, n_out): count the i in [0, n_in) that satisfy it.
        off = kk * dil - p
        lo = max(0, -(off // s))  # smallest i with i*s + off >= 0
        hi_bound = n_out - 1 - off  # i*s <= hi_bound
        if hi_bound < 0:
            continue
        hi = min(n_in - 1, hi_bound // s)
        if hi >= lo:
            count += hi - lo + 1
    return count


@dataclass(frozen=True)
class ConvParams:
    """A validated conv_transpose3d problem: shapes, normalized triples and the output size.

    ``x`` is ``(N, C_in, D, H, W)`` (or unbatched ``(C_in, D, H, W)``, then ``batched`` is False
    and ``N`` is 1), ``w`` is ``(C_in, C_out // groups, kD, kH, kW)``.
    """

    N: int
    C_in: int
    C_out: int
    groups: int
    in_size: Triple
    kernel: Triple
    stride: Triple
    padding: Triple
    output_padding: Triple
    dilation: Triple
    out_size: Triple
    batched: bool
    has_bias: bool

    @classmethod
    def from_args(
        cls,
        x_shape: Sequence[int],
        w_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        stride: IntOrTriple = 1,
        padding: IntOrTriple = 0,
        output_padding: IntOrTriple = 0,
        groups: int = 1,
        dilation: IntOrTriple = 1,
    ) -> ConvParams:
        """Validate shapes and arguments (PyTorch's rules) and compute the output size."""
        x_shape = tuple(int(s) for s in x_shape)
        w_shape = tuple(int(s) for s in w_shape)
        if len(x_shape) not in (4, 5):
            raise ValueError(
                f"x must be 5D (N, C_in, D, H, W) or unbatched 4D (C_in, D, H, W), "
                f"got {len(x_shape)}D with shape {x_shape}"
            )
        if len(w_shape) != 5:
            raise ValueError(
                f"w must be 5D (C_in, C_out/groups, kD, kH, kW), got {len(w_shape)}D "
                f"with shape {w_shape}"
            )
        batched = len(x_shape) == 5
        n = x_shape[0] if batched else 1
        c_in = x_shape[1] if batched else x_shape[0]
        in_size = x_shape[-3:]
        stride_t = as_triple("stride", stride)
        padding_t = as_triple("padding", padding)
        output_padding_t = as_triple("output_padding", output_padding)
        dilation_t = as_triple("dilation", dilation)
        groups = _as_int("groups", groups)

        if groups < 1:
            raise ValueError(f"groups={groups} must be >= 1")
        if c_in < 1:
            raise ValueError(f"x has C_in={c_in} channels; at least 1 is required")
        for i, v in enumerate(in_size):
            if v < 1:
                raise ValueError(
                    f"x {_AXES[i]} size is {v}: every spatial size must be >= 1 (shape {x_shape})"
                )
        if w_shape[0] != c_in:
            raise ValueError(
                f"channel mismatch: x has C_in={c_in} channels but w.shape[0]={w_shape[0]} "
                f"(w must be (C_in, C_out/groups, kD, kH, kW))"
            )
        if c_in % groups:
            raise ValueError(f"groups={groups} must divide C_in={c_in}")
        if w_shape[1] < 1:
            raise ValueError(f"w.shape[1]={w_shape[1]} (C_out/groups) must be >= 1")
        kernel = w_shape[2:]
        for i, v in enumerate(kernel):
            if v < 1:
                raise ValueError(f"kernel size w.shape[{2 + i}]={v} must be >= 1")
        c_out = w_shape[1] * groups
        if c_out % groups:  # cannot happen with the weight layout, kept as the stated rule
            raise ValueError(f"groups={groups} must divide C_out={c_out}")

        _check_min("stride", stride_t, 1)
        _check_min("dilation", dilation_t, 1)
        _check_min("padding", padding_t, 0)
        _check_min("output_padding", output_padding_t, 0)
        for i in range(3):
            limit = max(stride_t[i], dilation_t[i])
            if output_padding_t[i] >= limit:
                raise ValueError(
                    f"output_padding[{i}]={output_padding_t[i]} must be smaller than "
                    f"max(stride[{i}], dilation[{i}])={limit}"
                )
        out_size = tuple(
            (in_size[i] - 1) * stride_t[i]
            - 2 * padding_t[i]
            + dilation_t[i] * (kernel[i] - 1)
            + output_padding_t[i]
            + 1
            for i in range(3)
        )
        for i, v in enumerate(out_size):
            if v <= 0:
                raise ValueError(
                    f"output {_AXES[i]} size would be {v} (must be > 0): "
                    f"(in={in_size[i]} - 1)*stride={stride_t[i]} - 2*padding={padding_t[i]} "
                    f"+ dilation={dilation_t[i]}*(kernel={kernel[i]} - 1) "
                    f"+ output_padding={output_padding_t[i]} + 1"
                )
        out_elems = n * c_out * out_size[0] * out_size[1] * out_size[2]
        if out_elems > 2**63 - 1:
            raise ValueError(
                f"the output would have N*C_out*D_out*H_out*W_out = {out_elems} elements "
                f"(shape {(n, c_out, *out_size)}), more than 2**63 - 1: no array can hold it"
            )
        if bias_shape is not None:
            bias_shape = tuple(int(s) for s in bias_shape)
            if bias_shape != (c_out,):
                raise ValueError(f"bias must have shape (C_out,)=({c_out},), got {bias_shape}")
        return cls(
            N=n,
            C_in=c_in,
            C_out=c_out,
            groups=groups,
            in_size=in_size,  # type: ignore[arg-type]
            kernel=kernel,  # type: ignore[arg-type]
            stride=stride_t,
            padding=padding_t,
            output_padding=output_padding_t,
            dilation=dilation_t,
            out_size=out_size,  # type: ignore[arg-type]
            batched=batched,
            has_bias=bias_shape is not None,
        )

    def __hash__(self) -> int:
        # Plans are cached per problem and looked up on every call: hash the fields once.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def C_in_g(self) -> int:
        """Input channels per group."""
        return self.C_in // self.groups

    @property
    def C_out_g(self) -> int:
        """Output channels per group."""
        return self.C_out // self.groups

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the result, unbatched when the input was."""
        shape = (self.N, self.C_out, *self.out_size)
        return shape if self.batched else shape[1:]

    @property
    def x_shape5(self) -> tuple[int, ...]:
        return (self.N, self.C_in, *self.in_size)

    @property
    def out_shape5(self) -> tuple[int, ...]:
        return (self.N, self.C_out, *self.out_size)

    def full_size(self, axis: int) -> int:
        """Length of the uncropped result along spatial ``axis``: ``(n-1)*s + dil*(k-1) + 1``."""
        return (
            (self.in_size[axis] - 1) * self.stride[axis]
            + self.dilation[axis] * (self.kernel[axis] - 1)
            + 1
        )

    def window(self, start: Triple, length: Triple) -> ConvParams:
        """The same convolution, computing only a window of the uncropped result.

        Along each spatial axis the result holds the ``length`` outputs that begin at index
        ``start`` of the uncropped result (:meth:`full_size` long, before any padding crops it),
        which is what padding ``start`` computes, ending wherever ``length`` says: an
        asymmetric crop. The kernels and the CPU backend need nothing else (they read
        ``padding`` and ``out_size``; ``output_padding`` is set to the value that keeps the
        output-size formula true, and may lie outside PyTorch's range). For internal callers
        (``cupyconvt.dask`` computes each output block this way, without a wider result to cut
        down); the public functions never build one.
        """
        for axis in range(3):
            if not (0 <= start[axis] and 1 <= length[axis]
                    and start[axis] + length[axis] <= self.full_size(axis)):  # fmt: skip
                raise ValueError(
                    f"window start={start[axis]}, length={length[axis]} does not lie in the "
                    f"uncropped result of {self.full_size(axis)} along {_AXES[axis]}"
                )
        out_pad = tuple(length[a] - self.full_size(a) + 2 * start[a] for a in range(3))
        return replace(self, padding=tuple(start), output_padding=out_pad,
                       out_size=tuple(length))  # fmt: skip

    @cached_property
    def useful_macs(self) -> int:
        """Multiply-adds whose product lands inside the output (what any exact method must do)."""
        per_axis = 1
        for i in range(3):
            per_axis *= _taps_hitting_output(
                self.in_size[i],
                self.kernel[i],
                self.stride[i],
                self.padding[i],
                self.dilation[i],
                self.out_size[i],
            )
        return self.N * self.C_out * self.C_in_g * per_axis

    def min_bytes(self, itemsize: int) -> int:
        """Fewest bytes any implementation must move: read x, w, bias once; write out once."""
        n_x = self.N * self.C_in * self.in_size[0] * self.in_size[1] * self.in_size[2]
        n_w = self.C_in * self.C_out_g * self.kernel[0] * self.kernel[1] * self.kernel[2]
        n_out = self.N * self.C_out * self.out_size[0] * self.out_size[1] * self.out_size[2]
        return itemsize * (n_x + n_w + n_out + (self.C_out if self.has_bias else 0))


def output_shape(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    output_padding: IntOrTriple = 0,
    groups: int = 1,
    dilation: IntOrTriple = 1,
) -> tuple[int, ...]:
    """Shape of ``conv_transpose3d(x, w, ...)`` for inputs of the given shapes.

    Applies the same validation as :func:`cupyconvt.conv_transpose3d` and raises the same errors.

    Examples
    --------
    >>> output_shape((2, 8, 16, 16, 16), (8, 4, 3, 3, 3), stride=2, padding=1, output_padding=1)
    (2, 4, 32, 32, 32)
    """
    return ConvParams.from_args(
        x_shape, w_shape, None, stride, padding, output_padding, groups, dilation
    ).out_shape
