"""capsfast: the fastest faithful Capsule Network trainer.

Importing capsfast has no side effects and imports neither triton, wandb nor gradio.
"""

from capsfast.model import CapsNet, CapsNetOutput, ModelConfig, margin_loss, reconstruction_loss
from capsfast.routing import digit_caps, route, squash

__all__ = [
    "CapsNet",
    "CapsNetOutput",
    "ModelConfig",
    "digit_caps",
    "load_model",
    "margin_loss",
    "reconstruction_loss",
    "route",
    "squash",
]
__version__ = "0.1.0"


def load_model(path, device="cpu", routing="auto"):
    """Load an exported model directory (model.safetensors + config.json)."""
    from capsfast.export import load_model as _load

    return _load(path, device=device, routing=routing)
