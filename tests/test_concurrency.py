"""Concurrency: calls from several host threads, on several CuPy and torch streams, and from
several processes sharing the disk caches, give what serial calls give (bitwise: every kernel
is deterministic), under concurrent *first* use too.

First use is what can race: a problem's plan, its device tables (uploaded once, then shared by
every stream) and its compiled kernels are built by whichever call comes first. The problems here
use shapes no other test uses, and the plan cache is cleared before each concurrent phase, so the
threads race to build them. The autotune cache's own thread and process safety (one measurement
per key, no torn file) is tested on the CPU in test_autotune.py; here it runs with real kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from cases import Case
from conftest import need
from oracle import TOL, conv_transpose3d_oracle, rel_err

import cupyconvt

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent

#: Distinct problems, one per family the selector picks for them, in several dtypes. Odd sizes
#: (13, 17, 19) keep them apart from every other test's shapes, so their first use is here.
PROBLEMS = [
    (Case("cc_direct", 1, 3, 2, (5, 13, 3), (3, 2, 3), dict(stride=(2, 3, 1), padding=1)),
     "float64"),
    (Case("cc_grouped", 2, 6, 6, (7, 13, 11), (4, 4, 4), dict(groups=6, stride=2, padding=1),
          bias=True), "float32"),
    (Case("cc_igemm", 1, 12, 20, (9, 13, 7), (3, 3, 3), dict(stride=2, padding=1)), "float32"),
    (Case("cc_tc16", 2, 16, 32, (5, 13, 9), (3, 3, 3), dict(stride=2, output_padding=1),
          bias=True), "float16"),
    (Case("cc_tcbf", 1, 32, 16, (7, 5, 13), (2, 2, 2), dict(stride=2)), "bfloat16"),
    (Case("cc_f64", 1, 8, 16, (6, 13, 5), (3, 3, 3), dict(dilation=2, padding=2)), "float64"),
]  # fmt: skip

THREADS = 8
ROUNDS = 3


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _inputs(rng):
    """Per problem: host float64 inputs rounded to the dtype, and their CuPy copies."""
    import cupy

    made = []
    for case, dtype in PROBLEMS:
        x, w, b = (None if a is None else a.astype(_np_dtype(dtype)) for a in case.arrays(rng))
        made.append((case, dtype, (x, w, b), tuple(None if a is None else cupy.asarray(a)
                                                   for a in (x, w, b))))  # fmt: skip
    return made


def _fresh_plans() -> None:
    """Forget every plan (and with them their device tables), as in a new process."""
    from cupyconvt._select import select

    select.cache_clear()


def _serial(made):
    import cupy

    out = []
    for case, _, _, (x, w, b) in made:
        out.append(cupy.asnumpy(cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)))
    return out


def _check_serial_is_right(made, serial):
    for (case, dtype, (x, w, b), _), got in zip(made, serial, strict=True):
        ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
        assert rel_err(got, ref) <= TOL[dtype], f"{case} {dtype}"


def _run_threads(target, n: int = THREADS):
    errors: list[BaseException] = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_with_own_streams_match_serial(rng):
    """Eight threads, each on its own non-blocking stream, start together on fresh plans and run
    every problem (in a different order each) three times; all results equal serial ones."""
    import cupy

    made = _inputs(rng)
    _fresh_plans()
    start = threading.Barrier(THREADS)
    results: dict[tuple[int, int, int], object] = {}

    def work(t: int) -> None:
        stream = cupy.cuda.Stream(non_blocking=True)
        order = np.random.default_rng(t).permutation(len(made))
        with stream:
            start.wait()
            for r in range(ROUNDS):
                for i in order:
                    case, _, _, (x, w, b) = made[i]
                    results[t, r, i] = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
            stream.synchronize()

    _run_threads(work)
    serial = _serial(made)
    _check_serial_is_right(made, serial)
    for (t, r, i), got in results.items():
        assert cupy.asnumpy(got).tobytes() == serial[i].tobytes(), (
            f"thread {t}, round {r}: {made[i][0]} differs from the serial result"
        )
    assert len(results) == THREADS * ROUNDS * len(made)


def test_first_cuda_work_of_a_thread(rng):
    """A thread whose first CUDA work is a cupyconvt call: CuPy's pool hands out cached memory
    and cudaGetDevice binds no context, so the launch itself must make the device's context
    current (a dask worker thread failed with CUDA_ERROR_INVALID_CONTEXT without it)."""
    import cupy

    made = _inputs(rng)
    serial = _serial(made)  # compiles and loads every kernel, and leaves the results' memory
    results, contexts = {}, []  # in CuPy's pool for the thread's allocations

    def work(_: int) -> None:
        contexts.append(cupy.cuda.driver.ctxGetCurrent())
        for i, (case, _, _, (x, w, b)) in enumerate(made):
            results[i] = cupy.asnumpy(cupyconvt.conv_transpose3d(x, w, b, **case.kwargs))

    _run_threads(work, 1)
    print("current context at the thread's start:", contexts)
    for i in range(len(made)):
        assert results[i].tobytes() == serial[i].tobytes(), f"{made[i][0]}"


def test_one_thread_many_streams_match_serial(rng):
    """Launches spread over four streams with no synchronization between them."""
    import cupy

    made = _inputs(rng)
    _fresh_plans()
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(4)]
    results = []
    for r in range(ROUNDS):
        for i, (case, _, _, (x, w, b)) in enumerate(made):
            with streams[(r + i) % len(streams)]:
                results.append((i, cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)))
    for s in streams:
        s.synchronize()
    serial = _serial(made)
    for i, got in results:
        assert cupy.asnumpy(got).tobytes() == serial[i].tobytes(), f"{made[i][0]}"


def test_backward_from_threads_matches_serial(rng):
    """The backward's device tables and workspaces under concurrent first use."""
    import cupy

    case = Case("cc_bwd", 2, 12, 20, (5, 13, 7), (3, 3, 3), dict(stride=2, padding=1), bias=True)
    x, w, _ = case.arrays(rng, np.float32)
    x, w = cupy.asarray(x), cupy.asarray(w)
    p_out = cupyconvt.conv_transpose3d(x, w, **case.kwargs).shape
    gy = cupy.asarray(rng.standard_normal(p_out).astype(np.float32))
    _fresh_plans()
    from cupyconvt import _backward_gpu

    for plans in (_backward_gpu.input_plan, _backward_gpu.weight_plan, _backward_gpu.bias_plan):
        plans.cache_clear()
    start = threading.Barrier(THREADS)
    results = {}

    def work(t: int) -> None:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            start.wait()
            g = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
            results[t] = tuple(cupy.asnumpy(a) for a in g)
            stream.synchronize()

    _run_threads(work)
    serial = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    for t, got in results.items():
        for name, a, b in zip(("input", "weight", "bias"), got, serial, strict=True):
            assert a.tobytes() == cupy.asnumpy(b).tobytes(), f"thread {t}: grad_{name} differs"


def test_torch_threads_on_own_streams_match_serial(rng):
    """torch tensors from several threads, each on its own torch stream."""
    torch = need("torch", "torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    made = [(case, dtype, host) for case, dtype, host, _ in _inputs(rng)]
    tensors = [
        tuple(None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float32)).to(
            device="cuda", dtype=getattr(torch, dtype)) for a in host)
        for _, dtype, host in made
    ]  # fmt: skip
    _fresh_plans()
    start = threading.Barrier(THREADS)
    results = {}

    def work(t: int) -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            start.wait()
            for r in range(ROUNDS):
                for i, (case, _, _) in enumerate(made):
                    x, w, b = tensors[i]
                    results[t, r, i] = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
        stream.synchronize()

    _run_threads(work)
    torch.cuda.synchronize()
    for i, (case, _, _) in enumerate(made):
        x, w, b = tensors[i]
        serial = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
        for t in range(THREADS):
            for r in range(ROUNDS):
                assert torch.equal(results[t, r, i], serial), f"thread {t}, round {r}: {case}"


def test_autotune_from_threads(tmp_path, monkeypatch, rng):
    """Autotuning on, fresh cache: threads asking for one problem at once time it once, store one
    entry and all get the serial result."""
    import cupy

    from cupyconvt import _autotune

    monkeypatch.setenv("CUPYCONVT_CACHE_DIR", str(tmp_path))
    case = Case("cc_tune", 1, 8, 16, (7, 5, 11), (3, 3, 3), dict(stride=2, padding=1))
    x, w, _ = case.arrays(rng, np.float32)
    xd, wd = cupy.asarray(x), cupy.asarray(w)
    _autotune.clear(memory_only=True)
    cupyconvt.set_autotune(True)
    try:
        start = threading.Barrier(THREADS)
        results = {}

        def work(t: int) -> None:
            with cupy.cuda.Stream(non_blocking=True) as stream:
                start.wait()
                results[t] = cupy.asnumpy(cupyconvt.conv_transpose3d(xd, wd, **case.kwargs))
                stream.synchronize()

        _run_threads(work)
        serial = cupy.asnumpy(cupyconvt.conv_transpose3d(xd, wd, **case.kwargs))
    finally:
        cupyconvt.set_autotune(None)
        _autotune.clear(memory_only=True)
    assert rel_err(serial, conv_transpose3d_oracle(x, w, **case.kwargs)) <= TOL["float32"]
    for t, got in results.items():
        assert got.tobytes() == serial.tobytes(), f"thread {t}"
    entries = json.loads((tmp_path / "autotune.json").read_text())
    assert len(entries) == 1, entries


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, cupy, cupyconvt
    sys.path.insert(0, {tests!r})
    from oracle import conv_transpose3d_oracle, rel_err
    cupyconvt.set_autotune(True)
    rng = np.random.default_rng(int(sys.argv[1]))
    bad = 0
    for shape, k, kw, dt in {problems!r}:
        x = rng.standard_normal(shape).astype(dt)
        w = rng.standard_normal((shape[1], 6, *k)).astype(dt)
        got = cupyconvt.conv_transpose3d(cupy.asarray(x), cupy.asarray(w), **kw)
        err = rel_err(cupy.asnumpy(got), conv_transpose3d_oracle(x, w, **kw))
        bad += not err <= (1e-5 if dt == "float32" else 1e-12)
    print("ok" if not bad else f"{{bad}} wrong")
    """
)


def test_processes_sharing_fresh_disk_caches(tmp_path):
    """Four processes start at once on empty kernel (CuPy) and autotune caches in one directory:
    each compiles, tunes and computes correctly, and the autotune file holds every problem once,
    intact."""
    problems = [
        ((1, 6, 5, 13, 4), (3, 3, 3), dict(stride=2, padding=1), "float32"),
        ((2, 6, 7, 3, 13), (2, 4, 2), dict(stride=(2, 1, 3), groups=3), "float64"),
        ((1, 6, 4, 9, 13), (3, 2, 3), dict(dilation=2), "float32"),
    ]
    script = _CHILD.format(tests=str(REPO / "tests"), problems=problems)
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path / "cupy"),
               CUPYCONVT_CACHE_DIR=str(tmp_path / "tune"))  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(4)
    ]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.strip() == "ok", (out, err[-2000:])
    entries = json.loads((tmp_path / "tune" / "autotune.json").read_text())
    assert len(entries) == len(problems), list(entries)
    assert not list((tmp_path / "tune").glob(".autotune.json.*")), "a temporary file was left"
