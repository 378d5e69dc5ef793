"""Which dtypes each backend accepts, and how bfloat16 is recognized without importing it."""

from __future__ import annotations

import numpy as np

#: dtypes with a kernel of their own on the GPU (bfloat16 arrives as ml_dtypes.bfloat16).
GPU_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: dtypes the CPU backend accepts; float16 and bfloat16 are computed in float32.
CPU_DTYPES = GPU_DTYPES


_NAMES: dict[object, str] = {}


def dtype_name(dtype: object) -> str:
    """Canonical name of a NumPy/CuPy dtype (``'bfloat16'`` for ml_dtypes' bfloat16).

    Memoized: ``np.dtype(...).name`` costs several microseconds, and it is asked on every call.
    """
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype-like
        name = np.dtype(dtype).name  # type: ignore[arg-type]
    try:
        _NAMES[dtype] = name
    except TypeError:
        pass
    return name


def check_dtype(arg: str, dtype: object, supported: tuple[str, ...]) -> str:
    """Return the dtype's name, or raise ``TypeError`` naming the argument and what is allowed."""
    name = dtype_name(dtype)
    if name not in supported:
        raise TypeError(f"{arg} has unsupported dtype {name}; supported: {', '.join(supported)}")
    return name


def compute_dtype(name: str) -> np.dtype:
    """The dtype the CPU backend accumulates in."""
    return np.dtype(np.float64) if name == "float64" else np.dtype(np.float32)
