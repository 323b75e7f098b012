"""Routing by agreement (docs/spec.md, derived in docs/routing.md) and the DigitCaps op, with dispatch by implementation.

`route` is the plain-PyTorch reference every fast path is checked against:

    b = 0                                  # per sample, every forward pass
    for t in 1..T:
        c = softmax_j(b)                   # over the J output capsules, not the I inputs
        s = sum_i c * u_hat (+ bias)
        v = squash(s)
        if t < T: b += <u_hat, v>

`digit_caps` is the whole DigitCaps layer, u_hat = W u followed by `route`, so that a fused kernel
can replace both at once without the model knowing.

Implementations (the trainer's `--routing` names them):
  torch  this file: einsum + the reference loop (any device, float64 for gradcheck)
  triton capsfast.kernels.routing: all iterations in fused Triton kernels, forward and backward
  fused  capsfast.kernels.digit_caps: W u formed on chip inside the routing kernels
  auto   `resolve_impl` picks the fastest that exists for the device
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

IMPLS = ("torch", "triton", "fused")
SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps): value and gradient stay finite at s = 0."""
    n2 = s.pow(2).sum(dim, keepdim=True)
    return (n2 / (1.0 + n2)) * s * torch.rsqrt(n2 + eps)


def safe_norm(v: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Capsule length sqrt(|v|^2 + eps): a plain norm has an infinite gradient at 0."""
    return torch.sqrt(v.pow(2).sum(dim) + eps)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (gradcheck); every other float computes in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_route_args(
    u_hat: torch.Tensor, iterations: int, bias: torch.Tensor | None, op: str = "route"
) -> None:
    """What every routing implementation needs of its arguments (the Triton entry adds its own)."""
    if u_hat.dim() != 4:
        raise ValueError(
            f"{op}: u_hat must be [B, I, J, D] (batch, input capsules, output capsules, "
            f"output dims); got shape {tuple(u_hat.shape)}"
        )
    if not u_hat.is_floating_point():
        raise TypeError(f"{op}: u_hat must be a floating-point tensor, got {u_hat.dtype}")
    if int(iterations) < 1:
        raise ValueError(f"{op}: iterations must be >= 1, got {iterations}")
    if bias is not None and tuple(bias.shape) != tuple(u_hat.shape[2:]):
        raise ValueError(
            f"{op}: bias must be [J, D] = {list(u_hat.shape[2:])}, got {list(bias.shape)}"
        )


def route_torch(
    u_hat: torch.Tensor,
    iterations: int = 3,
    bias: torch.Tensor | None = None,
    detach_inner: bool = False,
) -> torch.Tensor:
    """The reference: docs/spec.md's loop as written, in fp32 (float64 stays float64)."""
    cdt = _compute_dtype(u_hat.dtype)
    with torch.autocast(device_type=u_hat.device.type, enabled=False):
        u = u_hat.to(cdt)
        beta = None if bias is None else bias.to(cdt)
        b = u.new_zeros(u.shape[:3])  # [B, I, J]: reset for every sample on every call
        for t in range(iterations):
            last = t == iterations - 1
            # detach_inner: the first T-1 iterations see u and the bias as constants, so b (and
            # the last c) carry no gradient; the last s = sum_i c u + bias does.
            inner_const = detach_inner and not last
            uu = u.detach() if inner_const else u
            c = torch.softmax(b, dim=2)  # over the output capsules j
            s = torch.einsum("bij,bijd->bjd", c, uu)
            if beta is not None:
                s = s + (beta.detach() if inner_const else beta)
            v = squash(s)
            if not last:
                b = b + torch.einsum("bijd,bjd->bij", uu, v)
    return v.to(u_hat.dtype)


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Turn `auto` into a concrete implementation for `device`.

    auto: the reference on CPU (Triton has no CPU backend outside the interpreter); on CUDA the
    Triton routing kernel. `fused` becomes auto's choice on CUDA only once a GPU benchmark has
    recorded it faster than `triton` (none has yet); CAPSFAST_AUTO_IMPL overrides auto's pick.
    """
    if impl not in ("auto", *IMPLS):
        raise ValueError(
            f"routing implementation must be one of auto, {', '.join(IMPLS)}; got {impl!r}"
        )
    if impl != "auto":
        return impl
    override = os.environ.get("CAPSFAST_AUTO_IMPL")
    if override:
        return resolve_impl(override, device)
    return "triton" if torch.device(device).type == "cuda" else "torch"


def route(
    u_hat: torch.Tensor,
    iterations: int = 3,
    *,
    bias: torch.Tensor | None = None,
    detach_inner: bool = False,
    impl: str = "torch",
) -> torch.Tensor:
    """Route u_hat [B, I, J, D] to v [B, J, D] (dtype of u_hat); bias is [J, D] or None."""
    impl = resolve_impl(impl, u_hat.device)
    if impl == "triton":  # route_triton checks its arguments (these and the kernels' own)
        from capsfast.kernels.routing import route_triton

        return route_triton(u_hat, iterations, bias=bias, detach_inner=detach_inner)
    check_route_args(u_hat, iterations, bias)
    if impl == "torch":
        return route_torch(u_hat, int(iterations), bias, detach_inner)
    raise ValueError(
        "route: impl='fused' needs W and u, not u_hat: call digit_caps(u, W, ..., impl='fused')"
    )


def check_digit_caps_args(u: torch.Tensor, W: torch.Tensor, op: str = "digit_caps") -> None:
    """What every DigitCaps implementation needs of u and W (the fused entry adds its own)."""
    if u.dim() != 3 or W.dim() != 4 or u.shape[1] != W.shape[0] or u.shape[2] != W.shape[3]:
        raise ValueError(
            f"{op}: u must be [B, I, Din] and W [I, J, D, Din]; got u {tuple(u.shape)}, "
            f"W {tuple(W.shape)}"
        )


def pose_transform(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """u_hat[b, i, j, d] = sum_k W[i, j, d, k] u[b, i, k]: one batched contraction, W never
    repeated over the batch."""
    return torch.einsum("ijdk,bik->bijd", W, u)


def digit_caps(
    u: torch.Tensor,
    W: torch.Tensor,
    iterations: int = 3,
    *,
    bias: torch.Tensor | None = None,
    detach_inner: bool = False,
    impl: str = "torch",
) -> torch.Tensor:
    """DigitCaps: u [B, I, Din] and W [I, J, D, Din] to v [B, J, D] in u's dtype."""
    impl = resolve_impl(impl, u.device)
    if impl != "fused":  # digit_caps_fused checks its arguments (these and the kernels' own)
        check_digit_caps_args(u, W)
    return implementation(impl)(u, W, int(iterations), bias=bias, detach_inner=detach_inner)


def implementation(impl: str) -> Callable[..., torch.Tensor]:
    """The DigitCaps function of a concrete routing implementation (torch, triton or fused), with
    digit_caps's signature; the kernels are imported here, once, not on every call."""
    if impl == "torch":
        return _digit_caps_torch
    if impl == "triton":
        from capsfast.kernels.routing import route_triton

        def _digit_caps_triton(u, W, iterations=3, *, bias=None, detach_inner=False):
            u_hat = pose_transform(*_common_dtype(u, W))
            v = route_triton(u_hat, iterations, bias=bias, detach_inner=detach_inner)
            return v.to(u.dtype)

        return _digit_caps_triton
    if impl == "fused":
        from capsfast.kernels.digit_caps import digit_caps_fused

        return digit_caps_fused
    raise ValueError(f"routing implementation must be one of {', '.join(IMPLS)}; got {impl!r}")


def _common_dtype(u: torch.Tensor, W: torch.Tensor):
    if u.dtype == W.dtype:
        return u, W
    common = torch.promote_types(u.dtype, W.dtype)  # bf16 activations, fp32 master W
    return u.to(common), W.to(common)


def _digit_caps_torch(u, W, iterations=3, *, bias=None, detach_inner=False):
    v = route_torch(pose_transform(*_common_dtype(u, W)), iterations, bias, detach_inner)
    return v.to(u.dtype)
