"""Memory layouts of ``x`` and of the result: NCDHW (PyTorch's default) or channels-last NDHWC.

The problem itself is always described in NCDHW terms (``ConvParams``, the "logical" shape); a
layout only says in which order the axes of ``x`` and of the result lie in memory. The weight
keeps PyTorch's layout ``(C_in, C_out/groups, kD, kH, kW)`` in both.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The accepted layouts: channels first (the default) and channels last.
LAYOUTS = ("NCDHW", "NDHWC")


def check_layout(layout: object) -> str:
    """Return ``layout`` if it is one of :data:`LAYOUTS`, else raise naming the argument."""
    if not isinstance(layout, str):
        raise TypeError(
            f"layout must be a str, one of {', '.join(map(repr, LAYOUTS))}; "
            f"got {type(layout).__name__} {layout!r}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    return str(layout)


def to_logical_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The NCDHW shape of an array of ``shape`` in ``layout``.

    NDHWC ``(N, D, H, W, C)`` gives ``(N, C, D, H, W)`` and unbatched ``(D, H, W, C)`` gives
    ``(C, D, H, W)``. Other ranks come back unchanged, for ``ConvParams`` to reject.
    """
    shape = tuple(shape)
    if layout == "NDHWC" and len(shape) in (4, 5):
        return shape[:-4] + shape[-1:] + shape[-4:-1]
    return shape


def from_logical_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The shape in ``layout`` of an array whose NCDHW shape is ``shape``: the inverse of
    :func:`to_logical_shape`."""
    shape = tuple(shape)
    if layout == "NDHWC" and len(shape) in (4, 5):
        return shape[:-4] + shape[-3:] + shape[-4:-3]
    return shape


def check_x_rank(shape: Sequence[int], layout: str) -> None:
    """Reject an ``x`` that is neither 5D nor 4D, describing the axes in ``layout``.

    ``ConvParams`` checks the rank too, but its message describes NCDHW axes.
    """
    if len(shape) not in (4, 5):
        axes = "(N, C_in, D, H, W)" if layout == "NCDHW" else "(N, D, H, W, C_in)"
        unbatched = "(C_in, D, H, W)" if layout == "NCDHW" else "(D, H, W, C_in)"
        raise ValueError(
            f"x must be 5D {axes} or unbatched 4D {unbatched} for layout={layout!r}, "
            f"got {len(shape)}D with shape {tuple(shape)}"
        )
