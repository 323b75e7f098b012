"""What `--task` and `--model` change in a training run: which data, which loss, which metric.

run_training stays one loop for every task: it calls `make_task` once, then each step
    x, y, target = task.batches.batch(epoch, k, order)
    out, loss, margin, recon = task.loss(model, x, y, cfg.recon_weight, target)
and counts a prediction right with `capsfast.model.correct(out.scores, y)`, which reads both one
label per image and two (MultiMNIST: the two top scores must be the two digits).

    mnist       the data set as loaded (--dataset), 2-pixel shifts (--max-shift); test_accuracy on
                its test set.
    multimnist  paper section 6: pairs of training digits generated on the device for every
                step (capsfast.multimnist), labels [B, 2], each digit reconstructed from its own
                capsule against itself as shifted; validation: fixed pairs of the held-out
                digits; test_accuracy: both digits right on the fixed test pairs (100,000 by
                default, --test-size caps them).
    affnist     paper section 5.2: training digits at random positions on a 40x40 canvas
                (capsfast.affnist); test_accuracy on the expanded 40x40 test set, and
                affnist_accuracy on affNIST (its real test files when --data-dir holds them,
                else the affNIST-like set generated from the MNIST test digits, 10,000 images
                by default).

The two generated tasks take 28x28 grey digits (MNIST, or another MNIST-family --dataset) and
replace --max-shift by their own placement (up to 4 and 6 pixels). `--model baseline` trains the
paper's baseline CNN (capsfast.baseline) on any task: cross-entropy, no reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from capsfast import affnist, multimnist
from capsfast.baseline import BaselineCNN, BaselineConfig
from capsfast.baseline import compute_loss as baseline_loss
from capsfast.data import DataError, Dataset, TrainBatches, epoch_permutation, to_float
from capsfast.model import CapsNet, ModelConfig
from capsfast.model import compute_loss as capsnet_loss

TASKS = ("mnist", "multimnist", "affnist")
MODELS = ("capsnet", "baseline")
IMAGE_SIZE = {"multimnist": multimnist.SIZE, "affnist": affnist.SIZE}


@dataclass
class Task:
    name: str
    model_config: ModelConfig | BaselineConfig
    batches: TrainBatches  # .batch(epoch, k, order) -> (x, y, reconstruction target or None)
    val: tuple[torch.Tensor, torch.Tensor]  # uint8 images, labels ([n] or [n, 2])
    test: tuple[torch.Tensor, torch.Tensor]  # what test_accuracy is measured on
    # further test sets, each reported as summary["<name>_accuracy"] (affnist: "affnist")
    extra_tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # for the banner

    def loss(self, model, x, y, recon_weight: float, target):
        """(output, total, classification loss, reconstruction loss) of the task's model."""
        fn = baseline_loss if isinstance(self.model_config, BaselineConfig) else capsnet_loss
        return fn(model, x, y, recon_weight, target)

    def figures(self, model, out_dir: Path) -> dict[str, Path]:
        """The run's figures of the exported `model` on the test set: Figure 5 for MultiMNIST
        (CapsNet), the single-label figures otherwise (the baseline: those that need no
        decoder)."""
        from capsfast.figures import save_figures

        test_x, test_y = self.test
        if self.name != "multimnist":
            return save_figures(model, test_x, test_y, out_dir, progress=True)
        if isinstance(model, BaselineCNN):
            return {}  # Figure 5 shows reconstructions: the baseline has none
        pairs = multimnist.Pairs(test_x[:2000], test_y[:2000], None, None, None)
        return {"figure5": multimnist.save_figure5(model, pairs, Path(out_dir) / "figure5.png")}


def build_model(config: ModelConfig | BaselineConfig) -> CapsNet | BaselineCNN:
    return BaselineCNN(config) if isinstance(config, BaselineConfig) else CapsNet(config)


def model_config(name: str, data_config: ModelConfig, size: int):
    """The model of `--model name` for the data (data_config: CapsNet as the data configures
    it) on size x size inputs. The baseline pools after its first two convolutions on inputs
    larger than MNIST's (capsfast.baseline's docstring says why)."""
    if name == "capsnet":
        return replace(data_config, image_size=size)
    c = data_config
    return BaselineConfig(in_channels=c.in_channels, image_size=size, num_classes=c.num_classes,
                          pool_after=(0, 1) if size > 28 else (), class_names=c.class_names,
                          input_style=c.input_style, input_resize=c.input_resize)  # fmt: skip


class SingleBatches(TrainBatches):
    """capsfast.data's batches; the input itself is the reconstruction target."""

    def batch(self, epoch, step_in_epoch, order=None):
        return (*super().batch(epoch, step_in_epoch, order), None)


