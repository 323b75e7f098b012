"""Routing at the paper's shape (I=1152, J=10, D=16, 3 iterations), forward and forward+backward.

Two subjects, each compared with its eager reference at the same pass, dtype and batch:
  route       u_hat [B, I, J, D] -> v: eager reference, the reference under torch.compile, Triton
  digit_caps  u [B, I, 8], W -> v (u_hat = W u, then routing): eager, Triton, fused Triton
              (the fused kernel never stores u_hat, so it can only be compared on this subject)

Bytes (for GB/s and the distance to the memory floor):
  route       docs/routing.md's fused-kernel traffic: u_hat read T times (forward); read 2T times and
              du written once (forward+backward). At B=512 bf16: 1.3 GB per step.
  digit_caps  compulsory traffic: u, W, bias read and v written once (forward); plus grad_v read
              and du, dW, dbias written once (forward+backward).
bf16 runs as in training: route gets bf16 u_hat; digit_caps gets bf16 u with the fp32 master W
under autocast.
"""

# ruff: noqa: E741  (I, J, D: the notation of docs/spec.md and docs/routing.md)
from __future__ import annotations

import pytest
import torch
import triton.testing
from capsfast.kernels import common as kernels_common
from capsfast.kernels import digit_caps as kernels_digit_caps
from capsfast.kernels import routing as kernels_routing

from bench.common import (
    DEVICE,
    DTYPES,
    ON_CUDA,
    compile_fn,
    describe,
    finish,
    first_batch_only,
    need_triton,
    new_step,
    skip_unless_meaningful,
    timed,
)
from capsfast.routing import digit_caps, route, route_torch, squash

T, I, J, D, DIN = 3, 1152, 10, 16, 8
BATCHES = (128, 512, 1024) if ON_CUDA else (8, 32)
TINY = {"batch": 2, "I": 64}  # benchmarking disabled: a test, not a measurement
ROUNDS = {"rounds": 50, "warmup_rounds": 5} if ON_CUDA else {"rounds": 20, "warmup_rounds": 2}
# Relative to the largest reference value (as tests/test_routing_triton.py): fp32 differs by
# summation order only; bf16 by rounding of u_hat and v (a few ulps of 2^-8).
TOL = {"fp32": 2e-5, "bf16": 3e-2}
PASSES = ("fwd", "fwd+bwd")
SMS = kernels_common.sm_count(DEVICE) if ON_CUDA else 132  # the cost model's GPU geometry


def capsule_inputs(B: int, n_in: int, seed: int = 0):
    """Capsule-like inputs (|u| < 1, correlated over i so routing has something to agree on)."""
    g = torch.Generator().manual_seed(seed)
    u = squash(torch.randn(B, 1, DIN, generator=g) + 0.7 * torch.randn(B, n_in, DIN, generator=g))
    W = torch.randn(n_in, J, D, DIN, generator=g) * (0.6 / DIN**0.5)
    bias = torch.randn(J, D, generator=g) * 0.5
    grad_v = torch.randn(B, J, D, generator=g)
    return u, W, bias, grad_v


def run(fn, inputs: list[torch.Tensor], grad_v: torch.Tensor, backward: bool):
    """v = fn(*inputs) and, forward+backward, the gradients of <v, grad_v> for every input."""
    if not backward:
        with torch.no_grad():
            return fn(*inputs), []
    v = fn(*inputs)
    return v, list(torch.autograd.grad(v, inputs, grad_v))


def assert_close(got, want, dtype: str, what: str):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    want = want.float()
    scale = want.abs().max().item()
    tol = TOL[dtype]
    torch.testing.assert_close(
        got.float(), want, rtol=tol, atol=tol * scale, msg=lambda m: what + m
    )


def bench_routing(benchmark, subject: str, impl: str, pass_: str, dtype: str, batch: int):
    first_batch_only(benchmark, batch, BATCHES)
    skip_unless_meaningful(benchmark, dtype=dtype, triton=impl in ("triton", "fused"),
                           compiled=impl == "compiled")  # fmt: skip
    if impl in ("triton", "fused"):
        need_triton(impl)
    B, n_in = (TINY["batch"], TINY["I"]) if benchmark.disabled else (batch, I)
    backward = pass_ == "fwd+bwd"
    dt = DTYPES[dtype]
    u, W, bias, grad_v = (t.to(DEVICE) for t in capsule_inputs(B, n_in))
    grad_v = grad_v.to(dt)  # the reference gets the same (rounded) incoming gradient, in fp32

    # The reference: eager, fp32 math on the same (possibly bf16-rounded) inputs.
    if subject == "route":
        u_hat = torch.einsum("ijdk,bik->bijd", W, u).to(dt)
        ref_inputs = [u_hat.float().clone().requires_grad_(), bias.clone().requires_grad_()]
        ref_fn = lambda x, b: route_torch(x, T, b)
        inputs = [u_hat, bias.clone()]
        costs = kernels_routing.pass_costs(B, n_in, J, D, DIN, T, dt, backward=backward, sms=SMS)
    else:
        u = u.to(dt)
        ref_inputs = [t.clone().requires_grad_() for t in (u.float(), W, bias)]
        ref_fn = lambda x, w, b: digit_caps(x, w, T, bias=b, impl="torch")
        inputs = [u, W.clone(), bias.clone()]
        costs = kernels_digit_caps.pass_costs(
            B, n_in, J, D, DIN, T, dt, w_dtype=W.dtype, backward=backward, sms=SMS
        )
    want_v, want_grads = run(ref_fn, ref_inputs, grad_v.float(), backward)

    if backward:
        inputs = [t.requires_grad_() for t in inputs]
    amp = subject == "digit_caps" and dtype == "bf16"
    if subject == "route" and impl == "compiled":
        f = compile_fn(lambda x, b: route_torch(x, T, b), benchmark)
    elif subject == "route":
        f = lambda x, b: route(x, T, bias=b, impl="torch" if impl == "eager" else impl)
    else:
        f = lambda x, w, b: digit_caps(x, w, T, bias=b, impl="torch" if impl == "eager" else impl)

    def step():
        new_step()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
            return run(f, inputs, grad_v, backward)

    describe(
        benchmark,
        group=f"{subject} {pass_} {dtype} B={batch}",
        subject=f"{subject} {pass_}",
        impl=impl,
        dtype=dtype,
        batch=B,
        baseline=impl == "eager",
        shape=[B, n_in, J, D],
        iterations=T,
    )
    v, grads = timed(benchmark, step, **ROUNDS)
    median_s = None
    if ON_CUDA and benchmark.enabled:  # GPU time with a cold L2, median of many calls
        median_s = triton.testing.do_bench(step, return_mode="median") / 1e3
    benchmark.extra_info.update(
        flops=costs["flops"], l2_bytes=costs["l2_bytes"], passes=costs["passes"], sms=SMS
    )
    finish(benchmark, nbytes=costs["bytes"], flops=costs["flops"], median_s=median_s)

    assert v.shape == (B, J, D) and v.dtype == dt
    assert_close(v, want_v, dtype, f"{subject} {impl} v: ")
    for k, (got, want) in enumerate(zip(grads, want_grads, strict=True)):
        assert_close(got, want, dtype, f"{subject} {impl} grad of input {k}: ")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", ["eager", "compiled", "triton"])
def test_route(benchmark, impl, pass_, dtype, batch):
    bench_routing(benchmark, "route", impl, pass_, dtype, batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", ["eager", "triton", "fused"])
def test_digit_caps(benchmark, impl, pass_, dtype, batch):
    bench_routing(benchmark, "digit_caps", impl, pass_, dtype, batch)
