"""The on-disk autotune cache (cupyconvt/_autotune.py): selection, reuse, recovery, concurrency.

No GPU: ``measure`` is a fake that returns fixed times, and a "new process" is simulated with
``clear(memory_only=True)`` except in the multi-process test, which uses real processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest

from cupyconvt import _autotune
from cupyconvt._autotune import AutotuneCacheWarning, choose, problem_key

TIMES = {"igemm:128x64x8x8x8": 1.5, "grouped:4": 0.75, "direct": 3.0}
KEY = problem_key("Fake GPU", "float32", ((2, 64, 8, 8, 8), (32, 3, 3, 3), (2, 2, 2), False))


class FakeMeasure:
    """``measure`` that returns ``times[name]`` (raising where the time is an exception)."""

    def __init__(self, times: dict[str, float | Exception], delay: float = 0.0) -> None:
        self.times = times
        self.delay = delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, name: str) -> float:
        with self._lock:
            self.calls.append(name)
        time.sleep(self.delay)
        t = self.times[name]
        if isinstance(t, Exception):
            raise t
        return t


def must_not_measure(name: str) -> float:
    raise AssertionError(f"measured {name!r} although the cache has the winner")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache directory per test, and a module state as in a new process."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CUPYCONVT_CACHE_DIR", str(d))
    monkeypatch.delenv("CUPYCONVT_AUTOTUNE", raising=False)
    _autotune.set_enabled(None)
    _autotune.clear(memory_only=True)
    yield d
    _autotune.set_enabled(None)
    _autotune.clear(memory_only=True)


def stored(d: Path) -> dict:
    return json.loads((d / "autotune.json").read_text())


# ----------------------------------------------------------------------------- keys and paths


def test_problem_key_is_stable_and_versioned():
    problem = ((2, 64, 8, 8, 8), (1, 1, 1), True)
    key = problem_key("NVIDIA H100 80GB HBM3", "float16", problem)
    assert key == "v1|NVIDIA H100 80GB HBM3|float16|[[2,64,8,8,8],[1,1,1],true]"
    assert key.startswith(f"v{_autotune.FORMAT_VERSION}|")
    # NumPy integers and lists give the same key as ints and tuples.
    as_numpy = (tuple(np.int64(v) for v in problem[0]), [1, 1, 1], np.True_)
    assert problem_key("NVIDIA H100 80GB HBM3", "float16", as_numpy) == key
    # A bool is not the int 1; the dtype and the device are part of the key.
    assert problem_key("NVIDIA H100 80GB HBM3", "float16", (problem[0], problem[1], 1)) != key
    assert problem_key("NVIDIA H100 80GB HBM3", "float32", problem) != key
    assert problem_key("NVIDIA H200", "float16", problem) != key


def test_problem_key_rejects_unstable_types():
    with pytest.raises(TypeError, match=r"problem\[1\]\[0\] has type object"):
        problem_key("dev", "float32", ((1, 2), (object(),)))


def test_cache_path_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPYCONVT_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _autotune.cache_path() == tmp_path / "own" / "autotune.json"
    monkeypatch.delenv("CUPYCONVT_CACHE_DIR")
    assert _autotune.cache_path() == tmp_path / "xdg" / "cupyconvt" / "autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _autotune.cache_path() == tmp_path / "home" / ".cache" / "cupyconvt" / "autotune.json"


@pytest.mark.parametrize(
    ("env", "override", "expected"),
    [
        (None, None, False),
        ("1", None, True),
        ("0", None, False),
        ("", None, False),
        ("true", None, True),
        ("1", False, False),
        (None, True, True),
        ("0", True, True),
    ],
)
def test_enabled_env_and_override(monkeypatch, env, override, expected):
    if env is not None:
        monkeypatch.setenv("CUPYCONVT_AUTOTUNE", env)
    _autotune.set_enabled(override)
    assert _autotune.enabled() is expected


def test_enabled_reads_env_at_call_time_until_overridden(monkeypatch):
    assert not _autotune.enabled()
    monkeypatch.setenv("CUPYCONVT_AUTOTUNE", "1")
    assert _autotune.enabled()
    _autotune.set_enabled(False)
    assert not _autotune.enabled()
    _autotune.set_enabled(None)
    assert _autotune.enabled()
    monkeypatch.setenv("CUPYCONVT_AUTOTUNE", "0")
    assert not _autotune.enabled()
    with pytest.raises(TypeError, match="on must be True, False or None, got 1"):
        _autotune.set_enabled(1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- choosing


def test_choose_measures_every_candidate_and_stores_the_fastest(cache_dir):
    measure = FakeMeasure(TIMES)
    assert choose(KEY, list(TIMES), measure) == "grouped:4"
    assert sorted(measure.calls) == sorted(TIMES)
    assert stored(cache_dir) == {KEY: {"winner": "grouped:4", "ms": TIMES}}
    # The same process does not measure again.
    assert choose(KEY, list(TIMES), must_not_measure) == "grouped:4"


def test_choose_breaks_ties_by_candidate_order():
    times = {"b": 1.0, "a": 1.0, "c": 2.0}
    assert choose(KEY, ["b", "a", "c"], FakeMeasure(times)) == "b"


def test_failing_candidates_are_skipped(cache_dir):
    times = {"igemm:128x64x8x8x8": RuntimeError("too much shared memory"), "direct": 3.0}
    times["grouped:4"] = float("nan")  # a broken timer is a failure too, not a winner
    assert choose(KEY, list(times), FakeMeasure(times)) == "direct"
    assert stored(cache_dir)[KEY] == {"winner": "direct", "ms": {"direct": 3.0}}


def test_all_candidates_failing_reraises_the_last_error_and_stores_nothing(cache_dir):
    times = {"a": RuntimeError("first"), "b": KeyError("last")}
    with pytest.raises(KeyError, match="last"):
        choose(KEY, list(times), FakeMeasure(times))
    assert not (cache_dir / "autotune.json").exists()
    with pytest.raises(ValueError, match="candidates must name at least one plan"):
        choose(KEY, [], FakeMeasure(times))


def test_winner_is_reused_by_a_new_process(cache_dir):
    assert choose(KEY, list(TIMES), FakeMeasure(TIMES)) == "grouped:4"
    _autotune.clear(memory_only=True)  # as if a new process started
    assert choose(KEY, list(TIMES), must_not_measure) == "grouped:4"
    # Other keys (device, dtype) are not answered by this entry.
    other = problem_key("Other GPU", "float32", ((2, 64, 8, 8, 8),))
    measure = FakeMeasure({"direct": 1.0})
    assert choose(other, ["direct"], measure) == "direct"
    assert measure.calls == ["direct"]
    assert set(stored(cache_dir)) == {KEY, other}


def test_each_key_is_read_from_disk_once_per_process(cache_dir):
    choose(KEY, list(TIMES), FakeMeasure(TIMES))
    _autotune.clear(memory_only=True)
    assert choose(KEY, list(TIMES), must_not_measure) == "grouped:4"
    # A later change to the file is not seen by this process: the entry came from memory.
    (cache_dir / "autotune.json").write_text(json.dumps({KEY: {"winner": "direct", "ms": {}}}))
    assert choose(KEY, list(TIMES), must_not_measure) == "grouped:4"


def test_stale_winner_is_measured_again(cache_dir):
    assert choose(KEY, list(TIMES), FakeMeasure(TIMES)) == "grouped:4"
    fewer = {k: v for k, v in TIMES.items() if k != "grouped:4"}
    for new_process in (False, True):
        if new_process:
            (cache_dir / "autotune.json").write_text(
                json.dumps({KEY: {"winner": "grouped:4", "ms": TIMES}})
            )
            _autotune.clear(memory_only=True)
        measure = FakeMeasure(fewer)
        assert choose(KEY, list(fewer), measure) == "igemm:128x64x8x8x8"
        assert sorted(measure.calls) == sorted(fewer)
        assert stored(cache_dir)[KEY] == {"winner": "igemm:128x64x8x8x8", "ms": fewer}


# ----------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    "content",
    [b'{"v1|Fake GPU|float32": {"winner": "dir', b"[1, 2, 3]", b"\xff\xfe\x00garbage", b""],
    ids=["torn", "not-an-object", "binary", "empty"],
)
def test_corrupt_file_warns_once_and_is_rewritten(cache_dir, content):
    cache_dir.mkdir()
    (cache_dir / "autotune.json").write_bytes(content)
    with pytest.warns(AutotuneCacheWarning, match="not a valid cache file") as record:
        assert choose(KEY, list(TIMES), FakeMeasure(TIMES)) == "grouped:4"
    assert len(record) == 1
    assert stored(cache_dir) == {KEY: {"winner": "grouped:4", "ms": TIMES}}
    _autotune.clear(memory_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(KEY, list(TIMES), must_not_measure) == "grouped:4"


def test_invalid_entry_is_measured_again_and_other_entries_are_kept(cache_dir):
    cache_dir.mkdir()
    other = {"winner": "direct", "ms": {"direct": 1.0}}
    (cache_dir / "autotune.json").write_text(json.dumps({KEY: 3, "v0|old": other}))
    measure = FakeMeasure(TIMES)
    assert choose(KEY, list(TIMES), measure) == "grouped:4"
    assert len(measure.calls) == len(TIMES)
    assert stored(cache_dir) == {KEY: {"winner": "grouped:4", "ms": TIMES}, "v0|old": other}


def _chmod_prevents_writing(d: Path) -> bool:
    """Whether a read-only mode stops us writing into ``d`` (it does not for root)."""
    probe = d / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def _assert_kept_in_memory() -> None:
    """With an unwritable cache: one warning for all keys, and results still reused in memory."""
    measure = FakeMeasure(TIMES)
    with pytest.warns(AutotuneCacheWarning, match="cannot write the autotune cache") as rec:
        assert choose(KEY, list(TIMES), measure) == "grouped:4"
        other = problem_key("Fake GPU", "float64", (1,))
        assert choose(other, ["direct"], FakeMeasure({"direct": 1.0})) == "direct"
    assert len(rec) == 1  # warned once, not per key
    assert choose(KEY, list(TIMES), must_not_measure) == "grouped:4"
    assert len(measure.calls) == len(TIMES)


def test_uncreatable_cache_dir_keeps_results_in_memory(tmp_path, monkeypatch):
    """A cache directory below a regular file cannot be made, by root either."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CUPYCONVT_CACHE_DIR", str(blocker / "sub"))
    _assert_kept_in_memory()
    assert blocker.read_text() == ""


