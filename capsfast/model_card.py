"""A model card (README.md) for an exported model, written from the run's own records.

Every figure in it comes from the run's summary.json (and, for a record run, its log): nothing
is typed by hand. The YAML header follows the Hugging Face Hub's model-card metadata
(`library_name`, `datasets`, `metrics`, `model-index`), so an export directory is Hub-ready.
"""

from __future__ import annotations

import json

# The recipe's settings worth naming on a card, in this order.
RECIPE_KEYS = ("batch_size", "epochs", "max_steps", "lr", "schedule", "warmup_frac",
               "final_lr_frac", "ema_decay", "max_shift", "routing_iters", "recon_weight")  # fmt: skip


def _yaml_value(value) -> str:
    return json.dumps(value)  # a JSON scalar is a YAML scalar


def model_card(summary: dict, *, name: str, accuracy: float | None = None,
               test_size: int | None = None, command: list[str] | None = None,
               machine: dict | None = None, wall_seconds: float | None = None,
               note: str | None = None) -> str:  # fmt: skip
    """The card's text. `summary`: the run's summary.json; `accuracy`/`test_size`: the figure
    to publish (default: the summary's own test_accuracy/test_size, e.g. re-measured on the
    shipped weights); `command`, `machine`, `wall_seconds`: how it was made (a record log has
    them)."""
    accuracy = summary["test_accuracy"] if accuracy is None else accuracy
    test_size = summary["test_size"] if test_size is None else test_size
    wall = summary.get("wall_seconds") if wall_seconds is None else wall_seconds
    dataset = summary.get("dataset", "mnist")
    config = summary.get("config", {})
    recipe = ", ".join(
        f"{k} {config[k]}" for k in RECIPE_KEYS if config.get(k) is not None
    )  # fmt: skip
    lines = [
        "---",
        "library_name: capsfast",
        "license: mit",
        f"datasets:\n- {dataset}",
        "metrics:\n- accuracy",
        "tags:\n- capsule-network\n- image-classification",
        "model-index:",
        f"- name: {name}",
        "  results:",
        "  - task:\n      type: image-classification",
        f"    dataset:\n      name: {dataset}\n      type: {dataset}\n      split: test",
        "    metrics:",
        "    - type: accuracy",
        f"      value: {_yaml_value(round(accuracy * 100, 2))}",
        f"      name: test accuracy (%) on {test_size} test images",
        "---",
        "",
        f"# {name}: CapsNet (Sabour, Frosst & Hinton 2017) trained with capsfast",
        "",
        f"- **Test accuracy: {accuracy:.2%}** on {test_size:,} {dataset} test images.",
        f"- Architecture: {summary.get('model', 'capsnet')}, "
        f"{summary.get('parameters', 0):,} trainable parameters, "
        f"{config.get('routing_iters', 3)} routing iterations.",
        f"- Recipe: preset `{summary.get('preset')}`, seed {summary.get('seed')}: {recipe}; "
        f"{summary.get('steps', 0):,} steps ({summary.get('epochs', 0):.3g} epochs); the "
        f"exported weights are those of the best validation accuracy "
        f"({summary.get('best_val_accuracy')}).",
        f"- Hardware: {summary.get('device')}"
        + (f" ({summary['cpu_threads']} threads)" if summary.get("cpu_threads") else "")
        + (f", {machine['cpu_model']}" if machine and machine.get("cpu_model") else "")
        + f", {summary.get('precision', summary.get('mixed_precision'))}"
        + (f"; {wall / 60:.0f} min of wall time" if wall else "")
        + ".",
        f"- Software: capsfast commit {summary.get('commit')}, torch {summary.get('torch')}.",
    ]
    if command:
        lines += ["", "Reproduce:", "", "```", " ".join(command), "```"]
    if note:
        lines += ["", note]
    lines += [
        "",
        "Use it:",
        "",
        "```python",
        "import capsfast",
        f'model = capsfast.load_model("{name}")  # or the directory that holds this card',
        "```",
        "",
    ]
    return "\n".join(lines)
