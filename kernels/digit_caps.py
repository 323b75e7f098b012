"""DigitCaps fused: the pose transform u_hat = W u formed on chip inside the routing kernels.

    v = digit_caps_fused(u [B, I, Din], W [I, J, D, Din], iterations, bias=None | [J, D])

u_hat[b, i, j, d] = sum_k W[i, j, d, k] u[b, i, k] is never stored: every pass over the input
capsules rebuilds its chunk of u_hat from W and u in registers, so device memory sees only u, W,
v, du, dW and a few [B, J, D] tensors. The recurrences, the passes, the tiles and the cost model
are in docs/routing.md (Sections 3-5, and Section 7 for what the fused op adds). The routing math
on chip and the per-sample finishing kernels are those of the routing op (kernels/common.py).

All arithmetic is fp32 whatever the input dtypes (loads are upcast); v comes back in u's dtype,
du in u's, dW in W's and d(bias) in the bias's dtype, so an fp32 master W works with bf16/fp16 u.
Saved for backward: s_t and V_{t-1} for every t, [T, B, J, D] fp32 each; u, W, bias themselves.

Public: digit_caps_fused (autograd-aware), pass_costs (bytes and FLOPs per launch), the custom
ops capsfast::digit_caps and capsfast::digit_caps_backward. Environment: CAPSFAST_DIGIT_CAPS_TILES
overrides the tiles, CAPSFAST_POISON fills buffers with NaN (docs/environment.md).

Sections, in the order kernels/routing.py has them too: jit helpers, kernels, tile choice, cost
model, launchers, custom op (fake, autograd rule), public entry (it has no probe of its own).
"""

# ruff: noqa: E741  (B, I, J, D, Din: the sizes as docs/routing.md and docs/spec.md name them)

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
from torch import Tensor

from capsfast.routing import SQUASH_EPS, check_digit_caps_args

MAX_JD = 32  # J and D up to 32 each
MAX_DIN = 16
TILES_ENV = "CAPSFAST_DIGIT_CAPS_TILES"  # block_b=n,block_i=n,i_per_prog=n or sms=N

# ---------------------------------------------------------------------------------------------
# Jit helpers: tiles of W and u, and a chunk of u_hat formed from them in registers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _w_tile(offs_i, I, J, D, K: tl.constexpr, KD: tl.constexpr, JP: tl.constexpr,
            DP: tl.constexpr):  # fmt: skip
    """Offsets and mask of W[offs_i] as [BI, KD, JP * DP], the right operand of u_hat = u W:
    column n = j * DP + d is the row W[i, j, d, :] (Din = K contiguous values in memory,
    zero-padded to KD)."""
    offs_k = tl.arange(0, KD)
    offs_n = tl.arange(0, JP * DP)
    j, d = offs_n // DP, offs_n % DP
    rows = (offs_i[:, None] * J + j[None, :]) * D + d[None, :]  # [BI, N]
    row_ok = (offs_i < I)[:, None] & ((j < J) & (d < D))[None, :]
    offs = rows[:, None, :] * K + offs_k[None, :, None]
    return offs, row_ok[:, None, :] & (offs_k < K)[None, :, None]


@triton.jit
def _u_tile(offs_b, b_ok, offs_i, I, K: tl.constexpr, KD: tl.constexpr):
    """Offsets and mask of u[offs_b, offs_i] as [BI, BB, KD], the left operand of u_hat = u W:
    rows of Din = K contiguous values, zero-padded to KD."""
    offs_k = tl.arange(0, KD)
    rows = offs_b[None, :] * I + offs_i[:, None]  # [BI, BB]
    ok = (offs_i < I)[:, None] & b_ok[None, :]
    offs = rows[:, :, None] * K + offs_k[None, None, :]
    return offs, ok[:, :, None] & (offs_k < K)[None, None, :]


