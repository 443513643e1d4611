"""Writing files so that a reader never sees half of one: the bottom layer, beside errors.

A write goes into a hidden sibling directory named after the target and the writing process
(`.<name>.<pid>-<tag>.tmp`) and is then renamed over the target. A directory is swapped in with one
atomic exchange (Linux renameat2 RENAME_EXCHANGE), so the target path holds a complete copy, old or
new, at every instant; where the exchange is unsupported it falls back to two renames, keeping the old
copy as `.<name>.<pid>-<tag>.old` in between. Siblings left by a killed writer are cleaned up by the
next write to the same target (an `.old` whose target is missing is put back first).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import WriteError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(path: Path) -> None:
    """Remove what killed writers of `path` left beside it; restore an `.old` copy if `path` is gone."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.(tmp|old)$")
    found = [(m, p) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    for m, stale in sorted(found, key=lambda mp: mp[0][2] == "tmp"):  # .old first
        if int(m[1]) == os.getpid() or _alive(int(m[1])):
            continue
        if m[2] == "old" and not os.path.lexists(path):
            os.rename(stale, path)
        elif stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def _os_errors(path: Path, what: str) -> Iterator[None]:
    """OSError -> WriteError naming the path and the reason."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise WriteError(f"cannot write {what} {str(path)!r}: {reason}") from e


def _mode(path: Path) -> int:
    """The permissions a written file gets: the replaced file's, else what open() would give (0666 & ~umask);
    writers' own temporaries are often 0600."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def _staged(path: Path, what: str) -> Iterator[Path]:
    """A new private sibling directory of `path` to write in, removed afterwards; OSError -> WriteError."""
    with _os_errors(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        tmp = _sibling(path, "tmp")
        os.mkdir(tmp)
        try:
            yield tmp
        finally:
            if tmp.exists():  # what was not renamed away (after an exchange: the old directory)
                shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: Path) -> None:
    """WriteError unless `path` can be written as atomic_write_dir writes it: an empty hidden directory is
    made and removed in the nearest existing directory above it (where the missing ones would be made), so a
    read-only destination is refused before long work rather than after it."""
    path = Path(path)
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    probe = _sibling(parent / path.name, "tmp")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise WriteError(f"cannot write {str(path)!r}: {str(parent)!r} is not writable ({reason}); give a "
                         f"destination in a directory you can write to") from e


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path), then rename tmp over `path`; the old file survives any failure.
    tmp_path lies in a private sibling directory, so whatever temporary files `write` itself makes
    (safetensors makes some) are cleaned up with it. OSErrors become WriteError."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write the file {str(path)!r}: it is a directory; give a file path")
    with _staged(path, "the file") as tmp:
        write(tmp / path.name)
        os.chmod(tmp / path.name, _mode(path))
        os.replace(tmp / path.name, path)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then nothing moved)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without renameat2
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system or kernel without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_dir(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_dir) on a new sibling directory, then swap it in for `path`; `path` holds a
    complete directory, the old or the new one, at every instant (see the module docstring).
    OSErrors become WriteError."""
    path = Path(path)
    with _staged(path, "the directory") as tmp:
        write(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif not exchange(tmp, path):
            old = _sibling(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
