"""The compute-sanitizer run (scripts/sanitize.py) on the CPU: its problems are valid and launch,
together, every kernel specialization the runtime can launch; and its reading of
compute-sanitizer's output.

The run itself needs a GPU and compute-sanitizer: ``PYTHONPATH=. python scripts/sanitize.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cupyconvt import _backward_gpu as bwd
from cupyconvt._params import ConvParams
from cupyconvt._select import all_modules, eligible

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sanitize  # noqa: E402  (scripts/sanitize.py)
import sanitize_problems as sp  # noqa: E402


def _labels(kernels) -> str:
    return "\n".join(sp.label(k) for k in kernels)


def test_every_kernel_specialization_is_launched_by_a_problem():
    missing = sp.missing()
    assert not missing, f"no sanitizer problem launches:\n{_labels(missing)}"


def test_the_quick_subset_launches_every_specialization_too():
    quick = sp.quick()
    assert len(quick) < len(sp.problems())
    assert not sp.missing(quick), _labels(sp.missing(quick))


def test_specializations_are_what_ci_compiles():
    listed = {
        (m, n) for m in all_modules() + bwd.all_backward_modules() for n in m.name_expressions
    }
    specs = sp.all_specializations()
    assert set(specs) == listed and len(specs) == len(listed)
    assert len({sp.label(k) for k in specs}) == len(specs), "labels must be unique"
    assert all(k in listed for pr in sp.problems() for k in sp.launches(pr))


def test_problems_are_valid_and_run_what_they_force():
    problems = sp.problems()
    assert len({pr.name for pr in problems}) == len(problems)
    for pr in problems:
        p = ConvParams.from_args(
            pr.x_shape, pr.w_shape, (pr.C_out,) if pr.bias else None, **pr.kwargs
        )
        assert p == pr.params
        assert max(sp._size(p.x_shape5), sp._size(p.out_shape5)) <= sp.MAX_ELEMENTS, pr
        assert sp.launches(pr), f"{pr} launches nothing"
        if pr.backward:
            assert set(pr.needs) <= {"input", "weight", "bias"} and not pr.bias
            gi, gw, _ = sp.backward_plans(pr)
            if pr.data_tile is not None:
                assert gi.tile == pr.data_tile and gi.path == "igemm"
            if pr.path is not None:
                assert gi.path == pr.path
            if pr.weight_tile is not None:
                assert gw.tile == pr.weight_tile
            if pr.splits is not None:
                assert gw.splits == pr.splits
            continue
        plan = sp.forward_plan(pr)
        if pr.family is not None:
            assert plan.family == pr.family
            assert eligible(p, pr.dtype, pr.family, pr.precision)
        if pr.tile is not None:
            assert plan.tile == pr.tile


def test_every_edge_is_exercised():
    """The brief of the run: sizes 1, odd strides and dilations, cropping padding,
    output_padding, every group layout, batch 1, 2 and unbatched, NDHWC, bias, misaligned x,
    every dtype and float32 precision, forward and backward."""
    problems = sp.problems()
    params = [pr.params for pr in problems]
    assert any(1 in p.in_size for p in params) and any(1 in p.out_size for p in params)
    assert any(s % 2 == 1 and s > 1 for p in params for s in p.stride)
    assert any(d % 2 == 1 and d > 1 for p in params for d in p.dilation)
    assert any(max(p.output_padding) > 0 for p in params)
    assert any(p.padding[a] >= p.kernel[a] - 1 > 0 for p in params for a in range(3))
    assert any(p.groups == 1 for p in params)
    assert any(p.groups > 1 and p.C_in_g > 1 and p.C_out_g > 1 for p in params)
    assert any(p.groups > 1 and p.C_in_g == 1 and p.C_out_g == 1 for p in params)  # depthwise
    assert any(p.groups > 1 and p.C_in_g == 1 and p.C_out_g > 1 for p in params)  # multiplier
    assert {p.N for p in params} >= {1, 2} and any(not p.batched for p in params)
    assert {pr.layout for pr in problems} == {"NCDHW", "NDHWC"}
    assert {pr.bias for pr in problems} == {False, True}
    assert any(pr.x_offset for pr in problems if pr.backward)
    assert any(pr.x_offset for pr in problems if not pr.backward)
    modes = {(pr.dtype, pr.precision) for pr in problems}
    assert modes >= {("float16", "highest"), ("bfloat16", "highest"), ("float64", "highest")}
    assert {("float32", q) for q in ("highest", "high", "medium")} <= modes


def test_coverage_fails_for_a_tile_no_problem_launches(monkeypatch):
    """A tile added to a table after the problems were made is reported missing; so is every
    specialization of a family whose problems are left out."""
    problems = sp.problems()
    without_tc = [pr for pr in problems if pr.kind != "tc"]
    assert any(k[0].filename == "tc.cu" for k in sp.missing(without_tc))

    # 1x1 register tiles over 128 x 256: no problem's tile choice would ever take it.
    extra = bwd.WeightTile(128, 256, 16, 1, 1, 1, 2, 1)
    caches = (bwd.backward_module, bwd.weight_plan, sp._labels)
    monkeypatch.setattr(bwd, "WEIGHT_TILES_FLOAT", bwd.WEIGHT_TILES_FLOAT + (extra,))
    for c in caches:
        c.cache_clear()
    try:
        missing = sp.missing(problems)
        want = [f"backward.cu:{extra.template(d)}" for d in ("float16", "bfloat16", "float32")]
        assert [sp.label(k) for k in missing] == want
    finally:
        monkeypatch.undo()
        for c in caches:
            c.cache_clear()
    assert not sp.missing(problems)


def test_launches_follow_the_plans():
    by_name = {pr.name: pr for pr in sp.problems()}
    # NCDHW through the channels-last workspace: x transposed with the pack, GEMM, result
    # transposed.
    pr = by_name["fwd/natural/f16/tc_ncdhw_workspace"]
    names = [n for _, n in sp.launches(pr)]
    assert names[-1] == "batched_transpose<u16>" and len(names) == 3
    # The GEMM writes channels-last: tc.cu's CL_OUT (then HALO), wgmma.cu's last argument.
    gemm = names[1]
    assert names[0].startswith("tc_prep")
    assert gemm.endswith(", true>" if gemm.startswith("wg_") else "true, true>"), gemm
    # An NDHWC caller of a CUDA-core family: a transpose on each side.
    pr = by_name["fwd/natural/f64/f64_ndhwc"]
    names = [n for _, n in sp.launches(pr)]
    assert names[0] == names[-1] == "batched_transpose<u64>" and len(names) == 3
    # Tapless phases: the fill kernel, then the pack and the GEMM.
    pr = by_name["fwd/igemm/f32/tapless_fill"]
    assert [n.split("<")[0] for _, n in sp.launches(pr)] == [
        "igemm_fill_tapless", "igemm_pack_weights", "igemm_conv_transpose3d"]  # fmt: skip
    # One split in float32: grad_weight written by the GEMM, no reduction.
    pr = next(p for p in sp.problems() if p.backward and p.splits == 1 and p.dtype == "float32")
    assert not any("reduce" in n for _, n in sp.launches(pr))


# --------------------------------------------------------------------------------------------
# Reading compute-sanitizer's output (formats of compute-sanitizer 2024-2025).

MEMCHECK_DIRTY = """\
========= COMPUTE-SANITIZER
sanitize-worker: 3 problems on NVIDIA H100 80GB HBM3 (sm_90, 132 SMs), tool memcheck
sanitize-worker: >> [  1/3] fwd/direct/f32/grouped_size1
sanitize-worker: ok       [  1/3] fwd/direct/f32/grouped_size1 launches 1 err 2.1e-07 0.01s
sanitize-worker: >> [  2/3] fwd/igemm/f32/128x64k8st4
========= Invalid __global__ read of size 4 bytes
=========     at void igemm_conv_transpose3d<float, 128, 64, 8, 8, 8, 4, 3, 8>(const T1 *)+0x1c30
=========     by thread (37,0,0) in block (0,1,0)
=========     Address 0x7f3a12000400 is out of bounds
=========     and is 1 bytes after the nearest allocation at 0x7f3a12000000 of size 1023 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========
========= Invalid __global__ read of size 4 bytes
=========     at void igemm_conv_transpose3d<float, 128, 64, 8, 8, 8, 4, 3, 8>(const T1 *)+0x1c30
=========     by thread (38,0,0) in block (0,1,0)
=========     Address 0x7f3a12000404 is out of bounds
=========
sanitize-worker: ok       [  2/3] fwd/igemm/f32/128x64k8st4 launches 2 err 3.0e-07 0.02s
sanitize-worker: >> [  3/3] bwd/natural/f32_grouped
sanitize-worker: WRONG    [  3/3] bwd/natural/f32_grouped launches 5 err 4.2e-01 0.03s tolerance 1e-05
sanitize-worker: done: 3 problems, 1 not ok, 8 of 494 kernel specializations launched, 8 launches
========= ERROR SUMMARY: 102 errors
========= ERROR SUMMARY: 2 errors were not printed. Use --print-limit option to adjust the number of printed errors
"""  # noqa: E501

RACECHECK_CLEAN = """\
========= COMPUTE-SANITIZER
sanitize-worker: >> [  1/1] fwd/tc/f16/highest/128x64k32h/ncdhw
sanitize-worker: ok       [  1/1] fwd/tc/f16/highest/128x64k32h/ncdhw launches 3 err 3.1e-04 0.4s
sanitize-worker: done: 1 problems, 0 not ok, 3 of 494 kernel specializations launched, 3 launches
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""

