"""Writing files so that a reader never sees half of one: atomic writes of files and folders, and
the check that a path can be written, made before any work."""

from __future__ import annotations

import json
import os
import shutil
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


def write_json(obj, path) -> None:
    """Write `obj` as indented JSON with a final newline, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


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
    """Raise `UsageError` unless the file `path` can be written: its nearest existing folder is
    writable (missing folders are made when the file is, after a successful run), and the path is
    no directory. `flag` names the setting in the message (e.g. "--out")."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    base = parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is not a directory")
    try:  # the real test (os.access says yes to root everywhere): make and drop a temp file
        with tempfile.NamedTemporaryFile(dir=base, prefix=".pydiff-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {base} ({e.strerror})") from None
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