@triton.jit
def _pose(u, w, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr,
          DP: tl.constexpr):  # fmt: skip
    """u_hat[b, i, j, d] = sum_k W[i, j, d, k] u[b, i, k] from the tiles u [BI, BB, KD] and
    w [BI, KD, JP * DP] (fp32): one [BB, KD] x [KD, J D] product per input capsule, in exact
    fp32 (input_precision="ieee": fused multiply-adds, not TF32) -> [BB, BI, JP, DP]."""
    u_hat = tl.dot(u, w, input_precision="ieee")  # [BI, BB, JP * DP]
    return tl.permute(tl.reshape(u_hat, (BLOCK_I, BLOCK_B, JP, DP)), (1, 0, 2, 3))


@triton.jit
def _load_u_hat(u_ptr, W_ptr, offs_b, b_ok, offs_i, I, J, D, K: tl.constexpr,
                KD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
                JP: tl.constexpr, DP: tl.constexpr):  # fmt: skip
    """u_hat[offs_b, offs_i] as fp32 [BB, BI, JP, DP] (zero outside), formed from a chunk of W
    and the samples' rows of u (both upcast to fp32 first). The grad pass, which keeps its W on
    chip across sample blocks, calls the three helpers above itself."""
    w_offs, w_ok = _w_tile(offs_i, I, J, D, K, KD, JP, DP)
    u_offs, u_ok = _u_tile(offs_b, b_ok, offs_i, I, K, KD)
    w = tl.load(W_ptr + w_offs, mask=w_ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + u_offs, mask=u_ok, other=0.0).to(tl.float32)
    return _pose(u, w, BLOCK_B, BLOCK_I, JP, DP)


@triton.jit
def _samples(B, BLOCK_B: tl.constexpr):
    """This program's block of samples: (offs_b [BB], b_ok [BB])."""
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    return offs_b.to(tl.int64), b_ok


# ---------------------------------------------------------------------------------------------
# Kernels (what each launch reads, writes and costs: docs/routing.md, Sections 5-7)
# ---------------------------------------------------------------------------------------------


