"""The ``tokenbench`` entry point: run the app; bad input is one line on stderr and exit code 2
(``--debug`` or ``TOKENBENCH_DEBUG``: the traceback), a bug one line and exit code 1."""

from __future__ import annotations

import os
import sys
from typing import Optional

from ..errors import UserError, user_message
from .app import app
from .common import err


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, aborts, exits) of click and of the copy of click that typer vendors."""
    usage, abort, exit_ = [], [], []
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            import importlib

            mod = importlib.import_module(name)
        except ImportError:
            continue
        for dest, attr in ((usage, "ClickException"), (abort, "Abort"), (exit_, "Exit")):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and cls not in dest:
                dest.append(cls)
    return tuple(usage), tuple(abort), tuple(exit_)


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` wherever it stands (before a ``--``), and whether it was there.

    "rerun with --debug" is advice users follow by appending it; typer alone would take it
    only before the subcommand.
    """
    end = argv.index("--") if "--" in argv else len(argv)
    found = "--debug" in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], found


def script_main(main, argv: Optional[list[str]] = None) -> int:
    """A script's ``main(argv)`` (``bench.py``, ``profile_method.py``) with bad input as one line on
    stderr and exit status 2, as the `tokenbench` command does (``--debug`` or ``TOKENBENCH_DEBUG``:
    the traceback)."""
    argv, debug = _take_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return main(argv)
    except UserError as e:
        if debug or os.environ.get("TOKENBENCH_DEBUG"):
            raise
        err(user_message(e))
        return 2


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    import warnings

    argv, debug_flag = _take_debug(list(argv) if argv is not None else sys.argv[1:])
    debug = debug_flag or bool(os.environ.get("TOKENBENCH_DEBUG"))
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not debug:
        # One line per warning ("warning: damaged record ... set aside as ..."), no source echo.
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {str(message).splitlines()[0]}\n"
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        rv = app(args=argv, standalone_mode=False)
        # Outside standalone mode typer returns an Exit's code instead of exiting; Ctrl-C
        # becomes Exit(130) that way.
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            if rv == 130:
                err("interrupted; completed runs are recorded, rerun to continue")
            sys.exit(rv)
    except UserError as e:
        if debug:
            raise
        err(user_message(e))
        sys.exit(2)
    except KeyboardInterrupt:
        err("interrupted; completed runs are recorded, rerun to continue")
        sys.exit(130)
    except Exception as e:  # usage errors and bugs
        usage, abort, exit_ = _click_exceptions()
        if isinstance(e.__cause__, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt):
            # typer turns Ctrl-C into Exit(130) (click into Abort): say what it means.
            err("interrupted; completed runs are recorded, rerun to continue")
            sys.exit(130)
        if isinstance(e, abort):
            err("aborted")
            sys.exit(130)
        if isinstance(e, usage):
            if debug:
                raise
            err(e.format_message().splitlines()[0])
            sys.exit(2)
        if isinstance(e, exit_):
            sys.exit(e.exit_code)
        if debug:
            raise
        err(f"internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(rerun with --debug for the traceback)")
        sys.exit(1)
    except SystemExit:
        raise
