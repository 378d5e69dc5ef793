"""Run every kernel specialization under compute-sanitizer (memcheck, racecheck, initcheck and
synccheck) on tiny problems that exercise every edge path, and print one summary line.

    PYTHONPATH=. python scripts/sanitize.py [--tools memcheck,racecheck,initcheck,synccheck]
                                            [--quick] [--out DIR] [--jobs N] [--timeout S]

Needs a CUDA GPU, CuPy and the CUDA toolkit's compute-sanitizer. The problems, and the kernels
each one launches, are in scripts/sanitize_problems.py; tests/test_sanitize_coverage.py checks on
the CPU that together they launch every specialization the runtime can.

Steps:

1. Compile every kernel module the problems use, in parallel processes (NVRTC, into CuPy's
   on-disk cache), so that the sanitized runs load cubins rather than compile.
2. A native run (no sanitizer): every result against a float64 reference computed by the CPU
   backend, and the kernels each problem launched against those sanitize_problems.launches()
   predicts.
3. The same run under each tool, all tools at once by default (--jobs), each its own process:
   ``compute-sanitizer --tool T ... python scripts/sanitize.py --worker``.

The worker turns CuPy's memory pools off before anything else, so every array (and every device
table of a plan) is its own cudaMalloc, and memcheck, with --padding, sees exact bounds rather
than a pool's slab. Inputs are fresh random numbers, never zeros. Results come from cupy.empty and
are never filled: initcheck then sees a kernel that reads an element before any kernel wrote it,
and the copy back of an element that no kernel wrote. The worker synchronizes after each problem
and prints one line for it. It does not import torch, whose caching allocator would hide bounds
too.

Writes <tool>.log (compute-sanitizer's whole output, with the worker's lines in it) and
summary.json to --out (default out/sanitize, which git ignores), and prints

    sanitize: memcheck 0 errors, racecheck 0 hazards, initcheck 0 errors, synccheck 0 errors
    over 372 problems, 494 kernel specializations: clean

(on one line). Exits 0 only if every tool reported no error and no hazard, every run finished,
every result matched its reference, and every specialization was launched in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's cupyconvt, whatever else is installed
    sys.path.insert(1, str(ROOT))

import sanitize_problems as sp  # noqa: E402  (scripts/, beside this file)

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")

#: Options for every tool: a distinct exit code for "the tool found errors"; a bounded log;
#: device backtraces only (the host ones are Python's interpreter); only the worker process; a
#: generous wait for the target to connect (four runs start at once, each importing CuPy); the
#: worker's own exit code kept out of the tool's error count (its verdicts are in its lines).
COMMON_OPTIONS = (
    "--error-exitcode", "99",
    "--print-limit", "100",
    "--show-backtrace", "device",
    "--target-processes", "application-only",
    "--launch-timeout", "300",
    "--check-exit-code", "no",
)  # fmt: skip
#: Per tool. memcheck: a padding buffer after every allocation (without it an overflow into the
#: next allocation goes unseen); a faulting kernel ends alone, not the context, so later problems
#: still run; no API-error reports (a failing call raises in CuPy and fails its problem; CuPy's
#: own probing and its teardown would only add noise). racecheck: the analysis report, one record
#: per racing pair of instructions. initcheck: global and shared memory (--initcheck-space).
TOOL_OPTIONS: dict[str, tuple[str, ...]] = {
    "memcheck": ("--padding", "4096", "--destroy-on-device-error", "kernel",
                 "--report-api-errors", "no"),
    "racecheck": ("--racecheck-report", "analysis"),
    "initcheck": ("--initcheck-address-space", "all"),
    "synccheck": (),
}  # fmt: skip

#: Relative-norm tolerance against the float64 reference, per dtype (tests/oracle.py's table);
#: TF32 ("medium") has 11 significant bits a product.
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
TOL_TF32 = 5e-3

WORKER = "sanitize-worker:"


# --------------------------------------------------------------------------------------------
# Reading compute-sanitizer's output.

_ERROR_SUMMARY = re.compile(r"^=+ ERROR SUMMARY: (\d+) errors?\s*$", re.MULTILINE)
_NOT_PRINTED = re.compile(r"^=+ ERROR SUMMARY: (\d+) errors? (?:was|were) not printed", re.M)
_RACE_SUMMARY = re.compile(
    r"^=+ RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", re.M
)
_REPORT = re.compile(r"^=+ (\S.*)$")  # a report's first line; its details are indented further
_NOT_REPORTS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY")
_WORKER_LINE = re.compile(rf"^{WORKER} (\S+)\s+\[\s*\d+/\d+\] (\S+)")
_WORKER_BEGIN = re.compile(rf"^{WORKER} >> \[\s*\d+/\d+\] (\S+)")


@dataclass
class ToolReport:
    """What a run's log says: the tool's counts (None where its summary line is missing, as when
    the run was killed), its reports by kind and by the problem that was running, and the
    worker's verdict on each problem."""

    errors: int | None = None  # ERROR SUMMARY; racecheck: hazards displayed
    race_errors: int = 0
    race_warnings: int = 0
    not_printed: int = 0
    kinds: Counter = field(default_factory=Counter)
    by_problem: Counter = field(default_factory=Counter)
    statuses: dict[str, str] = field(default_factory=dict)
    worker_done: bool = False


