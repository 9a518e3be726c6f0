"""Writing files so that a reader never sees half of one: atomic writes of files and folders (one
or several files: all written to temporaries first, then renamed), writes to streams (stdout, a
FIFO, a character device), and the check that a path can be written, made before any work."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable

from pydiff.errors import UsageError


def _umask() -> int:
    # os.umask can only be read by setting it; do it once, at import (single-threaded then).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()

# What a temporary sibling adds to a name: mkstemp's ".NAME." + 8 random characters + ".tmp"
_TMP_EXTRA = len("..") + 8 + len(".tmp")


def is_stream(path) -> bool:
    """True for "-" (stdout) and for a path that is, or links to, a FIFO, a character device or a
    socket, or that lives in /dev or /proc (/dev/stdout, /dev/fd/N): written in place, as a
    stream, never replaced by a file."""
    p = os.fspath(path)
    if p == "-":
        return True
    try:
        mode = os.stat(p).st_mode
    except OSError:  # absent (or a dangling link): a file to make
        return False
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
        return True
    # /dev/stdout with stdout redirected to a file links, through /proc/self/fd/1, to that file
    hop = os.path.abspath(p)
    for _ in range(40):
        if hop.startswith(("/dev/", "/proc/")):
            return True
        if not os.path.islink(hop):
            return False
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return False


def name_max(directory) -> int:
    """The longest file name `directory`'s file system takes (255 where it cannot say)."""
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def write_output(path, data: bytes) -> None:
    """`data` to `path`: written in place to a stream (see is_stream; "-" is stdout), else
    atomically (atomic_write_bytes)."""
    if os.fspath(path) == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif is_stream(path):
        with open(path, "wb") as f:
            f.write(data)
    else:
        atomic_write_bytes(path, data)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and os.replace.

    Readers see either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)  # made now, when there is something to write
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_files_atomic(items) -> None:
    """Write several files, (path, bytes) each, so that a failure anywhere (a full disk, a signal)
    leaves every path as it was: all are written to temporaries first and renamed only then; a
    failed rename puts back what the earlier ones replaced. No temporary file is left behind."""
    items = [(Path(p), data) for p, data in items]
    temps: list[tuple[Path, str]] = []
    backups: list[str] = []  # the earlier files, kept aside until every new one is in place
    done: list[tuple[Path, str | None]] = []  # renamed into place: (path, backup of the old file)
    try:
        for path, data in items:
            directory = path.parent if str(path.parent) else Path(".")
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
            temps.append((path, tmp))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        for path, tmp in temps:
            backup = None
            if os.path.lexists(path):
                fd, backup = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.close(fd)
                backups.append(backup)  # removed on failure unless put back
                os.replace(path, backup)
            done.append((path, backup))
            os.replace(tmp, path)
    except BaseException:
        for path, backup in reversed(done):  # put the earlier files back
            try:
                if backup is not None:
                    os.replace(backup, path)
                else:
                    os.unlink(path)
            except OSError:
                pass
        for tmp in [t for _, t in temps] + backups:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for _, backup in done:
        if backup is not None:
            try:
                os.unlink(backup)
            except OSError:
                pass


def write_json(obj, path) -> None:
    """Write `obj` as indented JSON with a final newline: atomically, or to a stream ("-": stdout)."""
    write_output(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_folder_atomic(out_dir: str | Path, build: Callable[[Path], None]) -> Path:
    """Call `build(tmp_dir)` to fill a temporary sibling of `out_dir`, then rename it into place.

    A failure leaves `out_dir` as it was (or absent) and no temporary folder behind.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Raise `UsageError` unless the file `path` can be written: a stream (see is_stream) that
    this process may write, or a file whose name leaves room for its temporary sibling's and
    whose nearest existing folder is writable (missing folders are made when the file is, after a
    successful run), and that is no directory. `flag` names the setting in the message (e.g.
    "--out")."""
    if os.fspath(path) == "-":
        return
    if is_stream(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: cannot write to it (permission denied)")
        return
    path = Path(path)
    if not path.name:
        raise UsageError(f"{flag} {path}: names no file")
    parent = path.parent if str(path.parent) else Path(".")
    base = parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is not a directory")
    limit = name_max(base)
    for part in path.parts[:-1]:
        if len(os.fsencode(part)) > limit:
            raise UsageError(f"{flag}: the folder name {part[:40]}... is over {limit} bytes")
    if len(os.fsencode(path.name)) + _TMP_EXTRA > limit:
        raise UsageError(
            f"{flag}: the file name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes; "
            f"at most {limit - _TMP_EXTRA} leave room for its temporary file (the limit is {limit})"
        )
    try:  # the real test (os.access says yes to root everywhere): make and drop a temp file
        with tempfile.NamedTemporaryFile(dir=base, prefix=".pydiff-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {base} ({e.strerror})") from None
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
