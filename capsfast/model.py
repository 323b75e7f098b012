"""CapsNet (Sabour, Frosst & Hinton 2017) exactly as docs/spec.md specifies it.

image [B,1,28,28] -> Conv1 (256, 9x9, ReLU) -> PrimaryCaps (32 types x 8D on a 6x6 grid)
  -> DigitCaps (W_ij per pair, routing, bias) -> 10 capsules of 16D
  -> decoder (masked capsule -> 512 -> 1024 -> 784, sigmoid)

Other data sets configure the same network from the data (ModelConfig): C input channels, an
S x S image (the primary grid and so the number of input capsules follow), K classes, a decoder
that reconstructs C x S x S; the paper's CIFAR-10 variant adds 64 primary types and a "none of
the above" routing capsule (section 7; `none_class`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from capsfast.data import INPUT_STYLES, MNIST_CLASSES
from capsfast.routing import IMPLS, implementation, resolve_impl, safe_norm, squash


@dataclass
class ModelConfig:
    """The architecture. The defaults are the paper's MNIST model; exported with every model."""

    in_channels: int = 1
    image_size: int = 28
    conv_channels: int = 256
    kernel_size: int = 9
    primary_types: int = 32
    primary_dim: int = 8
    num_classes: int = 10
    digit_dim: int = 16
    routing_iters: int = 3
    digit_bias: bool = True
    detach_inner: bool = False
    w_init_std: float = 0.01  # SPEC: small normal; N(0, 1) slows training
    decoder_hidden: tuple[int, int] = (512, 1024)
    # One more capsule in the routing softmax that is no class (the paper's CIFAR-10 "none of
    # the above"): DigitCaps routes to num_classes + 1 capsules; lengths, poses, the losses, the
    # prediction and the decoder see the num_classes real ones only.
    none_class: bool = False
    # What the model's classes and inputs are, so that an export can be used on its own (predict,
    # the app, figures). class_names None: MNIST's (exports that predate class names).
    # input_style: how predict prepares a picture (capsfast.data.INPUT_STYLES); input_resize:
    # photo style, the square size a picture is resized to before the centre image_size crop
    # (the data's size when the model trained on crops; None: image_size).
    class_names: tuple[str, ...] | None = None
    input_style: str = "mnist"
    input_resize: int | None = None

    def __post_init__(self):
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"{len(self.class_names)} class names for num_classes={self.num_classes}"
                )
        if self.input_style not in INPUT_STYLES:
            raise ValueError(f"input_style must be one of {INPUT_STYLES}, got {self.input_style!r}")
        if self.primary_grid < 1:
            raise ValueError(
                f"a {self.image_size}x{self.image_size} input is too small for CapsNet's two "
                f"{self.kernel_size}x{self.kernel_size} convolutions (the second with stride 2): "
                f"it needs at least {2 * self.kernel_size - 1}x{2 * self.kernel_size - 1} pixels"
            )

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names (MNIST's digits for a 10-class model without names, else "0".."K-1")."""
        if self.class_names is not None:
            return self.class_names
        if self.num_classes == len(MNIST_CLASSES):
            return MNIST_CLASSES
        return tuple(str(k) for k in range(self.num_classes))

    @property
    def routed_capsules(self) -> int:
        """J: the capsules DigitCaps routes to (the classes, plus the none-of-the-above one)."""
        return self.num_classes + int(self.none_class)

    @property
    def primary_grid(self) -> int:
        conv1 = self.image_size - self.kernel_size + 1
        return (conv1 - self.kernel_size) // 2 + 1

    @property
    def num_primary(self) -> int:
        return self.primary_types * self.primary_grid**2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden)
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}: written by a newer capsfast?")
        if "decoder_hidden" in known:
            known["decoder_hidden"] = tuple(known["decoder_hidden"])
        return cls(**known)


@dataclass
class CapsNetOutput:
    lengths: torch.Tensor  # [B, num_classes]: capsule lengths, the class probabilities
    poses: torch.Tensor  # [B, num_classes, digit_dim]: the DigitCaps outputs v
    reconstructions: torch.Tensor  # [B, C, S, S] in [0, 1] (MNIST: [B, 1, 28, 28])