def _kind(text: str) -> str:
    """A report's first line without addresses, sizes and places: "Invalid __global__ read of
    size N bytes", "Uninitialized __shared__ memory read of size N bytes", "Error: Race reported
    between Write access", "Barrier error detected. Divergent thread(s) in block"."""
    text = re.split(r" at | in block | by thread |\(error \d+\)|:$", text)[0]
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", text).strip()[:100]


def parse_log(text: str, tool: str) -> ToolReport:
    """Parse one run's combined output (compute-sanitizer's lines and the worker's)."""
    rep = ToolReport()
    m = _RACE_SUMMARY.search(text) if tool == "racecheck" else None
    if m:
        rep.errors, rep.race_errors, rep.race_warnings = (int(v) for v in m.groups())
    else:
        m = _ERROR_SUMMARY.search(text)
        if m:
            rep.errors = int(m.group(1))
        m = _NOT_PRINTED.search(text)
        if m:
            rep.not_printed = int(m.group(1))
    current = "(before the first problem)"
    for line in text.splitlines():
        if line.startswith(WORKER):
            begin = _WORKER_BEGIN.match(line)
            if begin:
                current = begin.group(1)
                continue
            done = _WORKER_LINE.match(line)
            if done:
                rep.statuses[done.group(2)] = done.group(1)
            elif line.startswith(f"{WORKER} done"):
                rep.worker_done = True
            continue
        m = _REPORT.match(line)
        if m is None or m.group(1).startswith(_NOT_REPORTS):
            continue
        rep.kinds[_kind(m.group(1))] += 1
        rep.by_problem[current] += 1
    return rep


# --------------------------------------------------------------------------------------------
# The worker: every problem once, in this process (run bare, or under compute-sanitizer).


def _np_dtype(name: str) -> Any:
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _rand(rng: Any, shape: Sequence[int], dtype: Any) -> Any:
    """Standard normal numbers (never zeros) rounded to ``dtype``."""
    import numpy as np

    draw = rng.standard_normal(tuple(shape))
    return (draw.astype(np.float32) if dtype.itemsize < 4 else draw).astype(dtype)


def _rel_err(got: Any, ref: Any) -> float:
    """‖got − ref‖ / ‖ref‖ in float64; inf for another shape, nan for a non-finite value."""
    import numpy as np

    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return float("inf")
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-300))


def _tolerance(pr: sp.Problem) -> float:
    if pr.dtype == "float32" and pr.precision == "medium" and not pr.backward:
        return TOL_TF32
    return TOL[pr.dtype]


