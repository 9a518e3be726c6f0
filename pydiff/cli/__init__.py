"""The `pydiff` command line: generate, inpaint, img2img, upscale, info (+ train, export, eval,
guidance, bench where their extras are installed). One module per command; this one routes.

Exit codes (docs/cli.md): 0 success; 2 bad usage, input or package (one line on stderr, no
traceback); 1 internal error (pydiff's bug); 74 an I/O error (output not written); 130 Ctrl-C;
143 SIGTERM. Images and JSON files are written atomically (temp files, then renames), or to a
stream. Set PYDIFF_DEBUG=1 to get tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from pydiff import __version__
from pydiff.cli import images, info
from pydiff.cli.common import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    InternalError,
    Parser,
    Terminated,
)
from pydiff.errors import BackendUnavailableError, ModelOutputError, PackageError, UsageError

__all__ = [
    "main",
    "build_parser",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_IO",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

OWN_COMMANDS = (*images.MODES, "info")

# The tools commands, by the module that registers each. Their modules import the tools tier, and
# with it torch, at module level: they are imported only when one of them (or --help) is asked for,
# so that `pydiff generate` never loads torch. This table is the one lazy import of pydiff modules.
# A module that cannot be imported (its extras are missing) leaves its command out.
TOOL_COMMANDS = {
    "train": "pydiff.cli.train",
    "export": "pydiff.cli.export",
    "eval": "pydiff.cli.eval",
    "guidance": "pydiff.cli.guidance",
    "bench": "pydiff.cli.bench",
    "serve": "pydiff.cli.serve",  # the [serve] extra: Starlette, uvicorn (says how to install it)
    "import": "pydiff.cli.importing",  # the [diffusers] extra (says how to install it)
    "segment": "pydiff.cli.segment",
    "purify": "pydiff.cli.purify",
}
# The extra that brings each tool command's packages: named when its module cannot be imported.
TOOL_EXTRAS = {"train": "train", "export": "train", "eval": "train", "guidance": "train", "bench": "dev"}
TOOL_EXTRAS.update(segment="train", purify="train")


def build_parser(tools=tuple(TOOL_COMMANDS)) -> argparse.ArgumentParser:
    """The `pydiff` parser, with the image commands, `info` and the tools commands `tools` that
    this installation can import."""
    parser = Parser(prog="pydiff", description="Cascaded conditional diffusion on a compiled sampling core.")
    parser.add_argument("--version", action="version", version=f"pydiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    images.register(sub)
    info.register(sub)
    for name in tools:
        try:
            module = importlib.import_module(TOOL_COMMANDS[name])
        except ImportError as e:
            _unavailable(sub, name, TOOL_EXTRAS.get(name, "dev"), e)
            continue
        module.register(sub)
    return parser


def _unavailable(sub, name: str, extra: str, error: ImportError) -> None:
    """A tool command whose extra is missing: listed, and exit 2 naming the extra to install."""
    p = sub.add_parser(name, help=f"(needs the [{extra}] extra)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    missing = error.name or str(error)

    def refuse(args):
        raise UsageError(
            f"pydiff {name} needs the [{extra}] extra ({missing} is missing): pip install 'pydiff[{extra}]'"
        )

    p.set_defaults(func=refuse)


def _tools_asked_for(argv) -> tuple[str, ...]:
    """The tools commands to load for `argv`: the one named, none for an image command, `info` or
    --version, all of them for --help, no command or an unknown one (argparse then lists them)."""
    for a in argv:
        if a.startswith("-"):
            if a in ("-h", "--help"):
                return tuple(TOOL_COMMANDS)
            if a == "--version":
                return ()
            continue
        if a in OWN_COMMANDS:
            return ()
        return (a,) if a in TOOL_COMMANDS else tuple(TOOL_COMMANDS)
    return tuple(TOOL_COMMANDS)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("PYDIFF_DEBUG"))
    parser = build_parser(_tools_asked_for(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.argv = argv  # the command's own words, for the commands that record how they were run
    previous = _on_sigterm()
    try:
        rc = args.func(args)
        return EXIT_OK if rc is None else int(rc)
    except KeyboardInterrupt:
        print("pydiff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("pydiff: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except (
        UsageError,
        PackageError,
        ValueError,
        TypeError,
        FileNotFoundError,
        BackendUnavailableError,
        ModelOutputError,
    ) as e:
        if debug:
            raise
        msg = str(e).replace("\n", " ") or type(e).__name__
        print(f"pydiff: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full disk, a closed pipe, a device error: nothing half-written
        if debug:
            raise
        if isinstance(e, BrokenPipeError):  # stdout's reader left: no second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        where = f" {e.filename}" if e.filename else ""
        print(f"pydiff: I/O error{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_IO
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        cause = e.__cause__ if isinstance(e, InternalError) and e.__cause__ else e
        print(
            f"pydiff: internal error: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            f" (set PYDIFF_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """SIGTERM raises Terminated (exit 143) so that temporary files are removed on the way out;
    returns the handler it replaced (None off the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminated)
