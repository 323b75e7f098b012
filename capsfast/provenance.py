"""Where a result came from: the commit and the library versions, recorded with every run,
export and benchmark."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def git_commit() -> str:
    """CAPSFAST_COMMIT (for copies without .git), else `git rev-parse`, else `unknown`."""
    if os.environ.get("CAPSFAST_COMMIT"):
        return os.environ["CAPSFAST_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    """python, torch, triton, accelerate (None where missing)."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "accelerate": package_version("accelerate"),
    }


def _process_start() -> float:
    """When this process was created (psutil comes with accelerate), so wall_seconds includes
    interpreter start-up and imports; the module's import time where that is unavailable."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return time.time()


PROCESS_START = _process_start()
