"""The paper's experiments through the real trainer (capsfast/tasks.py): `--task` and `--model`,
their summary keys and test sets, the early stops bench/paper.py relies on, and the baseline
through predict and the app. Real MNIST digits (a few hundred of the shipped copy), tiny budgets.

The generators, the models' shapes and counts, the two-label loss and the top-2 metric are
tested in tests/test_multimnist.py, tests/test_affnist.py, tests/test_baseline.py and
tests/test_model.py."""

import json

import pytest
import torch

from capsfast import affnist, tasks
from capsfast.baseline import BaselineCNN
from capsfast.baseline import compute_loss as baseline_loss
from capsfast.config import parse_args as trainer_args
from capsfast.config import resolve
from capsfast.data import MNIST, epoch_permutation, load_mnist
from capsfast.export import load_model
from capsfast.model import compute_loss as capsnet_loss
from capsfast.multimnist import Pairing
from capsfast.train import train


@pytest.fixture(scope="module")
def digits() -> MNIST:
    d = load_mnist()
    return MNIST(d.train_images[:400], d.train_labels[:400], d.test_images[:300],
                 d.test_labels[:300])  # fmt: skip


def cfg(tmp_path, **kw):
    base = dict(batch_size=8, val_size=16, max_steps=8, report_to="none", checkpoint_every=0,
                log_every=2, output_dir=str(tmp_path), eval_batch_size=50, cpu_threads=2,
                test_size=24, mixed_precision="no", compile=False)  # fmt: skip
    return resolve({**base, **kw})


def train_losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if r["kind"] == "train"]


@torch.no_grad()
def fixed_batch_loss(model, task: str, digits: MNIST, n: int = 32) -> float:
    """The task's training loss of `model` (eval mode) on n fixed training examples: a trained
    model must beat a freshly initialised one here (per-step losses of tiny runs are noisy)."""
    x, y, index = digits.train_images, digits.train_labels, torch.arange(n)
    target = None
    if task == "multimnist":
        p = Pairing(x, y).pairs(index, seed=0, epoch=0)
        x, y, target = p.images, p.labels, p.digits.float() / 255
    elif task == "affnist":
        x, y = affnist.expanded(x, index, 0, 0), y[:n]
    else:
        x, y = x[:n], y[:n]
    loss = baseline_loss if isinstance(model, BaselineCNN) else capsnet_loss
    return loss(model.eval(), x.float() / 255, y, 0.0005, target)[1].item()


def test_multimnist_trains_capsnet_on_generated_pairs(digits, tmp_path):
    """~40 s: 12 steps of the 36x36 CapsNet at batch 8, two labels, two reconstructions."""
    summary = train(cfg(tmp_path, task="multimnist", max_steps=12), data=digits)
    assert summary["task"] == "multimnist" and summary["model"] == "capsnet"
    assert summary["parameters"] == 11_361_968  # the 36x36 CapsNet (the paper: 11.36M)
    assert summary["test_size"] == 24  # --test-size caps the generated test pairs
    losses = train_losses(tmp_path)
    assert len(losses) == 6 and summary["final_train_loss"] == losses[-1]
    model = load_model(tmp_path / "model")
    torch.manual_seed(0)
    fresh = tasks.build_model(model.config)
    assert fixed_batch_loss(model, "multimnist", digits) < 0.95 * fixed_batch_loss(
        fresh, "multimnist", digits
    )
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architecture"] == "capsnet" and config["model"]["image_size"] == 36
    assert config["meta"]["task"] == "multimnist"
    assert (tmp_path / "figures" / "figure5.png").stat().st_size > 0
    # test_accuracy means both digits right on the fixed pairs: recount it from the export
    from capsfast.model import correct
    from capsfast.multimnist import fixed_test_pairs

    pairs = fixed_test_pairs(digits.test_images, digits.test_labels, 24)
    with torch.no_grad():
        scores = model(pairs.images.float() / 255).scores
    assert summary["test_accuracy"] == correct(scores, pairs.labels).float().mean().item()


def test_affnist_trains_the_baseline_and_reports_affnist_accuracy(digits, tmp_path):
    """~20 s: 8 steps of the pooled 40x40 baseline, the expanded and affNIST-like test sets."""
    summary = train(cfg(tmp_path, task="affnist", model="baseline", lr=4e-3), data=digits)
    assert summary["task"] == "affnist" and summary["model"] == "baseline"
    assert summary["parameters"] == 6_728_466
    assert summary["test_size"] == 24 and summary["affnist_size"] == 24
    assert 0 <= summary["affnist_accuracy"] <= 1 and 0 <= summary["test_accuracy"] <= 1
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["confusion_matrix.png"]
    model = load_model(tmp_path / "model")
    assert model.config.image_size == 40 and model.config.pool_after == (0, 1)
    torch.manual_seed(0)
    fresh = tasks.build_model(model.config)
    assert fixed_batch_loss(model, "affnist", digits) < fixed_batch_loss(fresh, "affnist", digits)


