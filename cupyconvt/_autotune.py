"""Opt-in autotuning: time every candidate plan once, remember the fastest on disk.

The selector asks :func:`choose` for a winner among the candidate plan names of a problem; the
first time a (device, dtype, problem) key is seen, every candidate is timed with the caller's
``measure`` function and the winner is stored in a JSON file shared by all processes of the user,
so later processes skip the timing. Nothing here needs a GPU or CuPy: timing is the caller's job.

The file maps each key to ``{"winner": name, "ms": {name: milliseconds}}``. Keys start with a
format version (:data:`FORMAT_VERSION`), so a change to the meaning of keys or plans invalidates
old entries by bumping it; entries of other versions stay in the file untouched.

Concurrency: within a process, a lock makes each key measured at most once even when threads ask
at the same time (and keeps two timings from running at once, which would distort both). Across
processes, a store re-reads the file, merges its entry and replaces the file atomically (temporary
file in the same directory + :func:`os.replace`) while holding ``fcntl.flock`` on a sibling
``.lock`` file, so concurrent writers never lose each other's entries or leave a torn file. Where
``fcntl`` is missing the replace is still atomic but concurrent stores may drop an entry, which
costs only a re-measure.

A corrupt file or a cache directory that cannot be written never fails a call: a warning
(:class:`AutotuneCacheWarning`) is issued once and the results are kept in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no inter-process lock, the atomic replace still holds
    fcntl = None  # type: ignore[assignment]

#: Bump when keys, candidate names or plan semantics change so that stored winners are ignored.
FORMAT_VERSION = 1

ENV_ENABLE = "CUPYCONVT_AUTOTUNE"
ENV_CACHE_DIR = "CUPYCONVT_CACHE_DIR"
FILE_NAME = "autotune.json"

_TRUE = ("1", "true", "yes", "on")

Entry = dict[str, Any]

_override: bool | None = None
#: Guards ``_memory``, ``_looked_up`` and ``_warned``; held only briefly.
_state_lock = threading.Lock()
#: Held while a key is looked up on disk, measured and stored, so that each key is measured once
#: per process and timings never overlap. Reentrant in case ``measure`` itself selects a plan.
_tune_lock = threading.RLock()
#: (cache file, key) -> entry, for entries read from disk or measured by this process.
_memory: dict[tuple[str, str], Entry] = {}
#: (cache file, key) pairs already looked up on disk, found or not.
_looked_up: set[tuple[str, str]] = set()
#: (reason, cache file) pairs already warned about.
_warned: set[tuple[str, str]] = set()


class AutotuneCacheWarning(UserWarning):
    """The autotune cache file could not be read or written; results are kept in memory."""


def enabled() -> bool:
    """Whether autotuning is on.

    :func:`set_enabled` decides once called with ``True`` or ``False``; otherwise the environment
    variable ``CUPYCONVT_AUTOTUNE`` does (``1``, ``true``, ``yes`` or ``on``), read at each call.

    Examples
    --------
    >>> from cupyconvt import _autotune
    >>> _autotune.set_enabled(True)
    >>> _autotune.enabled()
    True
    >>> _autotune.set_enabled(None)  # follow CUPYCONVT_AUTOTUNE again
    """
    if _override is not None:
        return _override
    return os.environ.get(ENV_ENABLE, "").strip().lower() in _TRUE


def set_enabled(on: bool | None) -> None:
    """Turn autotuning on or off for this process; ``None`` follows ``CUPYCONVT_AUTOTUNE`` again.

    Examples
    --------
    >>> from cupyconvt import _autotune
    >>> _autotune.set_enabled(False)
    >>> _autotune.enabled()
    False
    >>> _autotune.set_enabled(None)
    """
    global _override
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"on must be True, False or None, got {on!r}")
    _override = on


def cache_path() -> Path:
    """The autotune cache file, from the environment at call time.

    ``$CUPYCONVT_CACHE_DIR/autotune.json`` if that variable is set, else
    ``$XDG_CACHE_HOME/cupyconvt/autotune.json``, else ``~/.cache/cupyconvt/autotune.json``.

    Examples
    --------
    >>> import os
    >>> from cupyconvt import _autotune
    >>> os.environ["CUPYCONVT_CACHE_DIR"] = "/tmp/cc"  # doctest: +SKIP
    >>> _autotune.cache_path()  # doctest: +SKIP
    PosixPath('/tmp/cc/autotune.json')
    """
    own = os.environ.get(ENV_CACHE_DIR)
    if own:
        return Path(own).expanduser() / FILE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cupyconvt" / FILE_NAME


def _canonical(value: Any, where: str) -> Any:
    """``value`` as JSON data whose text does not depend on NumPy scalar reprs or tuple/list."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} has type {type(value).__name__}: a problem key may hold only ints, floats, "
        "bools, strings, None and tuples of those"
    )


def problem_key(device_name: str, dtype: str, problem: tuple) -> str:
    """A stable string key for ``problem`` in ``dtype`` on the device named ``device_name``.

    The key starts with the format version, so bumping :data:`FORMAT_VERSION` retires every old
    entry. ``problem`` is a tuple of ints, bools, strings and nested tuples (NumPy integers are
    taken as ints), e.g. built from the fields of a ``ConvParams``.

    Examples
    --------
    >>> from cupyconvt._autotune import problem_key
    >>> problem_key("NVIDIA H100", "float32", ((2, 64, 8, 8, 8), (1, 1, 1), False))
    'v1|NVIDIA H100|float32|[[2,64,8,8,8],[1,1,1],false]'
    """
    body = json.dumps(_canonical(tuple(problem), "problem"), separators=(",", ":"))
    return f"v{FORMAT_VERSION}|{device_name}|{dtype}|{body}"


