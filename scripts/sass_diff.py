"""Compare the machine code (SASS) of every kernel specialization between the working tree and a
git revision, with no GPU: proof that a refactor of kernels/ left the code that runs unchanged.

    PYTHONPATH=. python scripts/sass_diff.py [--base REV] [--only SUBSTR,...] [--arch sm_90]
                                             [--jobs N] [--show N]

Each side's ``cupyconvt`` lists its kernel modules (``_compile.every_module()``, what the CI
compile test builds: the runtime's exact sources and NVRTC options); every module is compiled with
NVRTC for ``--arch`` (a module whose options name an architecture, sm_90a's wgmma kernels, for that
one) into a cubin, and ``cuobjdump -sass`` splits it into one listing a function. The listings are
compared instruction by instruction, text and both 64-bit encoding words (so the scheduling bits
too): two specializations match only where their machine code is bit for bit the same. ptxas does
not always compile one source to the same code (7 of backward.cu's 143 specializations came out
more than one way over five compiles of one tree, NVRTC 13.5), so a module with a differing
specialization is compiled again on both sides (``--recompile``), and a specialization matches
where some compile of each side agrees. Prints one line a differing specialization (instruction
counts on both sides, and where ``--show`` asks, the first differing lines), then

    sass_diff: 678 specializations, 678 identical (3 of them compiled more than one way),
    0 differ, 0 only in base, 0 only here

(on one line) and exits 0 only where all match and the two sides list the same specializations.

Needs NVRTC (``cuda-bindings``, ``nvidia-cuda-nvrtc``: the test extra's) and ``cuobjdump`` with
the ``nvdisasm`` it runs (the CUDA toolkit's, or ``pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm``); found on PATH, beside nvcc, or in those wheels. Machine code that is the
same runs the same, so a refactor this script passes needs no new GPU run for correctness or
speed; one it fails does.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# cuobjdump -sass: "        Function : _Z...", then per instruction two 64-bit words, the first on
# the line "        /*0010*/   MOV R1, c[0x0][0x28] ;   /* 0x00000a00ff017b82 */" and the second
# (with the scheduling bits: stalls, barriers, reuse) alone on the next line.
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*/\* (0x[0-9a-f]{16}) \*/\s*$")
_WORD = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")


def find_cuobjdump() -> str:
    """The cuobjdump binary: on PATH, beside nvcc, under CUDA_HOME, or in the pip wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent / "cuobjdump")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(Path(base).glob("cu*/bin/cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(
        "cuobjdump not found (on PATH, beside nvcc, under CUDA_HOME, or from "
        "`pip install nvidia-cuda-cuobjdump`)"
    )


def list_modules(tree: Path) -> list[dict]:
    """The kernel modules of the ``cupyconvt`` in ``tree``: filename, options, name expressions
    and source, read in a subprocess so that each side imports its own package."""
    code = (
        "import json, sys\n"
        "try:\n"
        "    from cupyconvt._compile import every_module\n"
        "except ImportError:  # a revision from before every_module: the same three lists\n"
        "    from cupyconvt._backward_gpu import all_backward_modules\n"
        "    from cupyconvt._select import all_modules\n"
        "    from cupyconvt._slab import slab_module\n"
        "    def every_module():\n"
        "        return all_modules() + all_backward_modules() + [slab_module()]\n"
        "json.dump([dict(filename=m.filename, options=list(m.options),\n"
        "                names=list(m.name_expressions), source=m.source())\n"
        "           for m in every_module()], sys.stdout)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def parse_sass(text: str, names: dict[str, str]) -> dict[str, list[str]]:
    """Split ``cuobjdump -sass`` output into one listing a function, each instruction its text and
    its two encoding words; functions named by ``names`` (mangled -> name expression) where it
    has them."""
    listings: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = listings.setdefault(names.get(m.group(1), m.group(1)), [])
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            instr = re.sub(r"\s+", " ", m.group(1))
            current.append(f"{instr}  {m.group(2)}")
            continue
        m = _WORD.match(line)
        if m and current:
            current[-1] += f" {m.group(1)}"
    return listings


def compile_sass(module: dict, arch: str, cuobjdump: str) -> dict[str, list[str]]:
    """name expression -> its SASS instructions, each its text and its two encoding words."""
    from cuda.bindings import nvrtc

    def check(result, what):
        err = result[0] if isinstance(result, tuple) else result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{module['filename']}: {what} failed ({err})")
        return result

    err, prog = nvrtc.nvrtcCreateProgram(
        module["source"].encode(), module["filename"].encode(), 0, [], []
    )
    check((err,), "nvrtcCreateProgram")
    try:
        for name in module["names"]:
            check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in module["options"]]
        if not any(o.startswith("--gpu-architecture") for o in module["options"]):
            opts.append(f"--gpu-architecture={arch}".encode())  # else built for its own (sm_90a)
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"{module['filename']} does not compile:\n{log.decode()}")
        lowered = {}
        for name in module["names"]:
            _, low = check(nvrtc.nvrtcGetLoweredName(prog, name.encode()), "nvrtcGetLoweredName")
            lowered[low.decode()] = name
        _, size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        # cuobjdump runs nvdisasm, which the wheels and some toolkits keep beside it
        env = {**os.environ, "PATH": f"{Path(cuobjdump).parent}{os.pathsep}{os.environ['PATH']}"}
        text = subprocess.run(
            [cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True, env=env
        ).stdout
    listings = parse_sass(text, lowered)
    missing = [name for name in module["names"] if not listings.get(name)]
    if missing:
        raise RuntimeError(f"{module['filename']}: no SASS read for {missing}")
    return {name: listings[name] for name in module["names"]}


Listings = dict[str, set[tuple[str, ...]]]  # 'file.cu: name' -> the listings seen for it


def side(modules: list[dict], arch: str, jobs: int, times: int, into: Listings) -> None:
    """Compile each of ``modules`` ``times`` times, adding every listing seen to ``into``."""
    cuobjdump = find_cuobjdump()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [
            (m, pool.submit(compile_sass, m, arch, cuobjdump))
            for m in modules
            for _ in range(times)
        ]
        for m, fut in futures:
            for name, sass in fut.result().items():
                into.setdefault(f"{m['filename']}: {name}", set()).add(tuple(sass))


def differing(base: Listings, here: Listings) -> list[str]:
    """The specializations of both sides no compile of which gave the same code on both."""
    return sorted(k for k in base.keys() & here.keys() if not base[k] & here[k])


def export_revision(rev: str, dest: Path) -> None:
    """The files of ``rev`` (git archive) under ``dest``."""
    data = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="the git revision to compare with")
    ap.add_argument("--only", default="", help="comma-separated substrings of kernel file names")
    ap.add_argument("--arch", default="sm_90", help="NVRTC --gpu-architecture")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--show", type=int, default=0, help="differing lines to print a function")
    ap.add_argument(
        "--recompile",
        type=int,
        default=4,
        help="compiles more of each side of a module with a differing specialization",
    )
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]

    def keep(mods: list[dict]) -> list[dict]:
        return [m for m in mods if not only or any(x in m["filename"] for x in only)]

    base: Listings = {}
    here: Listings = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp)
        export_revision(args.base, base_tree)
        base_mods = keep(list_modules(base_tree))
    here_mods = keep(list_modules(ROOT))
    side(base_mods, args.arch, args.jobs, 1, base)
    side(here_mods, args.arch, args.jobs, 1, here)

    # ptxas does not always give one source the same code (the docstring), so a module with a
    # differing specialization is compiled again on both sides, and a specialization counts as
    # identical where some compile of each side gave the same code.
    files = {k.split(": ", 1)[0] for k in differing(base, here)}
    if files and args.recompile:
        side([m for m in base_mods if m["filename"] in files], args.arch, args.jobs,
             args.recompile, base)  # fmt: skip
        side([m for m in here_mods if m["filename"] in files], args.arch, args.jobs,
             args.recompile, here)  # fmt: skip
    differ = differing(base, here)
    for key in differ:
        a, b = min(base[key]), min(here[key])
        print(f"differs: {key}: {len(a)} -> {len(b)} instructions")
        if args.show:
            lines = [
                d
                for d in difflib.unified_diff(a, b, lineterm="", n=0)
                if d[:1] in "+-" and d[:3] not in ("+++", "---")
            ]
            for d in lines[: args.show]:
                print(f"    {d}")
    varied = sum(
        1 for k in base.keys() & here.keys() if k not in differ and len(base[k] | here[k]) > 1
    )
    only_base = sorted(base.keys() - here.keys())
    only_here = sorted(here.keys() - base.keys())
    for key in only_base:
        print(f"only in {args.base}: {key}")
    for key in only_here:
        print(f"only here: {key}")
    same = len(base.keys() & here.keys()) - len(differ)
    print(
        f"sass_diff: {len(base.keys() | here.keys())} specializations, {same} identical "
        f"({varied} of them compiled more than one way), {len(differ)} differ, "
        f"{len(only_base)} only in base, {len(only_here)} only here"
    )
    return 0 if not differ and not only_base and not only_here else 1


if __name__ == "__main__":
    sys.exit(main())
