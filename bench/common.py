"""What every benchmark shares: the device, what runs where, timing, and what each result records.

Two modes, one code path:
  timed     (`--benchmark-only`)      real sizes; warm-up (compilation, autotuning) runs before
                                      the timed rounds; every timed call ends in a device sync.
  disabled  (`--benchmark-disable`)   each benchmark runs at a tiny size as a test (CI), so no
                                      benchmark can rot; its assertions still apply (a check
                                      over repeated calls gets them: `timed(min_calls=...)`).
On CPU the timed mode runs only what means something there (fp32, no Triton interpreter) and
skips the rest with the reason.

CAPSFAST_BENCH_TINY=1 times the tiny sizes of the disabled mode, everything included, in a
round or two: how `bench/gpu_check.py --dry-run` runs the GPU plan on CPU, through the same
code. Its figures time tiny problems and mean nothing.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import pytest
import torch

# The trainer's own pieces are imported here only, so the benchmarks follow them when they move.
from capsfast.model import compute_loss  # noqa: F401
from capsfast.provenance import git_commit, package_version
from capsfast.train import build_optimizer, evaluate  # noqa: F401

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Arithmetic of one sample (docs/spec.md): forward about 0.4 GFLOP, forward + backward 1.2 GFLOP.
FLOP_FWD = 0.4e9
FLOP_TRAIN = 1.2e9
# torch.compile mode of every compiled path: default unless set (e.g. reduce-overhead, the fast
# preset's CUDA-graph mode); recorded with each result.
COMPILE_MODE = os.environ.get("CAPSFAST_BENCH_COMPILE_MODE") or None
TINY_TIMED = os.environ.get("CAPSFAST_BENCH_TINY", "0") not in ("", "0")
TINY_ROUNDS = {"rounds": 2, "warmup_rounds": 1}  # CAPSFAST_BENCH_TINY: 3 calls, 2 timed
# Every benchmark that finished timed, (name, extra_info), for the terminal summary
# (bench/conftest.py) and in run order.
RESULTS: list[tuple[str, dict]] = []


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
def tiny(benchmark) -> bool:
    """Run the tiny problem: timing disabled (CI), or CAPSFAST_BENCH_TINY (gpu_check's dry run)."""
    return benchmark.disabled or TINY_TIMED


def skip_unless_meaningful(
    benchmark, *, dtype: str = "fp32", triton: bool = False, compiled: bool = False
) -> None:
    """On CPU, time fp32 (eager and compiled), eager bf16 where the CPU has bf16 instructions,
    and no Triton; at tiny sizes everything runs. The trainer's CPU default, compiled bf16, is
    timed on the whole step by bench/peer_ratio.py, not row by row here."""
    if ON_CUDA or tiny(benchmark):
        return
    from capsfast.runtime import cpu_has_native_bf16

    if dtype == "fp16":
        pytest.skip("fp16 on a CPU: the trainer refuses it (no fp16 autocast there)")
    if dtype == "bf16" and cpu_has_native_bf16() is None:
        pytest.skip(
            "this CPU has no bf16 instructions: bf16 is emulated, 6-13x slower than fp32 where "
            "measured, and the trainer runs fp32 here"
        )
    if dtype == "bf16" and compiled:
        pytest.skip(
            "compiled bf16 on a CPU: 30-45 s of compilation a row; bench/peer_ratio.py times "
            "this default CPU step whole, and the tiny run checks this path"
        )
    if triton:
        pytest.skip("Triton runs on CPU only under its interpreter: its time measures Python")


def first_batch_only(benchmark, batch: int, batches: tuple) -> None:
    """At tiny sizes every batch size runs the same problem: run it once."""
    if tiny(benchmark) and batch != batches[0]:
        pytest.skip("benchmarking disabled: the first batch size already tests this path")


def need_triton(kind: str = "triton") -> None:
    """Skip (with the reason) when the Triton routing or the fused DigitCaps cannot run here."""
    try:
        from capsfast.kernels.routing import triton_available

        ok, reason = triton_available(DEVICE)
        if ok and kind == "fused":
            import capsfast.kernels.digit_caps  # noqa: F401
    except Exception as e:  # import errors of an unfinished or broken kernel module
        ok, reason = False, f"{type(e).__name__}: {e}"
    if not ok:
        pytest.skip(f"{kind} unavailable on {DEVICE}: {reason}")


def compile_fn(fn, benchmark):
    """torch.compile with fresh dynamo caches (parameters must not share the recompile limit).
    At tiny sizes: backend aot_eager traces and differentiates the graph as inductor would, in
    seconds instead of minutes of code generation."""
    torch._dynamo.reset()
    if tiny(benchmark):
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


def timed(benchmark, fn, *, rounds: int, warmup_rounds: int, min_calls: int = 1):
    """Run fn under the benchmark and return the result of its last timed call.

    Warm-up calls (compile, autotune, allocator) run before the timed rounds and before the peak
    memory counter is reset; each call ends with a sync, so a round measures finished work.
    With timing disabled fn runs once under the benchmark; then, untimed, until it has run
    `min_calls` times in all, so that a check over repeated calls (does the loss go down?)
    tests real results in CI too."""

    def call():
        out = fn()
        sync()
        return out

    if TINY_TIMED:
        rounds = min(rounds, TINY_ROUNDS["rounds"])
        warmup_rounds = min(warmup_rounds, TINY_ROUNDS["warmup_rounds"])
    calls = 1
    if benchmark.enabled:
        for _ in range(warmup_rounds):
            call()
        calls = warmup_rounds + rounds
    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    result = benchmark.pedantic(call, rounds=rounds, warmup_rounds=0)
    for _ in range(calls, min_calls):
        call()
    return result


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
    matmul_rate=None,
    median_s: float | None = None,
):
    """Rates from the median round: images/s, GB/s against a byte count, TFLOP/s; peak memory.
    With `matmul_rate` (the session fixture: dtype -> this device's matmul TFLOP/s) also that
    rate and `matmul_fraction`, the achieved FLOP rate over it: how close the whole step comes
    to what the device's matrix units reach on one large matmul, in the same run. median_s
    replaces pytest-benchmark's median where a better timer measured it (kernels on CUDA:
    triton.testing.do_bench, L2 flushed before every call); report.py reads it."""
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
        if matmul_rate is not None:
            peak = matmul_rate(info["dtype"])
            info["matmul_tflop_per_second"] = peak
            info["matmul_fraction"] = info["tflop_per_second"] / peak
    RESULTS.append((benchmark.name, dict(info)))


