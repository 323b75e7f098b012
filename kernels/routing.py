"""Routing by agreement in fused Triton kernels, forward and backward (../shared/ROUTING.md).

One sample, T iterations, u = u_hat [I, J, D], optional bias beta [J, D]:

    V_0 = 0
    for t = 1..T:
        c_t[i, j] = softmax_j <u[i, j], V_{t-1}[j]>       # b_{t-1} = <u, V_{t-1}>, never stored
        s_t[j]    = sum_i c_t[i, j] u[i, j] + beta[j]
        v_t       = squash(s_t);  V_t = V_{t-1} + v_t
    return v_T

Every per-(i, j) quantity (b, c, c * u and, in the backward, gamma, P, Bbar) lives only in
registers: a pass loads a tile of u, recomputes what it needs from the small per-sample state
([J, D] per sample and iteration) and reduces over i. A pass runs on a grid of (sample, i-slice);
each program writes a [J, D] partial sum and a small per-sample kernel adds the partials in a fixed
order (deterministic, no atomics) and applies squash or its backward.

    forward   T x (pass + finalize)                         saves s_t and V_{t-1}: [T, B, J, D] fp32
    backward  finalize(G_T); (T-1) x (pass + finalize); du  full gradient through every iteration
              finalize(G_T); du                             detach_inner: c_T is a constant

All arithmetic is fp32 whatever the input dtype (fp32, bf16, fp16); v and du come back in u_hat's
dtype, d(bias) in the bias's dtype. float64 is rejected: use impl="torch" (it computes in float64).

Public API:
    route_triton(u_hat, iterations, bias=None, detach_inner=False) -> v     (autograd-aware)
    triton_available(device) -> (ok, reason)                          (for --routing auto fallback)
    torch.ops.capsfast.route / torch.ops.capsfast.route_backward      (the custom ops)

Debugging knobs (read at call time):
    CAPSFAST_POISON=1            fill every output and scratch buffer with NaN before the kernels
                                 run, so an element a kernel forgets to write shows up (tests).
    CAPSFAST_ROUTING_BLOCK_I=n   rows of i per tile (a power of two)
    CAPSFAST_ROUTING_SLICES=n    i-slices per sample (programs per sample in a pass)
"""

# ruff: noqa: E741  (I, J, D, B, T: the notation of SPEC.md and ROUTING.md)
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from capsfast.kernels.common import buffer, check_device, interpreted, sm_count

from capsfast.routing import SQUASH_EPS

__all__ = ["route_triton", "triton_available", "is_interpreted"]

# ---------------------------------------------------------------------------------------------
# Building blocks (inlined into the kernels)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_u_tile(
    u_ptr, b, i0, I, J, D, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr
):
    """u[b, i0:i0+BLOCK_I, :, :] as fp32 [BLOCK_I, BLOCK_J, BLOCK_D]; zero outside I, J, D."""
    offs_i = i0 + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_i < I)[:, None, None] & (offs_j < J)[None, :, None] & (offs_d < D)[None, None, :]
    offs = offs_i[:, None, None] * (J * D) + offs_j[None, :, None] * D + offs_d[None, None, :]
    base = u_ptr + b.to(tl.int64) * I * J * D
    return tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_u_tile(
    ptr, x, b, i0, I, J, D, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Store x [BLOCK_I, BLOCK_J, BLOCK_D] into ptr[b, i0:i0+BLOCK_I] (layout of u_hat)."""
    offs_i = i0 + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_i < I)[:, None, None] & (offs_j < J)[None, :, None] & (offs_d < D)[None, None, :]
    offs = offs_i[:, None, None] * (J * D) + offs_j[None, :, None] * D + offs_d[None, None, :]
    base = ptr + b.to(tl.int64) * I * J * D
    tl.store(base + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jd_offsets(J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of a contiguous [J, D] matrix, padded to [BLOCK_J, BLOCK_D]."""
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_j < J)[:, None] & (offs_d < D)[None, :]
    return offs_j[:, None] * D + offs_d[None, :], mask


