"""The examples run end to end (on the CPU backend here) and check their own results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, cwd: Path) -> str:
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd,
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_upsample_volume_example(tmp_path):
    need("scipy", "examples")
    need("matplotlib", "examples")
    out = _run("upsample_volume.py", "--size", "24", "--png", "slices.png", cwd=tmp_path)
    assert "max |conv_transpose3d - map_coordinates|" in out
    assert (tmp_path / "slices.png").stat().st_size > 1000


def test_torch_interop_example(tmp_path):
    need("torch", "torch")
    out = _run("torch_interop.py", cwd=tmp_path)
    assert out.count(" ok") >= 2 and "MISMATCH" not in out


def test_train_decoder_example(tmp_path, monkeypatch):
    need("torch", "torch")
    need("matplotlib", "examples")
    # One thread: on a small CI machine torch's OpenMP workers, spinning after each parallel
    # region, would otherwise compete with the NumPy backend for the cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = _run("train_decoder.py", "--steps", "20", "--device", "cpu", "--out", "curves.png",
               cwd=tmp_path)  # fmt: skip
    assert "max relative difference of the loss curves" in out and "MISMATCH" not in out
    assert out.count(" ok") == 1 and "time per step, cupyconvt" in out
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_big_volume_example(tmp_path):
    need("dask", "dask")
    zarr = need("zarr", "dask")
    # 40^3 with blocks of 16 (the last one 8): the check compares random regions across blocks.
    out = _run("big_volume.py", "--size", "40", "--chunk", "16", "--check", "--output", "up.zarr",
               cwd=tmp_path)  # fmt: skip
    assert "checked 3 region(s) of (2, 80, 80, 80)" in out and "MISMATCH" not in out
    assert "M voxels/s" in out
    up = zarr.open(str(tmp_path / "up.zarr"), mode="r")
    assert up.shape == (2, 80, 80, 80) and up.chunks == (2, 32, 32, 32)
