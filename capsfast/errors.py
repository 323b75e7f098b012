"""One error boundary for every entry point (train, predict, visualize, app).

Expected failures (bad flags or files, a full or read-only disk, a missing package, a signal)
reach the user as one line that says what to do, with exit code 2; anything else is a bug and
keeps its traceback. Library code raises `UserError` (or a subclass) with a message that names
the file or flag and the fix; plain `OSError`s from the file system are turned into one line here,
with their path.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class UserError(Exception):
    """A failure the user can fix; str(error) is the whole message (one line, says what to do)."""

    exit_code = EXIT_USER_ERROR


class Interrupted(UserError):
    """Stopped at once by the user (a second Ctrl-C); the message says what was kept."""

    exit_code = EXIT_INTERRUPTED


# What to say about an operating-system error, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose another directory) and run again",
    errno.EDQUOT: "the disk quota is exhausted: free space and run again",
    errno.EROFS: "the file system is read-only: choose a writable directory",
    errno.EACCES: "permission denied: choose a path you can write (or read)",
    errno.EPERM: "operation not permitted: choose another path",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.EEXIST: "already exists",
    errno.ELOOP: "too many levels of symbolic links (a link loop)",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EADDRINUSE: "the address is already in use: choose another port (--port)",
}


def describe_os_error(e: OSError) -> str:
    """One line: the path(s), what went wrong, what to do."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    advice = _OS_ADVICE.get(e.errno, e.strerror or str(e))
    return f"{where}: {advice}" if where else advice


def run_main(main: Callable[[list[str] | None], int], prog: str, argv=None) -> int:
    """Call `main(argv)` and turn every expected failure into `prog: error: ...` on stderr."""
    code = EXIT_USER_ERROR
    try:
        return main(argv)
    except UserError as e:
        message, code = str(e), e.exit_code
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "capsfast":
            raise  # capsfast itself is broken: a bug
        message = (
            f"the package {e.name!r} is not installed: install capsfast with its dependencies "
            "(pip install capsfast, or pip install -e . in a checkout)"
        )
    except OSError as e:
        message = describe_os_error(e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