def _to_device(cupy: Any, host: Any, offset: int) -> Any:
    """A device copy of ``host``; with ``offset``, a view that many elements into a larger
    allocation (C-contiguous, off the 16-byte boundary)."""
    import numpy as np

    if not offset:
        return cupy.asarray(host)
    flat = np.zeros(host.size + offset, dtype=host.dtype)
    flat[offset:] = host.ravel()
    view = cupy.asarray(flat)[offset:].reshape(host.shape)
    assert view.flags.c_contiguous and view.data.ptr % 16
    return view


def _returning(plan: Any, p: Any) -> Any:
    """A stand-in for a plan lookup that gives ``plan``, checking it is for the problem asked."""

    def lookup(params: Any, *args: Any, **kwargs: Any) -> Any:
        if params != p:
            raise AssertionError(f"the runtime asked for a plan of {params}, expected {p}")
        return plan

    return lookup


def _f64(a: Any) -> Any:
    import numpy as np

    return None if a is None else a.astype(np.float64)


def _run_forward(pr: sp.Problem, dev: Any, rng: Any, cupy: Any) -> float:
    """The public conv_transpose3d on CuPy arrays, with the problem's plan (so a forced family
    or tile runs through the same backend code as a selected one)."""
    from unittest import mock

    import numpy as np

    import cupyconvt
    from cupyconvt import _gpu

    p, dt = pr.params, _np_dtype(pr.dtype)
    x, w = _rand(rng, pr.x_shape, dt), _rand(rng, pr.w_shape, dt)
    b = _rand(rng, (pr.C_out,), dt) if pr.bias else None
    x_mem = np.ascontiguousarray(np.moveaxis(x, -4, -1)) if pr.layout == "NDHWC" else x
    plan = sp.forward_plan(pr, dev)
    xd, wd = _to_device(cupy, x_mem, pr.x_offset), cupy.asarray(w)
    bd = None if b is None else cupy.asarray(b)
    with mock.patch.object(_gpu, "select", _returning(plan, p)):
        y = cupyconvt.conv_transpose3d(xd, wd, bd, **pr.kwargs, precision=pr.precision,
                                       layout=pr.layout)  # fmt: skip
    got = cupy.asnumpy(y)
    if pr.layout == "NDHWC":
        got = np.moveaxis(got, -1, -4)
    ref = cupyconvt.conv_transpose3d(_f64(x), _f64(w), _f64(b), **pr.kwargs)
    return _rel_err(got, ref)


def _run_backward(pr: sp.Problem, dev: Any, rng: Any, cupy: Any) -> float:
    """The public conv_transpose3d_backward on CuPy arrays, with the problem's plans."""
    from contextlib import ExitStack
    from unittest import mock

    import cupyconvt
    from cupyconvt import _backward_gpu

    p, dt = pr.params, _np_dtype(pr.dtype)
    x, w, gy = _rand(rng, pr.x_shape, dt), _rand(rng, pr.w_shape, dt), _rand(rng, p.out_shape, dt)
    names = ("input_plan", "weight_plan", "bias_plan")
    plans = dict(zip(names, sp.backward_plans(pr, dev), strict=True))
    gyd, xd = _to_device(cupy, gy, pr.x_offset), _to_device(cupy, x, pr.x_offset)
    wd = cupy.asarray(w)
    with ExitStack() as stack:
        for name, plan in plans.items():
            if plan is not None:
                stack.enter_context(mock.patch.object(_backward_gpu, name, _returning(plan, p)))
        got = cupyconvt.conv_transpose3d_backward(gyd, xd, wd, **pr.kwargs, needs=pr.needs,
                                                  precision=pr.precision)  # fmt: skip
    ref = cupyconvt.conv_transpose3d_backward(_f64(gy), _f64(x), _f64(w), **pr.kwargs,
                                              needs=pr.needs)  # fmt: skip
    errs = [_rel_err(cupy.asnumpy(g), r) for g, r in zip(got, ref, strict=True) if r is not None]
    return max(errs, key=lambda e: (e != e, e))  # a nan counts as the worst


class _Recorded:
    """A kernel function that notes each launch (kernel, in order) in ``log``."""

    __slots__ = ("fn", "kernel", "log")

    def __init__(self, fn: Any, kernel: sp.Kernel, log: list[sp.Kernel]) -> None:
        self.fn, self.kernel, self.log = fn, kernel, log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append(self.kernel)
        return self.fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