RACECHECK_DIRTY = """\
========= COMPUTE-SANITIZER
sanitize-worker: >> [  1/1] fwd/grouped/f32/cot4_vq2
========= Error: Race reported between Write access at void grouped_conv_transpose3d<float, 4, 2>(const float *)+0x4f0
=========     and Read access at void grouped_conv_transpose3d<float, 4, 2>(const float *)+0x9a0 [1024 hazards]
=========
========= Warning: Race reported between Write access at void batched_transpose<unsigned int>(const T1 *)+0x2b0
=========     and Read access at void batched_transpose<unsigned int>(const T1 *)+0x3c0 [16 hazards]
=========
sanitize-worker: ok       [  1/1] fwd/grouped/f32/cot4_vq2 launches 1 err 1.0e-07 0.9s
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""  # noqa: E501

INITCHECK_DIRTY = """\
========= COMPUTE-SANITIZER
sanitize-worker: >> [  1/1] fwd/tc/f32/medium/256x16k16/ndhwc
========= Uninitialized __shared__ memory read of size 16 bytes
=========     at void tc_conv_transpose3d<float, 1, 256, 16, 16, 8, 1, 3, 2, true, false>(const T1 *)+0x2210
=========     by thread (3,0,0) in block (0,0,2)
=========     Address 0x1f80
=========
========= Host API memory access error at host access to 0x7f0000200000 of size 4 bytes
=========     Uninitialized access at 0x7f0000200010 on access by cudaMemcopy source.
=========
sanitize-worker: ok       [  1/1] fwd/tc/f32/medium/256x16k16/ndhwc launches 2 err 3.2e-04 0.1s
========= ERROR SUMMARY: 1 error
"""  # noqa: E501

SYNCCHECK_CRASHED = """\
========= COMPUTE-SANITIZER
sanitize-worker: >> [  1/2] fwd/direct/f16/grouped_k3
========= Barrier error detected. Divergent thread(s) in block
=========     at void grouped_conv_transpose3d<cct::half_t, 1, 1>(const T1 *)+0x3f0
=========     by thread (37,0,0) in block (0,0,0)
=========
"""


def test_parse_memcheck_errors():
    rep = sanitize.parse_log(MEMCHECK_DIRTY, "memcheck")
    assert rep.errors == 102 and rep.not_printed == 2
    assert rep.kinds == {"Invalid __global__ read of size N bytes": 2}
    assert rep.by_problem == {"fwd/igemm/f32/128x64k8st4": 2}
    assert rep.statuses == {
        "fwd/direct/f32/grouped_size1": "ok",
        "fwd/igemm/f32/128x64k8st4": "ok",
        "bwd/natural/f32_grouped": "WRONG",
    }
    assert rep.worker_done


def test_parse_racecheck():
    clean = sanitize.parse_log(RACECHECK_CLEAN, "racecheck")
    assert (clean.errors, clean.race_errors, clean.race_warnings) == (0, 0, 0)
    assert not clean.kinds and clean.worker_done
    dirty = sanitize.parse_log(RACECHECK_DIRTY, "racecheck")
    assert (dirty.errors, dirty.race_errors, dirty.race_warnings) == (2, 1, 1)
    assert dirty.kinds == {
        "Error: Race reported between Write access": 1,
        "Warning: Race reported between Write access": 1,
    }
    assert dirty.by_problem == {"fwd/grouped/f32/cot4_vq2": 2}
    assert not dirty.worker_done


def test_parse_initcheck_and_a_run_without_a_summary():
    rep = sanitize.parse_log(INITCHECK_DIRTY, "initcheck")
    assert rep.errors == 1
    assert rep.kinds["Uninitialized __shared__ memory read of size N bytes"] == 1
    assert sum(rep.kinds.values()) == 2
    crashed = sanitize.parse_log(SYNCCHECK_CRASHED, "synccheck")
    assert crashed.errors is None  # killed (timeout) or crashed before its summary
    assert crashed.kinds == {"Barrier error detected. Divergent thread(s) in block": 1}
    assert crashed.by_problem == {"fwd/direct/f16/grouped_k3": 1}


def test_sanitizer_command_leaves_out_options_the_tool_lacks():
    help_text = "--tool --error-exitcode --print-limit --show-backtrace --target-processes"
    cmd, dropped = sanitize.sanitizer_command(
        "/cuda/bin/compute-sanitizer", "initcheck", help_text, ["w.py", "--worker"], port=49252
    )
    assert cmd[:3] == ["/cuda/bin/compute-sanitizer", "--tool", "initcheck"]
    assert cmd[-2:] == ["w.py", "--worker"] and sys.executable in cmd
    assert dropped == [
        "--launch-timeout",
        "--check-exit-code",
        "--initcheck-address-space",
        "--port",
    ]
    assert "--error-exitcode" in cmd and "99" in cmd
    full, none = sanitize.sanitizer_command("cs", "memcheck", "", ["w.py"])
    assert not none and "--padding" in full and "--port" not in full


@pytest.mark.parametrize("tool", sanitize.TOOLS)
def test_every_tool_has_options(tool):
    assert tool in sanitize.TOOL_OPTIONS
    assert len(sanitize.TOOL_OPTIONS[tool]) % 2 == 0


def _run(tmp_path, name, log_text, results, launched):
    log, data = tmp_path / f"{name}.log", tmp_path / f"{name}.json"
    log.write_text(log_text)
    data.write_text(sanitize.json.dumps(dict(results=results, launched=launched, unknown=[])))
    run = sanitize.Run(name, ["cmd"], log, data, 60.0)
    run.returncode, run.seconds = 0, 1.0
    return run


def test_summary_line(tmp_path, capsys):
    every = [sp.label(k) for k in sp.all_specializations()]
    ok = [dict(name="a", status="ok"), dict(name="b", status="ok")]
    clean_log = "========= ERROR SUMMARY: 0 errors\n"
    runs = [
        _run(tmp_path, "native", "", ok, every),
        _run(tmp_path, "memcheck", clean_log, ok, every),
        _run(tmp_path, "racecheck", RACECHECK_CLEAN, ok, every),
    ]
    line, clean = sanitize._summarize(runs, 2, len(every), True, tmp_path, False)
    assert clean
    assert line == (
        "sanitize: memcheck 0 errors, racecheck 0 hazards over 2 problems, "
        f"{len(every)} kernel specializations: clean"
    )
    assert (tmp_path / "summary.json").is_file()

    wrong = [dict(name="a", status="ok"), dict(name="b", status="WRONG")]
    runs = [
        _run(tmp_path, "memcheck", MEMCHECK_DIRTY, ok, every[:-1]),
        _run(tmp_path, "synccheck", clean_log, wrong, every),
    ]
    runs.append(sanitize.Run("initcheck", ["cmd"], tmp_path / "i.log", None, 60.0))
    runs[-1].log.write_text(SYNCCHECK_CRASHED)
    runs[-1].timed_out = True
    line, clean = sanitize._summarize(runs, 2, len(every), True, tmp_path, False)
    assert not clean
    assert line.startswith(
        "sanitize: memcheck 102 errors, synccheck 0 errors, initcheck ? errors (timed out) over "
        f"2 problems, 0 of {len(every)} kernel specializations: FAILED ("
    )
    assert "synccheck: 1 problems not ok" in line and "initcheck did not finish" in line
    out = capsys.readouterr().out
    assert "2 reports while running fwd/igemm/f32/128x64k8st4" in out


def test_the_worker_hooks_exist():
    """The worker hands its plans to the runtime through these lookups and records launches by
    wrapping get_launcher where the launching modules imported it."""
    from cupyconvt import _compile, _gpu, _grouped, _igemm, _patch, _plans, _slab, _tc

    assert _gpu.select is sp.select
    assert bwd.input_plan is sp.input_plan and bwd.weight_plan is sp.weight_plan
    assert bwd.bias_plan is sp.bias_plan
    for mod in (_plans, _tc, _igemm, _grouped, _patch, _slab, bwd):
        assert mod.get_launcher is _compile.get_launcher, mod.__name__
