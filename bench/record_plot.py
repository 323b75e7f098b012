"""The record's learning curve beside the public CapsNet reproductions' curves, as PNG.

    python bench/record_plot.py bench/results/records/LOG.json --out bench/results/records/PNG

Ours: test accuracy on all 10,000 MNIST test images after every epoch (the epoch records of a
run with --test-every-epoch, EMA weights), and the exported model's final figure. Theirs: test
accuracy after epochs 1 / 5 / 10 / 50, read from each repository's committed log or plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from capsfast.errors import UserError, run_main  # noqa: E402

# (epoch, test accuracy %) read from each repository's committed log or plot.
PUBLIC = {
    "XifengGuo/CapsNet-Pytorch": [(1, 99.0), (5, 99.35), (10, 99.53), (50, 99.69)],
    "XifengGuo/CapsNet-Keras": [(1, 98.7), (5, 99.2), (10, 99.4), (50, 99.65)],
    "naturomics/CapsNet-Tensorflow (validation)": [(1, 98.8), (5, 99.38), (10, 99.48), (50, 99.4)],
}


def epoch_curve(log: dict) -> list[tuple[float, float]]:
    """(epoch, test accuracy %) of every epoch record that holds one."""
    return [(r["epoch"], 100 * r["test_accuracy"]) for r in log["metrics"]
            if r["kind"] == "epoch" and r.get("test_accuracy") is not None]  # fmt: skip


def plot(log: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = epoch_curve(log)
    if not ours:
        raise UserError("the log has no per-epoch test accuracy: train with --test-every-epoch")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, points), marker in zip(PUBLIC.items(), "os^", strict=True):
        ax.plot(*zip(*points, strict=True), marker=marker, ls="--", alpha=0.7, label=name)
    label = (f"capsfast {log['preset']} (seed {log['seed']}, {log['device']}, "
             f"{log.get('precision', log['mixed_precision'])})")  # fmt: skip
    ax.plot(*zip(*ours, strict=True), marker="*", ms=9, lw=2, color="black", label=label)
    ax.axhline(99.35, color="grey", lw=0.8, ls=":")
    ax.text(1, 99.36, "99.35%", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(0.8, 60)
    ax.set_xticks([1, 2, 5, 10, 20, 50], labels=["1", "2", "5", "10", "20", "50"])
    ax.set_ylim(98.5, 99.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    final = 100 * log["test_accuracy"]
    ax.set_title(f"MNIST test accuracy after each epoch; exported model: {final:.2f}% "
                 f"({log['test_size']:,} images)", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="a record log (bench/results/records/*.json)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    log = json.loads(Path(args.log).read_text())
    print(f"record_plot: wrote {plot(log, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "record_plot"))
