"""cupyconvt: fast, exact 3D transposed convolution for CuPy, NumPy and PyTorch arrays.

>>> import cupyconvt
>>> y = cupyconvt.conv_transpose3d(x, w, bias, stride=2, padding=1)  # doctest: +SKIP
"""

from __future__ import annotations

from ._api import conv_transpose3d
from ._autotune import enabled as autotune_enabled
from ._backward import conv_transpose3d_backward
from ._params import ConvParams, output_shape
from ._precision import get_float32_matmul_precision, set_float32_matmul_precision
from ._select import set_autotune

__version__ = "0.1.0"
__all__ = [
    "conv_transpose3d",
    "conv_transpose3d_backward",
    "output_shape",
    "ConvParams",
    "set_autotune",
    "autotune_enabled",
    "set_float32_matmul_precision",
    "get_float32_matmul_precision",
    "__version__",
]
