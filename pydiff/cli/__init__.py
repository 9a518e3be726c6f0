"""The `pydiff` command line: generate, inpaint, img2img, upscale, info (+ train, export, eval,
guidance, bench where their extras are installed). One module per command; this one routes.

Exit codes: 0 success; 2 bad usage or input (one line on stderr, no traceback); 1 internal error;
130 interrupted. Images and JSON files are written atomically (temp file + os.replace).
Set PYDIFF_DEBUG=1 to get tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pydiff import __version__
from pydiff.cli import images, info
from pydiff.cli.common import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, InternalError, Parser
from pydiff.errors import BackendUnavailableError, PackageError, UsageError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_INTERRUPTED"]

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
}


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
        except ImportError:
            continue
        module.register(sub)
    return parser


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
    try:
        rc = args.func(args)
        return EXIT_OK if rc is None else int(rc)
    except KeyboardInterrupt:
        print("pydiff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, PackageError, ValueError, TypeError, FileNotFoundError, BackendUnavailableError) as e:
        if debug:
            raise
        msg = str(e).replace("\n", " ") or type(e).__name__
        print(f"pydiff: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
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
