"""A model card (README.md) for an exported model, written from the run's own records.

Every figure in it comes from the run's summary.json (and, for a record run, its log): nothing
is typed by hand. The YAML header follows the Hugging Face Hub's model-card metadata
(`library_name`, `datasets`, `metrics`, `model-index`), so an export directory is Hub-ready.
"""

from __future__ import annotations

import json
from pathlib import Path

from capsfast.diskio import write_text

# The recipe's settings worth naming on a card, in this order.
RECIPE_KEYS = ("batch_size", "epochs", "max_steps", "lr", "schedule", "warmup_frac",
               "final_lr_frac", "ema_decay", "max_shift", "routing_iters", "recon_weight")  # fmt: skip


# The paper's two models, as a card names them, and the class that loads each from the Hub.
MODELS = {
    "capsnet": ("CapsNet (Sabour, Frosst & Hinton 2017)", "capsfast.model", "CapsNet"),
    "baseline": ("the baseline CNN of Sabour et al. 2017 (Table 1)", "capsfast.baseline",
                 "BaselineCNN"),
}  # fmt: skip
# Settings that say where a run wrote or resumed, not how it trained: left out of the command.
NOT_RECIPE = ("preset", "output_dir", "resume", "report_to", "wandb_project", "download")


def _yaml_value(value) -> str:
    return json.dumps(value)  # a JSON scalar is a YAML scalar


def train_command(summary: dict) -> list[str] | None:
    """The command that trains this run again: the preset and every setting of the summary's
    resolved config that differs from the preset's value (None when the summary has no config
    or names no known preset)."""
    from capsfast.config import PRESETS, preset_values

    config, preset = summary.get("config") or {}, summary.get("preset")
    if not config or preset not in PRESETS:
        return None
    command = ["accelerate", "launch", "launch/train.py", "--preset", preset]
    for key, default in preset_values(preset).items():
        # The resolved config's "model" is the architecture's fields; the flag is its kind.
        value = summary.get("model", default) if key == "model" else config.get(key, default)
        if key in NOT_RECIPE or value == default or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        else:
            command += [flag, str(value)]
    return command


def _use_it(architecture: str, name: str) -> list[str]:
    _, module, cls = MODELS.get(architecture, MODELS["capsnet"])
    return [
        "",
        "Use it:",
        "",
        "```python",
        "import capsfast",
        f"from {module} import {cls}",
        "",  # a blank line after the imports: the card's code is ruff-formatted as written
        f'model = {cls}.from_pretrained("USER/{name}")  # its Hub id, or the folder of this card',
        f'model = capsfast.load_model("{name}")  # or the directory that holds this card',
        "```",
        "",
    ]


def plain_card(architecture: str = "capsnet", dataset: str | None = None,
               name: str = "capsfast-model") -> str:  # fmt: skip
    """A card for weights that come with no run record (an untrained or hand-made model): the
    Hub metadata, and no figure at all, since nothing was measured."""
    what = MODELS.get(architecture, MODELS["capsnet"])[0]
    lines = ["---", "library_name: capsfast", "license: mit"]
    lines += [f"datasets:\n- {_yaml_value(dataset)}"] if dataset else []
    lines += ["tags:\n- capsule-network\n- image-classification", "---", "", f"# {name}: {what}"]
    lines += ["", "No test accuracy comes with these weights: a card with measured figures is "
              "written by training, from the run's summary.json."]  # fmt: skip
    return "\n".join(lines + _use_it(architecture, name))


def write_card(directory: str | Path, summary: dict, name: str) -> Path:
    """The card of `summary`'s run, as README.md in its export directory (Hub-ready)."""
    path = Path(directory) / "README.md"
    write_text(path, model_card(summary, name=name))  # all or nothing
    return path


def model_card(summary: dict, *, name: str, accuracy: float | None = None,
               test_size: int | None = None, command: list[str] | None = None,
               machine: dict | None = None, wall_seconds: float | None = None,
               note: str | None = None) -> str:  # fmt: skip
    """The card's text. `summary`: the run's summary.json; `accuracy`/`test_size`: the figure
    to publish (default: the summary's own test_accuracy/test_size, e.g. re-measured on the
    shipped weights); `command`, `machine`, `wall_seconds`: how it was made (a record log has
    them)."""
    accuracy = summary["test_accuracy"] if accuracy is None else accuracy
    command = train_command(summary) if command is None else command
    architecture = summary.get("model", "capsnet")
    test_size = summary["test_size"] if test_size is None else test_size
    wall = summary.get("wall_seconds") if wall_seconds is None else wall_seconds
    dataset = summary.get("dataset", "mnist")
    threads = summary.get("cpu_threads")
    config = summary.get("config", {})
    recipe = ", ".join(
        f"{k} {config[k]}" for k in RECIPE_KEYS if config.get(k) is not None
    )  # fmt: skip
    lines = [
        "---",
        "library_name: capsfast",
        "license: mit",
        f"datasets:\n- {_yaml_value(dataset)}",
        "metrics:\n- accuracy",
        "tags:\n- capsule-network\n- image-classification",
        "model-index:",
        f"- name: {_yaml_value(name)}",
        "  results:",
        "  - task:\n      type: image-classification",
        f"    dataset:\n      name: {_yaml_value(dataset)}\n      type: {_yaml_value(dataset)}"
        "\n      split: test",
        "    metrics:",
        "    - type: accuracy",
        f"      value: {_yaml_value(round(accuracy * 100, 2))}",
        f"      name: {_yaml_value(f'test accuracy (%) on {test_size} test images')}",
        "---",
        "",
        f"# {name}: {MODELS.get(architecture, MODELS['capsnet'])[0]} trained with capsfast",
        "",
        f"- **Test accuracy: {accuracy:.2%}** on {test_size:,} {dataset} test images.",
        f"- Architecture: {architecture}, "
        f"{summary.get('parameters', 0):,} trainable parameters"
        + (
            f", {config.get('routing_iters', 3)} routing iterations."
            if architecture == "capsnet"
            else ", no routing."
        ),
        f"- Recipe: preset `{summary.get('preset')}`, seed {summary.get('seed')}: {recipe}; "
        f"{summary.get('steps', 0):,} steps ({summary.get('epochs', 0):.3g} epochs); the "
        f"exported weights are those of the best validation accuracy "
        f"({summary.get('best_val_accuracy')}).",
        f"- Hardware: {summary.get('device')}"
        + (f" ({threads} CPU thread{'s' * (threads != 1)})" if threads else "")
        + (f", {machine['cpu_model']}" if machine and machine.get("cpu_model") else "")
        + f", {summary.get('precision', summary.get('mixed_precision'))}"
        + (f"; {wall / 60:.1f} min of wall time" if wall else "")
        + ".",
        f"- Software: capsfast commit {summary.get('commit')}, torch {summary.get('torch')}.",
    ]
    if command:
        lines += ["", "Reproduce:", "", "```", " ".join(command), "```"]
    if note:
        lines += ["", note]
    return "\n".join(lines + _use_it(architecture, name))