@pytest.mark.parametrize("missing", [False, True], ids=["existing-dir", "uncreatable-dir"])
def test_read_only_cache_dir_keeps_results_in_memory(tmp_path, monkeypatch, missing):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not _chmod_prevents_writing(ro):
            pytest.skip(
                "running as root, whom chmod does not stop from writing (see the test above)"
            )
        monkeypatch.setenv("CUPYCONVT_CACHE_DIR", str(ro / "sub" if missing else ro))
        _assert_kept_in_memory()
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_clear_deletes_the_file(cache_dir):
    choose(KEY, list(TIMES), FakeMeasure(TIMES))
    assert (cache_dir / "autotune.json").exists()
    _autotune.clear()
    assert not (cache_dir / "autotune.json").exists()
    measure = FakeMeasure(TIMES)
    assert choose(KEY, list(TIMES), measure) == "grouped:4"
    assert len(measure.calls) == len(TIMES)
    _autotune.clear()
    _autotune.clear()  # no file: nothing to do


# ----------------------------------------------------------------------------- concurrency


def test_threads_asking_for_one_key_measure_it_once():
    n_threads = 8
    measure = FakeMeasure(TIMES, delay=0.02)
    barrier = threading.Barrier(n_threads)
    results: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            barrier.wait()
            results.append(choose(KEY, list(TIMES), measure))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results == ["grouped:4"] * n_threads
    assert sorted(measure.calls) == sorted(TIMES)  # one measurement of each candidate


