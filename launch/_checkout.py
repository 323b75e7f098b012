"""Run an entry point from a plain checkout as well as from an installed capsfast.

The launch scripts put the repository root on sys.path, so `python launch/train.py` works
without `pip install` when the dependencies are installed; when torch itself is missing, they stop
at once with one line that says how to install, instead of an ImportError traceback; a Ctrl-C
during those imports ends them with one line too (exit code 130, as the entry points' own).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str) -> None:
    """Exit with the status of capsfast's entry point `name` (capsfast.cli.ENTRY_POINTS)."""
    sys.path.insert(0, str(ROOT))
    try:
        from capsfast import cli  # imports torch: a second or two
    except KeyboardInterrupt:  # Ctrl-C before anything ran: nothing to keep, no traceback
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "capsfast":
            raise  # capsfast itself is broken: a bug, keep the traceback
        print(
            f"{name}: error: the package {e.name!r} is not installed; install capsfast with its "
            f"dependencies: pip install -e {ROOT}",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(cli.run(name))
