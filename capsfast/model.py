"""CapsNet (Sabour, Frosst & Hinton 2017) exactly as docs/spec.md specifies it.

image [B,1,28,28] -> Conv1 (256, 9x9, ReLU) -> PrimaryCaps (32 types x 8D on a 6x6 grid)
  -> DigitCaps (W_ij per pair, routing, bias) -> 10 capsules of 16D
  -> decoder (masked capsule -> 512 -> 1024 -> 784, sigmoid)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    # [B, C, H, W] in [0, 1]; [B, K, C, H, W] when forward got K labels per image (MultiMNIST)
    reconstructions: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        """What classification ranks (the baseline's logits play the same part)."""
        return self.lengths


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
        self.W = nn.Parameter(
            torch.randn(cfg.num_primary, cfg.num_classes, cfg.digit_dim, cfg.primary_dim)
            * cfg.w_init_std
        )
        self.bias = (
            nn.Parameter(torch.zeros(cfg.num_classes, cfg.digit_dim)) if cfg.digit_bias else None
        )
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
        """images [B, 1, 28, 28] in [0, 1] -> poses v [B, num_classes, digit_dim]."""
        x = F.relu(self.conv1(images))
        return self.digit(self.primary(x))

    def decode(self, poses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reconstruct [B, 1, 28, 28] from poses [B, J, D], masked to `labels` [B]."""
        return self.decoder(poses, labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> CapsNetOutput:
        """labels [B] (one digit per image) or [B, K] (K digits, MultiMNIST: paper section 6)."""
        poses = self.encode(images)
        lengths = safe_norm(poses)
        # Training: the decoder sees the true label's capsule; inference: the predicted one.
        chosen = labels if labels is not None else lengths.argmax(dim=1)
        if chosen.dim() == 1:
            return CapsNetOutput(lengths, poses, self.decode(poses, chosen))
        # K labels: each digit is reconstructed from its own capsule alone, all K in one decoder
        # call (the decoder is shared, as in the authors' code).
        B, K = chosen.shape
        repeated = (
            poses.unsqueeze(1).expand(B, K, *poses.shape[1:]).reshape(B * K, *poses.shape[1:])
        )
        recon = self.decode(repeated, chosen.reshape(B * K))
        return CapsNetOutput(lengths, poses, recon.view(B, K, *recon.shape[1:]))


def class_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """T [B, num_classes]: 1 for every class present in the image, else 0. labels are [B] (one
    digit per image) or [B, K] (K digits of different classes: MultiMNIST has K = 2)."""
    T = F.one_hot(labels, num_classes)
    return T if labels.dim() == 1 else T.amax(dim=1)


def correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: the image is classified right. One label: the top score is it. K labels (K
    different classes, MultiMNIST): the K top scores are exactly those classes (the paper's
    section 6 takes the two longest capsules; an image counts only when both digits are right,
    as the authors' code counts `correct`)."""
    if labels.dim() == 1:
        return scores.argmax(dim=1) == labels
    top = scores.topk(labels.shape[1], dim=1).indices
    return (top.sort(dim=1).values == labels.sort(dim=1).values).all(dim=1)


def margin_loss(
    lengths: torch.Tensor,
    labels: torch.Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, mean over the batch.

    T_k = 1 for every class present (paper Eq. 4, written for several digits): labels [B] or
    [B, K], as `class_targets` reads them."""
    lengths = lengths.float()
    T = class_targets(labels, lengths.shape[1]).to(lengths.dtype)
    loss = T * F.relu(m_plus - lengths).pow(2) + lam * (1 - T) * F.relu(lengths - m_minus).pow(2)
    return loss.sum(1).mean()


def reconstruction_loss(
    reconstructions: torch.Tensor, images: torch.Tensor, weight: float = 0.0005
) -> torch.Tensor:
    """weight * sum over pixels of the squared error, mean over the batch. With K
    reconstructions per image ([B, K, C, H, W] against each digit alone, MultiMNIST) the sum runs
    over all K: the sum of the K reconstruction losses."""
    err = (reconstructions.float() - images.float()).pow(2).flatten(1).sum(1)
    return weight * err.mean()


def compute_loss(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    recon_weight: float = 0.0005,
    recon_targets: torch.Tensor | None = None,
):
    """The training objective (docs/spec.md): forward with the true labels (the decoder sees the
    true class's capsule), margin loss + recon_weight x reconstruction loss.

    MultiMNIST (paper section 6): labels [B, 2], and recon_targets [B, 2, C, H, W] holds each
    digit alone (as shifted into the pair): each reconstruction is compared with its own digit.
    Otherwise the reconstruction target is the input image.
    Returns (output, total, margin, reconstruction)."""
    out = model(images, labels)
    margin = margin_loss(out.lengths, labels)
    target = images if recon_targets is None else recon_targets
    recon = reconstruction_loss(out.reconstructions, target, recon_weight)
    return out, margin + recon, margin, recon
