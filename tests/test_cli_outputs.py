"""Where the command line writes (issue 18, part 4): regular files atomically (several: all to
temporaries, then renamed), streams in place ("-", FIFOs, character devices, links to them), names
checked before any work, and a run that fails part-way leaves what was there before."""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("onnx")

import pydiff  # noqa: E402
from pydiff import cli, files, ops  # noqa: E402
from pydiff.tools.testing import make_tiny_package  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
PRELUDE = """
import functools, sys
import pydiff
from pydiff import ops
if not ops.native_available():
    pydiff.sample = functools.partial(pydiff.sample, backend="reference")
from pydiff.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_tiny_package(tmp_path_factory.mktemp("outputs") / "text")


@pytest.fixture(autouse=True)
def core_backend(monkeypatch):
    if not ops.native_available():
        monkeypatch.setattr(pydiff, "sample", functools.partial(pydiff.sample, backend="reference"))


def subprocess_run(*args, **kw):
    return subprocess.run(
        [sys.executable, "-c", PRELUDE, *map(str, args)], capture_output=True, cwd=Path(__file__).parent, **kw
    )


def test_out_dash_writes_the_png_to_stdout(pkg, tmp_path):
    r = subprocess_run(
        "generate", "red", "--model", pkg, "-q", "--out", "-", "--json-out", tmp_path / "r.json"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PNG)
    assert (tmp_path / "r.json").is_file()
    r = subprocess_run(
        "generate", "red", "--model", pkg, "-q", "--json-out", "-", "--out", tmp_path / "a.png"
    )
    assert r.returncode == 0 and r.stdout.lstrip().startswith(b"{"), r.stderr


def test_a_character_device_or_a_link_to_one_is_written_as_a_stream(pkg, tmp_path, capsys):
    link = tmp_path / "null.png"
    link.symlink_to(os.devnull)
    for out in (os.devnull, link):
        assert cli.main(["generate", "red", "--model", str(pkg), "-q", "--out", str(out)]) == 0
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert Path(os.devnull).is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null.png"]  # no temporary left
    assert files.is_stream("-") and files.is_stream("/dev/stdout") and not files.is_stream(tmp_path / "x.png")


def test_a_fifo_is_written_in_place(pkg, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    got = {}

    def read():
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    reader = threading.Thread(target=read)
    reader.start()
    assert cli.main(["generate", "red", "--model", str(pkg), "-q", "--out", str(fifo)]) == 0
    reader.join(30)
    assert got["data"].startswith(PNG) and fifo.is_fifo()


def test_a_name_too_long_for_its_temporary_file_is_caught_before_any_work(pkg, tmp_path, capsys, monkeypatch):
    from pydiff.pipeline.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "execute", lambda self, plan: pytest.fail("ran"))
    name = "a" * (255 - 14 + 1 - 4) + ".png"  # fits NAME_MAX, not with ".NAME.XXXXXXXX.tmp"
    rc = cli.main(["generate", "red", "--model", str(pkg), "-q", "--out", str(tmp_path / name)])
    assert rc == 2 and "temporary file" in capsys.readouterr().err
    # --no-grid: OUT-0.png, OUT-1.png are longer than OUT: checked too, before the run
    name = "a" * (255 - 14 - 4) + ".png"
    rc = cli.main(
        [
            "generate",
            "red",
            "--model",
            str(pkg),
            "-q",
            "--num-images",
            "2",
            "--no-grid",
            "--out",
            str(tmp_path / name),
        ]
    )
    assert rc == 2 and "temporary file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_the_earlier_runs_files_and_exits_74(pkg, tmp_path, capsys, monkeypatch):
    out = tmp_path / "img.png"
    old = {f"img-{i}.png": f"old {i}".encode() for i in range(3)}
    old["r.json"] = b"old json"
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    calls = []
    real = os.fsync

    def fsync(fd):  # the third file's fsync finds the disk full
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["generate", "red", "--model", str(pkg), "-q", "--num-images", "3", "--no-grid", "--out", str(out)]
    rc = cli.main(argv + ["--json-out", str(tmp_path / "r.json")])
    assert rc == 74 and "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # nothing new, no temporary
    monkeypatch.undo()
    assert cli.main(argv + ["--json-out", str(tmp_path / "r.json")]) == 0
    assert all((tmp_path / f"img-{i}.png").read_bytes().startswith(PNG) for i in range(3))


def test_a_failed_rename_puts_the_earlier_files_back(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"old")
    real, n = os.replace, []

    def replace(a, b):
        n.append(b)
        if len(n) == 5:  # the third file's rename
            raise OSError(errno.EIO, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        files.write_files_atomic([(tmp_path / f"f{i}", b"new") for i in range(3)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {f"f{i}": b"old" for i in range(3)}


def test_sigterm_mid_run_exits_143_and_writes_nothing(pkg, tmp_path):
    slow = PRELUDE.replace(
        "from pydiff.cli import main",
        """import time
from pydiff.backends.onnxruntime import OrtStageModel
_call = OrtStageModel.__call__
def _slow(self, *a, **k):
    time.sleep(0.005)
    return _call(self, *a, **k)
OrtStageModel.__call__ = _slow
from pydiff.cli import main""",
    )
    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow,
            "generate",
            "red",
            "--model",
            str(pkg),
            "--steps",
            "1000",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )
    seen, deadline = "", time.time() + 60
    while "base 8x8" not in seen and time.time() < deadline:
        seen += p.stderr.read(1)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=60)[1]
    assert p.returncode == 143, seen + rest
    assert "terminated" in rest and "Traceback" not in rest
    assert [q.name for q in tmp_path.iterdir()] == ["x.png"] and out.read_bytes() == b"old"
