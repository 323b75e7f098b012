"""Exported models: `model.safetensors` + `config.json`, loadable without any training code.

config.json holds {"format": "capsfast-model", "format_version": 1, "architecture": "capsnet" or
"baseline", "model": its config's fields (ModelConfig, or capsfast.baseline.BaselineConfig),
"meta": {...free-form provenance...}}. The model's fields include what using it needs: its
class names and how a picture becomes its input (input_style, input_resize); meta names the data
set it was trained on ("dataset", e.g. "cifar10"). An export without "architecture" (written
before the baseline existed) is a CapsNet; one written before the data fields existed loads as
an MNIST model (digits 0-9). The routing implementation is not part of the model: any exported
model loads under any implementation.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch

from capsfast.baseline import BaselineCNN, BaselineConfig
from capsfast.diskio import atomic_path
from capsfast.errors import UserError
from capsfast.model import CapsNet, ModelConfig

FORMAT = "capsfast-model"
# Trained models shipped inside the package, by name (`capsfast.load_model("mnist")`).
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "models"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"  # the model card (capsfast.model_card): what makes a directory Hub-ready


def architecture(model) -> str:
    """ "baseline" for the paper's baseline CNN, "capsnet" for CapsNet."""
    return "baseline" if isinstance(model, BaselineCNN) else "capsnet"


