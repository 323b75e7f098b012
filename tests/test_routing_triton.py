"""The fused Triton routing (capsfast.kernels.routing) against the reference route(impl="torch").

Runs natively on CUDA when present, else under the Triton interpreter on CPU (conftest.py sets
TRITON_INTERPRET=1 before triton is imported). Every test runs with CAPSFAST_POISON=1: outputs
and scratch buffers start as NaN, so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from capsfast.kernels import routing as kr
from capsfast.kernels.common import buffer

from capsfast import CapsNet, margin_loss, reconstruction_loss
from capsfast.routing import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative tolerance per dtype: the kernels and the reference both compute in fp32 and round the
# result to the input dtype once, so they differ by fp32 reassociation plus one rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(TOL)
PAPER = (2, 1152, 10, 16)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("CAPSFAST_POISON", "1")
    monkeypatch.delenv(kr.TILES_ENV, raising=False)


def assert_close(got, want, dtype, what=""):
    """|got - want| <= tol * (|want| + max|want|): relative to the tensor's scale, so entries
    near zero do not need an absolute tolerance of their own."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    tol = TOL[dtype]
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def make_inputs(shape, dtype, with_bias, seed=0, bias_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    B, _, J, D = shape
    # Scale so |s| spans squash's curved range and the softmax is far from uniform.
    u = (torch.randn(shape, generator=gen) * 0.5).to(DEVICE, dtype).requires_grad_(True)
    bias = None
    if with_bias:
        bias = (torch.randn(J, D, generator=gen) * 0.3).to(DEVICE, bias_dtype or dtype)
        bias.requires_grad_(True)
    grad_v = torch.randn(B, J, D, generator=gen).to(DEVICE, dtype)
    return u, bias, grad_v


def check_against_reference(shape, iterations, detach_inner, with_bias, dtype, seed=0):
    u, bias, grad_v = make_inputs(shape, dtype, with_bias, seed)
    inputs = [u] + ([bias] if with_bias else [])
    results = {}
    for impl in ("torch", "triton"):
        v = route(u, iterations, bias=bias, detach_inner=detach_inner, impl=impl)
        grads = torch.autograd.grad(v, inputs, grad_v)
        results[impl] = (v, *grads)
    names = ("v", "du_hat", "dbias")[: len(inputs) + 1]
    for name, got, want in zip(names, results["triton"], results["torch"], strict=True):
        assert_close(got, want, dtype, f"{name} {shape} T={iterations} detach={detach_inner}")


# --- forward and gradients against the reference --------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
def test_iterations_modes_bias_fp32(iterations, detach_inner, with_bias):
    check_against_reference((2, 37, 7, 5), iterations, detach_inner, with_bias, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 37, 7, 5), (2, 37, 1, 5), (1, 37, 7, 5), (3, 1, 4, 3), (2, 9, 3, 1), (1, 6, 32, 32)],
    ids=["odd", "J1", "B1", "I1", "D1", "J32D32"],
)
@pytest.mark.parametrize("detach_inner", [False, True])
def test_shapes_dtypes(shape, dtype, detach_inner):
    check_against_reference(shape, 3, detach_inner, True, dtype, seed=1)


@pytest.mark.parametrize(
    "tiles",
    ["block_i=4,slices=3", "block_i=1,slices=100", "block_i=8,slices=1", "block_i=64,slices=2",
     "sms=2"],
    ids=["partial-last-slice", "one-row-tiles", "one-slice", "one-masked-tile", "gpu-tiles"],
)  # fmt: skip
def test_tilings(monkeypatch, tiles):
    """Other (BLOCK_I, i-slices) splits: masked rows, empty trailing tiles, many partials; and
    the GPU's own choice (for a device with 2 SMs), run here under the interpreter."""
    monkeypatch.setenv(kr.TILES_ENV, tiles)
    check_against_reference((2, 37, 7, 5), 3, False, True, torch.float32, seed=2)


@pytest.mark.parametrize(
    "value", ["4", "block_i=0", "block_i=x", "slices=2,block_b=4", "sms=2,slices=1", "block_i=3"]
)
def test_tile_override_rejects_what_it_cannot_use(monkeypatch, value):
    """CAPSFAST_ROUTE_TILES: comma-separated key=n of this op's keys (n >= 1, BLOCK_I a power of
    two), or sms=N alone; anything else is an error, never silently ignored."""
    monkeypatch.setenv(kr.TILES_ENV, value)
    with pytest.raises(ValueError, match=kr.TILES_ENV):
        kr._tiles(2, 37, 7, 5, torch.device(DEVICE))


