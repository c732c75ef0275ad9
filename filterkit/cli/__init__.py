"""The ``filterkit`` command line: parses, calls the library, prints. No logic of its own.

One module per group of commands (``collection``, ``training``, ``models``); heavy imports
(torch, timm, faiss) happen inside the commands, so ``filterkit --help`` is fast.
"""

from __future__ import annotations

import sys
from typing import Optional

from ..errors import FilterkitError
from . import collection, models, review, training  # noqa: F401  (each registers its commands on app)
from .common import app, echo_err

__all__ = ["app", "main", "run"]


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI and return its exit status; user errors become one line on stderr.

    Typer runs in standalone mode so that it reports its own usage errors (unknown command or
    option, missing value: exit status 2) with whatever click it bundles: typer 0.29 vendors
    one, whose exceptions are not the ``click`` package's. Only filterkit's errors are ours.
    """
    try:
        app(args=argv, prog_name="filterkit", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except FilterkitError as e:
        echo_err(f"error: {e}")
        return 1
    except KeyboardInterrupt:  # outside a command (the commands handle their own: common._App)
        echo_err("interrupted")
        return 130
    return 0


def run() -> None:
    sys.exit(main())