def _warn_once(reason: str, path: Path, message: str) -> None:
    with _state_lock:
        if (reason, str(path)) in _warned:
            return
        _warned.add((reason, str(path)))
    warnings.warn(message, AutotuneCacheWarning, stacklevel=4)


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("winner"), str)
        and isinstance(entry.get("ms", {}), dict)
    )


def _read(path: Path, strict: bool = False) -> dict[str, Any]:
    """The cache file's contents; empty (after a warning) when it is missing, unreadable or bad.

    With ``strict``, an unreadable file raises :class:`OSError` instead, so that a store does not
    replace a file it could not read.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):  # no file there (yet)
        return {}
    except OSError as e:
        if strict:
            raise
        _warn_once("unreadable", path, f"cannot read the autotune cache {path} ({e}); ignoring it")
        return {}
    try:
        data = json.loads(text)
        problem = "" if isinstance(data, dict) else "not a JSON object"
    except ValueError as e:
        data, problem = None, str(e)
    if problem:
        _warn_once(
            "corrupt",
            path,
            f"the autotune cache {path} is not a valid cache file ({problem}); ignoring it, it "
            "will be rewritten",
        )
        return {}
    return data


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock for ``path`` (a no-op without ``fcntl``)."""
    if fcntl is None:
        yield
        return
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _store(path: Path, key: str, entry: Entry) -> None:
    """Merge ``entry`` under ``key`` into the cache file; warn once and go on if that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            data = _read(path, strict=True)
            data[key] = entry
            _write_atomic(path, data)
    except OSError as e:
        _warn_once(
            "unwritable",
            path,
            f"cannot write the autotune cache {path} ({e}); autotune results are kept in memory "
            f"for this process only (set {ENV_CACHE_DIR} to a writable directory)",
        )


def _measure_all(candidates: Sequence[str], measure: Callable[[str], float]) -> Entry:
    times: dict[str, float] = {}
    error: Exception | None = None
    for name in candidates:
        try:
            ms = float(measure(name))
            if not math.isfinite(ms) or ms < 0:
                raise ValueError(f"measure({name!r}) returned {ms} ms")
        except Exception as e:
            error = e
            continue
        times[name] = ms
    if not times:
        assert error is not None
        raise error
    winner = min(times, key=times.__getitem__)  # ties: the first candidate listed
    return {"winner": winner, "ms": times}


def choose(key: str, candidates: Sequence[str], measure: Callable[[str], float]) -> str:
    """The fastest of ``candidates`` for ``key``, measured once and remembered on disk.

    If the cache (in memory, else the file at :func:`cache_path`) has an entry for ``key`` whose
    winner is still among ``candidates``, it is returned without measuring. Otherwise
    ``measure(name)`` (milliseconds) is called for every candidate, candidates whose measurement
    raises are skipped (if all raise, the last error propagates and nothing is stored), and the
    fastest is stored as ``{"winner": name, "ms": {name: ms}}`` under ``key`` and returned.

    This function does not look at :func:`enabled`; the caller decides whether to autotune.

    Parameters
    ----------
    key : str
        From :func:`problem_key`.
    candidates : sequence of str
        Stable plan names, e.g. ``"igemm:128x64x8x8x8"``, ``"grouped:4"``, ``"direct"``.
    measure : callable
        ``measure(name) -> float``: the time of one run of plan ``name`` in milliseconds.

    Returns
    -------
    str
        The winning candidate name.

    Examples
    --------
    >>> from cupyconvt import _autotune
    >>> key = _autotune.problem_key("NVIDIA H100", "float32", ((1, 8, 4, 4, 4),))
    >>> times = {"direct": 2.0, "grouped:4": 1.5}
    >>> _autotune.choose(key, list(times), times.__getitem__)  # doctest: +SKIP
    'grouped:4'
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"candidates must name at least one plan for key {key!r}")
    path = cache_path()
    slot = (str(path), key)
    with _state_lock:
        entry = _memory.get(slot)
    if entry is not None and entry["winner"] in candidates:
        return entry["winner"]
    with _tune_lock:
        with _state_lock:
            entry = _memory.get(slot)
            first_look = slot not in _looked_up
            _looked_up.add(slot)
        if entry is None and first_look:
            found = _read(path).get(key)
            if _valid_entry(found):
                entry = found
                with _state_lock:
                    _memory[slot] = entry
        if entry is not None and entry["winner"] in candidates:
            return entry["winner"]
        entry = _measure_all(candidates, measure)
        with _state_lock:
            _memory[slot] = entry
        _store(path, key, entry)
        return entry["winner"]


def clear(memory_only: bool = False) -> None:
    """Forget the autotune results of this process, and unless ``memory_only``, delete the file.

    ``clear(memory_only=True)`` makes this process behave like a new one: the next :func:`choose`
    for each key reads the file again (and warnings about the file may be issued again).
    """
    with _tune_lock:
        with _state_lock:
            _memory.clear()
            _looked_up.clear()
            _warned.clear()
        if memory_only:
            return
        path = cache_path()
        if not path.exists():
            return
        with _file_lock(path):
            path.unlink(missing_ok=True)