class GeneratedBatches(TrainBatches):
    """Batches built from this rank's slice of the epoch's digits (TrainBatches' split of every
    global batch across ranks) by a pure function of (seed, epoch, index): `make(index, epoch)`
    -> (uint8 images, labels, uint8 reconstruction targets or None)."""

    def __init__(self, images, labels, global_batch, seed, rank, world_size, device, make):
        super().__init__(images, labels, global_batch, seed, 0, rank, world_size)
        self.device, self.make = device, make

    def batch(self, epoch, step_in_epoch, order=None):
        if order is None:
            order = epoch_permutation(self.images.shape[0], self.seed, epoch, self.images.device)
        start = step_in_epoch * self.global_batch + self.rank * self.local_batch
        idx = order[start : start + self.local_batch].to(self.images.device)
        x, y, target = self.make(idx, epoch)
        x, y = to_float(x.to(self.device)), y.to(self.device)
        return x, y, None if target is None else to_float(target.to(self.device))


def _empty(size: int, labels_per_image: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (0,) if labels_per_image == 1 else (0, labels_per_image)
    images = torch.zeros(0, 1, size, size, dtype=torch.uint8, device=device)
    return images, torch.zeros(shape, dtype=torch.long, device=device)


def check_digits(task: str, data: Dataset) -> None:
    if data.channels != 1 or data.image_size != 28 or data.num_classes != 10:
        raise DataError(
            f"--task {task} builds its images from 28x28 grey digits of 10 classes; --dataset "
            f"{data.name} has {data.channels}x{data.image_size}x{data.image_size} images of "
            f"{data.num_classes} classes: use --dataset mnist (or another MNIST-family set)"
        )


def affnist_dir(cfg) -> str | None:
    """Where the digits come from: --data-dir, or the shipped MNIST when --data-dir holds only
    affNIST's files (task affnist)."""
    if cfg.task != "affnist" or not affnist.find_affnist(cfg.data_dir):
        return cfg.data_dir
    root = Path(cfg.data_dir)
    has_mnist = any((d / "train-images-idx3-ubyte").exists() or
                    (d / "train-images-idx3-ubyte.gz").exists()
                    for d in (root, root / "raw", root / "MNIST" / "raw"))  # fmt: skip
    return cfg.data_dir if has_mnist else None


def make_task(cfg, data: Dataset, data_config: ModelConfig, train, val, test, *, rank: int,
              world: int, device, stream: bool, flip: bool) -> Task:  # fmt: skip
    """The Task of `cfg.task` / `cfg.model` on the loaded data. train and val are the split
    training digits, test the (capped, cropped) test set of the data set as loaded."""
    (train_x, train_y), (val_x, val_y) = train, val
    if cfg.task == "mnist":
        batches = SingleBatches(train_x, train_y, cfg.batch_size, cfg.seed, cfg.max_shift, rank,
                                world, crop=cfg.crop, flip=flip, stream=stream, device=device)  # fmt: skip
        size = data_config.image_size
        return Task("mnist", model_config(cfg.model, data_config, size), batches, val, test)
    check_digits(cfg.task, data)
    if cfg.crop:
        raise DataError(f"--crop applies to --task mnist only (--task {cfg.task} places digits)")
    size = IMAGE_SIZE[cfg.task]
    model_cfg = model_config(cfg.model, data_config, size)
    test_digits = data.test_images, data.test_labels
    if cfg.task == "multimnist":
        pairing = multimnist.Pairing(train_x, train_y)

        def make(index, epoch):
            p = pairing.pairs(index, cfg.seed, epoch)
            return p.images, p.labels, p.digits

        batches = GeneratedBatches(train_x, train_y, cfg.batch_size, cfg.seed, rank, world,
                                   device, make)  # fmt: skip
        if len(val_x):
            v = multimnist.Pairing(val_x, val_y).fixed_set(len(val_x), multimnist.VAL_SEED)
            val = (v.images, v.labels)
        else:
            val = _empty(size, 2, device)
        t = multimnist.fixed_test_pairs(*test_digits, cfg.test_size)
        notes = [f"MultiMNIST: pairs generated every step, {len(t.labels):,} fixed test pairs"]
        return Task("multimnist", model_cfg, batches, val, (t.images, t.labels), notes=notes)

    # affnist
    def make(index, epoch):
        return affnist.expanded(train_x, index, cfg.seed, epoch), train_y[index], None

    batches = GeneratedBatches(train_x, train_y, cfg.batch_size, cfg.seed, rank, world, device,
                               make)  # fmt: skip
    val_index = torch.arange(len(val_x))
    val = (affnist.expanded(val_x, val_index, affnist.TEST_SEED + 1, 0), val_y)
    test = (affnist.expanded_test_set(data.test_images, cfg.test_size),
            data.test_labels[: cfg.test_size])  # fmt: skip
    files = affnist.find_affnist(cfg.data_dir)
    if files:
        aff_x, aff_y = affnist.read_affnist(files)
        aff_x, aff_y = aff_x[: cfg.test_size], aff_y[: cfg.test_size]
        source = f"affNIST's test files ({', '.join(f.name for f in files[:3])})"
    else:
        aff_x, aff_y = affnist.affnist_like(*test_digits, size=cfg.test_size)
        source = "the affNIST-like set generated from the MNIST test digits"
    notes = [f"affNIST: {len(aff_y):,} images from {source}"]
    return Task("affnist", model_cfg, batches, val, test, {"affnist": (aff_x, aff_y)}, notes)