def shipped_models() -> list[str]:
    """The names of the trained models that come with capsfast."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG).is_file())


def shipped_name(model: str | Path) -> str | None:
    """`model` as the name of a shipped model, or None when it is a path. A path that exists
    wins: a folder named `mnist` in the current directory is that folder, not the shipped one."""
    if Path(model).exists() or str(model) not in shipped_models():
        return None
    return str(model)


def model_dir(model: str | Path) -> Path:
    """A model argument (an export directory, or the name of a shipped model) as a directory."""
    name = shipped_name(model)
    return SHIPPED_DIR / name if name else Path(model)


def output_dir(model: str | Path, what: str) -> Path:
    """Where a command writes `what` (figures, reconstructions) for a model by default: inside
    an export directory; for a shipped model, `NAME-WHAT` in the current directory (never inside
    the installed package)."""
    name = shipped_name(model)
    return Path(f"{name}-{what}") if name else Path(model) / what


def save_model(
    model: CapsNet | BaselineCNN,
    directory: str | Path,
    meta: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write model.safetensors and config.json into `directory` (created if needed). `dtype`:
    how floating-point weights are stored (the shipped models: float16, half the bytes); any
    dtype loads into the float32 model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture(model),
        "model": model.config.to_dict(),
        "meta": meta or {},
    }
    # Both files are written whole beside the old ones before either replaces its old one: a
    # failed write (a full disk) leaves the previous export as it was, and no partial file.
    with atomic_path(directory / WEIGHTS) as weights, atomic_path(directory / CONFIG) as cfg:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        save_file(state, str(weights), metadata=metadata)
        cfg.write_text(json.dumps(config, indent=2) + "\n")
    return directory


class ModelError(UserError):
    """An exported model that cannot be loaded; the message names the file and what to do."""


def _check_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    if not directory.exists():
        raise ModelError(
            f"{directory}: no such model directory; give the folder written by training "
            f"(runs/NAME/model, with {WEIGHTS} and {CONFIG}) or a shipped model's name "
            f"({', '.join(shipped_models()) or 'none installed'})"
        )
    hint = f" (here: {directory.parent})" if directory.name in (WEIGHTS, CONFIG) else ""
    raise ModelError(
        f"{directory} is a file, not a model directory: give the folder that holds {WEIGHTS} "
        f"and {CONFIG}{hint}"
    )


# Model fields that came with data sets other than MNIST: an export written before them lacks
# them and loads as an MNIST model (ModelConfig's defaults).
DATA_FIELDS = ("none_class", "class_names", "input_style", "input_resize")


def _check_data_field(name: str, value, section: dict, path: Path, redo: str) -> None:
    from capsfast.data import INPUT_STYLES

    if name == "class_names":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        ok = ok and len(value) == section.get("num_classes", len(value))
        want = "a list of num_classes strings"
    elif name == "input_style":
        ok, want = value in INPUT_STYLES, f"one of {', '.join(INPUT_STYLES)}"
    else:  # input_resize
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        want = "a positive int or null"
    if not ok:
        raise ModelError(f"{path}: model key {name!r} is {value!r}, must be {want}; {redo}")


def _model_config(section, path: Path) -> ModelConfig:
    """The "model" section of config.json as a ModelConfig: every field present, each of the
    type its default has, the sizes positive (a hand-edited or damaged file fails here, in one
    line, instead of deep inside torch)."""
    redo = "re-export the model (or restore config.json)"
    if not isinstance(section, dict):
        raise ModelError(f'{path}: "model" must be an object of architecture fields; {redo}')
    defaults = ModelConfig()
    names = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise ModelError(
            f"{path}: unknown model keys {unknown} (written by a newer capsfast?): upgrade capsfast"
        )
    missing = [n for n in names if n not in section and n not in DATA_FIELDS]
    if missing:
        raise ModelError(f"{path}: model keys {missing} are missing; {redo}")
    section = {k: v for k, v in section.items() if v is not None or k not in DATA_FIELDS}
    for name in names:
        if name not in section:  # a data field an older export lacks: its default (MNIST's)
            continue
        value, default = section[name], getattr(defaults, name)
        if name in DATA_FIELDS and name != "none_class":
            _check_data_field(name, value, section, path, redo)
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            ok = ok and math.isfinite(value)
        else:  # decoder_hidden: a list of positive layer widths
            ok = isinstance(value, list) and len(value) == len(default)
            ok = ok and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
            )
        if not ok:
            want = (
                "a list of 2 positive integers"
                if isinstance(default, tuple)
                else (
                    f"a {'boolean' if isinstance(default, bool) else 'positive ' + type(default).__name__}"
                )
            )
            raise ModelError(f"{path}: model key {name!r} is {value!r}, must be {want}; {redo}")
    config = ModelConfig.from_dict(section)
    if config.primary_grid < 1:
        raise ModelError(
            f"{path}: kernel_size {config.kernel_size} is too large for image_size "
            f"{config.image_size} (no primary capsules left); {redo}"
        )
    return config


def _baseline_config(section, path: Path) -> BaselineConfig:
    """The "model" section of a baseline's config.json, checked as `_model_config` checks
    CapsNet's: every field present, of its type, the sizes positive."""
    redo = "re-export the model (or restore config.json)"
    if not isinstance(section, dict):
        raise ModelError(f'{path}: "model" must be an object of architecture fields; {redo}')
    names = [f.name for f in fields(BaselineConfig)]
    unknown = sorted(set(section) - set(names))
    missing = [n for n in names if n not in section and n not in DATA_FIELDS]
    if unknown:
        raise ModelError(
            f"{path}: unknown model keys {unknown} (written by a newer capsfast?): upgrade capsfast"
        )
    if missing:
        raise ModelError(f"{path}: model keys {missing} are missing; {redo}")

    def positive(v, low=1):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    section = {k: v for k, v in section.items() if v is not None or k not in DATA_FIELDS}
    for name in names:
        if name not in section:  # a data field an older export lacks: its default (MNIST's)
            continue
        value = section[name]
        if name in DATA_FIELDS:
            _check_data_field(name, value, section, path, redo)
            continue
        if name in ("conv_channels", "hidden"):
            ok = isinstance(value, list) and len(value) >= 1 and all(map(positive, value))
            want = "a list of positive integers"
        elif name == "pool_after":
            ok = isinstance(value, list) and all(positive(v, 0) for v in value)
            want = "a list of convolution indices"
        elif name == "dropout":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and 0 <= value < 1
            want = "a number in [0, 1)"
        else:
            ok, want = positive(value), "a positive integer"
        if not ok:
            raise ModelError(f"{path}: model key {name!r} is {value!r}, must be {want}; {redo}")
    return BaselineConfig.from_dict(section)


