"""Routing by agreement in fused Triton kernels: u_hat [B, I, J, D] -> v [B, J, D], and back.

The math (the forward, the full-gradient and detach_inner backward), the passes and the cost model
are in docs/routing.md, Sections 3-6. In short: every per-(i, j) quantity lives only in registers;
a pass over i runs on a grid of (sample, i-slice), each program loading its sample's small state
once, walking its i-slice in tiles of u_hat and writing a [J, D] partial sum; a finishing kernel
per sample (kernels/common.py) adds the partials in a fixed order (deterministic, no atomics) and
applies squash or its backward. The routing math on chip is shared with the fused DigitCaps op
(kernels/common.py); here its tiles have a sample axis of 1.

All arithmetic is fp32 whatever the input dtype (fp32, bf16, fp16); v and du come back in u_hat's
dtype, d(bias) in the bias's dtype. float64 is rejected: use impl="torch" (it computes in float64).

Public: route_triton (autograd-aware), triton_available (for --routing auto), pass_costs (bytes
and FLOPs per launch), the custom ops capsfast::route and capsfast::route_backward. Environment:
CAPSFAST_ROUTE_TILES overrides the tiles, CAPSFAST_POISON fills buffers with NaN
(docs/environment.md).

Sections, in the order kernels/digit_caps.py has them too: jit helpers, kernels, tile choice, cost
model, launchers, custom op (fake, autograd rule), public entry, probe.
"""

# ruff: noqa: E741  (I, J, D, B, T: the notation of docs/routing.md)
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from capsfast.kernels import common
from capsfast.kernels.common import (
    INTERPRETER_TILE,
    buffer,
    bwd_finish_kernel,
    coupling,
    finish_block,
    fwd_finish_kernel,
    interpreted,
    load_rows,
    load_state,
    logit_grad,
    store_rows,
    u_hat_grad_step,
)

from capsfast.routing import SQUASH_EPS, check_route_args

__all__ = ["pass_costs", "route_triton", "triton_available"]

TILES_ENV = "CAPSFAST_ROUTE_TILES"  # block_i=n,slices=n or sms=N (docs/environment.md)

