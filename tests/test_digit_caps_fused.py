"""The fused DigitCaps op (kernels/digit_caps.py) against the plain-PyTorch reference.

digit_caps(u, W, ..., impl="fused") forms u_hat = W u on chip and routes in Triton; every test
compares it with digit_caps(..., impl="torch"): forward and the gradients of u, W and bias. On a
machine without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA the same module runs them natively.

Every buffer the op allocates is filled with NaN first (CAPSFAST_POISON=1, set for every test
here), so an element a kernel forgets to write fails the comparison.
"""

# ruff: noqa: E741  (B, I, J, D, Din: the sizes as docs/routing.md and docs/spec.md name them)

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from capsfast import CapsNet, margin_loss, reconstruction_loss
from capsfast.routing import digit_caps, squash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerance per dtype of the tensor being checked, relative to the largest magnitude of the
# expected tensor (atol = tol * max|expected|, rtol = tol).
#  - float32: the op and the reference add the same fp32 terms in different orders (sums over
#    1152 inputs split into slices and chunks, softmax and squash reassociated); measured error
#    is about 1e-6 of the largest value at the paper shape, so 2e-5 leaves a 20x margin while a
#    wrong term (a missing iteration, a wrong sign) shows up at 1e-2 or more.
#  - bfloat16 / float16: the op computes in fp32 and rounds once when it writes v, du or dW
#    (relative half-ulp 2^-9 for bf16, 2^-12 for fp16), so the bounds are a few ulps.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

PAPER = dict(I=1152, J=10, D=16, Din=8)
ODD = dict(I=37, J=7, D=5, Din=3)


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setenv("CAPSFAST_POISON", "1")
    monkeypatch.delenv("CAPSFAST_DIGIT_CAPS_TILES", raising=False)


def make_inputs(B, I, J, D, Din, *, u_dtype, w_dtype, bias, seed):
    """Capsule-like inputs (|u| < 1, u correlated across i so that routing has something to agree
    on, logits of order 1) and a random incoming gradient for v."""
    g = torch.Generator().manual_seed(seed)
    u = squash(torch.randn(B, 1, Din, generator=g) + 0.7 * torch.randn(B, I, Din, generator=g))
    W = torch.randn(I, J, D, Din, generator=g) * (0.6 / Din**0.5)
    W = W + torch.randn(1, J, D, Din, generator=g) * (3 * J / I / Din**0.5)
    beta = torch.randn(J, D, generator=g) * 0.5 if bias else None
    grad_v = torch.randn(B, J, D, generator=g)
    u = u.to(DEVICE, u_dtype).requires_grad_()
    W = W.to(DEVICE, w_dtype).requires_grad_()
    if beta is not None:
        beta = beta.to(DEVICE, w_dtype).requires_grad_()
    return u, W, beta, grad_v.to(DEVICE, u_dtype)


