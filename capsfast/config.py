"""The training configuration: one dataclass, three presets, one flag per field.

A preset is a set of overrides on the dataclass defaults; flags given on the command line win
over the preset. `--lr` is the learning rate at the preset's reference batch (`lr_ref_batch`);
another global batch B scales it by the square-root rule, lr * sqrt(B / lr_ref_batch), the rule
derived for Adam (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms"); the step-decay interval is kept constant in samples, not steps.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import asdict, dataclass, field, fields


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


# Each numeric flag's allowed range: (field, low, high); a bound is (value, closed) or None.
# A field whose value is None (not set) is not checked.
RANGES = [
    ("batch_size", (1, True), None),
    ("epochs", (1, True), None),
    ("max_steps", (1, True), None),
    ("lr", (0, False), None),
    ("decoder_lr", (0, False), None),
    ("lr_ref_batch", (1, True), None),
    ("lr_decay", (0, False), (1, True)),
    ("lr_decay_every", (1, True), None),
    ("warmup_frac", (0, True), (1, False)),
    ("final_lr_frac", (0, True), (1, True)),
    ("weight_decay", (0, True), None),
    ("ema_decay", (0, True), (1, False)),
    ("routing_iters", (1, True), None),
    ("val_size", (0, True), None),
    ("test_size", (1, True), None),
    ("max_shift", (0, True), (8, True)),
    ("crop", (0, True), None),
    ("test_fraction", (0, False), (1, False)),
    ("image_size", (1, True), None),
    ("primary_types", (1, True), None),
    ("checkpoint_every", (0, True), None),
    ("keep_checkpoints", (1, True), None),
    ("log_every", (1, True), None),
    ("eval_batch_size", (1, True), None),
    ("cpu_threads", (1, True), None),
    ("recon_weight", (0, True), None),
    ("max_seconds", (0, False), None),
    ("peer_timeout", (0, False), None),
    ("stop_at_accuracy", (0, False), (1, True)),
    ("seed", (0, True), (2**32, False)),
]


def _in_range(value, low, high) -> bool:
    ok_low = low is None or (value >= low[0] if low[1] else value > low[0])
    ok_high = high is None or (value <= high[0] if high[1] else value < high[0])
    return ok_low and ok_high


def _range_text(low, high) -> str:
    """`>= 1`, `positive`, `in [0, 1)`; the seed's upper end as 2**32 - 1."""
    if high is None:
        return f">= {low[0]}" if low[1] else ("positive" if low[0] == 0 else f"> {low[0]}")
    if high == (2**32, False):
        return f"in [{low[0]}, 2**32 - 1]"
    return f"in {'[' if low[1] else '('}{low[0]}, {high[0]}{']' if high[1] else ')'}"