@pytest.mark.parametrize(
    "dtype, iterations, detach_inner, with_bias",
    [
        (torch.float32, 3, False, True),
        (torch.bfloat16, 3, False, True),
        (torch.float16, 3, True, False),
        (torch.float32, 2, True, True),
    ],
    ids=["fp32-full-bias", "bf16-full-bias", "fp16-detach", "fp32-T2-detach-bias"],
)
def test_paper_shape(dtype, iterations, detach_inner, with_bias):
    check_against_reference(PAPER, iterations, detach_inner, with_bias, dtype, seed=3)


def test_mixed_dtype_bias_and_noncontiguous_input():
    """bf16 u_hat with an fp32 bias (an fp32 parameter under autocast), u_hat a transposed view:
    v and du in bf16, dbias in fp32, as the reference gives."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 7, 37, 5, generator=gen).to(DEVICE, torch.bfloat16)
    u = base.transpose(1, 2).requires_grad_(True)  # [2, 37, 7, 5], not contiguous
    assert not u.is_contiguous()
    bias = torch.randn(7, 5, generator=gen).to(DEVICE).requires_grad_(True)
    grad_v = torch.randn(2, 7, 5, generator=gen).to(DEVICE, torch.bfloat16)
    out = {}
    for impl in ("torch", "triton"):
        v = route(u, 3, bias=bias, impl=impl)
        out[impl] = (v, *torch.autograd.grad(v, (u, bias), grad_v))
    for name, got, want in zip(("v", "du", "dbias"), out["triton"], out["torch"], strict=True):
        assert_close(got, want, torch.bfloat16, name)
    assert out["triton"][2].dtype == torch.float32


def test_deterministic():
    u, bias, grad_v = make_inputs((2, 37, 7, 5), torch.float32, True, seed=5)
    runs = []
    for _ in range(2):
        v = route(u, 3, bias=bias, impl="triton")
        runs.append((v, *torch.autograd.grad(v, (u, bias), grad_v)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_poison_fills_buffers_with_nan():
    """The NaN poisoning the tests of both ops rely on (kernels.common.buffer) is switched on."""
    assert torch.isnan(buffer((3, 4), torch.bfloat16, DEVICE)).all()
    assert torch.isnan(buffer((3, 4), torch.float32, DEVICE)).all()
    assert torch.isnan(buffer((3,), torch.bfloat16, DEVICE)).all()


# --- torch.library: opcheck, torch.compile, autocast ----------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    u, bias, _ = make_inputs((2, 5, 3, 4), torch.float32, with_bias, seed=6)
    torch.library.opcheck(torch.ops.capsfast.route.default, (u, bias, 3, False))
    torch.library.opcheck(torch.ops.capsfast.route.default, (u, bias, 2, True))


def _compiled_matches(backend):
    u, bias, grad_v = make_inputs((2, 37, 7, 5), torch.float32, True, seed=7)

    def f(u, bias):
        return route(u, 3, bias=bias, impl="triton").square().sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    g = grad_v[..., 0]
    out = {}
    for name, fn in (("eager", f), ("compiled", compiled)):
        y = fn(u, bias)
        out[name] = (y, *torch.autograd.grad(y, (u, bias), g))
    for name, got, want in zip(("y", "du", "dbias"), out["compiled"], out["eager"], strict=True):
        assert_close(got, want, torch.float32, f"{backend} {name}")


def test_compile_aot_eager():
    _compiled_matches("aot_eager")


def test_compile_inductor():
    _compiled_matches("inductor")


def test_autocast_matches_reference():
    """Under autocast u_hat comes from a low-precision einsum; the op takes it as it is."""
    amp = torch.bfloat16 if DEVICE == "cpu" else torch.float16
    gen = torch.Generator().manual_seed(8)
    W = (torch.randn(37, 7, 5, 4, generator=gen) * 0.3).to(DEVICE).requires_grad_(True)
    x = torch.randn(2, 37, 4, generator=gen).to(DEVICE)
    bias = (torch.randn(7, 5, generator=gen) * 0.3).to(DEVICE).requires_grad_(True)
    out = {}
    for impl in ("torch", "triton"):
        with torch.autocast(DEVICE, dtype=amp):
            u_hat = torch.einsum("ijdk,bik->bijd", W, x)
            v = route(u_hat, 3, bias=bias, impl=impl)
            loss = v.float().square().sum()
        assert u_hat.dtype == amp and v.dtype == amp
        out[impl] = (v, *torch.autograd.grad(loss, (W, bias)))
    for name, got, want in zip(("v", "dW", "dbias"), out["triton"], out["torch"], strict=True):
        assert_close(got, want, amp, f"autocast {name}")


def test_autocast_passes_inputs_through():
    """Both ops follow one autocast rule, on CPU and CUDA alike: no autocast kernel, so autocast's
    fallthrough hands them their inputs as they are (bf16 u_hat, fp32 bias); they compute in
    fp32 and return u_hat's dtype, bit for bit what they return outside autocast."""
    import capsfast.kernels.digit_caps  # noqa: F401  (registers capsfast::digit_caps)

    for op in ("capsfast::route", "capsfast::digit_caps"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    u, _, grad_v = make_inputs((2, 37, 7, 5), torch.bfloat16, False, seed=10)
    bias = (torch.randn(7, 5, generator=torch.Generator().manual_seed(11)) * 0.3).to(DEVICE)
    bias.requires_grad_(True)
    out = {}
    for amp in (True, False):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            v = route(u, 3, bias=bias, impl="triton")
        out[amp] = (v, *torch.autograd.grad(v, (u, bias), grad_v))
    assert [x.dtype for x in out[True]] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for got, want in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- launch device, validation, costs --------------------------------------------------------


class _CudaCurrentDevice:
    """Stands in for torch.cuda.device where no GPU exists: keeps the index of the current CUDA
    device, which is what a Triton launch runs on."""

    current = 0

    def __init__(self, device):
        self.index = torch.device(device).index

    def __enter__(self):
        self.previous, _CudaCurrentDevice.current = _CudaCurrentDevice.current, self.index

    def __exit__(self, *exc):
        _CudaCurrentDevice.current = self.previous
        return False


@pytest.mark.parametrize("op", ["route", "digit_caps"])
def test_launches_run_on_the_tensors_device(monkeypatch, op):
    """u on cuda:1 while cuda:0 is current: every kernel of the op (forward and backward) must
    launch with cuda:1 current (kernels.common.on_device), and cuda:0 be current again after.
    No second GPU exists here: the launchers run on fake tensors that claim cuda:1, with recorders
    in place of the jit kernels (the same capture the compile check uses)."""
    from capsfast.kernels import common
    from capsfast.kernels import digit_caps as kd
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = kr if op == "route" else kd
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, _CudaCurrentDevice.current))

    kernels = sorted(name for name in dir(module) if name.endswith("_kernel"))
    for name in kernels:
        monkeypatch.setattr(module, name, Recorder(name))
    monkeypatch.setattr(common, "sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "device", _CudaCurrentDevice)
    monkeypatch.setattr(_CudaCurrentDevice, "current", 0)
    dev = torch.device("cuda", 1)
    with FakeTensorMode():
        bias = torch.empty(10, 16, device=dev)
        if op == "route":
            u_hat = torch.empty(4, 64, 10, 16, device=dev, dtype=torch.bfloat16)
            v, S, Vprev = kr.route_forward(u_hat, bias, 3)
            kr.route_backward(torch.empty_like(v), u_hat, S, Vprev, False)
        else:
            u = torch.empty(4, 64, 8, device=dev, dtype=torch.bfloat16)
            W = torch.empty(64, 10, 16, 8, device=dev)
            v, S, Vprev = kd.digit_caps_forward(u, W, bias, 3)
            kd.digit_caps_backward(torch.empty_like(v), u, W, bias, S, Vprev, 3, False)
    assert sorted({name for name, _ in launches}) == kernels  # every kernel of the op launched
    assert {device for _, device in launches} == {1}
    assert _CudaCurrentDevice.current == 0


def test_pass_costs_by_hand():
    """kernels.routing.pass_costs at B=2, I=4, J=3, D=2, T=2, fp32, bias, full gradient, one
    partial per sample (E = B I J D = 48 values of u_hat, 4 bytes; m = B J D = 12; IJ = 24).
    Bytes, tensor by tensor: u_hat read by T forward + T-1 backward passes and by the du pass,
    du written: (2T + 1) 4E = 960; V_0 zeroed 48; V_{t-1} read by the forward passes 96;
    partials written and read by 3 passes 288; bias read per finish 48; forward finishes write
    s_t (96), update V (96) and write v (48); backward finish of G_T reads dL/dv and s_T and
    writes G_T (144); the backward pass reads V_1, G_2 (96); its finish reads s_1, writes G_1
    (96); the du pass reads G_1, G_2 and V_1 (144); dbias reads G (96) and writes 24."""
    costs = kr.pass_costs(2, 4, 3, 2, None, 2, torch.float32, False, True, sms=1)
    assert costs["bytes"] == 960 + 48 + 96 + 288 + 48 + 240 + 144 + 96 + 96 + 144 + 120 == 2280
    # FLOPs: forward passes T (4E + 5 IJ) = 624; finishes T (n + 6) m = 168; backward finishes
    # 2 x 9m = 216; backward pass (4E + 10 IJ) + 2E = 528; du pass 2E (t = 1) + 8E + 9 IJ = 696;
    # dbias T m = 24.
    assert costs["flops"] == 624 + 168 + 216 + 528 + 696 + 24 == 2256
    assert costs["l2_bytes"] == costs["bytes"]  # one program per sample: nothing re-read
    assert [p["kernel"] for p in costs["passes"]].count("_route_fwd_pass_kernel") == 2
    forward = kr.pass_costs(2, 4, 3, 2, None, 2, torch.float32, False, True, backward=False, sms=1)
    assert forward["bytes"] == 48 + 288 + 216 + 288 + 168


# --- the whole model -------------------------------------------------------------------------


def test_capsnet_training_step_matches_reference():
    torch.manual_seed(9)
    ref = CapsNet(routing="torch").to(DEVICE)
    fast = CapsNet(routing="triton").to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    assert fast.routing == "triton"
    images = torch.rand(2, 1, 28, 28, device=DEVICE)
    labels = torch.tensor([3, 7], device=DEVICE)
    results = {}
    for name, model in (("torch", ref), ("triton", fast)):
        out = model(images, labels)
        loss = margin_loss(out.lengths, labels) + reconstruction_loss(out.reconstructions, images)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert_close(results["triton"][0], results["torch"][0], torch.float32, "loss")
    grads_ref = results["torch"][1]
    assert set(results["triton"][1]) == set(grads_ref) and "digit.bias" in grads_ref
    for n, g in results["triton"][1].items():
        assert_close(g, grads_ref[n], torch.float32, f"grad of {n}")


# --- errors and availability ----------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    u = torch.randn(2, 5, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[B, I, J, D\]"):
        kr.route_triton(u[0], 3)
    with pytest.raises(ValueError, match="bias must be"):
        kr.route_triton(u, 3, bias=torch.zeros(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="iterations"):
        kr.route_triton(u, 0)
    with pytest.raises(ValueError, match="I, J and D"):
        kr.route_triton(u[:, :0], 2)
    with pytest.raises(TypeError, match="impl='torch' for float64"):
        kr.route_triton(u.double(), 3)


def test_triton_available_here():
    ok, reason = kr.triton_available(DEVICE)
    assert ok, reason
    assert kr.triton_available("meta") == (
        False,
        "Triton routing does not support device type 'meta'",
    )


def test_cpu_without_interpreter_raises_clear_error():
    """A fresh interpreter without TRITON_INTERPRET: a CPU tensor gets a RuntimeError naming the
    ways out, and triton_available('cpu') says no."""
    script = textwrap.dedent(
        """
        import torch
        from capsfast.kernels.routing import triton_available
        from capsfast.routing import route
        ok, reason = triton_available("cpu")
        assert not ok and "TRITON_INTERPRET" in reason, reason
        try:
            route(torch.randn(1, 3, 2, 2), 2, impl="triton")
        except RuntimeError as e:
            print("ERROR:", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR:" in proc.stdout
    assert "impl='torch'" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout
