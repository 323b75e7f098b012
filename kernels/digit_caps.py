"""DigitCaps fused: the pose transform u_hat = W u formed on chip inside the routing kernels.

    v = digit_caps_fused(u [B, I, Din], W [I, J, D, Din], iterations, bias=None | [J, D])

u_hat[b, i, j, d] = sum_k W[i, j, d, k] u[b, i, k] is never stored: every pass over the input
capsules rebuilds its tile of u_hat from W and u in registers (Din multiply-adds per element), so
device memory sees only u, W, v, du, dW and a few [B, J, D] tensors. The recurrences are those of
../shared/ROUTING.md (forward, full-gradient backward, detach_inner backward):

    forward, t = 1..T (one pass over i each, then a tiny finishing step per sample)
        c_t[i,j]  = softmax_j <u_hat[i,j], V_{t-1}[j]>        # V_{t-1} = v_1 + ... + v_{t-1}
        s_t[j]    = sum_i c_t[i,j] u_hat[i,j] + beta[j];  v_t = squash(s_t);  V_t = V_{t-1} + v_t
    backward (full gradient), G_t = squash_bwd(s_t, dL/dv_t):
        gamma_t[i,j] = <u_hat[i,j], G_t[j]>;   P_t = c_t (gamma_t - sum_j c_t gamma_t)
        dL/dv_{t-1}[j] = sum_i (P_t + ... + P_T)[i,j] u_hat[i,j]          # passes t = T..2
        dL/du_hat[i,j] = sum_t c_t[i,j] G_t[j] + P_t[i,j] V_{t-1}[j]      # last pass
    backward (detach_inner): dL/du_hat = c_T G_T
    then du[b,i,k] = sum_{j,d} W[i,j,d,k] dL/du_hat[b,i,j,d]   (on chip, per sample)
         dW[i,j,d,k] = sum_b dL/du_hat[b,i,j,d] u[b,i,k]       (fp32 registers, whole batch)
         dbeta = sum_{b,t} G_t  (detach_inner: sum_b G_T)

(The logit term of dL/du_hat is ROUTING.md's sum_{t<T} Bbar_t v_t regrouped: b_{t-1} = <u_hat,
V_{t-1}>, so P_t V_{t-1} summed over t is the same sum, computed in one forward sweep over t.)

Grid of the routing passes (forward t = 1..T, backward t = T..2): (i-slice, sample block). A
program owns I_PER_PROG input capsules and BLOCK_B samples; it walks its i-slice in chunks of
BLOCK_I, loads each chunk of W once and applies it to all BLOCK_B samples at once, so W is read
once per sample block per pass (not once per sample). The [J, D] sums over i are written per
i-slice to a partials buffer [n_slices, B, J, D] and summed in a fixed order by a small
finishing kernel (one program per block of samples): deterministic, no atomics.
Grid of the last backward pass: (i-slice,). There is no sum over i left (du is per (b, i)), only
dW's sum over the batch, so a program owns an i-slice and walks every sample block for each
chunk, accumulating the chunk's dW in fp32 registers and writing it once: no partials for dW.

All arithmetic is fp32 whatever the input dtypes (loads are upcast); v comes back in u's dtype,
du in u's, dW in W's and dbeta in bias's dtype, so an fp32 master W works with bf16/fp16 u.
Din is at most 16 and the contraction over it is a static loop of broadcast multiply-adds: no
tl.dot (Din = 8 is under its GPU minimum of 16, and fp32 tl.dot would be TF32).

Saved for backward: s_t and V_{t-1} for every t, [T, B, J, D] fp32 each; u, W, bias themselves.

Wrapped as the custom op capsfast::digit_caps (+ capsfast::digit_caps_backward) with fake and
autograd registrations, so it passes torch.library.opcheck and torch.compile. On CPU it runs only
under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

# ruff: noqa: E741  (B, I, J, D, Din: the sizes as ROUTING.md and SPEC.md name them)

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from capsfast.kernels.common import buffer, check_device, interpreted, sm_count
from torch import Tensor

MAX_JD = 32  # J and D up to 32 each
MAX_DIN = 16
_SQUASH_EPS = 1e-8  # capsfast.routing.SQUASH_EPS

# ----------------------------------------------------------------------------------------------
# Small on-chip helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pose_tile(
    u_ptr, W_ptr, offs_b, offs_i, offs_j, offs_d, b_ok, i_ok, j_ok, d_ok, I, J, D,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr,
    DP: tl.constexpr,
):  # fmt: skip
    """u_hat[b, i, j, d] = sum_k W[i, j, d, k] u[b, i, k] for a [BLOCK_B, BLOCK_I, JP, DP] tile,
    in fp32 registers; zero outside the valid (b, i, j, d) range."""
    w_rows = ((offs_i[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]) * K
    w_ok = i_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :]
    u_rows = (offs_b[:, None] * I + offs_i[None, :]) * K
    u_ok = b_ok[:, None] & i_ok[None, :]
    u_hat = tl.zeros((BLOCK_B, BLOCK_I, JP, DP), dtype=tl.float32)
    for k in tl.static_range(K):
        w_k = tl.load(W_ptr + w_rows + k, mask=w_ok, other=0.0).to(tl.float32)  # [BI, JP, DP]
        u_k = tl.load(u_ptr + u_rows + k, mask=u_ok, other=0.0).to(tl.float32)  # [BB, BI]
        u_hat += w_k[None, :, :, :] * u_k[:, :, None, None]
    return u_hat


@triton.jit
def _coupling(u_hat, V, j_ok):
    """c[b, i, j] = softmax_j <u_hat[b, i, j], V[b, j]>: the routing logits recomputed from the
    running sum V of the outputs (never stored). Padded j get c = 0."""
    logits = tl.sum(u_hat * V[:, None, :, :], axis=3)
    logits = tl.where(j_ok[None, None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    return e / tl.sum(e, axis=2)[:, :, None]


@triton.jit
def _softmax_bwd(c, u_hat, G):
    """P[b, i, j] = c (gamma - sum_j c gamma), gamma = <u_hat, G>: dL/dlogits of one iteration."""
    gamma = tl.sum(u_hat * G[:, None, :, :], axis=3)
    return c * (gamma - tl.sum(c * gamma, axis=2)[:, :, None])


@triton.jit
def _squash(s, EPS: tl.constexpr):
    """v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) over the last axis (capsfast.squash)."""
    n2 = tl.sum(s * s, axis=2)[:, :, None]
    return (n2 / (1.0 + n2)) * s / tl.sqrt(n2 + EPS)


@triton.jit
def _squash_bwd(s, g, EPS: tl.constexpr):
    """dL/ds for v = f(n2) s with f = n2 / ((1 + n2) sqrt(n2 + eps)):
    f g + 2 f'(n2) <s, g> s, with f' = a r (a - n2 r^2 / 2), a = 1/(1 + n2), r = 1/sqrt(n2 + eps).
    Finite at s = 0 (the eps of capsfast.squash), equal to autograd through it."""
    n2 = tl.sum(s * s, axis=2)[:, :, None]
    a = 1.0 / (1.0 + n2)
    r = 1.0 / tl.sqrt(n2 + EPS)
    f = n2 * a * r
    df = a * r * (a - 0.5 * n2 * r * r)
    sg = tl.sum(s * g, axis=2)[:, :, None]
    return f * g + 2.0 * df * sg * s


@triton.jit
def _jd_block(ptr, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D):
    """Load a [BLOCK, JP, DP] block of a contiguous [B, J, D] tensor as fp32 (0 outside)."""
    offs = (offs_b[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]
    ok = b_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :]
    return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _jd_store(ptr, x, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D):
    """Store a [BLOCK, JP, DP] block into a contiguous [B, J, D] tensor (cast to its dtype)."""
    offs = (offs_b[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]
    ok = b_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


# Forward pass t over the input capsules.
#   computes  partial[n, b, j, d] = sum_{i in slice n} c_t[b,i,j] u_hat[b,i,j,d],
#             c_t = softmax_j <u_hat, V_{t-1}>, u_hat formed on chip from W and u.
#   grid      (n_slices, n_sample_blocks); program (n, m) owns i in [n*I_PER_PROG, ...) in chunks
#             of BLOCK_I and samples [m*BLOCK_B, ...); each W chunk is loaded once for the block.
#   saves     nothing: the partials go to _fwd_finish_kernel.
@triton.jit
def _fwd_pass_kernel(
    u_ptr, W_ptr, Vprev_ptr, part_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr,
    DP: tl.constexpr,
):  # fmt: skip
    slice_id = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_b = offs_b.to(tl.int64)
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    j_ok = offs_j < J
    d_ok = offs_d < D
    i_lo = slice_id * I_PER_PROG
    i_hi = tl.minimum(i_lo + I_PER_PROG, I)

    V = _jd_block(Vprev_ptr, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)  # [BB, JP, DP]
    s = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        offs_i = i_lo + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = offs_i < i_hi
        u_hat = _pose_tile(
            u_ptr, W_ptr, offs_b, offs_i, offs_j, offs_d, b_ok, i_ok, j_ok, d_ok, I, J, D,
            K, BLOCK_B, BLOCK_I, JP, DP,
        )  # fmt: skip
        c = _coupling(u_hat, V, j_ok)  # [BB, BI, JP]
        s += tl.sum(c[:, :, :, None] * u_hat, axis=1)
    _jd_store(part_ptr + slice_id * B * J * D, s, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)


# Forward finishing step of iteration t, per sample.
#   computes  s_t = sum_n partial[n] + beta;  v_t = squash(s_t);  V_t = V_{t-1} + v_t
#             (the last iteration writes v_T to the output in its dtype instead of V_T).
#   grid      (cdiv(B, BLOCK_B),); the partials are summed in slice order: deterministic.
#   saves     s_t into s_all[t-1] and V_t into Vprev_all[t] (the state the next pass reads).
@triton.jit
def _fwd_finish_kernel(
    part_ptr, N_PARTS, bias_ptr, Vprev_ptr, Vnext_ptr, s_ptr, v_ptr, B, J, D,
    HAS_BIAS: tl.constexpr, LAST: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr,
    JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_b = offs_b.to(tl.int64)
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    j_ok = offs_j < J
    d_ok = offs_d < D
    s = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for n in range(N_PARTS):
        s += _jd_block(part_ptr + n * B * J * D, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
    if HAS_BIAS:
        beta_offs = offs_j[:, None] * D + offs_d[None, :]
        beta_ok = j_ok[:, None] & d_ok[None, :]
        s += tl.load(bias_ptr + beta_offs, mask=beta_ok, other=0.0).to(tl.float32)[None, :, :]
    _jd_store(s_ptr, s, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
    v = _squash(s, EPS)
    if LAST:
        _jd_store(v_ptr, v, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
    else:
        V = _jd_block(Vprev_ptr, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
        _jd_store(Vnext_ptr, V + v, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


# Backward finishing step, per sample:  G_t = squash_bwd(s_t, dL/dv_t),
#   dL/dv_t = sum_n partial[n] (for t = T the partials are the incoming gradient itself, N_PARTS=1).
#   grid      (cdiv(B, BLOCK_B),)
#   saves     G_t into G_all[t-1], read by the later passes.
@triton.jit
def _bwd_finish_kernel(
    part_ptr, N_PARTS, s_ptr, G_ptr, B, J, D,
    EPS: tl.constexpr, BLOCK_B: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_b = offs_b.to(tl.int64)
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    j_ok = offs_j < J
    d_ok = offs_d < D
    dv = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for n in range(N_PARTS):
        dv += _jd_block(part_ptr + n * B * J * D, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
    s = _jd_block(s_ptr, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
    G = _squash_bwd(s, dv, EPS)
    _jd_store(G_ptr, G, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)


# Backward reduction pass for step t (t = T..2) of the full gradient.
#   computes  partial[n, b, j, d] = sum_{i in slice n} Bbar_{t-1}[b,i,j] u_hat[b,i,j,d],
#             Bbar_{t-1} = P_t + ... + P_T = dL/d(logits b_{t-1}); c_tau and P_tau recomputed
#             from u_hat (on chip), V_{tau-1} and G_tau for tau >= t.
#   grid      (n_slices, n_sample_blocks), as the forward pass.
#   saves     nothing: _bwd_finish_kernel turns the partials into G_{t-1}.
@triton.jit
def _bwd_pass_kernel(
    u_ptr, W_ptr, Vprev_ptr, G_ptr, part_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    t: tl.constexpr, T: tl.constexpr, K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_I: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    slice_id = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_b = offs_b.to(tl.int64)
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    j_ok = offs_j < J
    d_ok = offs_d < D
    i_lo = slice_id * I_PER_PROG
    i_hi = tl.minimum(i_lo + I_PER_PROG, I)
    BJD = B * J * D

    dv = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        offs_i = i_lo + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = offs_i < i_hi
        u_hat = _pose_tile(
            u_ptr, W_ptr, offs_b, offs_i, offs_j, offs_d, b_ok, i_ok, j_ok, d_ok, I, J, D,
            K, BLOCK_B, BLOCK_I, JP, DP,
        )  # fmt: skip
        Bbar = tl.zeros((BLOCK_B, BLOCK_I, JP), dtype=tl.float32)
        for tau in tl.static_range(t - 1, T):  # iterations t..T (0-based index tau)
            V = _jd_block(Vprev_ptr + tau * BJD, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
            G = _jd_block(G_ptr + tau * BJD, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
            c = _coupling(u_hat, V, j_ok)
            Bbar += _softmax_bwd(c, u_hat, G)
        dv += tl.sum(Bbar[:, :, :, None] * u_hat, axis=1)
    _jd_store(part_ptr + slice_id * BJD, dv, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)


# Last backward pass: gradients of u and W through the on-chip u_hat.
#   computes  du_hat = sum_t c_t G_t + P_t V_{t-1}  (DETACH: c_T G_T only), then per sample
#             du[b,i,k] = sum_{j,d} W[i,j,d,k] du_hat[b,i,j,d]    (written in u's dtype)
#             and  dW[i,j,d,k] = sum_b du_hat[b,i,j,d] u[b,i,k], accumulated in fp32 registers
#             for the program's chunk of i over the whole batch: never a [B, I, J, D, Din]
#             temporary, no partials, each dW element written once (in W's dtype).
#   grid      (n_slices,): a program owns an i-slice and, for each chunk of it, walks ALL
#             samples in blocks of BLOCK_B (the W chunk stays cache-resident across them).
#   saves     nothing.
@triton.jit
def _pose_grad_kernel(
    u_ptr, W_ptr, Vprev_ptr, G_ptr, du_ptr, dW_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS, N_BLOCKS,
    T: tl.constexpr, TAU0: tl.constexpr, DETACH: tl.constexpr, K: tl.constexpr,
    KP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr,
    DP: tl.constexpr,
):  # fmt: skip
    slice_id = tl.program_id(0)
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    offs_k = tl.arange(0, KP)
    j_ok = offs_j < J
    d_ok = offs_d < D
    i_lo = slice_id * I_PER_PROG
    i_hi = tl.minimum(i_lo + I_PER_PROG, I)
    BJD = B * J * D

    for chunk in range(N_CHUNKS):
        offs_i = i_lo + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = offs_i < i_hi
        w_rows = (offs_i[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]
        w_rows = w_rows * K
        w_ok = i_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :]
        dW = tl.zeros((BLOCK_I, JP, DP, KP), dtype=tl.float32)
        for blk in range(N_BLOCKS):
            offs_b = blk * BLOCK_B + tl.arange(0, BLOCK_B)
            b_ok = offs_b < B
            offs_b = offs_b.to(tl.int64)
            u_hat = _pose_tile(
                u_ptr, W_ptr, offs_b, offs_i, offs_j, offs_d, b_ok, i_ok, j_ok, d_ok, I, J, D,
                K, BLOCK_B, BLOCK_I, JP, DP,
            )  # fmt: skip
            du_hat = tl.zeros((BLOCK_B, BLOCK_I, JP, DP), dtype=tl.float32)
            for tau in tl.static_range(TAU0, T):  # TAU0 = T-1 under DETACH, else 0
                V = _jd_block(Vprev_ptr + tau * BJD, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
                G = _jd_block(G_ptr + tau * BJD, offs_b, b_ok, offs_j, offs_d, j_ok, d_ok, J, D)
                c = _coupling(u_hat, V, j_ok)
                du_hat += c[:, :, :, None] * G[:, None, :, :]  # through s_tau = sum_i c u_hat
                if not DETACH:  # through the logits <u_hat, V_{tau-1}> of iteration tau
                    du_hat += _softmax_bwd(c, u_hat, G)[:, :, :, None] * V[:, None, :, :]

            # Back through u_hat = W u, one input dimension k at a time.
            u_rows = (offs_b[:, None] * I + offs_i[None, :]) * K
            u_ok = b_ok[:, None] & i_ok[None, :]
            for k in tl.static_range(K):
                w_k = tl.load(W_ptr + w_rows + k, mask=w_ok, other=0.0).to(tl.float32)
                du_k = tl.sum(tl.sum(du_hat * w_k[None, :, :, :], axis=3), axis=2)  # [BB, BI]
                tl.store(du_ptr + u_rows + k, du_k.to(du_ptr.dtype.element_ty), mask=u_ok)
                u_k = tl.load(u_ptr + u_rows + k, mask=u_ok, other=0.0).to(tl.float32)
                dW_k = tl.sum(du_hat * u_k[:, :, None, None], axis=0)  # [BI, JP, DP]
                dW += tl.where(
                    (offs_k == k)[None, None, None, :], dW_k[:, :, :, None], 0.0
                )  # column k
        dW_offs = w_rows[:, :, :, None] + offs_k[None, None, None, :]
        dW_ok = w_ok[:, :, :, None] & (offs_k < K)[None, None, None, :]
        tl.store(dW_ptr + dW_offs, dW.to(dW_ptr.dtype.element_ty), mask=dW_ok)


# Sum over rows: out[n] = sum_r x[r, n] in fp32, stored in out's dtype (fixed order).
#   used for dbeta (rows = iterations x samples of G_t).
#   grid      (cdiv(N, BLOCK_N),)
@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, R, N, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(R):
        acc += tl.load(x_ptr + r * N + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Host side: tiles, buffers, launches
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    """True when the kernels above were built for the Triton interpreter (CPU)."""
    return interpreted(_fwd_pass_kernel)


_buffer = buffer  # NaN-filled under CAPSFAST_POISON=1, so an unwritten element shows up


def _tiles(B: int, I: int, J: int, D: int, device: torch.device) -> dict:
    """Launch geometry. A tile is [BLOCK_B samples, BLOCK_I inputs, J, D] in registers; a program
    of the routing passes owns I_PER_PROG inputs and one sample block; a program of the last
    backward pass owns I_PER_PROG_FINAL inputs and every sample.
    CAPSFAST_FUSED_TILES overrides the choice (tests use it): "block_b,block_i,i_per_prog" sets
    the tiles, "gpu:<SMs>" picks the GPU geometry for a device with that many SMs."""
    JP, DP = triton.next_power_of_2(J), triton.next_power_of_2(D)
    override = os.environ.get("CAPSFAST_FUSED_TILES", "")
    if override.startswith("gpu:"):
        return _gpu_tiles(B, I, JP, DP, sms=int(override[4:]))
    if override:
        block_b, block_i, i_per_prog = (int(x) for x in override.split(","))
        block_b_final, i_per_prog_final = block_b, i_per_prog
    elif _interpreting():
        # The interpreter pays per operation, not per element: few, large tiles.
        block_b = block_b_final = min(triton.next_power_of_2(B), 16)
        block_i = min(triton.next_power_of_2(I), max(1, 2**15 // (block_b * JP * DP)))
        i_per_prog = i_per_prog_final = block_i
    else:
        return _gpu_tiles(B, I, JP, DP, sms=sm_count(device))
    return _geometry(B, I, JP, DP, block_b, block_i, i_per_prog, block_b_final, i_per_prog_final)


def _gpu_tiles(B: int, I: int, JP: int, DP: int, sms: int) -> dict:
    """GPU geometry (a first guess, not tuned on hardware): tiles of 2048 fp32 values per tensor
    in the routing passes and 1024 in the last pass (which also holds du_hat and the dW
    accumulator), the sizes at which ptxas -v for sm_90 shows (next to) no spills at the paper
    shape with 4 warps. Routing passes: enough i-slices that slices x sample blocks give ~2
    programs per SM, at most 32 (the [slices, B, J, D] partials stay small and L2-resident).
    Last pass: its programs walk the whole batch; ~4 programs per SM."""
    block_b = min(triton.next_power_of_2(B), max(1, min(8, 2048 // (JP * DP))))
    block_i = min(triton.next_power_of_2(I), max(1, 2048 // (block_b * JP * DP)))
    n_chunks = triton.cdiv(I, block_i)
    n_slices = min(n_chunks, max(1, min(32, triton.cdiv(2 * sms, triton.cdiv(B, block_b)))))
    i_per_prog = triton.cdiv(n_chunks, n_slices) * block_i
    i_per_prog_final = triton.cdiv(n_chunks, 4 * sms) * block_i
    block_b_final = max(1, block_b // 2)
    return _geometry(B, I, JP, DP, block_b, block_i, i_per_prog, block_b_final, i_per_prog_final)


def _geometry(B, I, JP, DP, block_b, block_i, i_per_prog, block_b_final, i_per_prog_final):
    block_b = triton.next_power_of_2(block_b)
    block_b_final = triton.next_power_of_2(block_b_final)
    block_i = triton.next_power_of_2(block_i)
    i_per_prog = triton.cdiv(max(i_per_prog, block_i), block_i) * block_i
    i_per_prog_final = triton.cdiv(max(i_per_prog_final, block_i), block_i) * block_i
    return dict(
        BLOCK_B=block_b,
        BLOCK_I=block_i,
        I_PER_PROG=i_per_prog,
        N_CHUNKS=i_per_prog // block_i,
        n_slices=triton.cdiv(I, i_per_prog),
        n_blocks=triton.cdiv(B, block_b),
        BLOCK_B_FINAL=block_b_final,
        I_PER_PROG_FINAL=i_per_prog_final,
        n_slices_final=triton.cdiv(I, i_per_prog_final),
        n_blocks_final=triton.cdiv(B, block_b_final),
        JP=JP,
        DP=DP,
    )


def _finish_block(B: int, JP: int, DP: int) -> int:
    return max(1, min(triton.next_power_of_2(B), 4096 // (JP * DP)))


def _device_of(u: Tensor):
    """Launch on u's GPU even when another one is current."""
    return torch.cuda.device(u.device) if u.device.type == "cuda" else contextlib.nullcontext()


