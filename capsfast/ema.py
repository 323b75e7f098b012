"""An exponential moving average of the weights, used for evaluation and export when enabled.

decay_t = min(decay, (1 + t) / (10 + t)) after t updates (the warm-up of TensorFlow's
ExponentialMovingAverage with num_updates): early on the average forgets its random start
quickly, so even a short step budget evaluates an average of recent weights. The decay is
computed on the host from the update count, so an update never waits for the device
(torch.optim.swa_utils.AveragedModel reads its on-device counter every step).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        # The floating-point tensors of both models, listed once: a step only lerps them.
        self._ema = [t for t in self.module.state_dict().values() if t.is_floating_point()]
        self._source, self._now = None, None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        if model is not self._source:
            self._source = model
            self._now = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(
            self._ema, self._now, 1.0 - self.current_decay()
        )  # ema += (1-d)(now-ema)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
