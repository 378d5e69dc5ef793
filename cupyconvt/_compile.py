"""The compile/cache layer: kernel sources, NVRTC options and the per-device module cache.

A :class:`KernelModule` names one ``kernels/<file>.cu`` and the template instantiations
(``name_expressions``) to build from it. :meth:`KernelModule.source` and
:attr:`KernelModule.options` are exactly what the runtime hands to ``cupy.RawModule`` and what
the CI test hands to NVRTC directly, so CI compiles what runs.

Local ``#include "x.cuh"`` lines are expanded here, in Python, so the source string is
self-contained: CuPy's on-disk cache is keyed by that string, and a changed header changes it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

#: NVRTC options used for every kernel (the architecture is added by CuPy or the CI test).
BASE_OPTIONS: tuple[str, ...] = ("--std=c++17",)

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_dir() -> Path:
    """Directory holding the ``.cu``/``.cuh`` files: inside the installed package, else the repo."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"cupyconvt kernel sources not found in {here / 'kernels'} or {here.parent / 'kernels'}"
    )


@cache
def load_source(filename: str) -> str:
    """Read ``kernels/<filename>`` with its local includes expanded (each header once)."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (root / name).read_text(encoding="utf-8")
        text = text.replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


@dataclass(frozen=True)
class KernelModule:
    """One compiled unit: a source file and the template instantiations built from it."""

    filename: str
    name_expressions: tuple[str, ...]
    options: tuple[str, ...] = BASE_OPTIONS

    def source(self) -> str:
        return load_source(self.filename)


def every_module() -> list[KernelModule]:
    """Every kernel module the package can compile: the forward families' (``_select``), the
    gradients' (``_backward_gpu``) and ``cupyconvt.dask``'s slab gather (``_slab``). What the CI
    compile test builds and ``scripts/sass_diff.py`` compares."""
    from ._backward_gpu import all_backward_modules
    from ._select import all_modules
    from ._slab import slab_module

    return all_modules() + all_backward_modules() + [slab_module()]


_lock = threading.Lock()
_modules: dict[tuple[KernelModule, int], Any] = {}
_functions: dict[tuple[KernelModule, str, int], Any] = {}
_smem_limit: dict[tuple[KernelModule, str, int], int] = {}
_launchers: dict[int, Any] = {}


def get_function(module: KernelModule, name_expression: str, dynamic_smem: int = 0) -> Any:
    """The ``cupy.RawModule`` function for ``name_expression``, compiled once per device.

    ``dynamic_smem`` raises the function's dynamic shared-memory limit to it (once per function
    and size): CUDA's default allows 48 KiB of static and dynamic shared memory together.
    """
    import cupy

    device_id = cupy.cuda.runtime.getDevice()
    fkey = (module, name_expression, device_id)
    fn = _functions.get(fkey)
    if fn is not None and (dynamic_smem == 0 or _smem_limit.get(fkey, 0) >= dynamic_smem):
        return fn
    with _lock:  # one compile per module and device, even under concurrent first use
        fn = _functions.get(fkey)
        if fn is None:
            raw = _modules.get((module, device_id))
            if raw is None:
                raw = cupy.RawModule(
                    code=module.source(),
                    options=module.options,
                    name_expressions=module.name_expressions,
                )
                _modules[(module, device_id)] = raw
            fn = raw.get_function(name_expression)
            _functions[fkey] = fn
        # Raised for any size, not only above 48 KiB: the default limit is 48 KiB for static and
        # dynamic shared memory together, so 47 KiB dynamic beside 2 KiB static fails to launch.
        if dynamic_smem > _smem_limit.get(fkey, 0):
            fn.max_dynamic_shared_size_bytes = dynamic_smem
            _smem_limit[fkey] = dynamic_smem
    return fn


def get_launcher(module: KernelModule, name_expression: str, dynamic_smem: int = 0) -> Any:
    """A :class:`cupyconvt._launch.Launcher` for :func:`get_function`'s kernel on the current
    device, its parameters typed by ``cupyconvt._launch.SIGNATURES`` (one launcher per device
    and function; the function, and so the key's ``id``, lives as long as the process)."""
    fn = get_function(module, name_expression, dynamic_smem)
    launcher = _launchers.get(id(fn))
    if launcher is None:
        from ._launch import Launcher, signature

        with _lock:
            launcher = _launchers.setdefault(id(fn), Launcher(fn, signature(name_expression)))
    return launcher