def build_model(config: dict, path: Path, routing: str = "auto"):
    """The untrained model that config.json (read_config's dict) describes."""
    kind = config.get("architecture", "capsnet")
    if kind == "baseline":
        try:
            return BaselineCNN(_baseline_config(config["model"], path))
        except ValueError as e:  # pooling that does not fit the image size
            raise ModelError(f"{path}: {_one_line(e)}; re-export the model") from None
    if kind != "capsnet":
        raise ModelError(
            f"{path}: unknown architecture {kind!r} (capsnet or baseline; written by a newer "
            "capsfast?): upgrade capsfast"
        )
    return CapsNet(_model_config(config["model"], path), routing=routing)


def read_config(directory: str | Path) -> dict:
    """config.json of an exported model (a directory or a shipped model's name), checked:
    raises ModelError saying what is wrong."""
    directory = model_dir(directory)
    _check_directory(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise ModelError(
            f"{path} not found: the model must be a directory written by capsfast training "
            f"(its model/ folder, with {WEIGHTS} and {CONFIG})"
        )
    try:
        config = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ModelError(f"{path} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(config, dict):
        raise ModelError(
            f"{path} is not a capsfast model config (a JSON {type(config).__name__}, not an "
            "object); re-export the model"
        )
    if config.get("format") != FORMAT:
        raise ModelError(f"{path} is not a capsfast model config (format={config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(f"{path}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ModelError(
            f"{path} has format_version {version}, newer than this capsfast reads "
            f"({FORMAT_VERSION}): upgrade capsfast"
        )
    if "model" not in config:
        raise ModelError(f'{path} has no "model" section; re-export the model')
    return config


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def load_model(directory: str | Path, device: str | torch.device = "cpu", routing: str = "auto"):
    """Load an exported model for inference (eval mode) on `device`: a directory, or the name of
    a model shipped with capsfast (`shipped_models()`; an existing directory of that name wins).
    Raises ModelError for a directory, config or weights file that is not a loadable model."""
    from safetensors.torch import load_file

    directory = model_dir(directory)
    config = read_config(directory)
    model = build_model(config, directory / CONFIG, routing)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights} not found next to {CONFIG}: the export is incomplete")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors reports damage in several types: all mean the same
        raise ModelError(
            f"{weights} is unreadable or corrupt ({_one_line(e)}); re-export the model"
        ) from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit the architecture in config.json
        raise ModelError(f"{weights} does not match {CONFIG}: {_one_line(e)}") from None
    if missing or unexpected:
        raise ModelError(
            f"{weights} does not match {CONFIG}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"{weights} holds NaN or infinite weights in {bad[:4]}; re-export it")
    # Provenance and card travel with the model, so save_pretrained writes them again.
    model.export_meta = config["meta"] if isinstance(config.get("meta"), dict) else {}
    card = directory / CARD
    model.card_text = card.read_text(errors="replace") if card.is_file() else None
    return model.to(device).eval()


def model_config(directory: str | Path) -> ModelConfig | BaselineConfig:
    """The architecture (and so the classes and how a picture becomes input) of an exported
    model, checked, without reading its weights: what `capsfast.infer.prepare_input` needs to
    feed an ONNX or pt2 graph of it."""
    directory = model_dir(directory)
    config = read_config(directory)
    path = directory / CONFIG
    kind = config.get("architecture", "capsnet")
    if kind == "baseline":
        return _baseline_config(config["model"], path)
    if kind != "capsnet":
        build_model(config, path)  # raises its one line on an unknown architecture
    return _model_config(config["model"], path)