@dataclass
class TrainConfig:
    preset: str = _f(
        "paper",
        "preset to start from: paper, seed, fast, quick, cpu-record or cifar10",
        choices=["paper", "seed", "fast", "quick", "cpu-record", "cifar10"],
    )
    # the experiment (capsfast.tasks): what is learnt, and by which model
    task: str = _f(
        "mnist",
        "mnist (the --dataset as loaded), multimnist (two overlapping digits, 36x36: paper "
        "section 6) or affnist (digits placed on 40x40, tested on affNIST too: section 5.2)",
        choices=["mnist", "multimnist", "affnist"],
    )
    model: str = _f(
        "capsnet",
        "capsnet, or baseline (the paper's baseline CNN of Table 1: cross-entropy, no decoder)",
        choices=["capsnet", "baseline"],
    )
    # data
    dataset: str = _f(
        "mnist",
        "mnist, fashion-mnist, kmnist, emnist-SPLIT (byclass, bymerge, balanced, letters, "
        "digits, mnist), cifar10, svhn, or folder:DIR (DIR/train/CLASS/*, DIR/test/CLASS/*; or "
        "DIR/CLASS/*)",
    )
    data_dir: str | None = _f(
        None,
        "directory with the data set's files in torchvision's layout (default: MNIST: the copy "
        "shipped with capsfast; the others: ./data)",
    )
    download: bool = _f(False, "download missing files through torchvision into --data-dir first")
    val_size: int = _f(
        5000,
        "training images held out for validation and best-checkpoint choice, at most a tenth of "
        "them (0: none)",
    )
    test_size: int | None = _f(
        None,
        "evaluate on the first N test images (default: all); caps the generated test sets too "
        "(multimnist: 100,000 fixed pairs; affnist: the expanded set and affNIST)",
    )
    test_fraction: float = _f(
        0.2,
        "folder: data sets without train/ and test/: the fraction of each class held out as the "
        "test set (a fixed, seeded choice)",
    )
    image_size: int | None = _f(
        None,
        "folder: data sets: resize (shorter side) and centre-crop images to N x N (default: 32)",
    )
    data_placement: str = _f(
        "auto",
        "where the uint8 data set lives: device, stream (host memory, copied in chunks while "
        "training), auto (stream on CUDA when it needs over a quarter of the free GPU memory)",
        choices=["auto", "device", "stream"],
    )
    max_shift: int = _f(2, "random shift augmentation, pixels in each direction (0: none)")
    crop: int = _f(0, "train on random N x N crops, evaluate on the centre crop (0: whole images)")
    flip: bool | None = _f(
        None,
        "random horizontal flips (default: on for cifar10 and folder: data sets, off for digits, "
        "letters and house numbers)",
    )
    # schedule
    epochs: int = _f(100, "training epochs")
    max_steps: int | None = _f(
        None, "stop after this many optimiser steps in total (overrides --epochs)"
    )
    max_seconds: float | None = _f(
        None, "stop training after this many seconds of the step loop (then the end of the run)"
    )
    stop_at_accuracy: float | None = _f(
        None,
        "stop at the first epoch end whose validation accuracy reaches this (affNIST: 0.992, "
        "the paper's stopping point)",
    )
    batch_size: int = _f(128, "GLOBAL batch size, summed over all processes")
    lr: float = _f(
        1e-3, "Adam learning rate at the reference batch lr_ref_batch (scaled by sqrt for others)"
    )
    lr_ref_batch: int = _f(128, "batch size at which --lr applies")
    schedule: str = _f(
        "step",
        "lr schedule: step (x lr_decay every lr_decay_every steps at the reference batch), onecycle, constant",
        choices=["step", "onecycle", "constant"],
    )
    lr_decay: float = _f(0.96, "step schedule: decay factor")
    lr_decay_every: int = _f(2000, "step schedule: steps between decays, at the reference batch")
    warmup_frac: float = _f(0.0, "fraction of the step budget spent in linear warm-up")
    final_lr_frac: float = _f(0.0, "onecycle: final lr as a fraction of the peak")
    decoder_lr: float | None = _f(
        None, "decoder learning rate at the reference batch (default: --lr)"
    )
    weight_decay: float = _f(
        0.0, "L2 weight decay on the encoder (Adam's, as the seed project used)"
    )
    ema_decay: float = _f(0.0, "EMA of the weights for evaluation and export (0: off)")
    # model
    primary_types: int = _f(32, "primary capsule types (8D capsules per grid position)")
    none_class: bool = _f(
        False, "route to one extra 'none of the above' capsule that is no class (paper, CIFAR-10)"
    )
    routing_iters: int = _f(3, "routing-by-agreement iterations")
    routing: str = _f(
        "auto",
        "routing implementation: auto, torch, triton, fused",
        choices=["auto", "torch", "triton", "fused"],
    )
    detach_inner: bool = _f(False, "gradient through the last routing iteration only")
    recon_weight: float = _f(0.0005, "weight of the reconstruction loss")
    # runtime
    mixed_precision: str | None = _f(
        None,
        "no (fp32), bf16 or fp16 (default: the launcher's setting, else --cuda-precision on "
        "CUDA, fp32 on CPU)",
        choices=["no", "bf16", "fp16"],
    )
    cuda_precision: str = _f(
        "bf16",
        "the precision on CUDA when neither --mixed-precision nor the launcher sets one",
        choices=["no", "bf16", "fp16"],
    )
    compile: bool | None = _f(
        None, "torch.compile the model (default: on; on a CPU only with a C++ compiler)"
    )
    compile_mode: str | None = _f(None, "torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    cpu_threads: int | None = _f(
        None, "torch threads per process on CPU (default: cores / local processes)"
    )
    peer_timeout: float = _f(
        600.0,
        "several processes: seconds a process waits for the others at start-up and at each "
        "collective before it stops with one line (a peer that hangs, or a node that vanished)",
    )
    seed: int = _f(0, "random seed (weights, data order, augmentation)")
    output_dir: str = _f("runs/capsnet", "where checkpoints, metrics, figures and model/ go")
    checkpoint_every: int = _f(1000, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep")
    resume: str | None = _f(
        None, "checkpoint directory to resume from, or 'auto' (newest complete one in --output-dir)"
    )
    overwrite: bool = _f(
        False,
        "start over in an --output-dir that holds another run: delete that run's checkpoints, "
        "model, metrics, summary and figures first (without it such a directory is refused)",
    )
    report_to: str = _f("wandb", "wandb or none", choices=["wandb", "none"])
    wandb_project: str = _f("capsfast", "W&B project name")
    log_every: int = _f(
        10, "steps between host syncs: loss/lr logging, progress bar, non-finite check"
    )
    eval_batch_size: int = _f(500, "evaluation batch size per process")
    test_every_epoch: bool = _f(
        False,
        "also test at every epoch end (metrics.jsonl's epoch records, for the learning curve "
        "only: the exported model is still chosen on validation)",
    )
    figures: bool = _f(
        True, "draw curves.png and figures/ at the end of the run (--no-figures: skip them)"
    )
    skip_nonfinite: bool = _f(
        False,
        "skip steps whose loss or gradient is not finite instead of stopping (counted in the logs)",
    )

    def validate(self) -> TrainConfig:
        """Raise ValueError with a one-line message naming the flag to change."""
        # Every float flag must be a finite number: an `inf` weight would train on and fail
        # later as a "non-finite loss" that names the wrong flag.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{_flag(f.name)} must be a finite number, got {value}")
        for name, low, high in RANGES:
            value = getattr(self, name)
            if value is not None and not _in_range(value, low, high):
                raise ValueError(f"{_flag(name)} must be {_range_text(low, high)}, got {value}")
        if self.image_size is not None and not self.dataset.startswith("folder:"):
            raise ValueError(
                f"--image-size resizes folder: data sets only; {self.dataset}'s images keep "
                "their size (pass --crop N to train on N x N crops)"
            )
        if self.output_dir.strip() == "":
            raise ValueError("--output-dir must not be empty")
        if self.overwrite and self.resume is not None:
            raise ValueError(
                "--overwrite starts the run over and --resume continues it: give one of them"
            )
        if self.preset not in PRESETS:
            raise ValueError(
                f"unknown --preset {self.preset!r}: choose one of {', '.join(PRESETS)}"
            )
        from capsfast.datasets import parse_name

        parse_name(self.dataset)  # a ValueError that lists the names
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    # --- the learning-rate rule and schedule -------------------------------------------------
    def scaled_lr(self, lr: float | None = None) -> float:
        """The rate at this config's global batch: lr * sqrt(batch / lr_ref_batch)."""
        return (self.lr if lr is None else lr) * math.sqrt(self.batch_size / self.lr_ref_batch)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier on the scaled lr at optimiser step `step` (0-based) of `total_steps`."""
        warmup = int(self.warmup_frac * total_steps)
        if step < warmup:
            return (step + 1) / warmup
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            # 0.96 every 2000 steps at batch 128 = every 256,000 samples, at any batch size.
            every = max(1, round(self.lr_decay_every * self.lr_ref_batch / self.batch_size))
            return self.lr_decay ** ((step - warmup) // every)
        # onecycle: cosine from the peak after warm-up down to final_lr_frac at the last step.
        span = max(1, total_steps - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return self.final_lr_frac + (1 - self.final_lr_frac) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


PRESETS: dict[str, dict] = {
    # The paper's training (docs/spec.md): Adam 1e-3 x 0.96 every 2,000 steps, batch 128, shifts
    # of up to 2 px; 100 epochs (public reproductions reach 99.65-99.72% between 50 and 500).
    "paper": {},
    # The project capsfast grew from: Adam 3e-4 with weight decay 1e-4 on the encoder, 1e-3
    # without decay on the decoder, batch 128, no augmentation, constant rate, 100 epochs, fp32.
    "seed": {
        "lr": 3e-4,
        "decoder_lr": 1e-3,
        "weight_decay": 1e-4,
        "max_shift": 0,
        "schedule": "constant",
        "cuda_precision": "no",
    },
    # Speed to the paper's accuracy on one GPU: see README "The fast preset" for each choice.
    "fast": {
        "batch_size": 512,
        "epochs": 20,
        "lr": 2e-3,
        "schedule": "onecycle",
        "warmup_frac": 0.05,
        "final_lr_frac": 0.02,
        "ema_decay": 0.999,
        "log_every": 50,
        "checkpoint_every": 0,
        "compile_mode": "reduce-overhead",
    },
    # A first look on a laptop CPU: 400 steps at batch 32 (the paper's recipe otherwise, at
    # 1e-3 after the square-root rule), about 98% test accuracy in a few minutes, every output
    # written (model, summary, curves, figures).
    "quick": {
        "batch_size": 32,
        "max_steps": 400,
        "lr": 2e-3,
        "val_size": 1000,
        "log_every": 20,
        "checkpoint_every": 200,
    },
    # The accuracy record on a 2-core CPU (bench/results/records/): the paper's model and
    # losses, the fast preset's one-cycle schedule with EMA at the paper's batch, in the time a
    # CPU gives an afternoon. Precision follows the CPU (bf16 where it has bf16 instructions).
    # A checkpoint every epoch (429 steps), so a stop costs at most one epoch (--resume auto).
    "cpu-record": {
        "batch_size": 128,
        "epochs": 10,
        "lr": 2e-3,
        "schedule": "onecycle",
        "warmup_frac": 0.05,
        "final_lr_frac": 0.02,
        "ema_decay": 0.999,
        "log_every": 20,
        "checkpoint_every": 429,
        "keep_checkpoints": 2,
        "test_every_epoch": True,
    },
    # The paper's CIFAR-10 model (section 7: 10.6% test error from an ensemble of 7 such models,
    # 3 routing iterations, 24x24 patches, 64 primary capsule types, a "none-of-the-above"
    # category for the routing softmaxes). Where the paper is silent:
    # - none-of-the-above is an 11th DigitCaps capsule (J = 11) routed like the others, whose
    #   length is neither a label nor a prediction (margin loss and argmax over the 10 classes).
    #   The authors' code (research/capsules, layers._leaky_routing) instead adds a constant zero
    #   logit to each routing softmax; a real capsule lets every routing implementation (the
    #   reference, the Triton kernels, the fused DigitCaps) run unchanged, at J = 11.
    # - 24x24: random crops of the 32x32 images with random horizontal flips in training, the
    #   centre crop at test (as the authors' cifar10_input.py). Their brightness/contrast jitter
    #   and per-image standardisation are left out: the decoder reconstructs pixels in [0, 1]
    #   (sigmoid), as for MNIST.
    # - everything else is the MNIST recipe, as in the authors' code: conv1 256 9x9, 8D primary
    #   capsules 9x9 stride 2 (a 4x4 grid: 1,024 input capsules), 16D class capsules, Adam 1e-3
    #   decayed 0.96 every 2,000 steps, batch 128, reconstruction weight 0.0005 (the authors'
    #   balance_factor for every data set; the decoder outputs 3x24x24 = 1,728 values).
    #   14,500,720 parameters.
    "cifar10": {
        "dataset": "cifar10",
        "primary_types": 64,
        "none_class": True,
        "crop": 24,
        "max_shift": 0,
        "flip": True,
    },
}


def check_presets(presets: dict[str, dict] = PRESETS) -> None:
    """Every preset key must be a TrainConfig field (a typo must not be dropped silently)."""
    fields_ = TrainConfig.__dataclass_fields__
    for name, overrides in presets.items():
        unknown = sorted(set(overrides) - set(fields_))
        if unknown:
            raise ValueError(f"preset {name!r} sets unknown settings {unknown}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(annotation):
    """(python type, optional?) of a field annotation such as `int | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:  # X | None
        return args[0], True
    return annotation, False


def preset_values(preset: str) -> dict:
    """Every field's value under `preset`: the dataclass defaults with the preset applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}: choose one of {', '.join(PRESETS)}")
    check_presets({preset: PRESETS[preset]})
    return {**asdict(TrainConfig()), **PRESETS[preset], "preset": preset}


def build_parser(preset: str = "paper") -> argparse.ArgumentParser:
    """One flag per TrainConfig field, each defaulting to its value under `preset` (so --help
    shows what this preset runs with); types and choices come from the dataclass."""
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train CapsNet (Sabour et al. 2017). Run through `accelerate launch`.",
        epilog="Defaults shown are those of the chosen --preset; every flag overrides it. "
        "--batch-size is the global batch; --lr applies at --lr-ref-batch and scales by "
        "sqrt(batch / lr_ref_batch).",
    )
    defaults = preset_values(preset)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind, _ = _flag_type(hints[f.name])
        default = defaults[f.name]
        help_text = f.metadata["help"]
        if "default:" not in help_text:
            help_text += " (default: auto)" if default is None else " (default: %(default)s)"
        if kind is bool:  # --x / --no-x
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                help=help_text,
            )  # fmt: skip
            continue
        parser.add_argument(
            _flag(f.name),
            type=kind,
            default=default,
            choices=f.metadata.get("choices"),
            metavar=None if f.metadata.get("choices") else "N" if kind in (int, float) else "S",
            help=help_text,
        )
    return parser


def resolve(args: argparse.Namespace | dict) -> TrainConfig:
    """Dataclass defaults, then the preset, then the settings that were given (None: not given)."""
    given = {
        k: v
        for k, v in (vars(args) if not isinstance(args, dict) else args).items()
        if v is not None
    }
    unknown = set(given) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    values = preset_values(given.get("preset", "paper"))
    return TrainConfig(**{**values, **given}).validate()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    # The preset decides every default, so read it first (also for --help).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="paper", choices=list(PRESETS))
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.preset)
    args = parser.parse_args(argv)
    try:
        return resolve(args)
    except ValueError as e:
        parser.error(str(e))
