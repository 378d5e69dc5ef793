"""benchmarks/bench_cpu.py end to end on small cases: the CPU backend against PyTorch's CPU
kernels, the table, the JSON and the plot (needs torch, as the benchmark does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import need

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cpu  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_bench_cpu_runs_and_checks(dtype, tmp_path, capsys):
    need("torch", "torch")
    if dtype == "bfloat16":
        need("ml_dtypes", "ml_dtypes")
    cases = "tiny_latency,kb72_strided_grouped"
    argv = ["--only", cases, "--dtype", dtype, "--repeat", "1", "--warmup", "0", "--out",
            str(tmp_path)]  # fmt: skip
    assert bench_cpu.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / f"bench_cpu_{dtype}.json").read_text())
    assert [r["case"] for r in data["rows"]] == ["kb72_strided_grouped", "tiny_latency"]
    for r in data["rows"]:
        assert r["ok"] and r["err"] <= bench_cpu.TOL[dtype] and r["ms"] > 0
        assert r["N"] == 1  # --batch 1 by default
        if "torch_ms" in r:  # torch has CPU kernels for these dtypes, or says why not
            assert r["speedup"] == pytest.approx(r["torch_ms"] / r["ms"])
        else:
            assert r["torch_error"]
    assert "| kb72_strided_grouped | 1 |" in out and "all correct: True" in out
    if any("speedup" in r for r in data["rows"]):
        assert (tmp_path / f"bench_cpu_{dtype}.png").stat().st_size > 0


def test_bench_cpu_fails_on_a_wrong_result(tmp_path, monkeypatch, capsys):
    """A result off the reference makes the run fail (exit 1), and says so."""
    need("torch", "torch")
    import cupyconvt

    real = cupyconvt.conv_transpose3d
    monkeypatch.setattr(cupyconvt, "conv_transpose3d", lambda *a, **k: real(*a, **k) * 1.001)
    argv = ["--only", "tiny_latency", "--repeat", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert bench_cpu.main(argv) == 1
    assert "all correct: False" in capsys.readouterr().out
