"""What every benchmark shares: the device, what runs where, timing, and what each result records.

Two modes, one code path:
  timed     (`--benchmark-only`)      real sizes; warm-up (compilation, autotuning) runs before
                                      the timed rounds; every timed call ends in a device sync.
  disabled  (`--benchmark-disable`)   each benchmark runs once at a tiny size as a test (CI), so
                                      no benchmark can rot; its assertions still apply.
On CPU the timed mode runs only what means something there (fp32, no Triton interpreter) and
skips the rest with the reason.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from capsfast.provenance import git_commit, package_version

ROOT = Path(__file__).resolve().parent.parent
ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SPEC.md, arithmetic of one sample: forward about 0.4 GFLOP, forward + backward about 1.2 GFLOP.
FLOP_FWD = 0.4e9
FLOP_TRAIN = 1.2e9
# torch.compile mode of every compiled path: default unless set (e.g. reduce-overhead, the fast
# preset's CUDA-graph mode); recorded with each result.
COMPILE_MODE = os.environ.get("CAPSFAST_BENCH_COMPILE_MODE") or None


def device_name() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu {platform.machine()}, {torch.get_num_threads()} threads"


def run_info() -> dict:
    """Who measured: stored in machine_info (once per JSON) and in every benchmark's extra_info."""
    return {
        "commit": git_commit(),
        "device": device_name(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda if ON_CUDA else None,
        "threads": torch.get_num_threads(),
        "compile_mode": COMPILE_MODE or "default",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --------------------------------------------------------------------------- what runs where
def skip_unless_meaningful(benchmark, *, dtype: str = "fp32", triton: bool = False) -> None:
    """On CPU, time only fp32 and no Triton; with timing disabled everything runs (tiny sizes)."""
    if ON_CUDA or benchmark.disabled:
        return
    if dtype != "fp32":
        pytest.skip(
            "bf16 on this CPU is emulated (about 13x slower than fp32): says nothing of GPUs"
        )
    if triton:
        pytest.skip("Triton runs on CPU only under its interpreter: its time measures Python")


def first_batch_only(benchmark, batch: int, batches: tuple) -> None:
    """With timing disabled every batch size runs the same tiny problem: run it once."""
    if benchmark.disabled and batch != batches[0]:
        pytest.skip("benchmarking disabled: the first batch size already tests this path")


def need_triton(kind: str = "triton") -> None:
    """Skip (with the reason) when the Triton routing or the fused DigitCaps cannot run here."""
    try:
        from capsfast.kernels.routing import triton_available

        ok, reason = triton_available(DEVICE)
        if ok and kind == "fused":
            import capsfast.kernels.digit_caps  # noqa: F401  (may still be in progress)
    except Exception as e:  # import errors of an unfinished or broken kernel module
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        pytest.skip(f"{kind} unavailable on {DEVICE}: {reason}")


def compile_fn(fn, benchmark):
    """torch.compile with fresh dynamo caches (parameters must not share the recompile limit).
    Timing disabled: backend aot_eager traces and differentiates the graph as inductor would,
    in seconds instead of minutes of code generation."""
    torch._dynamo.reset()
    if benchmark.disabled:
        return torch.compile(fn, backend="aot_eager")
    return torch.compile(fn, mode=COMPILE_MODE)


def new_step() -> None:
    """Tell CUDA-graph compile modes that a new step begins, so that replaying the graph may reuse
    the last step's output buffers (a no-op for other modes and for eager code)."""
    if ON_CUDA:
        torch.compiler.cudagraph_mark_step_begin()


# --------------------------------------------------------------------------- timing and records
def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def timed(benchmark, fn, *, rounds: int, warmup_rounds: int):
    """Run fn under the benchmark and return its last result.

    Warm-up calls (compile, autotune, allocator) run before the timed rounds and before the peak
    memory counter is reset; each call ends with a sync, so a round measures finished work."""

    def call():
        out = fn()
        sync()
        return out

    if benchmark.enabled:
        for _ in range(warmup_rounds):
            call()
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=0)


def describe(benchmark, *, group: str, subject: str, impl: str, dtype: str, batch: int, **more):
    """Label a benchmark before it runs. `group` holds the rows that compare with each other; the
    row with baseline=True is what report.py divides by."""
    benchmark.group = group
    benchmark.extra_info.update(
        {**run_info(), "subject": subject, "impl": impl, "dtype": dtype, "batch": batch, **more}
    )


def finish(
    benchmark,
    *,
    images: int | None = None,
    nbytes: int | None = None,
    flops=None,
    median_s: float | None = None,
):
    """Rates from the median round: images/s, GB/s against a byte count, TFLOP/s; peak memory.
    median_s replaces pytest-benchmark's median where a better timer measured it (kernels on
    CUDA: triton.testing.do_bench, L2 flushed before every call); report.py reads it."""
    info = benchmark.extra_info
    info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if ON_CUDA else None
    if nbytes is not None:
        info["bytes"] = int(nbytes)
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median if median_s is None else median_s
    info["timer"] = "pytest-benchmark" if median_s is None else "triton.testing.do_bench"
    info["median_s"] = median
    if images is not None:
        info["images_per_second"] = images / median
    if nbytes is not None:
        info["gb_per_second"] = nbytes / median / 1e9
    if flops is not None:
        info["tflop_per_second"] = flops / median / 1e12


# --------------------------------------------------------------------------- whole-model paths
def variant_setup(benchmark, variant: str, batch: int, batches: tuple) -> tuple[bool, str, str]:
    """'compiled-bf16-triton' -> (True, 'bf16', 'triton'), after skipping what cannot run here."""
    mode, dtype, routing = variant.split("-")
    first_batch_only(benchmark, batch, batches)
    skip_unless_meaningful(benchmark, dtype=dtype, triton=routing != "torch")
    if routing != "torch":
        need_triton(routing)
    return mode == "compiled", dtype, routing


def new_model(routing: str):
    """The paper's CapsNet, with W drawn at std 0.1 (the top of SPEC's range) instead of 0.01:
    same cost, but capsules large enough at initialisation for output checks to mean something."""
    from capsfast.model import CapsNet, ModelConfig

    torch.manual_seed(0)
    return CapsNet(ModelConfig(w_init_std=0.1), routing=routing).to(DEVICE)


def autocast(dtype: str):
    """AMP as Accelerate applies it: bf16 autocast around the forward, fp32 master weights."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def train_step(model, net, dtype: str):
    """The trainer's optimiser step (capsfast.train): forward + loss, backward, Adam, zero_grad.
    `net` is the model or its compiled wrapper; returns step(x, y) -> (loss, poses), detached."""
    from capsfast.config import resolve
    from capsfast.train import build_optimizer, compute_loss

    optimizer = build_optimizer(model, resolve({"preset": "paper"}))

    def step(x, y):
        new_step()
        with autocast(dtype):
            out, loss, _, _ = compute_loss(net, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone(), out.poses.detach().clone()  # CUDA graphs reuse buffers

    return step