def _record_launches() -> list[sp.Kernel]:
    """Make every cupyconvt module's get_launcher hand out recording launchers; returns the log
    they append to."""
    import cupyconvt._backward_gpu
    import cupyconvt._gpu
    import cupyconvt._grouped
    import cupyconvt._igemm
    import cupyconvt._patch
    import cupyconvt._plans
    import cupyconvt._slab
    import cupyconvt._tc  # noqa: F401  (every module that launches, imported before the swap)
    from cupyconvt import _compile

    log: list[sp.Kernel] = []
    original = _compile.get_launcher

    def get_launcher(module: Any, name: str, dynamic_smem: int = 0) -> Any:
        return _Recorded(original(module, name, dynamic_smem), (module, name), log)

    swapped = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("cupyconvt.") and getattr(mod, "get_launcher", None) is original:
            if mod is not _compile:
                mod.get_launcher = get_launcher  # type: ignore[attr-defined]
                swapped += 1
    assert swapped, "no cupyconvt module imports get_launcher"
    return log


def _exact_allocations(cupy: Any) -> None:
    """Every allocation its own cudaMalloc: CuPy's device and pinned pools off, and the device
    tables of plans (which DeviceArray takes from the default pool on purpose) too."""
    cupy.cuda.set_allocator(None)
    cupy.cuda.set_pinned_memory_allocator(None)

    class _NoPool:
        malloc = staticmethod(cupy.cuda.memory._malloc)

    no_pool = _NoPool()
    cupy.get_default_memory_pool = lambda: no_pool


def _compile_shard(args: argparse.Namespace) -> int:
    """Compile every ``n``-th module the chosen problems use, from the ``i``-th
    (``--compile-shard i/n``)."""
    import cupy

    from cupyconvt._compile import get_function

    i, n = (int(v) for v in args.compile_shard.split("/"))
    modules = _modules_used(sp.select_problems(args.quick, _split(args.only)))[i::n]
    start = time.perf_counter()
    with cupy.cuda.Device(0):
        for m in modules:
            get_function(m, m.name_expressions[0])
    print(f"{WORKER} compiled {len(modules)} modules in {time.perf_counter() - start:.1f} s",
          flush=True)  # fmt: skip
    return 0


def _modules_used(problems: Sequence[sp.Problem]) -> list[Any]:
    seen: dict[Any, None] = {}
    for pr in problems:
        for m, _ in sp.launches(pr):
            seen.setdefault(m, None)
    return list(seen)