# Forward pass of iteration t (one launch per iteration).
#   computes  part[n, b] = sum_{i in slice n} c_t[b,i,j] u_hat[b,i,j,:], c_t = softmax_j <u_hat,
#             V_{t-1}>, u_hat formed on chip from W and u
#   grid      (n_slices, n_sample_blocks); program (n, m) owns i in [n*I_PER_PROG, ...) in chunks
#             of BLOCK_I and samples [m*BLOCK_B, ...): V_{t-1} loaded once, each W chunk once
#   saves     nothing (the partials are scratch, reduced by fwd_finish_kernel)
@triton.jit
def _digit_caps_fwd_pass_kernel(
    u_ptr, W_ptr, Vprev_ptr, part_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    K: tl.constexpr, KD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    offs_b, b_ok = _samples(B, BLOCK_B)
    j_ok = tl.arange(0, JP) < J
    V = load_rows(Vprev_ptr, offs_b, b_ok, J, D, JP, DP)  # [BB, JP, DP]
    s = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        offs_i = n * I_PER_PROG + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        u_hat = _load_u_hat(
            u_ptr, W_ptr, offs_b, b_ok, offs_i, I, J, D, K, KD, BLOCK_B, BLOCK_I, JP, DP
        )
        c = coupling(u_hat, V, j_ok)
        s += tl.sum(c[:, :, :, None] * u_hat, axis=1)
    store_rows(part_ptr + n * B * J * D, s, offs_b, b_ok, J, D, JP, DP)


# Backward pass for dL/dv_{t-1} (full gradient only; t = T..2, one launch each).
#   computes  part[n, b] = sum_{i in slice n} Bbar_{t-1}[b,i,j] u_hat[b,i,j,:],
#             Bbar_{t-1} = P_t + ... + P_T = dL/d(logits b_{t-1}); c_tau and P_tau recomputed
#             from u_hat (on chip), V_{tau-1} and G_tau for tau >= t
#   grid      (n_slices, n_sample_blocks), as the forward pass; the 2 (T - t + 1) state
#             matrices of the block loaded once
#   saves     nothing (bwd_finish_kernel turns the partials into G_{t-1})
@triton.jit
def _digit_caps_bwd_pass_kernel(
    u_ptr, W_ptr, Vprev_ptr, G_ptr, part_ptr, B, I, J, D, I_PER_PROG, N_CHUNKS,
    t: tl.constexpr, T: tl.constexpr, K: tl.constexpr, KD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    offs_b, b_ok = _samples(B, BLOCK_B)
    j_ok = tl.arange(0, JP) < J
    Vs = load_state(Vprev_ptr, offs_b, b_ok, B, J, D, t - 1, T, JP, DP)
    Gs = load_state(G_ptr, offs_b, b_ok, B, J, D, t - 1, T, JP, DP)
    dv = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        offs_i = n * I_PER_PROG + chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        u_hat = _load_u_hat(
            u_ptr, W_ptr, offs_b, b_ok, offs_i, I, J, D, K, KD, BLOCK_B, BLOCK_I, JP, DP
        )
        Bbar = logit_grad(u_hat, Vs, Gs, j_ok, T - t + 1)
        dv += tl.sum(Bbar[:, :, :, None] * u_hat, axis=1)
    store_rows(part_ptr + n * B * J * D, dv, offs_b, b_ok, J, D, JP, DP)


# Grad pass: the input gradients du and dW through the on-chip u_hat (the last launch).
#   computes  du_hat = sum_t c_t G_t + P_t V_{t-1}  (DETACH: c_T G_T only; common.u_hat_grad_step),
#             then du[b,i,:] = sum_{j,d} W[i,j,d,:] du_hat[b,i,j,d]   (written in u's dtype)
#             and  dW[i,j,d,:] = sum_b du_hat[b,i,j,d] u[b,i,:], accumulated in fp32 registers
#             over the whole batch and written once (in W's dtype)
#   grid      (n_chunks,): a program owns BLOCK_I input capsules, keeps their W and dW in
#             registers and walks ALL samples in N_BLOCKS blocks of BLOCK_B, loading each block's
#             state once
#   saves     nothing
@triton.jit
def _digit_caps_grad_pass_kernel(
    u_ptr, W_ptr, Vprev_ptr, G_ptr, du_ptr, dW_ptr, B, I, J, D, N_BLOCKS,
    TAU0: tl.constexpr, T: tl.constexpr, DETACH: tl.constexpr, K: tl.constexpr,
    KD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, JP: tl.constexpr,
    DP: tl.constexpr,
):  # fmt: skip
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    j_ok = tl.arange(0, JP) < J
    w_offs, w_ok = _w_tile(offs_i, I, J, D, K, KD, JP, DP)
    w = tl.load(W_ptr + w_offs, mask=w_ok, other=0.0).to(tl.float32)  # [BI, KD, N]
    w_t = tl.permute(w, (0, 2, 1))  # [BI, N, KD]
    dW = tl.zeros((BLOCK_I, JP * DP, KD), dtype=tl.float32)
    for blk in range(N_BLOCKS):
        offs_b = blk * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        offs_b = offs_b.to(tl.int64)
        u_offs, u_ok = _u_tile(offs_b, b_ok, offs_i, I, K, KD)
        u = tl.load(u_ptr + u_offs, mask=u_ok, other=0.0).to(tl.float32)  # [BI, BB, KD]
        u_hat = _pose(u, w, BLOCK_B, BLOCK_I, JP, DP)
        du_hat = tl.zeros((BLOCK_B, BLOCK_I, JP, DP), dtype=tl.float32)
        for tau in tl.static_range(TAU0, T):  # the block's state, each matrix loaded once
            G = load_rows(G_ptr + tau * B * J * D, offs_b, b_ok, J, D, JP, DP)
            V = G  # (unused for t = 1: V_0 = 0)
            if tau > 0:
                V = load_rows(Vprev_ptr + tau * B * J * D, offs_b, b_ok, J, D, JP, DP)
            du_hat = u_hat_grad_step(du_hat, u_hat, V, G, j_ok, tau == 0, DETACH)
        # Back through u_hat = u W: du = du_hat W^T per capsule, dW += u^T du_hat over samples.
        du_hat = tl.reshape(tl.permute(du_hat, (1, 0, 2, 3)), (BLOCK_I, BLOCK_B, JP * DP))
        du = tl.dot(du_hat, w_t, input_precision="ieee")  # [BI, BB, KD]
        tl.store(du_ptr + u_offs, du.to(du_ptr.dtype.element_ty), mask=u_ok)
        dW = tl.dot(tl.permute(du_hat, (0, 2, 1)), u, dW, input_precision="ieee")  # [BI, N, KD]
    tl.store(dW_ptr + tl.permute(w_offs, (0, 2, 1)), dW.to(dW_ptr.dtype.element_ty),
             mask=tl.permute(w_ok, (0, 2, 1)))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Tile choice
# ---------------------------------------------------------------------------------------------

# GPU tiles (a first design, not tuned on hardware; docs/gpu.md says how to time it), chosen so
# that ptxas (sm_90, triton 3.6 and 3.8) allocates without spills at the paper shape.
GPU_BLOCK_B = 16  # routing passes: samples per program (W is re-read once per sample block)
GPU_W_TILE = 2048  # routing passes: values of a W chunk [BLOCK_I, KD, JP * DP] (staged in smem)
GPU_BLOCK_B_LAST = 8  # grad pass: samples per block (at least the dot's minimum K)
GPU_BLOCK_I_LAST = 2  # grad pass: input capsules per program (their W and dW stay on chip)
GPU_TILE_LAST = 4096  # grad pass: values of a u_hat tile [BLOCK_B, BLOCK_I, JP, DP]
GPU_WARPS_LAST = 8
GPU_STAGES_LAST = 1  # grad pass: no software pipelining (its loop body is long, smem is not)
# Register ceiling given to ptxas. Without one it caps some of these kernels at 64 or 128
# registers and spills to raise occupancy (ptxas -v, sm_90, triton 3.8's ptxas); the fused
# passes are compute-bound with long dependency-free FMA chains, so no spills wins.
GPU_MAXNREG = 255


@functools.cache
def _min_dot_k() -> int:
    """The smallest K of an fp32 tl.dot the installed triton compiles for NVIDIA GPUs (16 in
    triton 3.6, 8 in 3.8), asked of its backend; 16 if it cannot say. The contractions pad Din,
    J D and the grad pass's sample block up to it with masked zeros."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        return int(min_dot_size(GPUTarget("cuda", 90, 32))(tl.float32, tl.float32)[2])
    except Exception:  # another backend layout: the conservative bound
        return 16


def _dot_k(K: int) -> int:
    return max(triton.next_power_of_2(K), _min_dot_k())


def _padded_jd(J: int, D: int) -> tuple[int, int]:
    """J and D padded to powers of two, D further so that J D reaches the dot's minimum K (the
    contraction du = du_hat W^T runs over the J D outputs of a capsule)."""
    JP, DP = triton.next_power_of_2(J), triton.next_power_of_2(D)
    return JP, max(DP, triton.cdiv(_min_dot_k(), JP))


def _tiles(B: int, I: int, J: int, D: int, device: torch.device) -> dict:
    """The tiles a launch uses: the GPU's choice, the interpreter's (few, large tiles), or what
    CAPSFAST_DIGIT_CAPS_TILES asks for (a key it leaves out takes the interpreter's choice)."""
    override = common.tile_override(TILES_ENV, ("block_b", "block_i", "i_per_prog"))
    if "sms" in override:
        return _gpu_tiles(B, I, J, D, override["sms"])
    if not override and not interpreted(_digit_caps_fwd_pass_kernel):
        return _gpu_tiles(B, I, J, D, common.sm_count(device))
    JP, DP = _padded_jd(J, D)
    block_b = override.get("block_b") or min(triton.next_power_of_2(B), 16)
    block_i = override.get("block_i") or min(
        triton.next_power_of_2(I), max(1, INTERPRETER_TILE // (block_b * JP * DP))
    )
    i_per_prog = override.get("i_per_prog") or block_i
    return _geometry(B, I, JP, DP, block_b, block_i, i_per_prog, block_b, block_i, 4, 4, 1)


def _gpu_tiles(B: int, I: int, J: int, D: int, sms: int) -> dict:
    """The GPU's choice for a device with `sms` SMs. Routing passes: GPU_BLOCK_B samples per
    program and W chunks of GPU_W_TILE values, with enough i-slices that slices x sample blocks
    give ~2 programs per SM (the partials [slices, B, J, D] then stay near 2 x SMs x BLOCK_B x J x
    D values, L2-resident); warps scale with the u_hat tile (2 to 8). Grad pass:
    GPU_BLOCK_I_LAST inputs per program, so I / GPU_BLOCK_I_LAST programs, each walking the batch
    in blocks of GPU_TILE_LAST values."""
    JP, DP = _padded_jd(J, D)
    KD = _dot_k(1)
    block_b = min(triton.next_power_of_2(B), GPU_BLOCK_B)
    block_i = min(triton.next_power_of_2(I), max(1, GPU_W_TILE // (KD * JP * DP)))
    warps = min(8, max(2, block_b * block_i * JP * DP // 512))
    n_chunks = triton.cdiv(I, block_i)
    n_slices = min(n_chunks, triton.cdiv(2 * sms, triton.cdiv(B, block_b)))
    i_per_prog = triton.cdiv(n_chunks, n_slices) * block_i
    # Grad pass: its dW contraction runs over the sample block, so BLOCK_B reaches the dot's
    # minimum K (8, or 16 under triton 3.6); then as many inputs as GPU_TILE_LAST allows (the
    # state is re-read once per program: more inputs per program, fewer re-reads).
    block_b_last = max(_min_dot_k(), min(triton.next_power_of_2(B), GPU_BLOCK_B_LAST))
    block_i_last = GPU_TILE_LAST // (block_b_last * JP * DP)
    block_i_last = min(triton.next_power_of_2(I), GPU_BLOCK_I_LAST, max(1, block_i_last))
    return _geometry(
        B, I, JP, DP, block_b, block_i, i_per_prog, block_b_last, block_i_last, warps,
        GPU_WARPS_LAST, GPU_STAGES_LAST,
    )  # fmt: skip


def _geometry(B, I, JP, DP, block_b, block_i, i_per_prog, block_b_last, block_i_last, warps,
              warps_last, stages_last):  # fmt: skip
    """Tile sizes (rounded up to powers of two) and the grids: (i-slice, sample block) for the
    routing passes, (i-chunk,) for the grad pass."""
    block_b = triton.next_power_of_2(block_b)
    block_i = triton.next_power_of_2(block_i)
    block_b_last = max(triton.next_power_of_2(block_b_last), _min_dot_k())  # dW's dot: K = BB
    block_i_last = triton.next_power_of_2(block_i_last)
    i_per_prog = triton.cdiv(max(i_per_prog, block_i), block_i) * block_i
    return dict(
        BLOCK_B=block_b,
        BLOCK_I=block_i,
        I_PER_PROG=i_per_prog,
        N_CHUNKS=i_per_prog // block_i,
        n_slices=triton.cdiv(I, i_per_prog),
        n_blocks=triton.cdiv(B, block_b),
        num_warps=warps,
        BLOCK_B_LAST=block_b_last,
        BLOCK_I_LAST=block_i_last,
        n_slices_final=triton.cdiv(I, block_i_last),
        n_blocks_final=triton.cdiv(B, block_b_last),
        num_warps_last=warps_last,
        num_stages_last=stages_last,
        JP=JP,
        DP=DP,
    )


# ---------------------------------------------------------------------------------------------
# Cost model (docs/routing.md, Sections 6 and 7; the shared model is kernels.common.pass_costs)
# ---------------------------------------------------------------------------------------------


def pass_costs(
    B: int,
    I: int,
    J: int,
    D: int,
    Din: int,
    T: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    detach_inner: bool = False,
    bias: bool = True,
    *,
    w_dtype: torch.dtype | None = None,
    backward: bool = True,
    sms: int = 132,
) -> dict:
    """Bytes and FLOPs of every launch of digit_caps_fused on u [B, I, Din] of `dtype` and W
    [I, J, D, Din] of `w_dtype` (default `dtype`; fp32 for an AMP master W), forward and the
    backward unless backward=False, with the GPU tiles for a device with `sms` SMs (132: H100).
    A pass over i reads u and W once each ("l2_bytes": W once per sample block and pass, the
    state once per grad-pass program); FLOPs count the contraction over Din unpadded."""
    eu = torch.empty((), dtype=dtype).element_size()
    ew = torch.empty((), dtype=w_dtype or dtype).element_size()
    g = _gpu_tiles(B, I, J, D, sms)
    u_bytes, w_bytes = B * I * Din * eu, I * J * D * Din * ew
    names = dict(fwd="_digit_caps_fwd_pass_kernel", bwd="_digit_caps_bwd_pass_kernel",
                 last="_digit_caps_grad_pass_kernel", last_pass="du, dW")  # fmt: skip
    return common.pass_costs(
        B, I, J, D, T, detach_inner, bias, out_bytes=eu, n_slices=g["n_slices"],
        pass_bytes=u_bytes + w_bytes, pass_l2=u_bytes + g["n_blocks"] * w_bytes,
        pose_flops=2 * B * I * J * D * Din, last_bytes=2 * (u_bytes + w_bytes),
        last_programs=g["n_slices_final"], names=names, backward=backward,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers (they trust their callers: digit_caps_fused validates)
# ---------------------------------------------------------------------------------------------


def digit_caps_forward(u: Tensor, W: Tensor, bias: Tensor | None, iterations: int):
    """Launch the forward passes; returns v (u's dtype), S and Vprev ([T, B, J, D] fp32)."""
    u, W = u.contiguous(), W.contiguous()
    B, I, K = u.shape
    J, D = W.shape[1], W.shape[2]
    T = iterations
    dev = u.device
    g = _tiles(B, I, J, D, dev)
    f32 = torch.float32
    part = buffer((g["n_slices"], B, J, D), f32, dev)
    S = buffer((T, B, J, D), f32, dev)
    Vprev = buffer((T, B, J, D), f32, dev)
    Vprev[0].zero_()  # V_0 = 0: uniform coupling in the first iteration
    v = buffer((B, J, D), u.dtype, dev)
    fb = finish_block(B, g["JP"], g["DP"])
    tiles = dict(BLOCK_B=g["BLOCK_B"], BLOCK_I=g["BLOCK_I"], JP=g["JP"], DP=g["DP"])
    pad = dict(K=K, KD=_dot_k(K))
    with common.on_device(dev):
        for t in range(1, T + 1):
            _digit_caps_fwd_pass_kernel[(g["n_slices"], g["n_blocks"])](
                u, W, Vprev[t - 1], part, B, I, J, D, g["I_PER_PROG"], g["N_CHUNKS"], **pad,
                **tiles, num_warps=g["num_warps"], maxnreg=GPU_MAXNREG,
            )  # fmt: skip
            last = t == T
            fwd_finish_kernel[(triton.cdiv(B, fb),)](
                part, g["n_slices"], bias if bias is not None else part, Vprev[t - 1],
                Vprev[t - 1] if last else Vprev[t], S[t - 1], v, B, J, D,
                HAS_BIAS=bias is not None, LAST=last, EPS=SQUASH_EPS, BLOCK_B=fb, JP=g["JP"],
                DP=g["DP"],
            )  # fmt: skip
    return v, S, Vprev


def digit_caps_backward(grad_v, u, W, bias, S, Vprev, iterations: int, detach_inner: bool):
    """Launch the backward passes; returns du (u's dtype), dW (W's dtype) and d(bias) (the
    bias's dtype; fp32 zeros if there is no bias)."""
    u, W = u.contiguous(), W.contiguous()
    B, I, K = u.shape
    J, D = W.shape[1], W.shape[2]
    T = iterations
    dev = u.device
    g = _tiles(B, I, J, D, dev)
    f32 = torch.float32
    tiles = dict(BLOCK_B=g["BLOCK_B"], BLOCK_I=g["BLOCK_I"], JP=g["JP"], DP=g["DP"])
    pad = dict(K=K, KD=_dot_k(K))
    fb = finish_block(B, g["JP"], g["DP"])
    finish = dict(EPS=SQUASH_EPS, BLOCK_B=fb, JP=g["JP"], DP=g["DP"])
    G = buffer((T, B, J, D), f32, dev)  # G_t = dL/ds_t (detach_inner: only G_T is written)
    du = buffer(u.shape, u.dtype, dev)
    dW = buffer(W.shape, W.dtype, dev)
    tau0 = T - 1 if detach_inner else 0
    with common.on_device(dev):
        # G_T = squash_bwd(s_T, dL/dv_T): the incoming gradient is the single "partial".
        bwd_finish_kernel[(triton.cdiv(B, fb),)](
            grad_v.contiguous(), 1, S[T - 1], G[T - 1], B, J, D, **finish
        )
        if not detach_inner:
            part = buffer((g["n_slices"], B, J, D), f32, dev)
            for t in range(T, 1, -1):  # dL/dv_{t-1}, then G_{t-1}
                _digit_caps_bwd_pass_kernel[(g["n_slices"], g["n_blocks"])](
                    u, W, Vprev, G, part, B, I, J, D, g["I_PER_PROG"], g["N_CHUNKS"],
                    t=t, T=T, **pad, **tiles, num_warps=g["num_warps"], maxnreg=GPU_MAXNREG,
                )  # fmt: skip
                bwd_finish_kernel[(triton.cdiv(B, fb),)](
                    part, g["n_slices"], S[t - 2], G[t - 2], B, J, D, **finish
                )
        _digit_caps_grad_pass_kernel[(g["n_slices_final"],)](
            u, W, Vprev, G, du, dW, B, I, J, D, g["n_blocks_final"],
            TAU0=tau0, T=T, DETACH=detach_inner, **pad, BLOCK_B=g["BLOCK_B_LAST"],
            BLOCK_I=g["BLOCK_I_LAST"], JP=g["JP"], DP=g["DP"], num_warps=g["num_warps_last"],
            num_stages=g["num_stages_last"], maxnreg=GPU_MAXNREG,
        )  # fmt: skip
    if bias is not None:
        dbias = G[tau0:].sum(dim=(0, 1)).to(bias.dtype)  # sum over iterations and batch of G_t
    else:
        dbias = torch.zeros((J, D), dtype=f32, device=dev)  # not a gradient: no bias
    return du, dW, dbias


# ---------------------------------------------------------------------------------------------
# Custom op: forward and backward ops, their fakes, the autograd rule
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("capsfast::digit_caps", mutates_args=())
def digit_caps_op(
    u: Tensor, W: Tensor, bias: Tensor | None, iterations: int, detach_inner: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """v [B, J, D] (u's dtype), and for the backward S (s_t) and Vprev (V_{t-1}),
    [T, B, J, D] fp32. detach_inner does not change the forward; it is an argument for the
    backward."""
    return digit_caps_forward(u, W, bias, iterations)


@digit_caps_op.register_fake
def _forward_fake(u, W, bias, iterations, detach_inner):
    B, J, D = u.shape[0], W.shape[1], W.shape[2]
    state = u.new_empty((iterations, B, J, D), dtype=torch.float32)
    return u.new_empty((B, J, D)), state, torch.empty_like(state)


@torch.library.custom_op("capsfast::digit_caps_backward", mutates_args=())
def digit_caps_backward_op(
    grad_v: Tensor,
    u: Tensor,
    W: Tensor,
    bias: Tensor | None,
    S: Tensor,
    Vprev: Tensor,
    iterations: int,
    detach_inner: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """du (u's dtype), dW (W's dtype) and d(bias) (the bias's dtype; fp32 zeros if no bias)."""
    return digit_caps_backward(grad_v, u, W, bias, S, Vprev, iterations, detach_inner)


@digit_caps_backward_op.register_fake
def _backward_fake(grad_v, u, W, bias, S, Vprev, iterations, detach_inner):
    J, D = W.shape[1], W.shape[2]
    dbias = W.new_empty((J, D), dtype=bias.dtype if bias is not None else torch.float32)
    return torch.empty_like(u), torch.empty_like(W), dbias


def _setup_context(ctx, inputs, output):
    u, W, bias, iterations, detach_inner = inputs
    _v, S, Vprev = output
    ctx.save_for_backward(u, W, bias, S, Vprev)
    ctx.iterations, ctx.detach_inner = iterations, detach_inner
    ctx.mark_non_differentiable(S, Vprev)


def _autograd_backward(ctx, grad_v, _grad_S, _grad_Vprev):
    u, W, bias, S, Vprev = ctx.saved_tensors
    du, dW, dbias = digit_caps_backward_op(
        grad_v, u, W, bias, S, Vprev, ctx.iterations, ctx.detach_inner
    )
    return du, dW, (dbias if bias is not None else None), None, None


digit_caps_op.register_autograd(_autograd_backward, setup_context=_setup_context)
# No autocast kernel, on purpose: the inputs reach the op as they are (docs/routing.md, Section 7,
# "Autocast"; both ops follow this rule).


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------


def digit_caps_fused(
    u: Tensor,
    W: Tensor,
    iterations: int = 3,
    *,
    bias: Tensor | None = None,
    detach_inner: bool = False,
) -> Tensor:
    """DigitCaps with u_hat = W u formed on chip: u [B, I, Din], W [I, J, D, Din], bias [J, D]
    or None -> v [B, J, D] in u's dtype; the algorithm is in docs/routing.md, Section 7. The one
    place its arguments are checked (capsfast.routing.digit_caps dispatches here unchecked)."""
    op = "digit_caps_fused"
    check_digit_caps_args(u, W, op=op)
    B, I, K = u.shape
    J, D = W.shape[1], W.shape[2]
    if min(B, I, J, D, K) < 1:
        raise ValueError(f"{op}: empty dimension in u {tuple(u.shape)}, W {tuple(W.shape)}")
    if J > MAX_JD or D > MAX_JD or K > MAX_DIN:
        raise ValueError(
            f"{op} supports J, D <= {MAX_JD} and Din <= {MAX_DIN}; got J={J}, D={D}, Din={K} "
            "(use impl='torch' or 'triton')"
        )
    if bias is not None and tuple(bias.shape) != (J, D):
        raise ValueError(f"{op}: bias must be [J, D] = [{J}, {D}], got {list(bias.shape)}")
    if int(iterations) < 1:
        raise ValueError(f"{op}: iterations must be >= 1, got {iterations}")
    instead = "digit_caps(..., impl='torch')"
    common.check_dtypes(op, instead, u=u, W=W, bias=bias)
    for name, x in (("W", W), ("bias", bias)):
        if x is not None and x.device != u.device:
            raise ValueError(f"{op}: {name} is on {x.device}, u on {u.device}")
    common.check_device(u.device, _digit_caps_fwd_pass_kernel, op, instead)
    bias = None if bias is None else bias.contiguous()
    v, _S, _Vprev = digit_caps_op(u, W, bias, int(iterations), bool(detach_inner))
    return v