def _check_device(u: Tensor) -> None:
    check_device(u.device, _fwd_pass_kernel, "digit_caps_fused", "digit_caps(..., impl='torch')")


def _forward(u: Tensor, W: Tensor, bias: Tensor | None, T: int):
    _check_device(u)
    B, I, K = u.shape
    J, D = W.shape[1], W.shape[2]
    g = _tiles(B, I, J, D, u.device)
    f32, dev = torch.float32, u.device
    part = _buffer((g["n_slices"], B, J, D), f32, dev)
    s_all = _buffer((T, B, J, D), f32, dev)
    Vprev = _buffer((T, B, J, D), f32, dev)
    Vprev[0].zero_()  # V_0 = 0: uniform coupling in the first iteration
    v = _buffer((B, J, D), u.dtype, dev)
    fb = _finish_block(B, g["JP"], g["DP"])
    tiles = dict(BLOCK_B=g["BLOCK_B"], BLOCK_I=g["BLOCK_I"], JP=g["JP"], DP=g["DP"])
    for t in range(1, T + 1):
        _fwd_pass_kernel[(g["n_slices"], g["n_blocks"])](
            u, W, Vprev[t - 1], part, B, I, J, D, g["I_PER_PROG"], g["N_CHUNKS"], K=K, **tiles
        )
        last = t == T
        _fwd_finish_kernel[(triton.cdiv(B, fb),)](
            part, g["n_slices"], bias if bias is not None else part, Vprev[t - 1],
            Vprev[t - 1] if last else Vprev[t], s_all[t - 1], v, B, J, D,
            HAS_BIAS=bias is not None, LAST=last, EPS=_SQUASH_EPS, BLOCK_B=fb, JP=g["JP"],
            DP=g["DP"],
        )  # fmt: skip
    return v, s_all, Vprev


