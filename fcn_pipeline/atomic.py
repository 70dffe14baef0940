"""Atomic outputs: a failed run never leaves a half-written result behind.

Every stage writes into a temporary sibling of its output and renames it into
place only when everything succeeded, so the previous good output survives any
error or interruption.

Temporary siblings are named ``.<name>.tmp-<pid>-<tag>`` (and ``.<name>.old-<pid>-<tag>``
for the moment of the swap). A run killed outright (``kill -9``, power loss) cannot
remove its own; the next write of the same output removes those whose process is gone.

An operating-system error while writing (no space left, read-only file system,
a file where a directory should be, no permission) becomes :class:`OutputError`
naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcn_pipeline.errors import OutputError, describe_os_error, printable


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(final: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``final`` left by runs that are no longer alive.

    Matches ``.<name>.tmp-<pid>[-<tag>]`` and ``.<name>.old-<pid>[-<tag>]`` whose process
    is gone, and the pid-less ``.<name>.tmp-<hex tag>`` of earlier versions. Returns the
    paths removed. A sibling of a live process (a concurrent run) is left alone. A run
    killed in the middle of its swap leaves ``final`` renamed to ``.old-``: that one is
    renamed back, not deleted.
    """
    final = Path(final)
    pattern = re.compile(
        rf"\.{re.escape(final.name)}\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)(?:-[0-9a-f]+)?|[0-9a-f]+)"
    )
    removed = []
    try:
        candidates = sorted(final.parent.iterdir())
    except OSError:  # no parent yet: nothing to clean
        return removed
    for entry in candidates:
        match = pattern.fullmatch(entry.name)
        if not match or (match["pid"] and _process_alive(int(match["pid"]))):
            continue
        if match["kind"] == "old" and not final.exists() and not final.is_symlink():
            entry.rename(final)  # the previous output, half-way through a swap
            continue
        remove_path(entry)
        removed.append(entry)
    return removed


def remove_path(path: Path) -> None:
    """Delete whatever stands at ``path``: a directory tree, a file or a link (best
    effort, as for a temporary: what cannot be deleted is left)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


# Errors of a write that names no file (``write(2)`` itself): blamed on the output.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside into :class:`OutputError` naming the file.

    The message names the file the system call failed on, or ``path`` when the error
    names one of ``path``'s temporary siblings (which the user never asked for) or
    none but is a write error (no space left). Other unnamed errors (too many open
    files, ...) pass unchanged: nothing says they concern ``path``.
    """
    path = Path(path)
    try:
        yield
    except OSError as error:
        hidden = re.compile(rf"(^|/)\.{re.escape(path.name)}\.(tmp|old)-")
        named = error.filename
        if isinstance(named, str | bytes | os.PathLike) and not hidden.search(printable(named)):
            message = describe_os_error(error, path)
        elif named is not None or error.errno in WRITE_ERRNOS:
            message = f"{printable(path)}: cannot write: {error.strerror or error}"
        else:
            raise
        raise OutputError(message) from error


@contextmanager
def atomic_output_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` on success.

    The temporary directory lives next to ``final`` (same file system, so the
    rename is atomic). On an exception it is deleted and ``final`` is untouched;
    an :class:`OSError` (from the caller's writes too) becomes :class:`OutputError`.
    """
    final = Path(final)
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final)
        tmp = _sibling(final, "tmp")
        tmp.mkdir()
    try:
        with writing(final):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(final, "old")
    with writing(final):
        if final.exists() or final.is_symlink():  # a directory, or a file in its way
            final.rename(old)
        tmp.rename(final)
    remove_path(old)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is deleted and ``path`` is untouched; an
    :class:`OSError` becomes :class:`OutputError` naming the file.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
    tmp = _sibling(path, "tmp")
    try:
        with writing(path):
            yield tmp
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN allowed, keys in insertion order)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON into a directory that is itself being built atomically."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
