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
from capsfast.hub import HubMixin
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
        known = known_fields(cls, d, "model")
        if "decoder_hidden" in known:
            known["decoder_hidden"] = tuple(known["decoder_hidden"])
        return cls(**known)


def known_fields(cls, d: dict, what: str) -> dict:
    """The keys of an exported config that are fields of dataclass `cls`; any other key is an
    error (a config written by a newer capsfast must not be read with parts silently dropped)."""
    known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}: written by a newer capsfast?")
    return known


@dataclass
class CapsNetOutput:
    lengths: torch.Tensor  # [B, num_classes]: capsule lengths, the class probabilities
    poses: torch.Tensor  # [B, num_classes, digit_dim]: the DigitCaps outputs v
    # [B, C, S, S] in [0, 1] (MNIST: [B, 1, 28, 28]); [B, K, C, S, S] when forward got K labels
    # per image (MultiMNIST)
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


class CapsNet(nn.Module, HubMixin):
    """`CapsNet()` is the paper's MNIST model (8,215,728 parameters with the DigitCaps bias).
    HubMixin gives it save_pretrained, from_pretrained and push_to_hub (capsfast.hub)."""

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
