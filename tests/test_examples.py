"""The examples run end to end (on the CPU backend here) and check their own results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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
