"""The built wheel carries the CUDA sources, and an installed copy loads them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_kernels_and_loads_them(tmp_path):
    need("hatchling", "packaging")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(wheels), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("cupyconvt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "kernels").iterdir()):
        assert f"cupyconvt/kernels/{src.name}" in names, f"{src.name} missing from {wheel.name}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], check=True
    )
    probe = (
        "import cupyconvt, cupyconvt._compile as c, cupyconvt._select as s;"
        "print(cupyconvt.__file__);print(c.kernel_dir());"
        "print(all(m.name_expressions[0].split('<')[0] in m.source() for m in s.all_modules()))"
    )
    out = subprocess.run(
        [str(py), "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[0].startswith(str(venv)), out
    assert out[1] == str(Path(out[0]).parent / "kernels"), out
    assert out[2] == "True", out
