"""What the two Triton ops (routing.py, digit_caps.py) share: the routing math on chip, the
per-sample finishing kernels, and the host-side helpers (interpreter check, buffers, device
checks, the device guard).

Tiles. Every kernel works on tiles with a sample axis: u_hat [BB, BI, JP, DP] (BB samples, BI
input capsules, J and D padded to powers of two), per-sample state [BB, JP, DP] (one [J, D] matrix
per sample: V_{t-1}, G_t, s_t, partial sums), couplings and logit gradients [BB, BI, JP]. The
routing kernels read u_hat from memory and use BB = 1; the fused DigitCaps kernels form u_hat = W u
on chip for blocks of BB samples. The math is that of docs/routing.md; the notation (c_t, V_t, G_t,
P_t, Bbar_t) is its notation.
"""

# ruff: noqa: E741  (B, I, J, D: the notation of docs/routing.md)
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# ----------------------------------------------------------------------------------------------
# Routing math on chip (inlined into the kernels of both ops)
# ----------------------------------------------------------------------------------------------


@triton.jit
def coupling(u_hat, V, j_ok):
    """c[b, i, j] = softmax_j <u_hat[b, i, j], V[b, j]>: the logits b_{t-1} = <u_hat, V_{t-1}>
    recomputed from the running sum V of the outputs (never stored). Padded j get c = 0."""
    logits = tl.sum(u_hat * V[:, None, :, :], axis=3)
    logits = tl.where(j_ok[None, None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    return e / tl.sum(e, axis=2)[:, :, None]


@triton.jit
def softmax_bwd(c, u_hat, G):
    """P[b, i, j] = c (gamma - sum_j c gamma), gamma = <u_hat, G>: the gradient w.r.t. the logits
    of one iteration's softmax, given G = dL/ds of that iteration."""
    gamma = tl.sum(u_hat * G[:, None, :, :], axis=3)
    return c * (gamma - tl.sum(c * gamma, axis=2)[:, :, None])


@triton.jit
def squash(s, EPS: tl.constexpr):
    """v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) per capsule (last axis) of s [BB, JP, DP];
    capsfast.routing.squash."""
    n2 = tl.sum(s * s, axis=2)[:, :, None]
    return (n2 / (1.0 + n2)) * s / tl.sqrt(n2 + EPS)


@triton.jit
def squash_bwd(s, g, EPS: tl.constexpr):
    """dL/ds for v = f(n2) s, n2 = |s|^2, f = n2 a r, a = 1 / (1 + n2), r = 1 / sqrt(n2 + eps):
    dL/ds = f g + 2 f'(n2) <s, g> s with f' = a r (a - n2 r^2 / 2). Finite at s = 0 (the eps of
    capsfast.routing.squash), equal to autograd through it."""
    n2 = tl.sum(s * s, axis=2)[:, :, None]
    a = 1.0 / (1.0 + n2)
    r = 1.0 / tl.sqrt(n2 + EPS)
    f = n2 * a * r
    df = a * r * (a - 0.5 * n2 * r * r)
    sg = tl.sum(s * g, axis=2)[:, :, None]
    return f * g + 2.0 * df * sg * s


@triton.jit
def load_rows(ptr, offs_b, b_ok, J, D, JP: tl.constexpr, DP: tl.constexpr):
    """Rows offs_b of a contiguous [rows, J, D] tensor as fp32 [BB, JP, DP], zero outside."""
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    offs = (offs_b[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]
    ok = b_ok[:, None, None] & (offs_j < J)[None, :, None] & (offs_d < D)[None, None, :]
    return tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, x, offs_b, b_ok, J, D, JP: tl.constexpr, DP: tl.constexpr):
    """Store x [BB, JP, DP] into rows offs_b of a contiguous [rows, J, D] tensor (its dtype)."""
    offs_j = tl.arange(0, JP)
    offs_d = tl.arange(0, DP)
    offs = (offs_b[:, None, None] * J + offs_j[None, :, None]) * D + offs_d[None, None, :]
    ok = b_ok[:, None, None] & (offs_j < J)[None, :, None] & (offs_d < D)[None, None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def load_state(ptr, offs_b, b_ok, B, J, D, TAU0: tl.constexpr, T: tl.constexpr,
               JP: tl.constexpr, DP: tl.constexpr):  # fmt: skip
    """The per-sample matrices ptr[tau, offs_b] for tau = TAU0..T-1 of a [T, B, J, D] tensor, as a
    tuple of fp32 [BB, JP, DP] (index tau - TAU0): loaded once, before a kernel's loop over i."""
    state = ()
    for tau in tl.static_range(TAU0, T):
        state = state + (load_rows(ptr + tau * B * J * D, offs_b, b_ok, J, D, JP, DP),)
    return state


@triton.jit
def logit_grad(u_hat, Vs, Gs, j_ok, N: tl.constexpr):
    """Bbar = P_t + ... + P_T = dL/db_{t-1} [BB, BI, JP] from the N = T - t + 1 iterations whose
    V_{tau-1} and G_tau are in the tuples Vs, Gs (c_tau recomputed from u_hat)."""
    Bbar = softmax_bwd(coupling(u_hat, Vs[0], j_ok), u_hat, Gs[0])
    for n in tl.static_range(1, N):
        Bbar += softmax_bwd(coupling(u_hat, Vs[n], j_ok), u_hat, Gs[n])
    return Bbar


@triton.jit
def u_hat_grad_step(du_hat, u_hat, V, G, j_ok, FIRST: tl.constexpr, DETACH: tl.constexpr):
    """One iteration t of dL/du_hat = sum_t c_t G_t + P_t V_{t-1} (du_hat, u_hat [BB, BI, JP, DP];
    V = V_{t-1}, G = G_t [BB, JP, DP]). docs/routing.md writes the logit term as
    sum_{t<T} Bbar_t v_t; regrouped by b_{t-1} = <u_hat, V_{t-1}> it is sum_t P_t V_{t-1}, so one
    sweep over t needs only V_{t-1} and G_t, never v_t. FIRST (t = 1): V_0 = 0, so c_1 = 1/J
    and the logit term vanishes (V is not read). DETACH: c_T is a constant, only c_T G_T."""
    if FIRST:
        c = tl.where(j_ok, 1.0 / tl.sum(j_ok.to(tl.float32), axis=0), 0.0)[None, None, :]
        du_hat += c[:, :, :, None] * G[:, None, :, :]
    else:
        c = coupling(u_hat, V, j_ok)
        du_hat += c[:, :, :, None] * G[:, None, :, :]  # through s_t = sum_i c_t u_hat
        if not DETACH:  # through the logits <u_hat, V_{t-1}> of iteration t
            du_hat += softmax_bwd(c, u_hat, G)[:, :, :, None] * V[:, None, :, :]
    return du_hat


# ----------------------------------------------------------------------------------------------
# Per-sample finishing kernels (both ops): the [J, D] sums over i, added in a fixed order
# ----------------------------------------------------------------------------------------------


# Forward finish of iteration t.
#   computes  s_t = sum_n part[n, b] + beta (partials added in slice order: deterministic),
#             v_t = squash(s_t); V_t = V_{t-1} + v_t; at the last iteration writes v_T (out's
#             dtype) instead of V_T
#   grid      (cdiv(B, BLOCK_B),)
#   saves     s_t into S[t-1] and V_t into Vprev[t]: the state the next pass and the backward read
@triton.jit
def fwd_finish_kernel(
    part_ptr, N_PARTS, bias_ptr, Vprev_ptr, Vnext_ptr, s_ptr, v_ptr, B, J, D,
    HAS_BIAS: tl.constexpr, LAST: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr,
    JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_b = offs_b.to(tl.int64)
    s = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for n in range(N_PARTS):
        s += load_rows(part_ptr + n * B * J * D, offs_b, b_ok, J, D, JP, DP)
    if HAS_BIAS:
        s += load_rows(bias_ptr, offs_b * 0, b_ok, J, D, JP, DP)
    store_rows(s_ptr, s, offs_b, b_ok, J, D, JP, DP)
    v = squash(s, EPS)
    if LAST:
        store_rows(v_ptr, v, offs_b, b_ok, J, D, JP, DP)
    else:
        V = load_rows(Vprev_ptr, offs_b, b_ok, J, D, JP, DP)
        store_rows(Vnext_ptr, V + v, offs_b, b_ok, J, D, JP, DP)


# Backward finish of iteration t: G_t = squash_bwd(s_t, dL/dv_t).
#   computes  dL/dv_t = sum_n part[n, b] (for t = T the incoming gradient itself, N_PARTS = 1)
#   grid      (cdiv(B, BLOCK_B),)
#   saves     G_t into G[t-1], read by the later backward passes
@triton.jit
def bwd_finish_kernel(
    part_ptr, N_PARTS, s_ptr, G_ptr, B, J, D,
    EPS: tl.constexpr, BLOCK_B: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_b = offs_b.to(tl.int64)
    dv = tl.zeros((BLOCK_B, JP, DP), dtype=tl.float32)
    for n in range(N_PARTS):
        dv += load_rows(part_ptr + n * B * J * D, offs_b, b_ok, J, D, JP, DP)
    s = load_rows(s_ptr, offs_b, b_ok, J, D, JP, DP)
    store_rows(G_ptr, squash_bwd(s, dv, EPS), offs_b, b_ok, J, D, JP, DP)


def finish_block(B: int, JP: int, DP: int) -> int:
    """Samples per program of the finishing kernels: [BLOCK_B, JP, DP] tiles of about 2K values
    (16 fp32 registers per thread and tensor at 4 warps)."""
    return max(1, min(triton.next_power_of_2(B), 2048 // (JP * DP)))


# ----------------------------------------------------------------------------------------------
# Cost model (both ops run the same passes; they differ in what a pass over i reads)
# ----------------------------------------------------------------------------------------------


def pass_costs(
    B, I, J, D, T, detach_inner, bias, *, out_bytes, n_slices, pass_bytes, pass_l2, pose_flops,
    last_bytes, last_programs, names, backward=True,
):  # fmt: skip
    """Bytes and FLOPs of every launch of one forward (+ backward) call, in launch order.

    out_bytes: element size of v and grad_v. n_slices: partial sums per sample. pass_bytes: what
    a pass over i reads of its inputs (u_hat, or u and W), once each; pass_l2: the same with the
    re-reads the grid implies; pose_flops: FLOPs of forming u_hat once (0 if it is read);
    last_bytes: what the last pass reads and writes of inputs and gradients (du, or du and dW);
    last_programs: programs of the last pass that each read the state of every sample they see
    (routing: n_slices per sample; fused: every program sees every sample).
    "bytes" counts each tensor a launch touches once (what must cross HBM); "l2_bytes" adds the
    re-reads (W per sample block, a sample's state once per program). FLOPs count the unpadded
    arithmetic: a multiply-add is 2, exp 1; squash and its backward are estimates.
    Returns {"passes": [{"pass", "kernel", "bytes", "l2_bytes", "flops"}, ...], "bytes",
    "l2_bytes", "flops"}."""
    E, IJ, m, n = B * I * J * D, B * I * J, B * J * D, n_slices
    passes = []

    def add(name, kernel, nbytes, flops, l2=None):
        passes.append(
            {"pass": name, "kernel": kernel, "bytes": int(nbytes),
             "l2_bytes": int(nbytes if l2 is None else l2), "flops": int(flops)}
        )  # fmt: skip

    add("init V_0", "zero_", 4 * m, 0)
    for t in range(1, T + 1):  # pass: reads its inputs and V_{t-1}, writes n partials
        add(f"fwd t={t}", names["fwd"], pass_bytes + 4 * m + 4 * n * m,
            pose_flops + 4 * E + 5 * IJ, l2=pass_l2 + 4 * n * m + 4 * n * m)  # fmt: skip
        out = 4 * m + (8 * m if t < T else out_bytes * m)  # s_t; V_{t-1} -> V_t, or v_T
        add(f"fwd finish t={t}", "fwd_finish_kernel", 4 * n * m + 4 * J * D * bias + out,
            (n + 5 + bias) * m)  # fmt: skip
    if not backward:
        return _totals(passes)
    add(f"bwd finish t={T}", "bwd_finish_kernel", out_bytes * m + 8 * m, 9 * m)
    if not detach_inner:
        for t in range(T, 1, -1):  # state: V_{tau-1}, G_tau for the N iterations tau >= t
            N = T - t + 1
            add(f"bwd t={t}", names["bwd"], pass_bytes + 8 * N * m + 4 * n * m,
                pose_flops + N * (4 * E + 10 * IJ) + 2 * E,
                l2=pass_l2 + n * 8 * N * m + 4 * n * m)  # fmt: skip
            add(f"bwd finish t={t - 1}", "bwd_finish_kernel", 4 * n * m + 8 * m, (n + 8) * m)
    # Last pass: G_t for every t it covers and V_{t-1} for t > 1 (V_0 = 0 is not read); t = 1
    # needs no logits (c_1 = 1/J).
    if detach_inner:
        state = 4 * m * min(T, 2)
        flops = 4 * E + 5 * IJ if T > 1 else 2 * E
    else:
        state = 4 * m * (2 * T - 1)
        flops = 2 * E + (T - 1) * (8 * E + 9 * IJ)
    add(names["last_pass"], names["last"], last_bytes + state, 3 * pose_flops + flops,
        l2=last_bytes + last_programs * state)  # fmt: skip
    if bias:
        N = 1 if detach_inner else T
        add("dbias", "sum", 4 * N * m + 4 * J * D, N * m)
    return _totals(passes)


def _totals(passes):
    return {
        "passes": passes,
        "bytes": sum(p["bytes"] for p in passes),
        "l2_bytes": sum(p["l2_bytes"] for p in passes),
        "flops": sum(p["flops"] for p in passes),
    }


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


# Values of u_hat per tile under the interpreter: it pays per operation, not per element, so both
# ops take few, large tiles there.
INTERPRETER_TILE = 2**15


def tile_override(env: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The tile override in the environment variable `env` (docs/environment.md), read at call
    time: {} when unset, else {key: n} from "key=n,key=n". `keys` are the op's tile parameters;
    "sms=N" alone asks for the tile choice of a GPU with N SMs instead."""
    value = os.environ.get(env, "").strip()
    if not value:
        return {}
    allowed = ("sms", *keys)
    usage = f"comma-separated key=n with n >= 1 and keys from {', '.join(allowed)}"
    out = {}
    for item in value.split(","):
        key, sep, n = (x.strip() for x in item.partition("="))
        if not sep or key not in allowed or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{env}={value!r}: expected {usage}")
        out[key] = int(n)
    if "sms" in out and len(out) > 1:
        raise ValueError(f"{env}={value!r}: sms=N takes no other key")
    return out


def interpreted(kernel) -> bool:
    """True when `kernel` was built for the Triton interpreter (TRITON_INTERPRET=1 was set before
    triton was first imported): the ops then run on CPU tensors, slowly. Asked of the kernel
    object, so that a launch capture with recorders in place of the kernels sees GPU geometry."""
    return isinstance(kernel, InterpretedFunction)


def buffer(shape, dtype, device) -> torch.Tensor:
    """An output or scratch buffer, uninitialised; filled with NaN under CAPSFAST_POISON=1 (the
    tests set it), so an element a kernel fails to write shows up."""
    if os.environ.get("CAPSFAST_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_device(device: torch.device):
    """Make `device` the current CUDA device for the launches inside (a no-op for CPU tensors):
    Triton launches on the current device, which need not be the one the tensors live on (u on
    cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_device(device: torch.device, kernel, op: str, instead: str) -> None:
    """CUDA, or CPU under the interpreter; anything else gets an error that says what to use."""
    if device.type == "cuda" or (device.type == "cpu" and interpreted(kernel)):
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{op}: the tensors are on the CPU, where Triton runs only under its interpreter. "
            f"Use {instead} on CPU, or set TRITON_INTERPRET=1 in the environment before triton "
            "is first imported (slow; for tests)."
        )
    raise RuntimeError(
        f"{op}: device {device} is not supported (CUDA, or CPU under the Triton interpreter); "
        f"use {instead}"
    )


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtypes(op: str, instead: str, **tensors) -> None:
    """fp32, bf16 or fp16 (the kernels compute in fp32); None entries are skipped."""
    for name, x in tensors.items():
        if x is not None and x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op}: {name} dtype {x.dtype} is not supported (float32, bfloat16, float16; the "
                f"kernels compute in float32). Use {instead} for float64."
            )
