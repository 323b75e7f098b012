"""Exported models: `model.safetensors` + `config.json`, loadable without any training code.

config.json holds {"format": "capsfast-model", "format_version": 1, "model": ModelConfig fields,
"meta": {...free-form provenance...}}. The model's fields include what using it needs: its
class names and how a picture becomes its input (input_style, input_resize); meta names the data
set it was trained on ("dataset", e.g. "cifar10"). An export written before those existed loads
as an MNIST model (digits 0-9). The routing implementation is not part of the model: any
exported model loads under any implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from capsfast.model import CapsNet, ModelConfig

FORMAT = "capsfast-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: CapsNet, directory: str | Path, meta: dict | None = None) -> Path:
    """Write model.safetensors and config.json into `directory` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    tmp.replace(directory / WEIGHTS)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "meta": meta or {},
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --model must be a directory written by capsfast training "
            f"(its model/ folder, with {WEIGHTS} and {CONFIG})"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the model") from None
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a capsfast model config (format={config.get('format')!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {config['format_version']}, newer than this capsfast "
            f"reads ({FORMAT_VERSION}): upgrade capsfast"
        )
    return config


def load_model(directory: str | Path, device: str | torch.device = "cpu", routing: str = "auto"):
    """Load an exported model for inference (eval mode) on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    model = CapsNet(ModelConfig.from_dict(config["model"]), routing=routing)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found next to {CONFIG}: the export is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is unreadable or corrupt ({e}); re-export the model") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {CONFIG}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return model.to(device).eval()