def worker(args: argparse.Namespace) -> int:
    """Run the chosen problems once each; one line per problem; a JSON report at the end."""
    if args.compile_shard:
        return _compile_shard(args)
    import cupy  # first: no array may come from a pool

    _exact_allocations(cupy)
    import numpy as np

    import cupyconvt
    from cupyconvt import _gpu

    cupyconvt.set_autotune(False)
    log = _record_launches()
    chosen = sp.select_problems(args.quick, _split(args.only))
    dev = _gpu.device_info(cupy.cuda.runtime.getDevice())
    print(f"{WORKER} {len(chosen)} problems on {dev.name} (sm_{dev.compute_capability}, "
          f"{dev.sm_count} SMs), tool {args.tool or 'none'}", flush=True)  # fmt: skip
    results = []
    started = time.perf_counter()
    for k, pr in enumerate(chosen, 1):
        tag = f"[{k:3d}/{len(chosen)}] {pr.name}"
        print(f"{WORKER} >> {tag}", flush=True)
        first, t0 = len(log), time.perf_counter()
        status, err, detail = "ok", float("nan"), ""
        try:
            rng = np.random.default_rng(zlib.crc32(pr.name.encode()))
            run = _run_backward if pr.backward else _run_forward
            err = run(pr, dev, rng, cupy)
            cupy.cuda.runtime.deviceSynchronize()
            if not err <= _tolerance(pr):
                status, detail = "WRONG", f"tolerance {_tolerance(pr):.0e}"
        except Exception as e:  # noqa: BLE001  (reported, and the run goes on)
            status, detail = "ERROR", f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        got = Counter(log[first:])
        want = Counter(sp.launches(pr, dev))
        if status != "ERROR" and got != want:  # sanitize_problems.launches() is out of date
            extra = [sp.label(x) for x in (got - want)]
            lacking = [sp.label(x) for x in (want - got)]
            detail = f"launched, not predicted: {extra}; predicted, not launched: {lacking}"
            status = "MISMATCH"
        seconds = time.perf_counter() - t0
        results.append(dict(name=pr.name, status=status, err=err, seconds=round(seconds, 4),
                            launches=sum(got.values()), detail=detail))  # fmt: skip
        print(f"{WORKER} {status:8s} {tag} launches {sum(got.values())} err {err:.1e} "
              f"{seconds:.2f}s {detail}".rstrip(), flush=True)  # fmt: skip
    every = sp.all_specializations()
    launched = set(log)
    missing = [sp.label(k) for k in every if k not in launched]
    unknown = sorted({sp.label(k) for k in launched if k not in set(every)})
    bad = [r for r in results if r["status"] != "ok"]
    print(f"{WORKER} done: {len(chosen)} problems, {len(bad)} not ok, "
          f"{len(every) - len(missing)} of {len(every)} kernel specializations launched, "
          f"{len(log)} launches in {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    if args.json:
        report = dict(device=dev.name, tool=args.tool, problems=len(chosen), results=results,
                      specializations=len(every), launched=sorted(sp.label(k) for k in launched),
                      missing=missing, unknown=unknown)  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1))
    cupy.cuda.runtime.deviceSynchronize()
    return 1 if bad or unknown or (missing and not args.only) else 0


# --------------------------------------------------------------------------------------------
# The driver.


def _split(text: str | None) -> list[str]:
    return [s for s in (text or "").split(",") if s]


def find_sanitizer(explicit: str | None = None) -> str | None:
    """compute-sanitizer: as given, on PATH, or in the usual CUDA toolkit places."""
    if explicit:
        return explicit
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    homes += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))[::-1]
    for home in filter(None, homes):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            path = Path(home) / rel
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def supported_options(help_text: str, options: Sequence[str]) -> tuple[list[str], list[str]]:
    """``options`` (flag, value pairs) without those ``--help`` does not list; and the dropped
    flags. An empty help text keeps everything."""
    kept, dropped = [], []
    for flag, value in zip(options[::2], options[1::2], strict=True):
        if help_text and flag not in help_text:
            dropped.append(flag)
        else:
            kept += [flag, value]
    return kept, dropped


def sanitizer_command(
    exe: str, tool: str, help_text: str, worker_args: Sequence[str], port: int | None = None,
    initcheck_space: str = "all",
) -> tuple[list[str], list[str]]:  # fmt: skip
    """The command line of one tool's run, and the options its compute-sanitizer lacks."""
    options = list(COMMON_OPTIONS) + list(TOOL_OPTIONS[tool])
    if tool == "initcheck":
        options[options.index("--initcheck-address-space") + 1] = initcheck_space
    if port is not None:  # runs at once each need their own ports
        options += ["--port", str(port)]
    kept, dropped = supported_options(help_text, options)
    return [exe, "--tool", tool, *kept, sys.executable, *worker_args], dropped


@dataclass
class Run:
    name: str  # "native" or a tool
    cmd: list[str]
    log: Path
    json: Path | None
    timeout: float
    dropped: list[str] = field(default_factory=list)
    proc: Any = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False


def _start(run: Run, env: dict[str, str]) -> None:
    with run.log.open("w") as f:
        f.write("$ " + " ".join(run.cmd) + "\n")
    handle = run.log.open("a")
    # A session of its own, so that a run past its time is stopped with everything it started.
    run.proc = subprocess.Popen(run.cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)  # fmt: skip
    handle.close()
    run.started = time.perf_counter()


def _stop(run: Run) -> None:
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run.proc.wait()


