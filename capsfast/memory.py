"""The memory of a training step, analytically, per routing implementation: what decides whether a
model fits on a device at a batch size. `--routing auto` uses it (capsfast.routing_choice), and
bench/test_memory.py sets it beside measured peaks.

One fp32 training step (forward, margin + reconstruction loss, backward, Adam) at batch B needs

    peak = 16 P + B * max(routing phase, convolution phase)        bytes

    P                 parameters: weights, gradients and Adam's two moments, 4 bytes each
    A                 what every implementation keeps for backward, per sample:
                      4 [c (S-k+1)^2          conv1 output (c = 256 channels, k = 9)
                         + (3 Din + 4) I      primary capsules: conv output, squash terms
                         + 3 C S^2            input, reconstruction, its target
                         + h1 + h2]           decoder (512 + 1024)
    routing phase     A + kept(impl) + temporaries(impl), per sample, 4 bytes per value:
        torch         kept: u_hat I J D, couplings and logits (2T - 1) I J
                      temporaries: 3.0 I J D (du_hat as autograd accumulates it over the T
                      iterations, and einsum's copies: measured 3.06 at 64 px)
        triton        kept: u_hat I J D (+ 2 T J D routing state)
                      temporaries: 2.3 I J D (du_hat from the kernel, 1, and the pose
                      transform's backward, measured alone at 1.3)
        fused         kept: 2 T J D (s_t and V_t); u_hat and du_hat never exist
    convolution phase A + c (S-k+1)^2 (the gradient of conv1's output, once the routing state
                      is freed)

with S the image side, C channels, I = types * G^2 input capsules on the G x G primary grid,
J routed capsules (the classes, +1 for none-of-the-above), D = 16, Din = 8, T iterations. The
kept terms are exactly what autograd saves (bench/test_memory.py counts the saved tensors);
the temporaries were measured on CPU with torch's MemTracker (torch.distributed._tools), and the
whole is set against peak RSS on CPU and torch.cuda.max_memory_allocated on CUDA by
bench/test_memory.py. u_hat grows with the image area times the classes; the fused DigitCaps
(capsfast.kernels.digit_caps) never stores it.
"""

from __future__ import annotations

from capsfast.model import ModelConfig

FP32 = 4
# The largest shapes the fused kernel takes (capsfast.kernels.digit_caps: MAX_JD, MAX_DIN).
FUSED_MAX_JD, FUSED_MAX_DIN = 32, 16
# Temporaries of the routing backward, in u_hat-sized buffers per sample (see the docstring).
TEMPORARIES = {"torch": 3.0, "triton": 2.3, "fused": 0.0}
# --routing auto: leave this fraction of the free memory for what the model above ignores
# (allocator fragmentation, cuDNN workspaces, the CUDA context of other libraries).
AUTO_HEADROOM = 0.8


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of CapsNet(cfg), from the shapes alone."""
    k, c, cc = cfg.kernel_size, cfg.in_channels, cfg.conv_channels
    primary = cfg.primary_types * cfg.primary_dim
    J, D, Din = cfg.routed_capsules, cfg.digit_dim, cfg.primary_dim
    h1, h2 = cfg.decoder_hidden
    pixels = c * cfg.image_size**2
    count = c * k * k * cc + cc  # conv1
    count += cc * primary * k * k + primary  # PrimaryCaps convolution
    count += cfg.num_primary * J * D * Din + (J * D if cfg.digit_bias else 0)  # W, bias
    count += cfg.num_classes * D * h1 + h1 + h1 * h2 + h2 + h2 * pixels + pixels  # decoder
    return count


def u_hat_values(cfg: ModelConfig) -> int:
    """Values of u_hat [I, J, D] per sample."""
    return cfg.num_primary * cfg.routed_capsules * cfg.digit_dim


def common_activation_bytes(cfg: ModelConfig) -> int:
    """A: bytes per sample every implementation keeps for backward."""
    conv1 = cfg.conv_channels * (cfg.image_size - cfg.kernel_size + 1) ** 2
    primary = (3 * cfg.primary_dim + 4) * cfg.num_primary
    pixels = 3 * cfg.in_channels * cfg.image_size**2
    return FP32 * (conv1 + primary + pixels + sum(cfg.decoder_hidden))


def kept_routing_bytes(cfg: ModelConfig, impl: str) -> int:
    """Bytes per sample that the routing keeps for backward (exactly what autograd saves)."""
    I, J, D, T = cfg.num_primary, cfg.routed_capsules, cfg.digit_dim, cfg.routing_iters
    state = 2 * T * J * D
    if impl == "torch":
        return FP32 * (I * J * D + (2 * T - 1) * I * J)
    if impl == "triton":
        return FP32 * (I * J * D + state)
    if impl == "fused":
        return FP32 * state
    raise ValueError(f"routing implementation must be torch, triton or fused, got {impl!r}")


def per_sample_bytes(cfg: ModelConfig, impl: str) -> int:
    """The batch-dependent part of a step's peak, per sample (the larger of the two phases)."""
    a = common_activation_bytes(cfg)
    temporaries = round(FP32 * TEMPORARIES[impl] * u_hat_values(cfg))
    routing = a + kept_routing_bytes(cfg, impl) + temporaries
    conv = a + FP32 * cfg.conv_channels * (cfg.image_size - cfg.kernel_size + 1) ** 2
    return max(routing, conv)


def step_peak_bytes(cfg: ModelConfig, batch: int, impl: str) -> int:
    """Analytic peak bytes of one fp32 training step at `batch` (see the module docstring)."""
    return 16 * parameter_count(cfg) + batch * per_sample_bytes(cfg, impl)


def largest_batch(cfg: ModelConfig, impl: str, budget_bytes: float) -> int:
    """The largest batch whose analytic peak fits in `budget_bytes` (0: not even one sample)."""
    room = budget_bytes - 16 * parameter_count(cfg)
    return max(0, int(room // per_sample_bytes(cfg, impl)))


def fused_supports(cfg: ModelConfig) -> bool:
    """Whether the fused DigitCaps kernel takes this shape (J, D <= 32; Din <= 16)."""
    return (
        cfg.routed_capsules <= FUSED_MAX_JD
        and cfg.digit_dim <= FUSED_MAX_JD
        and cfg.primary_dim <= FUSED_MAX_DIN
    )
