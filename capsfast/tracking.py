"""Weights & Biases through Accelerate's tracker, never allowed to stop or stall training.

- `--report-to none` or WANDB_MODE=disabled: no tracker.
- No API key (env or netrc) and no WANDB_MODE: offline, with the `wandb sync` command printed.
- A key but no network (or quota, or a server error): wandb.init gives up after a short timeout
  and the run falls back to offline, with a message.
wandb is imported here only, and only when asked for.
"""

from __future__ import annotations

import os
import sys

INIT_TIMEOUT_S = 8


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = (
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        )
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_wanted(report_to: str) -> bool:
    if report_to == "none" or os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("capsfast: wandb is not installed; training without tracking", file=sys.stderr)
        return False
    return True


def init_tracking(accelerator, config: dict, project: str, run_dir: str, run_name: str | None):
    """Start the wandb tracker (main process only inside Accelerate). Returns True if active."""
    if not accelerator.is_main_process:
        # Accelerate's tracker calls are main-process only; the others still call init_trackers.
        accelerator.init_trackers(project, config=config)
        return False
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not mode and not _has_api_key():
        os.environ["WANDB_MODE"] = mode = "offline"
        accelerator.print(
            "capsfast: no W&B API key found: logging offline. Upload later with "
            f"`wandb sync {run_dir}/wandb/offline-run-*` (or run `wandb login` first)."
        )
    import wandb

    kwargs = {
        "dir": run_dir,
        "name": run_name,
        "settings": wandb.Settings(init_timeout=INIT_TIMEOUT_S),
    }
    try:
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": kwargs})
    except Exception as e:  # network, quota, auth: never fail the run for tracking
        accelerator.print(
            f"capsfast: W&B online init failed ({type(e).__name__}: {e}); logging offline"
        )
        os.environ["WANDB_MODE"] = "offline"
        try:
            accelerator.trackers.clear()
        except AttributeError:
            pass
        offline = {**kwargs, "mode": "offline"}  # the env var alone is read too late here
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": offline})
    return True


def log_images(accelerator, images: dict, step: int) -> None:
    """Log {name: image path or array} to wandb on the main process (no-op without wandb)."""
    if not accelerator.is_main_process:
        return
    try:
        tracker = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return
    if tracker is None or not hasattr(tracker, "log"):
        return
    import wandb

    tracker.log({k: wandb.Image(v) for k, v in images.items()}, step=step)


def set_summary(accelerator, summary: dict) -> None:
    if not accelerator.is_main_process:
        return
    try:
        tracker = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return
    if tracker is not None and hasattr(tracker, "summary"):
        for k, v in summary.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                tracker.summary[k] = v