# ---------------------------------------------------------------------------------------------
# Jit helpers: a chunk of u_hat (a sample axis of 1: the shared math works on [BB, BI, JP, DP])
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_u_hat(u_ptr, b, offs_i, I, J, D, JP: tl.constexpr, DP: tl.constexpr):
    """u_hat[b, offs_i] as fp32 [1, BI, JP, DP] (zero outside), with its offsets and mask (the
    grad pass stores du through them): rows of D contiguous values."""
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    offs = (offs_i[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]
    ok = (offs_i < I)[:, None, None] & (offs_j < J)[None, :, None] & (offs_d < D)[None, None, :]
    offs, ok = (b.to(tl.int64) * I * J * D + offs)[None, :, :, :], ok[None, :, :, :]
    u_hat = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return u_hat, offs, ok


@triton.jit
def _samples(B):
    """This program's sample b as a block of one: (b, offs_b [1], b_ok [1])."""
    b = tl.program_id(0)
    offs_b = b.to(tl.int64) + tl.zeros((1,), dtype=tl.int64)
    return b, offs_b, offs_b < B


# ---------------------------------------------------------------------------------------------
# Kernels (what each launch reads, writes and costs: docs/routing.md, Sections 5 and 6)
# ---------------------------------------------------------------------------------------------


# Forward pass of iteration t (one launch per iteration).
#   computes  part[n, b] = sum_{i in slice n} c_t[i, :] u[b, i, :, :]      ([J, D], fp32)
#             with c_t = softmax_j <u, V_{t-1}>, V_{t-1} = Vprev[t-1, b] (zero for t = 1)
#   grid      (B, n_slices): a program owns sample b and i-slice n = [n * I_PER_PROG, ...),
#             walked in N_CHUNKS tiles of BLOCK_I rows; V_{t-1} loaded once
#   saves     nothing (the partials are scratch, reduced by fwd_finish_kernel)
@triton.jit
def _route_fwd_pass_kernel(
    u_ptr, Vprev_ptr, part_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    BLOCK_I: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    b, offs_b, b_ok = _samples(B)
    n = tl.program_id(1)
    j_ok = tl.arange(0, JP) < J
    V = load_rows(Vprev_ptr, offs_b, b_ok, J, D, JP, DP)  # [1, JP, DP]
    s = tl.zeros((1, JP, DP), dtype=tl.float32)
    for chunk in range(0, N_CHUNKS):
        offs_i = n * I_PER_PROG + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        u_hat, _, _ = _load_u_hat(u_ptr, b, offs_i, I, J, D, JP, DP)
        c = coupling(u_hat, V, j_ok)
        s += tl.sum(c[:, :, :, None] * u_hat, axis=1)
    store_rows(part_ptr + n * B * J * D, s, offs_b, b_ok, J, D, JP, DP)


# Backward pass for dL/dv_{t-1} (full gradient only; t = T..2, one launch each).
#   computes  part[n, b] = sum_{i in slice n} Bbar_{t-1}[i, :] u[b, i, :, :]
#             Bbar_{t-1} = dL/db_{t-1} = P_t + ... + P_T, P_tau = softmax_bwd(c_tau, <u, G_tau>),
#             c_tau recomputed from u and V_{tau-1}, G_tau already final for tau >= t
#   grid      (B, n_slices), as the forward pass; the 2 (T - t + 1) state matrices of the
#             sample are loaded once per program
#   saves     nothing (bwd_finish_kernel turns the partials into G_{t-1})
@triton.jit
def _route_bwd_pass_kernel(
    u_ptr, Vprev_ptr, G_ptr, part_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    t: tl.constexpr, T: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr,
    DP: tl.constexpr,
):  # fmt: skip
    b, offs_b, b_ok = _samples(B)
    n = tl.program_id(1)
    j_ok = tl.arange(0, JP) < J
    Vs = load_state(Vprev_ptr, offs_b, b_ok, B, J, D, t - 1, T, JP, DP)
    Gs = load_state(G_ptr, offs_b, b_ok, B, J, D, t - 1, T, JP, DP)
    dv = tl.zeros((1, JP, DP), dtype=tl.float32)
    for chunk in range(0, N_CHUNKS):
        offs_i = n * I_PER_PROG + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        u_hat, _, _ = _load_u_hat(u_ptr, b, offs_i, I, J, D, JP, DP)
        Bbar = logit_grad(u_hat, Vs, Gs, j_ok, T - t + 1)
        dv += tl.sum(Bbar[:, :, :, None] * u_hat, axis=1)
    store_rows(part_ptr + n * B * J * D, dv, offs_b, b_ok, J, D, JP, DP)


# Grad pass: the input gradient du (the last launch of the backward).
#   computes  du[i, j] = sum_{t > TAU0} c_t[i, j] G_t[j] + P_t[i, j] V_{t-1}[j]
#             (common.u_hat_grad_step); TAU0 = 0 is the full gradient, DETACH (TAU0 = T - 1) is
#             detach_inner: du = c_T G_T
#   grid      (B, n_slices), as the forward pass; the sample's state loaded once per program
#   saves     nothing; du written in du's dtype
@triton.jit
def _route_grad_pass_kernel(
    u_ptr, Vprev_ptr, G_ptr, du_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    TAU0: tl.constexpr, T: tl.constexpr, DETACH: tl.constexpr, BLOCK_I: tl.constexpr,
    JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    b, offs_b, b_ok = _samples(B)
    n = tl.program_id(1)
    j_ok = tl.arange(0, JP) < J
    V0: tl.constexpr = TAU0 + (TAU0 == 0)  # V_0 = 0 is never read
    Vs = load_state(Vprev_ptr, offs_b, b_ok, B, J, D, V0, T, JP, DP)
    Gs = load_state(G_ptr, offs_b, b_ok, B, J, D, TAU0, T, JP, DP)
    for chunk in range(0, N_CHUNKS):
        offs_i = n * I_PER_PROG + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        u_hat, offs, ok = _load_u_hat(u_ptr, b, offs_i, I, J, D, JP, DP)
        du_hat = tl.zeros(u_hat.shape, dtype=tl.float32)
        for tau in tl.static_range(TAU0, T):
            G = Gs[tau - TAU0]
            V = Vs[tau - V0] if tau > 0 else G  # (unused for t = 1)
            du_hat = u_hat_grad_step(du_hat, u_hat, V, G, j_ok, tau == 0, DETACH)
        tl.store(du_ptr + offs, du_hat.to(du_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Tile choice
# ---------------------------------------------------------------------------------------------

# GPU tile: values of u_hat per [BLOCK_I, JP, DP] tile, 8 fp32 registers per thread and tile at
# 4 warps, so that triton 3.6's ptxas allocates the backward passes without spills and with
# several warps per scheduler (the passes are memory-bound).
GPU_TILE = 1024


def _tiles(B: int, I: int, J: int, D: int, device: torch.device) -> dict:
    """The tiles a launch uses: the GPU's choice, the interpreter's (one program at a time: few,
    large tiles), or what CAPSFAST_ROUTE_TILES asks for."""
    override = common.tile_override(TILES_ENV, ("block_i", "slices"))
    if "sms" in override:
        return _gpu_tiles(B, I, J, D, override["sms"])
    if interpreted(_route_fwd_pass_kernel):
        return _geometry(B, I, J, D, INTERPRETER_TILE, programs=1, **override)
    return _gpu_tiles(B, I, J, D, common.sm_count(device), **override)


def _gpu_tiles(B: int, I: int, J: int, D: int, sms: int, **override) -> dict:
    """The GPU's choice for a device with `sms` SMs: tiles of GPU_TILE values, enough i-slices
    for about 4 programs per SM."""
    return _geometry(B, I, J, D, GPU_TILE, programs=4 * sms, **override)


def _geometry(B, I, J, D, tile_values, programs, block_i=None, slices=None) -> dict:
    """Tile sizes and the (sample, i-slice) grid.

    JP, DP: J and D padded to powers of two (masked). BLOCK_I: rows of i per tile, so that a
    [BLOCK_I, JP, DP] fp32 tile holds `tile_values` values. n_slices: i-slices per sample, enough
    for B * n_slices to reach `programs`; each program walks N_CHUNKS tiles of its slice.
    block_i and slices, when given, replace the choice (a power of two, any count).
    """
    JP = triton.next_power_of_2(J)
    DP = triton.next_power_of_2(D)
    BLOCK_I = block_i or max(1, tile_values // (JP * DP))
    if BLOCK_I & (BLOCK_I - 1):
        raise ValueError(f"{TILES_ENV}: block_i must be a power of two, got {BLOCK_I}")
    BLOCK_I = min(BLOCK_I, triton.next_power_of_2(I))
    n_blocks = triton.cdiv(I, BLOCK_I)
    n_slices = slices or triton.cdiv(programs, max(B, 1))
    n_slices = min(n_slices, n_blocks)
    n_chunks = triton.cdiv(n_blocks, n_slices)
    n_slices = triton.cdiv(n_blocks, n_chunks)  # no empty slice
    return dict(
        BLOCK_I=BLOCK_I,
        JP=JP,
        DP=DP,
        n_slices=n_slices,
        N_CHUNKS=n_chunks,
        I_PER_PROG=n_chunks * BLOCK_I,
    )


# ---------------------------------------------------------------------------------------------
# Cost model (docs/routing.md, Section 6; the shared model is kernels.common.pass_costs)
# ---------------------------------------------------------------------------------------------


def pass_costs(
    B: int,
    I: int,
    J: int,
    D: int,
    Din: int | None = None,
    T: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    detach_inner: bool = False,
    bias: bool = True,
    *,
    backward: bool = True,
    sms: int = 132,
) -> dict:
    """Bytes and FLOPs of every launch of route_triton on u_hat [B, I, J, D] of `dtype` (forward,
    and the backward unless backward=False), with the GPU tiles for a device with `sms` SMs
    (132: H100). A pass over i reads u_hat once. Din is unused (u_hat is given; the argument keeps
    one signature with kernels.digit_caps.pass_costs)."""
    del Din
    e = torch.empty((), dtype=dtype).element_size()
    n = _gpu_tiles(B, I, J, D, sms)["n_slices"]
    E = B * I * J * D
    names = dict(fwd="_route_fwd_pass_kernel", bwd="_route_bwd_pass_kernel",
                 last="_route_grad_pass_kernel", last_pass="du")  # fmt: skip
    return common.pass_costs(
        B, I, J, D, T, detach_inner, bias, out_bytes=e, n_slices=n, pass_bytes=E * e,
        pass_l2=E * e, pose_flops=0, last_bytes=2 * E * e, last_programs=n, names=names,
        backward=backward,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers (they trust their callers: route_triton validates)
# ---------------------------------------------------------------------------------------------


def route_forward(u_hat, bias, iterations):
    """Launch the forward passes; returns v (u_hat's dtype), S and Vprev ([T, B, J, D] fp32)."""
    u = u_hat.contiguous()
    B, I, J, D = u.shape
    T = iterations
    dev = u.device
    g = _tiles(B, I, J, D, dev)
    ns, blocks = g["n_slices"], dict(JP=g["JP"], DP=g["DP"])
    out = buffer((B, J, D), u.dtype, dev)
    S = buffer((T, B, J, D), torch.float32, dev)
    Vprev = buffer((T, B, J, D), torch.float32, dev)
    if B == 0:
        return out, S, Vprev
    Vprev[0].zero_()  # V_0 = 0: uniform coupling in the first iteration
    part = buffer((ns, B, J, D), torch.float32, dev)
    beta = bias.contiguous() if bias is not None else S  # S: a placeholder pointer, never read
    fb = finish_block(B, g["JP"], g["DP"])
    with common.on_device(dev):
        for t in range(1, T + 1):
            _route_fwd_pass_kernel[(B, ns)](
                u, Vprev[t - 1], part, B, I, J, D, g["I_PER_PROG"], g["N_CHUNKS"],
                BLOCK_I=g["BLOCK_I"], **blocks,
            )  # fmt: skip
            last = t == T
            fwd_finish_kernel[(triton.cdiv(B, fb),)](
                part, ns, beta, Vprev[t - 1], Vprev[t - 1] if last else Vprev[t], S[t - 1], out,
                B, J, D, HAS_BIAS=bias is not None, LAST=last, EPS=SQUASH_EPS, BLOCK_B=fb,
                **blocks,
            )  # fmt: skip
    return out, S, Vprev


def route_backward(grad_v, u_hat, S, Vprev, detach_inner):
    """Launch the backward passes; returns du (u_hat's dtype) and d(bias) (fp32, [J, D])."""
    u = u_hat.contiguous()
    B, I, J, D = u.shape
    T = S.shape[0]
    dev = u.device
    g = _tiles(B, I, J, D, dev)
    ns, blocks = g["n_slices"], dict(JP=g["JP"], DP=g["DP"])
    walk = (g["I_PER_PROG"], g["N_CHUNKS"])
    G = buffer((T, B, J, D), torch.float32, dev)  # G_t = dL/ds_t (detach_inner: only G_T)
    du = buffer((B, I, J, D), u.dtype, dev)
    if B == 0:
        return du, torch.zeros((J, D), dtype=torch.float32, device=dev)
    fb = finish_block(B, g["JP"], g["DP"])
    finish_grid = (triton.cdiv(B, fb),)
    tau0 = T - 1 if detach_inner else 0
    with common.on_device(dev):
        # G_T = squash_bwd(s_T, dL/dv_T): the incoming gradient is the single "partial".
        bwd_finish_kernel[finish_grid](
            grad_v.contiguous(), 1, S[T - 1], G[T - 1], B, J, D, EPS=SQUASH_EPS, BLOCK_B=fb,
            **blocks,
        )  # fmt: skip
        if not detach_inner:
            part = buffer((ns, B, J, D), torch.float32, dev)
            for t in range(T, 1, -1):  # dL/dv_{t-1}, then G_{t-1}
                _route_bwd_pass_kernel[(B, ns)](
                    u, Vprev, G, part, B, I, J, D, *walk, t=t, T=T, BLOCK_I=g["BLOCK_I"],
                    **blocks,
                )  # fmt: skip
                bwd_finish_kernel[finish_grid](
                    part, ns, S[t - 2], G[t - 2], B, J, D, EPS=SQUASH_EPS, BLOCK_B=fb, **blocks
                )
        _route_grad_pass_kernel[(B, ns)](
            u, Vprev, G, du, B, I, J, D, *walk, TAU0=tau0, T=T, DETACH=detach_inner,
            BLOCK_I=g["BLOCK_I"], **blocks,
        )  # fmt: skip
    dbias = G[tau0:].sum(dim=(0, 1))  # d(bias) = sum over iterations and batch of G_t
    return du, dbias


# ---------------------------------------------------------------------------------------------
# Custom op: forward and backward ops, their fakes, the autograd rule
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("capsfast::route", mutates_args=())
def route_op(
    u_hat: torch.Tensor, bias: torch.Tensor | None, iterations: int, detach_inner: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [B, J, D] (u_hat's dtype), and for the backward S (s_t) and Vprev (V_{t-1}),
    [T, B, J, D] fp32. detach_inner does not change the forward; it is an argument for the
    backward."""
    return route_forward(u_hat, bias, iterations)


@route_op.register_fake
def _forward_fake(u_hat, bias, iterations, detach_inner):
    B, _, J, D = u_hat.shape
    state = u_hat.new_empty((iterations, B, J, D), dtype=torch.float32)
    return u_hat.new_empty((B, J, D)), state, torch.empty_like(state)


@torch.library.custom_op("capsfast::route_backward", mutates_args=())
def route_backward_op(
    grad_v: torch.Tensor,
    u_hat: torch.Tensor,
    S: torch.Tensor,
    Vprev: torch.Tensor,
    detach_inner: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """du [B, I, J, D] (u_hat's dtype) and d(bias) [J, D] (fp32) from dL/dv [B, J, D]."""
    return route_backward(grad_v, u_hat, S, Vprev, detach_inner)


@route_backward_op.register_fake
def _backward_fake(grad_v, u_hat, S, Vprev, detach_inner):
    return torch.empty_like(u_hat), u_hat.new_empty(u_hat.shape[2:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    u_hat, bias, _iterations, detach_inner = inputs
    _v, S, Vprev = output
    ctx.save_for_backward(u_hat, S, Vprev)
    ctx.detach_inner = detach_inner
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(S, Vprev)


def _autograd_backward(ctx, grad_v, _grad_S, _grad_Vprev):
    u_hat, S, Vprev = ctx.saved_tensors
    du, dbias = route_backward_op(grad_v, u_hat, S, Vprev, ctx.detach_inner)
    dbias = None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)
    return du, dbias, None, None


route_op.register_autograd(_autograd_backward, setup_context=_setup_context)
# No autocast kernel, on purpose: the inputs reach the op as they are (docs/routing.md, Section 7,
# "Autocast"; both ops follow this rule).


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------


def route_triton(
    u_hat: torch.Tensor,
    iterations: int = 3,
    *,
    bias: torch.Tensor | None = None,
    detach_inner: bool = False,
) -> torch.Tensor:
    """Routing by agreement in fused Triton kernels: u_hat [B, I, J, D] -> v [B, J, D].

    Same contract as capsfast.routing.route_torch: fp32 math, v in u_hat's dtype, gradients for
    u_hat and bias (full through every iteration, or only through the last with detach_inner).
    The one place its arguments are checked (capsfast.routing.route dispatches here unchecked).
    """
    check_route_args(u_hat, iterations, bias, op="route_triton")
    if min(u_hat.shape[1:]) < 1:
        raise ValueError(f"route_triton: I, J and D must be >= 1; got {tuple(u_hat.shape)}")
    common.check_dtypes("route_triton", "impl='torch'", u_hat=u_hat, bias=bias)
    if bias is not None and bias.device != u_hat.device:
        raise ValueError(f"route_triton: bias is on {bias.device}, u_hat on {u_hat.device}")
    common.check_device(u_hat.device, _route_fwd_pass_kernel, "route_triton", "impl='torch'")
    v, _S, _Vprev = route_op(u_hat, bias, int(iterations), bool(detach_inner))
    return v


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _probe(device: torch.device) -> tuple[bool, str]:
    """Compile and run forward + backward once on a tiny input and check it against the
    reference: catches compiler failures on a new GPU or triton version."""
    from capsfast.routing import route_torch

    try:
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(2, 5, 3, 4, generator=gen).to(device).requires_grad_(True)
        bias = torch.randn(3, 4, generator=gen).to(device).requires_grad_(True)
        v = route_triton(u, 2, bias=bias)
        du, db = torch.autograd.grad(v.square().sum(), (u, bias))
        v_ref = route_torch(u, 2, bias)
        du_ref, db_ref = torch.autograd.grad(v_ref.square().sum(), (u, bias))
        for name, got, want in (("v", v, v_ref), ("du", du, du_ref), ("dbias", db, db_ref)):
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-5):
                return False, f"triton routing gives wrong {name} on {device}"
    except Exception as e:  # any failure means: fall back to the reference
        return False, f"triton routing failed on {device}: {type(e).__name__}: {e}"
    where = " (interpreter)" if interpreted(_route_fwd_pass_kernel) else ""
    return True, f"triton routing runs on {device}{where}"


def triton_available(device: torch.device | str, probe: bool = True) -> tuple[bool, str]:
    """(ok, reason): can route_triton run on `device`? With probe=True (default) a tiny forward
    and backward is compiled, run and checked against the reference once per device (cached),
    so `--routing auto` can fall back to impl='torch' on compile failures."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "cpu":
        if not interpreted(_route_fwd_pass_kernel):
            return False, "Triton runs on CPU only under its interpreter (TRITON_INTERPRET=1)"
    else:
        return False, f"Triton routing does not support device type {device.type!r}"
    if not probe:
        return True, f"triton routing should run on {device} (not probed)"
    return _probe(device)
