"""The float32 precision policy, named after ``torch.set_float32_matmul_precision``.

- ``"highest"``: IEEE float32 arithmetic (FMA), denormals kept. The default: the library never
  lowers float32 precision unless asked.
- ``"high"``: 3xTF32 on tensor cores. Each float32 operand is split into a TF32 "big" part and a
  TF32 remainder, and three TF32 products are summed in float32, which is about as accurate as
  float32 arithmetic.
- ``"medium"``: plain TF32 on tensor cores (10 mantissa bits per operand, float32 accumulation):
  the fastest, with a relative error near 1e-3.

The policy applies to float32 inputs on the GPU only. float64 is always float64, and float16 and
bfloat16 always use tensor cores with float32 accumulation. The CPU backend computes every
precision in IEEE float32 (or float64), at least as accurately as asked. The setting is this
library's own: torch's ``set_float32_matmul_precision`` is not consulted.
"""

from __future__ import annotations

#: The accepted values, most accurate first.
PRECISIONS = ("highest", "high", "medium")

# The process-wide default. One module global: reading and rebinding it are atomic, so threads
# see either the old or the new value, never a torn one.
_default = "highest"


def _validate(precision: object) -> str:
    if not isinstance(precision, str):
        raise TypeError(
            f"precision must be a str, one of {', '.join(map(repr, PRECISIONS))}; "
            f"got {type(precision).__name__} {precision!r}"
        )
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}"
        )
    return str(precision)


def resolve(precision: str | None) -> str:
    """The precision a call runs at: ``None`` gives the process default, else it is validated."""
    if precision is None:
        return _default
    if type(precision) is str and precision in PRECISIONS:  # the common case: no message built
        return precision
    return _validate(precision)


def set_float32_matmul_precision(precision: str) -> None:
    """Set the process-wide default precision of float32 convolutions on the GPU.

    Parameters
    ----------
    precision : {"highest", "high", "medium"}
        ``"highest"``: IEEE float32 arithmetic (the default). ``"high"``: 3xTF32 on tensor cores,
        about as accurate as float32. ``"medium"``: plain TF32 on tensor cores (relative error
        near 1e-3). A call's own ``precision=`` argument overrides this default.

    Raises
    ------
    TypeError
        ``precision`` is not a str.
    ValueError
        ``precision`` is not one of the three names.

    Notes
    -----
    Only float32 inputs on the GPU are affected. The CPU backend computes every precision in IEEE
    float32. This setting is independent of ``torch.set_float32_matmul_precision``.

    Examples
    --------
    >>> import cupyconvt
    >>> cupyconvt.set_float32_matmul_precision("high")
    >>> cupyconvt.get_float32_matmul_precision()
    'high'
    >>> cupyconvt.set_float32_matmul_precision("highest")
    """
    global _default
    _default = _validate(precision)


def get_float32_matmul_precision() -> str:
    """The process-wide default precision of float32 convolutions on the GPU.

    Examples
    --------
    >>> import cupyconvt
    >>> cupyconvt.get_float32_matmul_precision()
    'highest'
    """
    return _default
