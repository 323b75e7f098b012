"""Ship a record run's exported model inside the package, as a named model.

    python bench/ship_model.py bench/results/records/LOG.json --name mnist

Takes the model the record run exported (its `config.output_dir`/model), stores its weights in
float16 under capsfast/assets/models/NAME/ with its config.json, re-measures the stored weights
on every test image, refuses them if they fall more than --max-drop points below the record's own
figure, and writes the model card (README.md) from the record log: the re-measured accuracy,
the recipe, the command, the machine and the time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from capsfast.data import load_mnist, to_float  # noqa: E402
from capsfast.errors import UserError, run_main  # noqa: E402
from capsfast.export import SHIPPED_DIR, load_model, read_config, save_model  # noqa: E402
from capsfast.model import correct  # noqa: E402
from capsfast.model_card import model_card  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def test_accuracy(model, n: int | None = None, batch: int = 500) -> tuple[float, int]:
    """Accuracy of `model` (fp32, on the CPU) on the first `n` (default: all 10,000) MNIST
    test images."""
    data = load_mnist()
    images, labels = data.test_images[:n], data.test_labels[:n]
    right = 0
    for start in range(0, len(images), batch):
        x = to_float(images[start : start + batch])
        right += int(correct(model(x).scores, labels[start : start + batch]).sum())
    return right / len(images), len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="a record log (bench/results/records/*.json)")
    parser.add_argument("--name", default="mnist", help="the shipped model's name")
    parser.add_argument(
        "--max-drop", type=float, default=0.0002, help="largest accuracy drop allowed (fraction)"
    )
    parser.add_argument("--test-size", type=int, default=None, help="(a dry run) first N only")
    parser.add_argument("--out", default=None, help="where to write (default: the package's)")
    args = parser.parse_args(argv)
    log = json.loads(Path(args.log).read_text())
    source = ROOT / log["config"]["output_dir"] / "model"  # relative to the checkout, or absolute
    if not (source / "model.safetensors").is_file():
        raise UserError(f"{source}: the record run's exported model is not here")
    model = load_model(source)
    meta = read_config(source)["meta"]
    target = Path(args.out) if args.out else SHIPPED_DIR / args.name
    save_model(model, target, meta={**meta, "record_test_accuracy": log["test_accuracy"]},
               dtype=torch.float16)  # fmt: skip
    shipped = load_model(target)
    accuracy, n = test_accuracy(shipped, args.test_size)
    drop = log["test_accuracy"] - accuracy
    print(f"ship: {target}: float16 weights, {accuracy:.4%} on {n:,} test images "
          f"(record {log['test_accuracy']:.4%}, drop {drop * 100:+.3f} points)")  # fmt: skip
    if drop > args.max_drop:
        raise UserError(f"the float16 weights lose {drop * 100:.3f} points: not shipped as is")
    config = json.loads((target / "config.json").read_text())
    config["meta"]["test_accuracy"] = accuracy
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    note = (f"The weights are stored in float16 and load into a float32 model; re-measured so "
            f"(fp32 compute, CPU): {accuracy:.2%}. The record run's own figure (the float32 "
            f"export): {log['test_accuracy']:.2%}. Record log: `{args.log}`.")  # fmt: skip
    card = model_card(log, name=args.name, accuracy=accuracy, test_size=n,
                      command=log.get("command"), machine=log.get("machine"),
                      wall_seconds=log.get("process_seconds"), note=note)  # fmt: skip
    (target / "README.md").write_text(card)
    print(f"ship: wrote {target / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "ship"))
