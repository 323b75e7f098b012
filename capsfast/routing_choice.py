"""Which routing implementation a run uses, and why: the one decision the trainer and inference
share.

    impl, reason, note = choose_routing(requested, model_config, device, batch, free_bytes)

The rules, in order:
1. `requested` must be auto, torch, triton or fused; `fused` must take the model's shape (at most
   32 routed capsules, D <= 32, Din <= 16): else a one-line UserError before any work.
2. An explicit choice is used as it is. `auto`: CAPSFAST_AUTO_IMPL if set; on a CPU the torch
   reference (Triton runs there only under its interpreter); on CUDA the Triton routing, or the
   fused DigitCaps when a step that stores u_hat would need more than AUTO_HEADROOM of the free
   memory at this batch and the fused kernel takes the shape (capsfast.memory's model).
3. A Triton implementation must run on the device (`triton_available`; `auto` also probes that
   it compiles and agrees with the reference there). Where it cannot, `auto` falls back to the
   reference and says why in `note`; an explicit choice is a one-line UserError. Under several
   processes `all_ranks_ok` makes every rank take the same decision.

`note` is a line for the user when the choice needs one (a fallback, a memory-driven switch).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from capsfast.errors import UserError
from capsfast.memory import AUTO_HEADROOM, FUSED_MAX_JD, fused_supports, step_peak_bytes
from capsfast.routing import IMPLS, resolve_impl

CHOICES = ("auto", *IMPLS)


def choose_routing(
    requested: str,
    model_config,
    device: torch.device | str,
    batch: int | None = None,
    free_bytes: int | None = None,
    all_ranks_ok: Callable[[bool], bool] | None = None,
) -> tuple[str, str, str | None]:
    """(implementation, why, a note for the user or None); see the module docstring.
    `model_config` is None for a model without routing (the baseline CNN): then the reference."""
    device = torch.device(device)
    if requested not in CHOICES:
        raise UserError(f"--routing {requested!r}: choose one of {', '.join(CHOICES)}")
    if model_config is None:
        return "torch", "the model has no routing", None
    if requested == "fused" and not fused_supports(model_config):
        raise UserError(
            f"--routing fused takes at most {FUSED_MAX_JD} routed capsules (classes, plus "
            f"none-of-the-above); this model routes to {model_config.routed_capsules}: use "
            "--routing auto, triton or torch"
        )
    impl, why, note = _first_choice(requested, model_config, device, batch, free_bytes)
    if impl == "torch":
        return impl, why, note
    ok, reason = _kernel_runs(device, probe=requested == "auto")
    if all_ranks_ok is not None and not all_ranks_ok(ok) and ok:
        ok, reason = False, "the kernel failed on another rank"
    if ok:
        return impl, why, note
    if requested != "auto":
        raise UserError(
            f"--routing {requested} cannot run on {device}: {reason}. Use --routing auto or torch"
        )
    return (
        "torch",
        f"the {impl} kernel cannot run on {device}",
        f"warning: --routing auto cannot use the {impl} kernel on {device} ({reason}); using the torch "
        f"reference. Pass --routing {impl} to see the full error.",
    )


def _first_choice(requested, model_config, device, batch, free_bytes):
    """(impl, why, note) before asking whether a kernel runs."""
    if requested != "auto":
        return requested, "--routing", None
    impl = resolve_impl("auto", device)  # CAPSFAST_AUTO_IMPL, else the device's default
    if os.environ.get("CAPSFAST_AUTO_IMPL"):
        return impl, "CAPSFAST_AUTO_IMPL", None
    if impl == "torch":
        return impl, "the reference on a CPU (Triton runs there only under its interpreter)", None
    if batch and free_bytes is not None and fused_supports(model_config):
        need = step_peak_bytes(model_config, batch, "triton")
        if need > AUTO_HEADROOM * free_bytes:
            note = (
                f"--routing auto: a step that stores u_hat needs about {need / 2**30:.1f} GiB at "
                f"batch {batch}, more than fits in the {free_bytes / 2**30:.1f} GiB free; using "
                "the fused DigitCaps, which never stores it"
            )
            return "fused", "u_hat would not fit in the free GPU memory", note
    return impl, "the Triton kernel on CUDA", None


def _kernel_runs(device: torch.device, probe: bool) -> tuple[bool, str]:
    """Whether the Triton kernels run on `device` (and, probed, agree with the reference)."""
    try:
        from capsfast.kernels.routing import triton_available

        return triton_available(device, probe=probe)
    except Exception as e:  # triton missing, or broken at import
        return False, f"{type(e).__name__}: {e}"