@triton.jit
def _load_jd(ptr, row, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row `row` of a [rows, J, D] buffer as fp32 [BLOCK_J, BLOCK_D], zero-padded."""
    offs, mask = _jd_offsets(J, D, BLOCK_J, BLOCK_D)
    x = tl.load(ptr + row.to(tl.int64) * J * D + offs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_jd(ptr, row, x, J, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    offs, mask = _jd_offsets(J, D, BLOCK_J, BLOCK_D)
    tl.store(ptr + row.to(tl.int64) * J * D + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coupling(u, V, J, BLOCK_J: tl.constexpr):
    """c[i, j] = softmax_j <u[i, j], V[j]>: u [BI, BJ, BD], V [BJ, BD] -> c [BI, BJ] (0 at j >= J)."""
    logits = tl.sum(u * V[None, :, :], axis=2)
    valid_j = tl.arange(0, BLOCK_J) < J
    logits = tl.where(valid_j[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _softmax_bwd(c, u, G):
    """P[i, j] = c (gamma - sum_k c gamma), gamma[i, j] = <u[i, j], G[j]>: the gradient of the loss
    w.r.t. the logits b of this iteration's softmax, given G = dL/ds."""
    gamma = tl.sum(u * G[None, :, :], axis=2)
    return c * (gamma - tl.sum(c * gamma, axis=1)[:, None])


@triton.jit
def _squash(s, EPS: tl.constexpr):
    """v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) per row j of s [BJ, BD]."""
    n2 = tl.sum(s * s, axis=1)[:, None]
    return (n2 / (1.0 + n2)) * s / tl.sqrt(n2 + EPS)


@triton.jit
def _squash_bwd(s, g, EPS: tl.constexpr):
    """dL/ds for v = f(n2) s, n2 = |s|^2, f = n2 r / (1 + n2), r = 1 / sqrt(n2 + eps):
    dL/ds = f g + 2 f'(n2) <s, g> s,  f' = r / (1 + n2)^2 - n2 r^3 / (2 (1 + n2))."""
    n2 = tl.sum(s * s, axis=1)[:, None]
    r = 1.0 / tl.sqrt(n2 + EPS)
    f = n2 * r / (1.0 + n2)
    df = r / ((1.0 + n2) * (1.0 + n2)) - 0.5 * n2 * r * r * r / (1.0 + n2)
    sg = tl.sum(s * g, axis=1)[:, None]
    return f * g + 2.0 * df * sg * s


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


# Forward pass of iteration t (one launch per iteration).
#   computes  part[b, k] = sum_{i in slice k} c_t[i, :] u[b, i, :, :]      ([J, D], fp32)
#             with c_t = softmax_j <u, V_{t-1}>, V_{t-1} = Vs[t-1, b] (zero for t = 1)
#   grid      (B, n_slices): a program owns sample b and i-slice k = [k * slice_len, ...), walked
#             in n_chunks tiles of BLOCK_I rows
#   saves     nothing (the partials are scratch, reduced by _route_fwd_finalize_kernel)
@triton.jit
def _route_fwd_pass_kernel(
    u_ptr,
    Vs_ptr,
    part_ptr,
    t,
    B,
    I,
    J,
    D,
    slice_len,
    n_chunks,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    V = _load_jd(Vs_ptr, (t - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
    s = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        u = _load_u_tile(
            u_ptr, b, k * slice_len + chunk * BLOCK_I, I, J, D, BLOCK_I, BLOCK_J, BLOCK_D
        )
        c = _coupling(u, V, J, BLOCK_J)
        s += tl.sum(c[:, :, None] * u, axis=0)
    _store_jd(part_ptr, b * tl.num_programs(1) + k, s, J, D, BLOCK_J, BLOCK_D)


# Forward finalize of iteration t.
#   computes  s_t = sum_k part[b, k] + beta (partials added in slice order: deterministic),
#             v_t = squash(s_t); V_t = V_{t-1} + v_t; at t = T writes out[b] = v_T (out's dtype)
#   grid      (B,)
#   saves     S[t-1, b] = s_t and, for t < T, Vs[t, b] = V_t (fp32): the backward's only state
@triton.jit
def _route_fwd_finalize_kernel(
    part_ptr,
    bias_ptr,
    S_ptr,
    Vs_ptr,
    out_ptr,
    t,
    T,
    B,
    n_slices,
    J,
    D,
    HAS_BIAS: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for k in range(0, n_slices):
        s += _load_jd(part_ptr, b * n_slices + k, J, D, BLOCK_J, BLOCK_D)
    if HAS_BIAS:
        s += _load_jd(bias_ptr, b * 0, J, D, BLOCK_J, BLOCK_D)
    _store_jd(S_ptr, (t - 1) * B + b, s, J, D, BLOCK_J, BLOCK_D)
    v = _squash(s, EPS)
    if t < T:
        V = _load_jd(Vs_ptr, (t - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
        _store_jd(Vs_ptr, t * B + b, V + v, J, D, BLOCK_J, BLOCK_D)
    else:
        _store_jd(out_ptr, b, v, J, D, BLOCK_J, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


# Backward finalize of iteration t: G_t = dL/ds_t.
#   computes  dv = sum_k part[b, k] (dL/dv_t; for t = T the incoming gradient, passed as one
#             "partial" per sample), G[t-1, b] = squash_bwd(s_t, dv)
#   grid      (B,)
#   saves     G[t-1, b] (fp32 scratch of the backward, [T, B, J, D])
@triton.jit
def _route_bwd_finalize_kernel(
    part_ptr,
    S_ptr,
    G_ptr,
    t,
    B,
    n_slices,
    J,
    D,
    EPS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    dv = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for k in range(0, n_slices):
        dv += _load_jd(part_ptr, b * n_slices + k, J, D, BLOCK_J, BLOCK_D)
    s = _load_jd(S_ptr, (t - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
    _store_jd(G_ptr, (t - 1) * B + b, _squash_bwd(s, dv, EPS), J, D, BLOCK_J, BLOCK_D)


# Backward pass for dL/dv_{t-1} (full gradient only; t = T..2, one launch each).
#   computes  part[b, k] = sum_{i in slice k} Bbar_{t-1}[i, :] u[b, i, :, :]
#             Bbar_{t-1} = dL/db_{t-1} = P_t + ... + P_T, P_tau = softmax_bwd(c_tau, <u, G_tau>),
#             c_tau recomputed from u and Vs[tau-1], G_tau read from G (already final for tau >= t)
#   grid      (B, n_slices), as the forward pass
#   saves     nothing
@triton.jit
def _route_bwd_pass_kernel(
    u_ptr,
    Vs_ptr,
    G_ptr,
    part_ptr,
    t,
    T,
    B,
    I,
    J,
    D,
    slice_len,
    n_chunks,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    dv = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        u = _load_u_tile(
            u_ptr, b, k * slice_len + chunk * BLOCK_I, I, J, D, BLOCK_I, BLOCK_J, BLOCK_D
        )
        Bbar = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for tau in range(t, T + 1):
            V = _load_jd(Vs_ptr, (tau - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
            G = _load_jd(G_ptr, (tau - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
            Bbar += _softmax_bwd(_coupling(u, V, J, BLOCK_J), u, G)
        dv += tl.sum(Bbar[:, :, None] * u, axis=0)
    _store_jd(part_ptr, b * tl.num_programs(1) + k, dv, J, D, BLOCK_J, BLOCK_D)


# Backward pass that writes du (last launch of the backward).
#   computes  du[i, j] = sum_{t >= t_first} c_t[i, j] G_t[j] + Bbar_t[i, j] v_t[j],
#             walking t = T..t_first with Bbar_t = P_{t+1} + ... + P_T accumulated on the way
#             (Bbar_T = 0); v_t = squash(S[t-1]) recomputed. t_first = 1 is the full gradient,
#             t_first = T is detach_inner (du = c_T G_T).
#   grid      (B, n_slices), as the forward pass
#   saves     nothing; du written in du's dtype
@triton.jit
def _route_bwd_du_kernel(
    u_ptr,
    S_ptr,
    Vs_ptr,
    G_ptr,
    du_ptr,
    t_first,
    T,
    B,
    I,
    J,
    D,
    slice_len,
    n_chunks,
    EPS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1)
    for chunk in range(0, n_chunks):
        i0 = k * slice_len + chunk * BLOCK_I
        u = _load_u_tile(u_ptr, b, i0, I, J, D, BLOCK_I, BLOCK_J, BLOCK_D)
        du = tl.zeros((BLOCK_I, BLOCK_J, BLOCK_D), dtype=tl.float32)
        Bbar = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for step in range(0, T - t_first + 1):
            t = T - step
            V = _load_jd(Vs_ptr, (t - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
            G = _load_jd(G_ptr, (t - 1) * B + b, J, D, BLOCK_J, BLOCK_D)
            v = _squash(_load_jd(S_ptr, (t - 1) * B + b, J, D, BLOCK_J, BLOCK_D), EPS)
            c = _coupling(u, V, J, BLOCK_J)
            du += c[:, :, None] * G[None, :, :] + Bbar[:, :, None] * v[None, :, :]
            Bbar += _softmax_bwd(c, u, G)
        _store_u_tile(du_ptr, du, b, i0, I, J, D, BLOCK_I, BLOCK_J, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """True when these kernels run under the Triton interpreter (TRITON_INTERPRET=1 was set
    before triton was first imported)."""
    return interpreted(_route_fwd_pass_kernel)


_alloc = buffer  # outputs and scratch: NaN-filled under CAPSFAST_POISON=1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 1  # the interpreter runs programs one after another: fewer, larger ones are faster


def _tiling(B: int, I: int, J: int, D: int, device: torch.device) -> dict:
    """Tile sizes and the (sample, i-slice) grid.

    BLOCK_J, BLOCK_D: J and D padded to powers of two (masked). BLOCK_I: rows of i per tile, so
    that a [BLOCK_I, BLOCK_J, BLOCK_D] fp32 tile is about 2K values on the GPU (a few registers per
    thread per live tile) and larger under the interpreter. n_slices: i-slices per sample, enough
    for B * n_slices to fill the GPU; each program walks n_chunks tiles of its slice.
    """
    BLOCK_J = triton.next_power_of_2(J)
    BLOCK_D = triton.next_power_of_2(D)
    tile_values = 2048 if device.type == "cuda" else 32768
    BLOCK_I = _env_int("CAPSFAST_ROUTING_BLOCK_I") or max(1, tile_values // (BLOCK_J * BLOCK_D))
    if BLOCK_I & (BLOCK_I - 1):
        raise ValueError(f"CAPSFAST_ROUTING_BLOCK_I must be a power of two, got {BLOCK_I}")
    BLOCK_I = min(BLOCK_I, triton.next_power_of_2(I))
    n_blocks = triton.cdiv(I, BLOCK_I)
    n_slices = _env_int("CAPSFAST_ROUTING_SLICES") or triton.cdiv(_target_programs(device), B)
    n_slices = min(n_slices, n_blocks)
    n_chunks = triton.cdiv(n_blocks, n_slices)
    n_slices = triton.cdiv(n_blocks, n_chunks)  # no empty slice
    return dict(
        BLOCK_I=BLOCK_I,
        BLOCK_J=BLOCK_J,
        BLOCK_D=BLOCK_D,
        n_slices=n_slices,
        n_chunks=n_chunks,
        slice_len=n_chunks * BLOCK_I,
    )


_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(u_hat: torch.Tensor, bias: torch.Tensor | None, iterations: int) -> None:
    if u_hat.dim() != 4:
        raise ValueError(f"route_triton: u_hat must be [B, I, J, D]; got {tuple(u_hat.shape)}")
    if u_hat.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"route_triton: u_hat dtype {u_hat.dtype} is not supported (float32, bfloat16, "
            "float16; the kernels compute in float32). Use impl='torch' for float64."
        )
    if iterations < 1:
        raise ValueError(f"route_triton: iterations must be >= 1, got {iterations}")
    if min(u_hat.shape[1:]) < 1:
        raise ValueError(f"route_triton: I, J and D must be >= 1; got {tuple(u_hat.shape)}")
    if bias is not None:
        if tuple(bias.shape) != tuple(u_hat.shape[2:]):
            raise ValueError(
                f"route_triton: bias must be [J, D] = {list(u_hat.shape[2:])}, "
                f"got {list(bias.shape)}"
            )
        if bias.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"route_triton: bias dtype {bias.dtype} is not supported")
        if bias.device != u_hat.device:
            raise ValueError(f"route_triton: bias is on {bias.device}, u_hat on {u_hat.device}")
    _check_device(u_hat.device)


def _check_device(device: torch.device) -> None:
    check_device(device, _route_fwd_pass_kernel, "route_triton", "impl='torch'")


def _route_forward(u_hat, bias, iterations):
    """Launch the forward passes; returns v (u_hat's dtype), S and Vs ([T, B, J, D] fp32)."""
    _check_inputs(u_hat, bias, iterations)
    u = u_hat.contiguous()
    B, I, J, D = u.shape
    T = iterations
    dev = u.device
    tiles = _tiling(B, I, J, D, dev)
    ns = tiles["n_slices"]
    out = _alloc((B, J, D), u.dtype, dev)
    S = _alloc((T, B, J, D), torch.float32, dev)
    Vs = _alloc((T, B, J, D), torch.float32, dev)
    Vs[0].zero_()
    part = _alloc((B, ns, J, D), torch.float32, dev)
    beta = bias.contiguous() if bias is not None else S  # S: a placeholder pointer, never read
    if B == 0:
        return out, S, Vs
    for t in range(1, T + 1):
        _route_fwd_pass_kernel[(B, ns)](
            u,
            Vs,
            part,
            t,
            B,
            I,
            J,
            D,
            tiles["slice_len"],
            tiles["n_chunks"],
            BLOCK_I=tiles["BLOCK_I"],
            BLOCK_J=tiles["BLOCK_J"],
            BLOCK_D=tiles["BLOCK_D"],
        )
        _route_fwd_finalize_kernel[(B,)](
            part,
            beta,
            S,
            Vs,
            out,
            t,
            T,
            B,
            ns,
            J,
            D,
            HAS_BIAS=bias is not None,
            EPS=SQUASH_EPS,
            BLOCK_J=tiles["BLOCK_J"],
            BLOCK_D=tiles["BLOCK_D"],
        )
    return out, S, Vs


def _route_backward(grad_v, u_hat, S, Vs, detach_inner):
    """Launch the backward passes; returns du (u_hat's dtype) and d(bias) (fp32, [J, D])."""
    u = u_hat.contiguous()
    B, I, J, D = u.shape
    T = S.shape[0]
    dev = u.device
    _check_device(dev)
    tiles = _tiling(B, I, J, D, dev)
    ns = tiles["n_slices"]
    grid = (B, ns)
    blocks = dict(BLOCK_J=tiles["BLOCK_J"], BLOCK_D=tiles["BLOCK_D"])
    G = _alloc((T, B, J, D), torch.float32, dev)
    du = _alloc((B, I, J, D), u.dtype, dev)
    if B == 0:
        return du, torch.zeros((J, D), dtype=torch.float32, device=dev)
    # G_T = squash_bwd(s_T, dL/dv_T): the incoming gradient is the single "partial" per sample.
    _route_bwd_finalize_kernel[(B,)](
        grad_v.contiguous(), S, G, T, B, 1, J, D, EPS=SQUASH_EPS, **blocks
    )
    t_first = T if detach_inner else 1
    if t_first < T:
        part = _alloc((B, ns, J, D), torch.float32, dev)
        for t in range(T, 1, -1):  # dL/dv_{t-1}, then G_{t-1}
            _route_bwd_pass_kernel[grid](
                u,
                Vs,
                G,
                part,
                t,
                T,
                B,
                I,
                J,
                D,
                tiles["slice_len"],
                tiles["n_chunks"],
                BLOCK_I=tiles["BLOCK_I"],
                **blocks,
            )
            _route_bwd_finalize_kernel[(B,)](
                part, S, G, t - 1, B, ns, J, D, EPS=SQUASH_EPS, **blocks
            )
    _route_bwd_du_kernel[grid](
        u,
        S,
        Vs,
        G,
        du,
        t_first,
        T,
        B,
        I,
        J,
        D,
        tiles["slice_len"],
        tiles["n_chunks"],
        EPS=SQUASH_EPS,
        BLOCK_I=tiles["BLOCK_I"],
        **blocks,
    )
    dbias = G[t_first - 1 :].sum(dim=(0, 1))  # d(bias) = sum over iterations and batch of G_t
    return du, dbias


# ---------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("capsfast::route", mutates_args=())
def route_op(
    u_hat: torch.Tensor, bias: torch.Tensor | None, iterations: int, detach_inner: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [B, J, D] (u_hat's dtype), and for the backward S (s_t) and Vs (V_{t-1}), [T, B, J, D]
    fp32. detach_inner does not change the forward; it is an argument for the backward."""
    return _route_forward(u_hat, bias, iterations)


@route_op.register_fake
def _route_fake(u_hat, bias, iterations, detach_inner):
    B, _, J, D = u_hat.shape
    state = u_hat.new_empty((iterations, B, J, D), dtype=torch.float32)
    return u_hat.new_empty((B, J, D)), state, torch.empty_like(state)


@torch.library.custom_op("capsfast::route_backward", mutates_args=())
def route_backward_op(
    grad_v: torch.Tensor,
    u_hat: torch.Tensor,
    S: torch.Tensor,
    Vs: torch.Tensor,
    detach_inner: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """du [B, I, J, D] (u_hat's dtype) and d(bias) [J, D] (fp32) from dL/dv [B, J, D]."""
    return _route_backward(grad_v, u_hat, S, Vs, detach_inner)


@route_backward_op.register_fake
def _route_backward_fake(grad_v, u_hat, S, Vs, detach_inner):
    return torch.empty_like(u_hat), u_hat.new_empty(u_hat.shape[2:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    u_hat, bias, _iterations, detach_inner = inputs
    _v, S, Vs = output
    ctx.save_for_backward(u_hat, S, Vs)
    ctx.detach_inner = detach_inner
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_v, _grad_S, _grad_Vs):
    u_hat, S, Vs = ctx.saved_tensors
    du, dbias = route_backward_op(grad_v, u_hat, S, Vs, ctx.detach_inner)
    dbias = None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)
    return du, dbias, None, None


route_op.register_autograd(_backward, setup_context=_setup_context)

# Autocast: no autocast kernel is registered on purpose. Autocast's fallthrough then calls the op
# with its inputs as they are (bf16 u_hat stays bf16, an fp32 bias stays fp32), exactly as the
# reference does: it computes in fp32 internally and returns u_hat's dtype. Casting the inputs
# (torch.library.register_autocast) would change the output dtype and the bytes read.


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
    """
    _check_inputs(u_hat, bias, int(iterations))
    v, _S, _Vs = route_op(u_hat, bias, int(iterations), bool(detach_inner))
    return v


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
    return True, f"triton routing runs on {device}" + (" (interpreter)" if is_interpreted() else "")


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
        if not is_interpreted():
            return False, "Triton runs on CPU only under its interpreter (TRITON_INTERPRET=1)"
    else:
        return False, f"Triton routing does not support device type {device.type!r}"
    if not probe:
        return True, f"triton routing should run on {device} (not probed)"
    return _probe(device)