def test_mnist_baseline_through_predict_and_the_app(digits, tmp_path, capsys):
    """~30 s: 6 steps of the 35.4M-parameter baseline at 28x28; predict and the app load it
    and say that it has no reconstruction instead of failing."""
    from PIL import Image

    from capsfast.app import AppModel
    from capsfast.infer import main as predict_main

    out = tmp_path / "run"
    summary = train(cfg(out, model="baseline", max_steps=6), data=digits)
    assert summary["task"] == "mnist" and summary["parameters"] == 35_445_522
    model = load_model(out / "model")
    torch.manual_seed(0)
    assert fixed_batch_loss(model, "mnist", digits) < fixed_batch_loss(
        tasks.build_model(model.config), "mnist", digits
    )
    png = tmp_path / "digit.png"
    Image.fromarray(digits.test_images[0, 0].numpy()).save(png)
    recon = tmp_path / "recon"
    assert (
        predict_main(["--model", str(out / "model"), str(png), f"--save-reconstructions={recon}"])
        == 0
    )
    printed = capsys.readouterr()
    assert "has no decoder" in printed.err and "digit.png: " in printed.out
    assert not recon.exists() or not any(recon.iterdir())
    result = AppModel(load_model(out / "model")).analyse(digits.test_images[0, 0].numpy())
    assert result["reconstruction"] is None and result["pose"] == []
    assert sum(result["lengths"]) == pytest.approx(1.0, abs=1e-5)  # softmax probabilities


def test_early_stops_end_the_run_with_every_output(digits, tmp_path):
    """~25 s: --stop-at-accuracy at the first epoch end, --max-seconds at the first sync."""
    data = MNIST(digits.train_images[:96], digits.train_labels[:96], digits.test_images,
                 digits.test_labels)  # fmt: skip
    # 80 training digits at batch 8: 10 steps an epoch; any accuracy reaches 0.01
    summary = train(cfg(tmp_path / "a", max_steps=None, epochs=3, stop_at_accuracy=0.01), data=data)
    assert summary["steps"] == 10 and summary["stopped_early"].startswith("validation accuracy")
    assert (tmp_path / "a" / "summary.json").is_file()
    summary = train(cfg(tmp_path / "b", max_steps=40, max_seconds=1e-3), data=data)
    assert summary["steps"] == 2 and summary["stopped_early"] == "--max-seconds 0.001 reached"
    assert (tmp_path / "b" / "model" / "model.safetensors").is_file()


def test_generated_batches_are_the_same_for_any_number_of_processes(digits):
    """< 1 s: the union over ranks of step k is the single-process batch of step k."""
    x, y = digits.train_images[:64], digits.train_labels[:64]
    for task in ("multimnist", "affnist"):
        c = resolve(dict(task=task, batch_size=16, report_to="none", val_size=0, test_size=4))
        parts = {}
        for world in (1, 2, 4):
            made = []
            for rank in range(world):
                t = tasks.make_task(c, digits, tasks.model_config("capsnet", _mnist_config(), 28),
                                    (x, y), (x[:0], y[:0]), (x[:4], y[:4]), rank=rank,
                                    world=world, device=torch.device("cpu"), stream=False,
                                    flip=False)  # fmt: skip
                order = epoch_permutation(64, c.seed, 3, "cpu")
                made.append(t.batches.batch(3, 1, order))
            parts[world] = [torch.cat([m[i] for m in made]) for i in range(2)]
            if task == "multimnist":
                parts[world].append(torch.cat([m[2] for m in made]))
        for world in (2, 4):
            for a, b in zip(parts[1], parts[world], strict=True):
                assert torch.equal(a, b)
        assert parts[1][0].shape[-1] == tasks.IMAGE_SIZE[task]


def _mnist_config():
    from capsfast.model import ModelConfig

    return ModelConfig()


def test_tasks_refuse_data_that_are_not_digits(digits, tmp_path):
    from capsfast.data import DataError

    colour = MNIST(torch.zeros(64, 3, 32, 32, dtype=torch.uint8), digits.train_labels[:64],
                   torch.zeros(8, 3, 32, 32, dtype=torch.uint8), digits.test_labels[:8])  # fmt: skip
    with pytest.raises(DataError, match="--task multimnist builds its images from 28x28"):
        train(cfg(tmp_path, task="multimnist"), data=colour)
    with pytest.raises(DataError, match="--crop applies to --task mnist only"):
        train(cfg(tmp_path, task="affnist", crop=24), data=digits)


def test_bench_paper_rows_flags_and_table():
    """< 1 s: what bench/paper.py passes to each run, and the table it renders from logs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import paper

    args, passthrough = paper.parse_args(["all", "--budget-s", "30", "--epochs", "2"])
    rows = {(r.experiment, r.name): r for r in paper.rows_of("all")}
    assert len(rows) == 10 and len(paper.rows_of("table1")) == 5
    flags = paper.run_flags(rows["affnist", "baseline"], args, passthrough)
    assert flags[-6:] == ["--epochs", "2", "--max-seconds", "30.0", "--stop-at-accuracy", "0.992"]
    flags = paper.run_flags(rows["multimnist", "capsnet-r3-recon"], args, passthrough)
    assert "--stop-at-accuracy" not in flags and ["--lr-decay-every", "20000"] == flags[2:4]
    for row in rows.values():  # every row's flags are the trainer's
        trained = trainer_args(paper.run_flags(row, args, passthrough))
        task = "mnist" if row.experiment == "table1" else row.experiment
        model = "baseline" if row.name == "baseline" else "capsnet"
        assert (trained.task, trained.model, trained.max_seconds) == (task, model, 30.0)
    with pytest.raises(SystemExit):
        paper.parse_args(["table1", "--task", "mnist"])  # set per row
    log = dict(experiment="affnist", row="baseline", test_accuracy=0.99, affnist_accuracy=0.5,
               test_size=100, affnist_size=200, steps=10, epochs=0.5, budget_s=30.0,
               device="cpu", commit="abc")  # fmt: skip
    table = paper.paper_table([log])
    assert "| affnist | baseline | 66% (at 99.22%) | 50.00% (at 99.00%) | 1 | 100 + 200 |" in table
    assert table.count("not run") == 9
