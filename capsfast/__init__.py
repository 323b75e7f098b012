"""capsfast: the fastest faithful Capsule Network trainer.

Importing capsfast has no side effects and imports neither triton, wandb nor gradio.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path


def _bind_source_kernels() -> None:
    """Make this tree's top-level `kernels/` folder importable as `capsfast.kernels`.

    pyproject maps `kernels/` to `capsfast.kernels`, so an installed wheel has the kernels inside
    the package and needs nothing here. A source tree (a plain checkout, an editable install, a
    second clone) keeps them beside the package: bind them here, so that whichever copy of
    capsfast is imported always brings its own kernels (and never another copy's, or none).
    Only the empty package is loaded; triton is imported when a kernel module is."""
    here = _Path(__file__).resolve().parent
    source = here.parent / "kernels" / "__init__.py"
    if "capsfast.kernels" in _sys.modules or (here / "kernels").is_dir() or not source.is_file():
        return
    spec = _importlib_util.spec_from_file_location(
        "capsfast.kernels", source, submodule_search_locations=[str(source.parent)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["capsfast.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_bind_source_kernels()

from capsfast.model import (  # noqa: E402  (after the binding above)
    CapsNet,
    CapsNetOutput,
    ModelConfig,
    margin_loss,
    reconstruction_loss,
)
from capsfast.routing import digit_caps, route, squash  # noqa: E402

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
    """Load an exported model: a directory (model.safetensors + config.json), or the name of a
    trained model shipped with capsfast ("mnist"); an existing directory of that name wins."""
    from capsfast.export import load_model as _load

    return _load(path, device=device, routing=routing)