def _run_all(runs: Sequence[Run], env: dict[str, str], jobs: int, deadline: float) -> None:
    """Run up to ``jobs`` at once; stop each at its timeout, and every one at ``deadline``."""
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < max(1, jobs):
            run = pending.pop(0)
            run.timeout = min(run.timeout, max(1.0, deadline - time.perf_counter()))
            _start(run, env)
            print(f"  {run.name}: started (timeout {run.timeout:.0f} s)", flush=True)
            active.append(run)
        time.sleep(0.5)
        for run in list(active):
            elapsed = time.perf_counter() - run.started
            if run.proc.poll() is None and elapsed > run.timeout:
                run.timed_out = True
                _stop(run)
            if run.proc.poll() is not None:
                run.returncode, run.seconds = run.proc.returncode, elapsed
                active.remove(run)
                print(f"  {run.name}: finished in {elapsed:.0f} s (exit {run.returncode}"
                      f"{', timed out' if run.timed_out else ''})", flush=True)  # fmt: skip


def _precompile(
    problems: Sequence[sp.Problem], worker_args: Sequence[str], env: dict[str, str], jobs: int,
    out: Path, deadline: float,
) -> bool:  # fmt: skip
    """Compile the modules the problems use, ``jobs`` processes at once (NVRTC is serial within a
    process; CuPy keeps each cubin, with its lowered names, in its on-disk cache)."""
    modules = _modules_used(problems)
    jobs = max(1, min(jobs, len(modules)))
    start = time.perf_counter()
    runs = [
        Run(f"compile {i + 1}/{jobs}",
            [sys.executable, *worker_args, "--compile-shard", f"{i}/{jobs}"],
            out / f"compile-{i}.tmp", None, 300.0)
        for i in range(jobs)
    ]  # fmt: skip
    for run in runs:
        run.timeout = min(run.timeout, max(1.0, deadline - time.perf_counter()))
        _start(run, env)
    ok = True
    for run in runs:
        try:
            run.returncode = run.proc.wait(
                timeout=max(1.0, run.timeout - (time.perf_counter() - run.started))
            )
        except subprocess.TimeoutExpired:
            _stop(run)
            run.returncode, run.timed_out = None, True
        text = run.log.read_text(errors="replace")
        run.log.unlink()
        if run.returncode != 0:
            ok = False
            print(f"  {run.name} failed (exit {run.returncode}):\n{text[-3000:]}", flush=True)
    print(f"compile: {len(modules)} modules in {time.perf_counter() - start:.0f} s "
          f"({jobs} processes){'' if ok else ': FAILED'}", flush=True)  # fmt: skip
    return ok


def _count_text(run: Run, rep: ToolReport) -> str:
    unit = "hazards" if run.name == "racecheck" else "errors"
    if rep.errors is None:
        return f"{run.name} ? {unit} ({'timed out' if run.timed_out else 'no summary line'})"
    return f"{run.name} {rep.errors} {unit}"


