"""The optimiser: Adam with the decoder in a group of its own, and the learning rate of a step
(a pure function of the config and the step, so flags given on a resume apply from it)."""

from __future__ import annotations

import torch

from capsfast.config import TrainConfig


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; the decoder is its own group (the seed preset gives it its own rate, no decay;
    the baseline has no decoder: an empty group)."""
    decoder = list(model.decoder.parameters()) if hasattr(model, "decoder") else []
    decoder_ids = {id(p) for p in decoder}
    encoder = [p for p in model.parameters() if id(p) not in decoder_ids]
    groups = [
        {"params": encoder, "lr": cfg.scaled_lr(), "weight_decay": cfg.weight_decay},
        {"params": decoder, "lr": cfg.scaled_lr(cfg.decoder_lr), "weight_decay": 0.0},
    ]
    if next(model.parameters()).is_cuda:
        return torch.optim.Adam(groups, fused=True)  # one kernel for all parameters
    return torch.optim.Adam(groups)


def set_learning_rate(optimizer, cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The schedule is a pure function of (config, step), applied before every step, so flags
    given on a resume (--lr, --schedule, --epochs, ...) take effect from the resumed step.
    Returns the encoder's rate."""
    factor = cfg.lr_factor(step, total_steps)
    encoder, decoder = optimizer.param_groups
    encoder["lr"] = cfg.scaled_lr() * factor
    decoder["lr"] = cfg.scaled_lr(cfg.decoder_lr) * factor
    return encoder["lr"]