def assert_close(actual, expected, what):
    tol = TOL[actual.dtype]
    expected = expected.float()
    scale = expected.abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten NaN poison?)"
    torch.testing.assert_close(
        actual.float(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(u, W, beta, grad_v, iterations, detach_inner, fn=None):
    """Run the fused op (or fn, a wrapper of it) and the reference; compare v and every gradient.

    The reference runs on the same inputs upcast to fp32: the fused op forms u_hat in fp32 from
    the bf16/fp16 values, whereas the reference with bf16 inputs would round u_hat to bf16 first.
    So the only low-precision error left is the op's final rounding of v, du, dW and dbias.
    """
    NAMES = ("du", "dW", "dbias")
    fn = fn or (lambda *a, **k: digit_caps(*a, **k, impl="fused"))
    inputs = [x for x in (u, W, beta) if x is not None]
    v = fn(u, W, iterations, bias=beta, detach_inner=detach_inner)
    grads = torch.autograd.grad(v, inputs, grad_v)

    ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
    u32, W32 = ref_inputs[:2]
    b32 = ref_inputs[2] if beta is not None else None
    v_ref = digit_caps(u32, W32, iterations, bias=b32, detach_inner=detach_inner, impl="torch")
    ref_grads = torch.autograd.grad(v_ref, ref_inputs, grad_v.float())

    assert v.dtype == u.dtype and v.shape == v_ref.shape
    assert_close(v, v_ref, "v")
    for name, x, gx, gref in zip(NAMES[: len(inputs)], inputs, grads, ref_grads, strict=True):
        assert gx.dtype == x.dtype, f"{name} is {gx.dtype}, its input {x.dtype}"
        assert gx.shape == x.shape
        assert_close(gx, gref, name)
    return v, grads


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------

PAPER_CASES = [  # the interpreter is slow at this size: three cases cover the three dtype modes
    pytest.param(torch.float32, torch.float32, 3, False, True, id="fp32-full-bias"),
    pytest.param(torch.bfloat16, torch.float32, 3, True, True, id="bf16u-fp32W-detach-bias"),
    pytest.param(torch.float16, torch.float16, 2, False, False, id="fp16-full-nobias"),
]


@pytest.mark.parametrize("u_dtype, w_dtype, iterations, detach_inner, bias", PAPER_CASES)
def test_paper_shape(u_dtype, w_dtype, iterations, detach_inner, bias):
    args = make_inputs(2, **PAPER, u_dtype=u_dtype, w_dtype=w_dtype, bias=bias, seed=1)
    check_against_reference(*args, iterations, detach_inner)


@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
def test_iterations_odd_shape(iterations, detach_inner):
    bias = iterations % 2 == 1  # with and without bias across the sweep
    args = make_inputs(
        3, **ODD, u_dtype=torch.float32, w_dtype=torch.float32, bias=bias, seed=iterations
    )
    check_against_reference(*args, iterations, detach_inner)


SHAPES = [  # (B, I, J, D, Din), each with both gradient modes
    (2, 37, 1, 5, 3),  # J = 1: softmax over one capsule
    (2, 37, 7, 5, 1),  # Din = 1
    (2, 37, 7, 5, 16),  # Din = 16, the largest
    (1, 37, 7, 5, 3),  # B = 1
    (3, 1, 3, 1, 2),  # I = 1, D = 1
    (2, 9, 32, 32, 5),  # J = D = 32, the largest
    (20, 11, 3, 4, 2),  # B = 20: more than one sample block with the default tiles
]
SHAPE_CASES = [(shape, detach) for shape in SHAPES for detach in (False, True)]
SHAPE_CASES.append(((1, *PAPER.values()), False))  # the paper shape at B = 1 (once: it is slow)


@pytest.mark.parametrize(
    "shape, detach_inner", SHAPE_CASES, ids=[f"{s}-detach={d}" for s, d in SHAPE_CASES]
)
def test_shapes(shape, detach_inner):
    B, I, J, D, Din = shape
    args = make_inputs(
        B, I, J, D, Din, u_dtype=torch.float32, w_dtype=torch.float32, bias=True, seed=B + 7
    )
    check_against_reference(*args, 3, detach_inner)


DTYPES = [
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16u-fp32W"),
    pytest.param(torch.float16, torch.float32, id="fp16u-fp32W"),
    pytest.param(torch.float32, torch.float32, id="fp32"),
]


@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("u_dtype, w_dtype", DTYPES)
def test_dtypes(u_dtype, w_dtype, detach_inner):
    args = make_inputs(4, **ODD, u_dtype=u_dtype, w_dtype=w_dtype, bias=True, seed=3)
    check_against_reference(*args, 3, detach_inner)


@pytest.mark.parametrize("detach_inner", [False, True])
def test_several_slices_blocks_and_chunks(monkeypatch, detach_inner):
    """Small forced tiles: 2 sample blocks (one partial), 3 i-slices (the last partial) of 2
    chunks each, so the partials reduction, the dW sum over sample blocks and the masks at every
    edge all run."""
    monkeypatch.setenv("CAPSFAST_DIGIT_CAPS_TILES", "block_b=4,block_i=8,i_per_prog=16")
    args = make_inputs(6, **ODD, u_dtype=torch.float32, w_dtype=torch.float32, bias=True, seed=5)
    check_against_reference(*args, 4, detach_inner)


@pytest.mark.parametrize(
    "shape, sms", [((20, 37, 7, 5, 3), 2), ((9, 9, 32, 32, 5), 2), ((2, 150, 10, 16, 8), 4)]
)
def test_gpu_geometry(monkeypatch, shape, sms):
    """The launch geometry chosen for a GPU (here for a device with `sms` SMs, so that the small
    shapes still get several slices, chunks and sample blocks), run under the interpreter on CPU
    machines: the CUDA heuristic itself is covered, not only the interpreter's big tiles."""
    from capsfast.kernels.digit_caps import _gpu_tiles

    B, I, J, D, Din = shape
    geometry = _gpu_tiles(B, I, J, D, sms=sms)
    assert geometry["n_slices"] * geometry["n_blocks"] > 1 and geometry["n_slices_final"] > 1
    monkeypatch.setenv("CAPSFAST_DIGIT_CAPS_TILES", f"sms={sms}")
    args = make_inputs(
        B, I, J, D, Din, u_dtype=torch.bfloat16, w_dtype=torch.float32, bias=True, seed=9
    )
    check_against_reference(*args, 3, False)


def test_deterministic(monkeypatch):
    """Partials are summed in a fixed order and no atomics are used: two runs agree bitwise."""
    monkeypatch.setenv("CAPSFAST_DIGIT_CAPS_TILES", "block_b=4,block_i=8,i_per_prog=16")
    u, W, beta, grad_v = make_inputs(
        6, **ODD, u_dtype=torch.float32, w_dtype=torch.float32, bias=True, seed=8
    )
    runs = []
    for _ in range(2):
        v = digit_caps(u, W, 3, bias=beta, impl="fused")
        runs.append((v, *torch.autograd.grad(v, [u, W, beta], grad_v)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    u, W, beta, grad_v = make_inputs(
        3, **ODD, u_dtype=torch.float32, w_dtype=torch.float32, bias=True, seed=11
    )
    # Same values in transposed storage: the op must read them by value, not by layout.
    u_t = u.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    W_t = W.detach().permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0).requires_grad_()
    b_t = beta.detach().t().contiguous().t().requires_grad_()
    assert not u_t.is_contiguous() and not W_t.is_contiguous() and not b_t.is_contiguous()
    check_against_reference(
        u_t, W_t, b_t, grad_v.transpose(0, 2).contiguous().transpose(0, 2), 3, False
    )


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    from capsfast.kernels import digit_caps as dc

    u, W, beta, grad_v = make_inputs(
        2, I=5, J=3, D=4, Din=2, u_dtype=torch.float32, w_dtype=torch.float32, bias=bias, seed=2
    )
    for detach_inner in (False, True):
        torch.library.opcheck(torch.ops.capsfast.digit_caps, (u, W, beta, 3, detach_inner))
    u, W = u.detach(), W.detach()
    beta = None if beta is None else beta.detach()
    v, S, Vprev = torch.ops.capsfast.digit_caps(u, W, beta, 3, False)
    back = (grad_v, u, W, beta, S, Vprev, 3, False)
    torch.library.opcheck(torch.ops.capsfast.digit_caps_backward, back)
    assert dc.digit_caps_fused(u, W, 3, bias=beta).shape == v.shape


def test_torch_compile():
    # Inductor on the whole call; the custom op is opaque to it (fullgraph: no graph breaks).
    # On CPU inductor compiles C++ for the glue; the op itself runs in the interpreter.
    @torch.compile(backend="inductor", fullgraph=True)
    def compiled(u, W, iterations, bias=None, detach_inner=False):
        return digit_caps(u, W, iterations, bias=bias, detach_inner=detach_inner, impl="fused")

    args = make_inputs(3, **ODD, u_dtype=torch.float32, w_dtype=torch.float32, bias=True, seed=4)
    v_c, grads_c = check_against_reference(*args, 3, False, fn=compiled)
    v_e = digit_caps(*args[:2], 3, bias=args[2], impl="fused")
    grads_e = torch.autograd.grad(v_e, [x for x in args[:3]], args[3])
    torch.testing.assert_close(v_c, v_e, rtol=0, atol=0)  # the same kernels, the same values
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


def test_autocast_passes_inputs_through():
    """Under autocast the op sees bf16 u and the fp32 master W unchanged, returns v in u's dtype
    and gradients in each input's dtype, exactly as outside autocast."""
    for key in ("AutocastCPU", "AutocastCUDA"):  # one rule for both ops: autocast's fallthrough
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("capsfast::digit_caps", key)
    u, W, beta, grad_v = make_inputs(
        2, **ODD, u_dtype=torch.bfloat16, w_dtype=torch.float32, bias=True, seed=6
    )
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        v = digit_caps(u, W, 3, bias=beta, impl="fused")
    grads = torch.autograd.grad(v, [u, W, beta], grad_v)
    v_plain = digit_caps(u, W, 3, bias=beta, impl="fused")
    grads_plain = torch.autograd.grad(v_plain, [u, W, beta], grad_v)
    assert v.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(v, v_plain, rtol=0, atol=0)
    for g, gp in zip(grads, grads_plain, strict=True):
        torch.testing.assert_close(g, gp, rtol=0, atol=0)


def test_pass_costs_by_hand():
    """kernels.digit_caps.pass_costs at B=2, I=4, J=3, D=2, Din=2, T=2, bf16 u with an fp32 W,
    bias, full gradient (one partial per sample, one sample block; the last pass has two
    programs of two inputs). u is 2 I Din = 16 values (32 bytes), W 48 (192 bytes).
    Bytes: u read by 2T - 1 passes and the last, du written: 5 x 32 = 160; W likewise, dW
    written: 5 x 192 = 960; the rest is the routing state, as kernels.routing's test derives
    (48 + 96 + 288 + 48), with v and dL/dv in bf16: forward finishes 96 + 96 + 24, G_T 120,
    backward pass 96, its finish 96, last pass 144, dbias 120."""
    from capsfast.kernels import digit_caps as dc

    costs = dc.pass_costs(2, 4, 3, 2, 2, 2, torch.bfloat16, False, True, w_dtype=torch.float32,
                          sms=1)  # fmt: skip
    state = 48 + 96 + 288 + 48 + 216 + 120 + 96 + 96 + 144 + 120
    assert costs["bytes"] == 160 + 960 + state == 2392
    # L2: both last-pass programs read the whole state (2 x 144).
    assert costs["l2_bytes"] == costs["bytes"] + 144
    # FLOPs: the routing ones of kernels.routing's test (2256) plus forming u_hat, 2 E Din = 192,
    # in each of the 3 passes over i and 3 x 192 in the last (u_hat, du and dW).
    assert costs["flops"] == 2256 + 3 * 192 + 3 * 192 == 3408


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_cpu_without_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from capsfast.kernels.digit_caps import digit_caps_fused\n"
        "u, W = torch.rand(2, 4, 3), torch.rand(4, 2, 5, 3)\n"
        "try:\n"
        "    digit_caps_fused(u, W, 3)\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "RuntimeError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
    assert "impl='torch'" in out.stdout


@pytest.mark.parametrize(
    "u_shape, w_shape, bias_shape, iterations, error",
    [
        ((2, 4, 3), (5, 2, 5, 3), None, 3, "u must be"),  # I differs
        ((2, 4, 3), (4, 2, 5, 2), None, 3, "u must be"),  # Din differs
        ((2, 4), (4, 2, 5, 3), None, 3, "u must be"),
        ((2, 4, 17), (4, 2, 5, 17), None, 3, "Din <= 16"),
        ((2, 4, 3), (4, 33, 5, 3), None, 3, "J, D <= 32"),
        ((2, 4, 3), (4, 2, 33, 3), None, 3, "J, D <= 32"),
        ((2, 4, 3), (4, 2, 5, 3), (5, 2), 3, "bias must be"),
        ((2, 4, 3), (4, 2, 5, 3), None, 0, "iterations must be"),
        ((0, 4, 3), (4, 2, 5, 3), None, 3, "empty"),
    ],
)
def test_bad_arguments(u_shape, w_shape, bias_shape, iterations, error):
    from capsfast.kernels.digit_caps import digit_caps_fused

    u, W = torch.rand(u_shape, device=DEVICE), torch.rand(w_shape, device=DEVICE)
    bias = None if bias_shape is None else torch.rand(bias_shape, device=DEVICE)
    with pytest.raises(ValueError, match=error):
        digit_caps_fused(u, W, iterations, bias=bias)


def test_float64_is_a_clear_error():
    from capsfast.kernels.digit_caps import digit_caps_fused

    u = torch.rand(2, 4, 3, device=DEVICE, dtype=torch.float64)
    W = torch.rand(4, 2, 5, 3, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="impl='torch'"):
        digit_caps_fused(u, W, 3)


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------


def test_capsnet_training_step_fused_matches_torch(ieee_fp32):
    # Full fp32 convolutions and matmuls on CUDA (no TF32, the ieee_fp32 fixture), so that the
    # fp32 bound applies.
    torch.manual_seed(0)
    images = torch.rand(2, 1, 28, 28, device=DEVICE)
    labels = torch.tensor([3, 7], device=DEVICE)
    model = CapsNet(routing="torch").to(DEVICE)
    with torch.no_grad():  # larger W than the init, so that routing moves away from uniform
        model.digit.W.mul_(5.0)
        model.digit.bias.normal_(0, 0.1)

    results = {}
    for impl in ("torch", "fused"):
        model.set_routing(impl)
        model.zero_grad(set_to_none=True)
        out = model(images, labels)
        loss = margin_loss(out.lengths, labels) + reconstruction_loss(out.reconstructions, images)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[impl] = (loss.detach(), out.poses.detach(), grads)

    loss_t, poses_t, grads_t = results["torch"]
    loss_f, poses_f, grads_f = results["fused"]
    # Both paths run fp32 end to end, so the fp32 bound applies (relative to each tensor's max).
    assert_close(loss_f, loss_t, "loss")
    assert_close(poses_f, poses_t, "poses")
    assert grads_f.keys() == grads_t.keys()
    for name in grads_t:
        assert_close(grads_f[name], grads_t[name], f"grad {name}")
