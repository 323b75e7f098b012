"""The routing reference against docs/spec.md and an independent, naive loop implementation."""

import itertools

import pytest
import torch

from capsfast.routing import digit_caps, pose_transform, resolve_impl, route, safe_norm, squash


def naive_route(u_hat, iterations, bias=None, detach_inner=False):
    """docs/spec.md's pseudo-code with explicit loops over samples, inputs i and outputs j."""
    B, I, J, D = u_hat.shape
    outs = []
    for n in range(B):
        b = [[torch.zeros((), dtype=u_hat.dtype) for _ in range(J)] for _ in range(I)]
        for t in range(iterations):
            last = t == iterations - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and (last or not detach_inner)):
                v = []
                for j in range(J):
                    s_j = torch.zeros(D, dtype=u_hat.dtype)
                    for i in range(I):
                        denom = sum(torch.exp(b[i][k]) for k in range(J))
                        c_ij = torch.exp(b[i][j]) / denom  # softmax over the J outputs
                        s_j = s_j + c_ij * u_hat[n, i, j]
                    if bias is not None:
                        s_j = s_j + bias[j]
                    norm2 = (s_j * s_j).sum()
                    v.append(norm2 / (1 + norm2) * s_j / torch.sqrt(norm2 + 1e-8))
                if not last:
                    b = [
                        [b[i][j] + (u_hat[n, i, j] * v[j]).sum() for j in range(J)]
                        for i in range(I)
                    ]
                    if detach_inner:
                        b = [[x.detach() for x in row] for row in b]
        outs.append(torch.stack(v))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "iterations,detach_inner,with_bias",
    list(itertools.product([1, 2, 3, 4, 5], [False, True], [False, True])),
)
def test_route_matches_naive_loop_float64(iterations, detach_inner, with_bias):
    torch.manual_seed(iterations * 10 + detach_inner * 2 + with_bias)
    u = (torch.randn(2, 5, 3, 4, dtype=torch.float64) * 0.7).requires_grad_()
    bias = (torch.randn(3, 4, dtype=torch.float64) * 0.3).requires_grad_() if with_bias else None
    g = torch.randn(2, 3, 4, dtype=torch.float64)

    v = route(u, iterations, bias=bias, detach_inner=detach_inner)
    inputs = [u] + ([bias] if with_bias else [])
    grads = torch.autograd.grad((v * g).sum(), inputs)

    v_ref = naive_route(u, iterations, bias, detach_inner)
    grads_ref = torch.autograd.grad((v_ref * g).sum(), inputs)

    assert v.dtype == torch.float64
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_detach_inner_changes_the_gradient_not_the_value():
    torch.manual_seed(0)
    u = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    v_full = route(u, 3)
    v_det = route(u, 3, detach_inner=True)
    torch.testing.assert_close(v_full, v_det)
    g_full = torch.autograd.grad(v_full.sum(), u)[0]
    g_det = torch.autograd.grad(v_det.sum(), u)[0]
    assert (g_full - g_det).abs().max() > 1e-6


def test_gradcheck():
    # The full gradient is the true derivative (detach_inner's is a chosen surrogate, so it is
    # checked against the naive loop above instead).
    torch.manual_seed(1)
    u = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, b: route(u, 3, bias=b), (u, bias))


def test_softmax_runs_over_output_capsules():
    # One input capsule (I = 1): softmax over the inputs would give c = 1 for every j; over the
    # J outputs it gives c = 1/J. After one iteration s_j = c * u_hat_j, so v tells which.
    J = 4
    u = torch.randn(3, 1, J, 8, dtype=torch.float64)
    v = route(u, 1)
    torch.testing.assert_close(v, squash(u[:, 0] / J))


def test_logits_reset_for_every_sample_and_call():
    torch.manual_seed(2)
    u = torch.randn(3, 7, 4, 5)
    together = route(u, 3)
    alone = torch.cat([route(u[n : n + 1], 3) for n in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)  # b never shared
    torch.testing.assert_close(route(u, 3), together)  # nor carried over between calls


def test_squash_value_and_finite_gradient_at_zero():
    s = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(squash(s), 25 / 26 * s / 5)
    z = torch.zeros(2, 16, dtype=torch.float64, requires_grad=True)
    v = squash(z)
    (g,) = torch.autograd.grad(v.sum(), z)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    n = safe_norm(z)
    (gn,) = torch.autograd.grad(n.sum(), z)
    assert torch.isfinite(gn).all()
    assert torch.allclose(n, torch.full_like(n, 1e-4))  # sqrt(0 + eps)


def test_route_dtypes_compute_in_fp32():
    torch.manual_seed(3)
    u = torch.randn(2, 9, 3, 4)
    for dtype in (torch.bfloat16, torch.float16):
        low = u.to(dtype)
        v = route(low, 3)
        assert v.dtype == dtype
        torch.testing.assert_close(v, route(low.float(), 3).to(dtype), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v_auto = route(low, 3)
        torch.testing.assert_close(v_auto, v, rtol=0, atol=0)


def test_route_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, I, J, D\]"):
        route(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="iterations"):
        route(torch.randn(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="bias"):
        route(torch.randn(1, 2, 3, 4), bias=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="auto, torch, triton, fused"):
        route(torch.randn(1, 2, 3, 4), impl="cuda")
    with pytest.raises(ValueError, match="digit_caps"):
        route(torch.randn(1, 2, 3, 4), impl="fused")


def test_auto_resolves_to_reference_on_cpu():
    assert resolve_impl("auto", "cpu") == "torch"
    assert resolve_impl("auto", "cuda") == "triton"


def test_pose_transform_is_per_pair_matrix_product():
    torch.manual_seed(4)
    u = torch.randn(2, 5, 8)
    W = torch.randn(5, 3, 16, 8)
    u_hat = pose_transform(u, W)
    for n, i, j in itertools.product(range(2), range(5), range(3)):
        torch.testing.assert_close(u_hat[n, i, j], W[i, j] @ u[n, i])


def test_digit_caps_torch_is_pose_transform_then_route():
    torch.manual_seed(5)
    u = torch.randn(2, 6, 8)
    W = torch.randn(6, 3, 4, 8) * 0.1
    bias = torch.randn(3, 4) * 0.1
    v = digit_caps(u, W, 3, bias=bias)
    torch.testing.assert_close(v, route(pose_transform(u, W), 3, bias=bias))
    # bf16 activations with an fp32 master W (AMP's situation) work and return u's dtype.
    assert digit_caps(u.bfloat16(), W, 3, bias=bias).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\[B, I, Din\]"):
        digit_caps(u, W[:, :, :, :4])
