"""Writes that leave either the whole new file or the old one, and failed writes as OSErrors.

A full disk reaches Python in several shapes: an `OSError` from Python's own files, a
`SafetensorError` that carries the OS error in its text, and a `RuntimeError` from torch's zip
writer (`[enforce fail at inline_container.cc] . unexpected pos ...`) that carries no errno at
all. `as_os_error` turns each into the OSError it stands for (ENOSPC when the file system is in
fact full), so that every write site ends in the same one line (capsfast.errors); anything else
is not a write failure and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The file system counts as full when less than this is left after a failed write.
FULL_BELOW_BYTES = 1 << 20
_WRITER_ERRORS = ("SafetensorError",)  # writers that wrap the OS error in their own type
# torch's zip writer, in the shapes a full disk has been seen to take (no errno in any of them)
_WRITER_TEXT = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos",
                "basic_ios::clear: iostream error")  # fmt: skip
_ERRNO_TEXT = {
    "No space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "os error 122": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "os error 30": errno.EROFS,
}


def disk_full(path: str | Path) -> bool:
    """Is the file system that holds `path` (or its nearest existing parent) out of space?"""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < FULL_BELOW_BYTES
    except OSError:
        return False


def as_os_error(e: BaseException, path: str | Path) -> OSError | None:
    """The OSError that `e`, raised while writing `path`, stands for; None if it is no write
    failure (a bug: keep its traceback)."""
    if isinstance(e, OSError):
        if e.filename is None:
            e.filename = str(path)
        return e
    if not isinstance(e, Exception):
        return None
    text = str(e)
    for words, code in _ERRNO_TEXT.items():
        if words in text:
            return OSError(code, os.strerror(code), str(path))
    if type(e).__name__ in _WRITER_ERRORS or (
        isinstance(e, RuntimeError) and any(w in text for w in _WRITER_TEXT)
    ):
        if disk_full(path):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
        return OSError(errno.EIO, f"the write failed ({first})", str(path))
    return None


def _temporary(path: Path) -> Path:
    """A sibling of `path` whose name starts with path's and ends in its suffix (matplotlib
    picks the format by it)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it whole inside the block, and it becomes
    `path` in one rename. A failure removes it, leaves `path` as it was, and is raised as the
    OSError it stands for (`as_os_error`) when it is a failed write."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        failure = as_os_error(e, path)  # before the removal frees the space
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if failure is not None and failure.filename in (str(tmp), tmp):
            failure.filename = str(path)  # the file the user knows, not its temporary twin
        if failure is not None and failure is not e:
            raise failure from None
        raise


def write_text(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, all or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_text(path: str | Path, text: str) -> None:
    """Append `text` to `path`; a failed append (a full disk) is cut back off, so the file never
    ends in half a line."""
    with open(path, "ab", buffering=0) as f:
        start = f.tell()
        try:
            view = memoryview(text.encode())
            while view:
                view = view[f.write(view) :]
        except BaseException as e:
            try:
                f.truncate(start)
            except OSError:
                pass
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(path)
            raise