N_PROCESSES = 4
KEYS_PER_PROCESS = 40


def _store_many(cache: str, worker: int, barrier, errors: str) -> None:
    """Child process: store KEYS_PER_PROCESS keys of its own, checking the file stays valid."""
    try:
        os.environ["CUPYCONVT_CACHE_DIR"] = cache
        warnings.simplefilter("error")  # a torn file read back would warn: fail instead
        barrier.wait(timeout=120)
        for i in range(KEYS_PER_PROCESS):
            key = problem_key("Fake GPU", "float32", (worker, i))
            times = {"a": 10.0 + worker, "b": float(i % 3), "c": 1.5}
            choose(key, list(times), times.__getitem__)
            json.loads((Path(cache) / "autotune.json").read_text())
    except BaseException:
        Path(errors, f"worker{worker}.txt").write_text(traceback.format_exc())
        raise


def test_processes_storing_concurrently_keep_a_valid_file_with_every_key(tmp_path, cache_dir):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_PROCESSES)
    errors = tmp_path / "errors"
    errors.mkdir()
    procs = [
        ctx.Process(target=_store_many, args=(str(cache_dir), w, barrier, str(errors)))
        for w in range(N_PROCESSES)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = {f.name: f.read_text() for f in errors.iterdir()}
    assert not reports, reports
    assert [p.exitcode for p in procs] == [0] * N_PROCESSES

    data = stored(cache_dir)
    expected = {
        problem_key("Fake GPU", "float32", (w, i)): "c" if i % 3 == 2 else "b"
        for w in range(N_PROCESSES)
        for i in range(KEYS_PER_PROCESS)
    }
    assert {k: v["winner"] for k, v in data.items()} == expected
    names = {f.name for f in cache_dir.iterdir()}
    assert names - {"autotune.json.lock"} == {"autotune.json"}  # no temporary file left behind