# --------------------------------------------------------------------------- device rates
# Sizes of the matmul and copy that measure the device: large enough to reach its steady rate
# (a 4096^3 fp32 matmul takes about a second on 2 CPU cores; 8192^3 a few ms on a GPU), tiny
# under CAPSFAST_BENCH_TINY.
MATMUL_N = 512 if TINY_TIMED else (8192 if ON_CUDA else 4096)
COPY_BYTES = 2**24 if TINY_TIMED else (2**30 if ON_CUDA else 2**28)
RATE_MIN_RUN_S = 0.2 if TINY_TIMED else 2.0  # each rate: timed blocks of at least this long


def _median_seconds(stmt: str, env: dict, min_run_time: float) -> float:
    """torch.utils.benchmark: blocks of calls, CUDA-synchronised, on this process's threads."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def matmul_tflops(dtype: torch.dtype, n: int = MATMUL_N, min_run_time=RATE_MIN_RUN_S) -> float:
    """Dense [n, n] x [n, n] matmul rate, TFLOP/s (2 n^3 per product), median of blocks. fp32
    runs at torch's float32 matmul precision (recorded with it: `highest` means no TF32)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=g)
    a @ b  # warm-up: cuBLAS handles, kernel choice
    sync()
    return 2 * n**3 / _median_seconds("a @ b", {"a": a, "b": b}, min_run_time) / 1e12


def copy_gb_per_second(nbytes: int = COPY_BYTES, min_run_time=RATE_MIN_RUN_S) -> float:
    """Device memory bandwidth of a tensor copy, GB/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    return (
        2 * nbytes / _median_seconds("dst.copy_(src)", {"src": src, "dst": dst}, min_run_time) / 1e9
    )


# --------------------------------------------------------------------------- whole-model paths
def variant_setup(benchmark, variant: str, batch: int, batches: tuple) -> tuple[bool, str, str]:
    """'compiled-bf16-triton' -> (True, 'bf16', 'triton'), after skipping what cannot run here."""
    mode, dtype, routing = variant.split("-")
    first_batch_only(benchmark, batch, batches)
    skip_unless_meaningful(
        benchmark, dtype=dtype, triton=routing != "torch", compiled=mode == "compiled"
    )
    if routing != "torch":
        need_triton(routing)
    return mode == "compiled", dtype, routing


# W's initial std. Training benchmarks: the paper's 0.01 (docs/spec.md), because their checks
# ask that steps lower the loss, and at 0.1 the first Adam step raises it (two images: 0.86 ->
# 2.69, still 1.01 after 16 steps; at 0.01: 0.90 -> 0.32 -> 0.26). Evaluation: 0.1, the top of
# the spec's range: same cost, capsules large enough at initialisation for output checks to
# mean more.
W_INIT_TRAIN = 0.01
W_INIT_EVAL = 0.1


def new_model(routing: str, w_init_std: float):
    """The paper's CapsNet on the benchmark device, seeded, W drawn at `w_init_std`."""
    from capsfast.model import CapsNet, ModelConfig

    torch.manual_seed(0)
    return CapsNet(ModelConfig(w_init_std=w_init_std), routing=routing).to(DEVICE)


def autocast(dtype: str):
    """AMP as Accelerate applies it: bf16 autocast around the forward, fp32 master weights."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def train_step(model, net, dtype: str, fused_adam: bool | None = None):
    """The trainer's optimiser step (capsfast.train): forward + loss, backward, Adam, zero_grad.
    `net` is the model or its compiled wrapper; returns step(x, y) -> (loss, poses), detached.
    `fused_adam`: force Adam's fused (one kernel) or foreach implementation (cpu_breakdown.py
    compares them on a CPU; the trainer's choice otherwise)."""
    from capsfast.config import resolve

    optimizer = build_optimizer(model, resolve({"preset": "paper"}))
    if fused_adam is not None:
        optimizer = torch.optim.Adam(optimizer.param_groups, fused=fused_adam)

    def step(x, y):
        new_step()
        with autocast(dtype):
            out, loss, _, _ = compute_loss(net, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone(), out.poses.detach().clone()  # CUDA graphs reuse buffers

    return step