def _sum_rows(x: Tensor, out: Tensor) -> Tensor:
    R, N = x.shape[0], out.numel()
    block = 2**15 if _interpreting() else 1024
    _sum_rows_kernel[(triton.cdiv(N, block),)](x, out, R, N, BLOCK_N=block)
    return out


def _backward(grad_v, u, W, bias, s_all, Vprev, T: int, detach_inner: bool):
    _check_device(u)
    B, I, K = u.shape
    J, D = W.shape[1], W.shape[2]
    g = _tiles(B, I, J, D, u.device)
    f32, dev = torch.float32, u.device
    grid = (g["n_slices"], g["n_blocks"])
    tiles = dict(BLOCK_B=g["BLOCK_B"], BLOCK_I=g["BLOCK_I"], JP=g["JP"], DP=g["DP"])
    fb = _finish_block(B, g["JP"], g["DP"])
    G = _buffer((T, B, J, D), f32, dev)  # G_t = dL/ds_t (detach_inner: only G_T is written)

    # G_T from the incoming gradient (a single "partial").
    _bwd_finish_kernel[(triton.cdiv(B, fb),)](
        grad_v.contiguous(), 1, s_all[T - 1], G[T - 1], B, J, D,
        EPS=_SQUASH_EPS, BLOCK_B=fb, JP=g["JP"], DP=g["DP"],
    )  # fmt: skip
    if not detach_inner:
        part = _buffer((g["n_slices"], B, J, D), f32, dev)
        for t in range(T, 1, -1):  # dL/dv_{t-1}, then G_{t-1}
            _bwd_pass_kernel[grid](
                u, W, Vprev, G, part, B, I, J, D, g["I_PER_PROG"], g["N_CHUNKS"],
                t=t, T=T, K=K, **tiles,
            )  # fmt: skip
            _bwd_finish_kernel[(triton.cdiv(B, fb),)](
                part, g["n_slices"], s_all[t - 2], G[t - 2], B, J, D,
                EPS=_SQUASH_EPS, BLOCK_B=fb, JP=g["JP"], DP=g["DP"],
            )  # fmt: skip

    du = _buffer(u.shape, u.dtype, dev)
    dW = _buffer(W.shape, W.dtype, dev)
    # The dW accumulator [BLOCK_I, J, D, Din] lives in registers: more warps when it is large.
    KP = triton.next_power_of_2(K)
    acc = g["BLOCK_I"] * g["JP"] * g["DP"] * KP
    num_warps = min(16, max(4, triton.next_power_of_2(acc // 1024)))
    _pose_grad_kernel[(g["n_slices_final"],)](
        u, W, Vprev, G, du, dW, B, I, J, D, g["I_PER_PROG_FINAL"],
        g["I_PER_PROG_FINAL"] // g["BLOCK_I"], g["n_blocks_final"],
        T=T, TAU0=T - 1 if detach_inner else 0, DETACH=detach_inner, K=K,
        KP=KP, BLOCK_B=g["BLOCK_B_FINAL"], BLOCK_I=g["BLOCK_I"], JP=g["JP"], DP=g["DP"],
        num_warps=num_warps,
    )  # fmt: skip
    if bias is not None:
        rows = G[T - 1] if detach_inner else G
        dbias = _sum_rows(rows.reshape(-1, J * D), _buffer((J, D), bias.dtype, dev))
    else:
        dbias = torch.zeros((J, D), dtype=torch.float32, device=dev)  # not a gradient: no bias
    return du, dW, dbias


# ----------------------------------------------------------------------------------------------
# The custom ops and their registrations
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("capsfast::digit_caps", mutates_args=())
def _digit_caps_op(
    u: Tensor, W: Tensor, bias: Tensor | None, iterations: int, detach_inner: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (v [B, J, D] in u's dtype, s_all [T, B, J, D] fp32, Vprev_all [T, B, J, D] fp32);
    the last two are saved for backward and are not differentiable."""
    with _device_of(u):
        return _forward(u, W, bias, iterations)


@_digit_caps_op.register_fake
def _(u, W, bias, iterations, detach_inner):
    B, J, D = u.shape[0], W.shape[1], W.shape[2]
    state = u.new_empty((iterations, B, J, D), dtype=torch.float32)
    return u.new_empty((B, J, D)), state, torch.empty_like(state)


@torch.library.custom_op("capsfast::digit_caps_backward", mutates_args=())
def _digit_caps_backward_op(
    grad_v: Tensor,
    u: Tensor,
    W: Tensor,
    bias: Tensor | None,
    s_all: Tensor,
    Vprev: Tensor,
    iterations: int,
    detach_inner: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (du in u's dtype, dW in W's dtype, dbias in bias's dtype; fp32 zeros if no bias)."""
    with _device_of(u):
        return _backward(grad_v, u, W, bias, s_all, Vprev, iterations, detach_inner)


@_digit_caps_backward_op.register_fake
def _(grad_v, u, W, bias, s_all, Vprev, iterations, detach_inner):
    J, D = W.shape[1], W.shape[2]
    dbias = W.new_empty((J, D), dtype=bias.dtype if bias is not None else torch.float32)
    return torch.empty_like(u), torch.empty_like(W), dbias


def _setup_context(ctx, inputs, output):
    u, W, bias, iterations, detach_inner = inputs
    _, s_all, Vprev = output
    ctx.save_for_backward(u, W, bias, s_all, Vprev)
    ctx.iterations, ctx.detach_inner = iterations, detach_inner
    ctx.mark_non_differentiable(s_all, Vprev)


def _backward_rule(ctx, grad_v, _grad_s, _grad_V):
    u, W, bias, s_all, Vprev = ctx.saved_tensors
    du, dW, dbias = _digit_caps_backward_op(
        grad_v, u, W, bias, s_all, Vprev, ctx.iterations, ctx.detach_inner
    )
    return du, dW, (dbias if bias is not None else None), None, None


_digit_caps_op.register_autograd(_backward_rule, setup_context=_setup_context)


def _register_autocast_passthrough(op_name: str, device_type: str) -> None:
    """Under autocast the op receives u, W and bias unchanged (e.g. bf16 u with an fp32 master
    W) and runs with autocast off: it computes in fp32 itself and returns v in u's dtype.
    (torch.library.register_autocast can only cast every input to one dtype.)"""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(torch.ops.capsfast, op_name).default

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*args)

    _AUTOCAST_LIB.impl(op_name, kernel, key, with_keyset=True)


_AUTOCAST_LIB = torch.library.Library("capsfast", "FRAGMENT")
for _device_type in ("cuda", "cpu"):
    _register_autocast_passthrough("digit_caps", _device_type)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def digit_caps_fused(
    u: Tensor,
    W: Tensor,
    iterations: int = 3,
    *,
    bias: Tensor | None = None,
    detach_inner: bool = False,
) -> Tensor:
    """DigitCaps with u_hat = W u formed on chip: u [B, I, Din], W [I, J, D, Din], bias [J, D]
    or None -> v [B, J, D] in u's dtype. See the module docstring for the algorithm."""
    if u.dim() != 3 or W.dim() != 4 or u.shape[1] != W.shape[0] or u.shape[2] != W.shape[3]:
        raise ValueError(
            f"digit_caps_fused: u must be [B, I, Din] and W [I, J, D, Din]; got u "
            f"{tuple(u.shape)}, W {tuple(W.shape)}"
        )
    B, I, K = u.shape
    J, D = W.shape[1], W.shape[2]
    if min(B, I, J, D, K) < 1:
        raise ValueError(
            f"digit_caps_fused: empty dimension in u {tuple(u.shape)}, W {tuple(W.shape)}"
        )
    if J > MAX_JD or D > MAX_JD or K > MAX_DIN:
        raise ValueError(
            f"digit_caps_fused supports J, D <= {MAX_JD} and Din <= {MAX_DIN}; got J={J}, D={D}, "
            f"Din={K} (use impl='torch' or 'triton')"
        )
    if bias is not None and tuple(bias.shape) != (J, D):
        raise ValueError(
            f"digit_caps_fused: bias must be [J, D] = [{J}, {D}], got {list(bias.shape)}"
        )
    if int(iterations) < 1:
        raise ValueError(f"digit_caps_fused: iterations must be >= 1, got {iterations}")
    supported = (torch.float32, torch.bfloat16, torch.float16)
    for name, x in (("u", u), ("W", W), ("bias", bias)):
        if x is not None and x.dtype not in supported:
            raise TypeError(
                f"digit_caps_fused: {name} is {x.dtype}; supported are float32, bfloat16 and "
                f"float16 (it computes in fp32; use impl='torch' for float64/gradcheck)"
            )
        if x is not None and x.device != u.device:
            raise ValueError(f"digit_caps_fused: {name} is on {x.device}, u on {u.device}")
    v, _, _ = _digit_caps_op(
        u.contiguous(),
        W.contiguous(),
        None if bias is None else bias.contiguous(),
        int(iterations),
        bool(detach_inner),
    )
    return v