class PrimaryCaps(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.types, self.dim = cfg.primary_types, cfg.primary_dim
        self.conv = nn.Conv2d(
            cfg.conv_channels, self.types * self.dim, cfg.kernel_size, stride=2
        )  # no ReLU: squash is the non-linearity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # [B, types*dim, H, W]
        B, _, H, W = y.shape
        # Capsule (type k, y, x) is channels dim*k .. dim*k + dim-1 at (y, x): split the channel
        # axis first, then move the capsule's dim last. Reshaping NCHW straight to [B, -1, dim]
        # would mix spatial positions into one capsule (a bug in several public versions).
        y = y.view(B, self.types, self.dim, H, W).permute(0, 1, 3, 4, 2)
        return squash(y.reshape(B, self.types * H * W, self.dim))  # [B, I, dim]


class DigitCaps(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.iterations = cfg.routing_iters
        self.detach_inner = cfg.detach_inner
        J = cfg.routed_capsules
        self.W = nn.Parameter(
            torch.randn(cfg.num_primary, J, cfg.digit_dim, cfg.primary_dim) * cfg.w_init_std
        )
        self.bias = nn.Parameter(torch.zeros(J, cfg.digit_dim)) if cfg.digit_bias else None
        self.set_routing("auto")

    def set_routing(self, impl: str) -> None:
        """Resolve the routing implementation once, for the device W is on, into the function
        that runs (`auto` is resolved again when the module moves: see _apply)."""
        if impl not in ("auto", *IMPLS):
            raise ValueError(f"routing must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
        self.requested_routing = impl
        self.routing = resolve_impl(impl, self.W.device)
        self._digit_caps = implementation(self.routing)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .cpu(): `auto` follows the device (as nn.RNNBase re-flattens here).
        module = super()._apply(fn, *args, **kwargs)
        if self.requested_routing == "auto":
            self.set_routing("auto")
        return module

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._digit_caps(
            u, self.W, self.iterations, bias=self.bias, detach_inner=self.detach_inner
        )


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h1, h2 = cfg.decoder_hidden
        out = cfg.in_channels * cfg.image_size**2
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.net = nn.Sequential(
            nn.Linear(cfg.num_classes * cfg.digit_dim, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Linear(h2, out),
            nn.Sigmoid(),
        )

    def forward(self, poses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Mask every capsule but the chosen one, keep the [J*D] layout (SPEC: 160 inputs).
        mask = F.one_hot(labels, poses.shape[1]).to(poses.dtype).unsqueeze(-1)
        return self.net((poses * mask).flatten(1)).view(-1, *self.shape)


class CapsNet(nn.Module):
    """`CapsNet()` is the paper's MNIST model (8,215,728 parameters with the DigitCaps bias)."""

    def __init__(self, config: ModelConfig | None = None, routing: str = "auto"):
        super().__init__()
        self.config = config or ModelConfig()
        cfg = self.config
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv_channels, cfg.kernel_size)
        self.primary = PrimaryCaps(cfg)
        self.digit = DigitCaps(cfg)
        self.decoder = Decoder(cfg)
        self.set_routing(routing)

    def set_routing(self, impl: str) -> None:
        """Choose the routing implementation (`--routing`): auto, torch, triton or fused; auto
        resolves for the device the model is on (and again when it moves)."""
        self.digit.set_routing(impl)

    @property
    def routing(self) -> str:
        """The routing implementation that runs (auto resolved)."""
        return self.digit.routing

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, S, S] in [0, 1] -> poses v [B, num_classes, digit_dim] (the
        none-of-the-above capsule, if any, is routed to and then dropped)."""
        x = F.relu(self.conv1(images))
        v = self.digit(self.primary(x))
        return v[:, : self.config.num_classes] if self.config.none_class else v

    def decode(self, poses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reconstruct [B, C, S, S] from poses [B, num_classes, D], masked to `labels` [B]."""
        return self.decoder(poses, labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> CapsNetOutput:
        poses = self.encode(images)
        lengths = safe_norm(poses)
        # Training: the decoder sees the true label's capsule; inference: the predicted one.
        chosen = labels if labels is not None else lengths.argmax(dim=1)
        return CapsNetOutput(lengths, poses, self.decode(poses, chosen))


def margin_loss(
    lengths: torch.Tensor,
    labels: torch.Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, mean over the batch."""
    lengths = lengths.float()
    T = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)
    loss = T * F.relu(m_plus - lengths).pow(2) + lam * (1 - T) * F.relu(lengths - m_minus).pow(2)
    return loss.sum(1).mean()


def reconstruction_loss(
    reconstructions: torch.Tensor, images: torch.Tensor, weight: float = 0.0005
) -> torch.Tensor:
    """weight * sum over pixels of the squared error, mean over the batch."""
    err = (reconstructions.float() - images.float()).pow(2).flatten(1).sum(1)
    return weight * err.mean()


def compute_loss(model, images: torch.Tensor, labels: torch.Tensor, recon_weight: float = 0.0005):
    """The training objective (docs/spec.md): forward with the true labels (the decoder sees the
    true class's capsule), margin loss + recon_weight x reconstruction loss.
    Returns (output, total, margin, reconstruction)."""
    out = model(images, labels)
    margin = margin_loss(out.lengths, labels)
    recon = reconstruction_loss(out.reconstructions, images, recon_weight)
    return out, margin + recon, margin, recon