def _summarize(
    runs: Sequence[Run], n_problems: int, total_specs: int, compiled: bool, out: Path,
    filtered: bool,
) -> tuple[str, bool]:  # fmt: skip
    """Print each run's details, write summary.json; return the summary line and whether
    everything was clean."""
    reasons = [] if compiled else ["the compile step failed"]
    launched_everywhere: set[str] | None = None
    counts, records = [], []
    for run in runs:
        rep = parse_log(run.log.read_text(errors="replace"), run.name)
        data: dict[str, Any] = {}
        if run.json is not None and run.json.is_file():
            data = json.loads(run.json.read_text())
        results = data.get("results") or [dict(name=k, status=v) for k, v in rep.statuses.items()]
        not_ok = {r["name"]: r["status"] for r in results if r["status"] != "ok"}
        launched = set(data.get("launched", []))
        if launched_everywhere is None:
            launched_everywhere = launched
        launched_everywhere &= launched
        if run.name != "native":
            counts.append(_count_text(run, rep))
            if rep.errors is None or rep.errors or rep.race_errors or rep.race_warnings:
                reasons.append(_count_text(run, rep))
        if run.timed_out or not data:
            reasons.append(f"{run.name} did not finish" + (" (timed out)" if run.timed_out else ""))
        if not_ok:
            reasons.append(f"{run.name}: {len(not_ok)} problems not ok")
        if data.get("unknown"):
            reasons.append(f"{run.name} launched kernels no list holds")
        detail = (f"{statuses_text(results, n_problems)}; {len(launched)}/{total_specs} "
                  f"specializations; {run.seconds:.0f} s; log {run.log}")  # fmt: skip
        if run.name != "native":
            detail = f"{_count_text(run, rep).split(' ', 1)[1]}; {detail}"
        if run.name == "racecheck" and rep.errors is not None:
            detail += f" ({rep.race_errors} errors, {rep.race_warnings} warnings)"
        if run.dropped:
            detail += f"; options this compute-sanitizer lacks, left out: {run.dropped}"
        print(f"  {run.name}: {detail}", flush=True)
        for kind, n in rep.kinds.most_common(8):
            print(f"      {n:5d} x {kind}")
        for name, n in rep.by_problem.most_common(8):
            print(f"      {n:5d} reports while running {name}")
        for name, status in list(not_ok.items())[:8]:
            print(f"      {status} {name}")
        records.append(dict(
            run=run.name, command=run.cmd, returncode=run.returncode, seconds=run.seconds,
            timed_out=run.timed_out, errors=rep.errors, racecheck_errors=rep.race_errors,
            racecheck_warnings=rep.race_warnings, not_printed=rep.not_printed,
            report_kinds=dict(rep.kinds), reports_by_problem=dict(rep.by_problem),
            problems_not_ok=not_ok, launched=len(launched), missing=data.get("missing"),
            unknown=data.get("unknown"), dropped_options=run.dropped, results=data.get("results"),
        ))  # fmt: skip
    n_launched = len(launched_everywhere or ())
    specs = f"{total_specs} kernel specializations"
    if n_launched < total_specs:
        specs = f"{n_launched} of {specs}"
        if not filtered:
            reasons.append(f"{total_specs - n_launched} specializations not launched in every run")
    line = (f"sanitize: {', '.join(counts) or 'no tool'} over {n_problems} problems, {specs}: "
            + ("clean" if not reasons else "FAILED (" + "; ".join(reasons) + ")"))  # fmt: skip
    (out / "summary.json").write_text(json.dumps(dict(summary=line, runs=records), indent=1))
    return line, not reasons


def statuses_text(results: Sequence[dict[str, Any]], n_problems: int) -> str:
    """How many problems passed, and the count of each other verdict ("2 WRONG")."""
    counts = Counter(r["status"] for r in results)
    text = f"{counts.pop('ok', 0)}/{n_problems} problems ok"
    return text + (f" ({', '.join(f'{n} {s}' for s, n in counts.items())})" if counts else "")


def drive(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    deadline = start + args.budget
    tools = _split(args.tools)
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        print(f"sanitize: unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
        return 2
    exe = find_sanitizer(args.sanitizer) if tools else None
    if tools and exe is None:
        print("sanitize: compute-sanitizer not found (give --sanitizer PATH)")
        return 2
    help_text = ""
    if exe:
        try:

            def ask(flag: str) -> str:
                done = subprocess.run([exe, flag], capture_output=True, text=True, timeout=60)
                return done.stdout + done.stderr

            help_text = ask("--help")
            version = [v for v in ask("--version").splitlines() if "Version" in v]
            print(f"sanitize: {exe} ({version[0].strip() if version else 'version unknown'})")
        except (OSError, subprocess.SubprocessError) as e:
            print(f"sanitize: {exe} --help failed ({e}); passing every option")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = sp.select_problems(args.quick, _split(args.only))
    total_specs = len(sp.all_specializations())
    print(f"sanitize: {len(chosen)} problems{' (quick)' if args.quick else ''}, "
          f"{len(sp.coverage(chosen))} of {total_specs} kernel specializations, tools "
          f"{', '.join(tools) or 'none'}", flush=True)  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUPYCONVT_AUTOTUNE="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.cache_dir:
        env["CUPY_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    worker_args = [str(Path(__file__).resolve()), "--worker"]
    worker_args += ["--quick"] if args.quick else []
    worker_args += ["--only", args.only] if args.only else []
    compiled = args.no_compile or _precompile(chosen, worker_args, env, args.compile_jobs, out,
                                              deadline)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="sanitize-"))
    runs = []
    if not args.no_native:
        native = Run("native", [sys.executable, *worker_args, "--json", str(tmp / "native.json")],
                     out / "native.log", tmp / "native.json", min(args.timeout, 240.0))  # fmt: skip
        _run_all([native], env, 1, deadline)
        runs.append(native)
    tool_runs = []
    for k, tool in enumerate(tools):
        json_path = tmp / f"{tool}.json"
        cmd, dropped = sanitizer_command(
            exe, tool, help_text, [*worker_args, "--tool", tool, "--json", str(json_path)],  # type: ignore[arg-type]
            port=49152 + 100 * k if args.jobs > 1 else None, initcheck_space=args.initcheck_space,
        )  # fmt: skip
        tool_runs.append(Run(tool, cmd, out / f"{tool}.log", json_path, args.timeout, dropped))
    _run_all(tool_runs, env, args.jobs, deadline)
    runs += tool_runs
    line, clean = _summarize(runs, len(chosen), total_specs, compiled, out, bool(args.only))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"sanitize: {time.perf_counter() - start:.0f} s in all; logs and summary.json in {out}")
    print(line, flush=True)
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help="comma-separated compute-sanitizer tools (empty: the native run only)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a subset that still launches every specialization (one problem a tile)",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: only problems whose name has one (debugging; "
        "the every-specialization check is then off)",
    )
    ap.add_argument(
        "--out", default=str(ROOT / "out" / "sanitize"), help="where the logs and summary.json go"
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=len(TOOLS),
        help="tool runs at once (each is its own process on the one GPU)",
    )
    ap.add_argument(
        "--compile-jobs",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="processes compiling the kernel modules at the start",
    )
    ap.add_argument("--timeout", type=float, default=480.0, help="seconds a run may take")
    ap.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds for everything: runs still going then are stopped",
    )
    ap.add_argument(
        "--initcheck-space",
        default="all",
        choices=("global", "shared", "all"),
        help="memory initcheck checks (compute-sanitizer's --initcheck-address-space)",
    )
    ap.add_argument("--sanitizer", default=None, help="path of compute-sanitizer")
    ap.add_argument("--cache-dir", default=None, help="CuPy's kernel cache (CUPY_CACHE_DIR)")
    ap.add_argument("--no-compile", action="store_true", help="skip the parallel compile step")
    ap.add_argument("--no-native", action="store_true", help="skip the run without a sanitizer")
    ap.add_argument(
        "--list",
        action="store_true",
        help="print the problems and what each launches, and exit (needs no GPU)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    ap.add_argument("--compile-shard", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        return list_problems(sp.select_problems(args.quick, _split(args.only)))
    return worker(args) if args.worker else drive(args)


def list_problems(problems: Sequence[sp.Problem]) -> int:
    """One line a problem: name, arguments, and the kernels it launches (on an H100)."""
    for pr in problems:
        p = pr.params
        args = (f"x{tuple(pr.x_shape)} C_out {pr.C_out} k{p.kernel} s{p.stride} p{p.padding} "
                f"op{p.output_padding} d{p.dilation} g{p.groups} {pr.dtype} {pr.precision} "
                f"{pr.layout}{' bias' if pr.bias else ''}"
                f"{f' needs {pr.needs}' if pr.needs else ''}"
                f"{f' x_offset {pr.x_offset}' if pr.x_offset else ''}")  # fmt: skip
        names = ", ".join(n.split("<")[0] for _, n in sp.launches(pr))
        print(f"{pr.name}: {args}: {names}")
    covered = sp.coverage(problems)
    print(f"{len(problems)} problems, {len(covered)} of {len(sp.all_specializations())} kernel "
          "specializations")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
