"""The paper's baseline CNN (Sabour et al. 2017, section 5, Table 1), trained by the same trainer.

Section 5: "three convolutional layers of 256, 256, 128 channels. Each has 5x5 kernels and stride
of 1. The last convolutional layers are followed by two fully connected layers of size 328, 192.
The last fully connected layer is connected with dropout to a 10 class softmax layer with cross
entropy loss", 35.4M parameters. The paper names no padding and no pooling; the parameter count
pins them: "same" padding and no pooling leave 28 x 28 x 128 = 100,352 features for FC 328, and

    conv 1x256 + 256x256 + 256x128 (5x5, with biases)       2,464,640
    FC 100,352 -> 328, 328 -> 192, 192 -> 10 (with biases)  32,980,882
    total                                                   35,445,522   (the paper: 35.4M)

The dropout rate is not given; 0.5 (the usual rate on a last hidden layer) is used.

Larger inputs (36x36 MultiMNIST, 40x40 affNIST) keep these layers and add 2x2 max-pooling after
the first two convolutions (`pool_after`): section 5.2 calls its CNN one "with MaxPooling and
DropOut" of "a similar number of parameters" as CapsNet without giving its shapes, and the
authors' baseline code pools after every convolution. Without pooling the 40x40 network would
carry 67M parameters in its first FC layer alone.

With K labels per image (MultiMNIST) the softmax is trained against the distribution that puts
1/K on each present class (cross-entropy with soft targets; one label reduces to the ordinary
loss) and the K largest logits are the prediction (`capsfast.model.correct`). The authors' code
used a sigmoid cross-entropy for two targets instead; the soft-target softmax keeps the paper's
"10 class softmax layer" unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from capsfast.hub import HubMixin
from capsfast.model import ModelConfig, class_targets, known_fields


@dataclass
class BaselineConfig:
    """The architecture. The defaults are the paper's MNIST baseline; exported with every model."""

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    conv_channels: tuple[int, ...] = (256, 256, 128)
    kernel_size: int = 5  # stride 1, "same" padding
    pool_after: tuple[int, ...] = ()  # indices of the convolutions followed by 2x2 max-pooling
    hidden: tuple[int, ...] = (328, 192)
    dropout: float = 0.5  # before the softmax layer
    # What the classes and inputs are, as in ModelConfig (predict, the app): None is MNIST's.
    class_names: tuple[str, ...] | None = None
    input_style: str = "mnist"
    input_resize: int | None = None

    def __post_init__(self):
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names (ModelConfig.labels' rule)."""
        if self.class_names is not None:
            return tuple(self.class_names)
        return ModelConfig(num_classes=self.num_classes).labels

    @property
    def feature_size(self) -> int:
        """Spatial size after the convolutions (each pooling halves it, rounding down)."""
        size = self.image_size
        for _ in self.pool_after:
            size //= 2
        return size

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("conv_channels", "pool_after", "hidden"):
            d[key] = list(d[key])
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BaselineConfig:
        known = known_fields(cls, d, "baseline")
        for key in ("conv_channels", "pool_after", "hidden", "class_names"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


@dataclass
class BaselineOutput:
    logits: torch.Tensor  # [B, num_classes]: the softmax layer's input
    reconstructions: None = None  # no decoder: nothing to reconstruct

    @property
    def scores(self) -> torch.Tensor:
        """What classification ranks (CapsNet's capsule lengths play the same part)."""
        return self.logits


class BaselineCNN(nn.Module, HubMixin):
    """`BaselineCNN()` is the paper's MNIST baseline (35,445,522 parameters). HubMixin gives it
    save_pretrained, from_pretrained and push_to_hub (capsfast.hub), as CapsNet has them."""

    def __init__(self, config: BaselineConfig | None = None):
        super().__init__()
        self.config = cfg = config or BaselineConfig()
        bad = [i for i in cfg.pool_after if not 0 <= i < len(cfg.conv_channels)]
        if bad or cfg.feature_size < 1:
            raise ValueError(
                f"pool_after {list(cfg.pool_after)} does not fit {len(cfg.conv_channels)} "
                f"convolutions on a {cfg.image_size}x{cfg.image_size} input"
            )
        layers: list[nn.Module] = []
        channels = cfg.in_channels
        for i, out in enumerate(cfg.conv_channels):
            layers += [nn.Conv2d(channels, out, cfg.kernel_size, padding=cfg.kernel_size // 2)]
            layers += [nn.ReLU(inplace=True)]
            if i in cfg.pool_after:
                layers += [nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = []
        width = channels * cfg.feature_size**2
        for h in cfg.hidden:
            fc += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.classifier = nn.Sequential(*fc, nn.Dropout(cfg.dropout))
        self.softmax_layer = nn.Linear(width, cfg.num_classes)

    @property
    def routing(self) -> str:
        return "none"  # no capsules: there is nothing to route

    def set_routing(self, impl: str) -> None:
        """Accepted and ignored, so that code written for CapsNet runs the baseline unchanged."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> BaselineOutput:
        """images [B, C, H, W] in [0, 1] -> logits [B, num_classes]; labels are not used (the
        same call as CapsNet's, whose decoder needs them in training)."""
        x = self.features(images).flatten(1)
        return BaselineOutput(self.softmax_layer(self.classifier(x)))


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch. labels [B], or [B, K] (K present classes: the
    target puts 1/K on each)."""
    logits = logits.float()
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    target = class_targets(labels, logits.shape[1]).float()
    return F.cross_entropy(logits, target / target.sum(dim=1, keepdim=True))


def compute_loss(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    recon_weight: float = 0.0,
    recon_targets: torch.Tensor | None = None,
):
    """The baseline's objective, with capsfast.model.compute_loss's signature and return value
    (output, total, classification loss, reconstruction loss = 0) so the trainer runs either
    model; recon_weight and recon_targets are unused (no decoder)."""
    out = model(images, labels)
    loss = cross_entropy_loss(out.logits, labels)
    return out, loss, loss, torch.zeros_like(loss)
