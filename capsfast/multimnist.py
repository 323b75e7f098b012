"""MultiMNIST (Sabour et al. 2017, section 6): two overlapping digits of different classes.

The paper: "We generate the MultiMNIST training and test dataset by overlaying a digit on top of
another digit from the same set (training or test) but different class. Each digit is shifted up
to 4 pixels in each direction resulting in a 36x36 image." The authors' generator (their
mnist_shift.py, `shift_write_multi_mnist`) fixes what the paper leaves open, and is followed here:

- each 28x28 digit is zero-padded by 4 to 36x36 and shifted by its own integer (dy, dx), each
  uniform in [-4, 4]: nothing is ever cut off;
- the partner is drawn uniformly among the digits of the same split whose class differs;
- the two are added and clipped at 255 (the paper's Figure 5: "the pixel values are clipped at
  1"), not combined by a pixel-wise max.

The paper generated 1,000 pairs per digit once (60M training images). Here every pair is a pure
function of (seed, epoch, index): epoch e pairs each training digit (the `index` the epoch's
permutation visits) with a fresh partner and fresh shifts, so 1,000 epochs see 1,000 pairs per
digit, generated on the device as they are needed, identical for any number of processes.

The test set is fixed: `TEST_PAIRS` pairs of test digits (test digit i mod 10,000 with a seeded
partner), the same for every run and training seed. The default, 100,000 pairs (10 per test
digit, 1% of the paper's 10M), puts the standard error of a 5% error rate at 0.07 points, enough
to tell the paper's 5.2% from the baseline's 8.1%; `--test-size` caps it.

Overlap. The paper: "two digits bounding boxes on average have 80% overlap". For the nominal
20x20 boxes of two digits shifted independently by up to 4 px, the expected shared fraction of a
box is exactly (1 - E|dy1 - dy2| / 20)^2 = (1 - 240/81/20)^2 = 72.6%. `overlap_statistics`
measures the generator on real digits (20,000 training pairs): nominal boxes 72.6%, the actual
ink boxes 46% intersection over union and 73% of the smaller box. 80% is what a relative shift
of up to 4 px (one digit fixed) would give: (1 - 20/9/20)^2 = 79.0%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from capsfast import canvas
from capsfast.diskio import atomic_path
from capsfast.model import ModelConfig, correct

SIZE = 36  # 28 + 2 x 4
PAD = 4
MAX_SHIFT = 4
TEST_PAIRS = 100_000
TEST_SEED = 1_000  # the test set's own seed: every run evaluates the same pairs
VAL_SEED = 1_001
# streams of canvas.draw: one per random choice
_PARTNER, _SHIFT_BASE, _SHIFT_TOP = 0, 1, 2

# Paper, section 6: the CapsNet of the MNIST experiments on 36x36 inputs: a 10x10 grid of 32
# primary capsule types (3,200 primary capsules); 11,361,968 parameters (the paper: 11.36M).
MODEL = ModelConfig(image_size=SIZE)
# "we increased the period of the decay step for the learning rate to be 10x larger because the
# training dataset is larger": 20,000 steps at batch 128 instead of 2,000.
LR_DECAY_EVERY = 20_000


@dataclass
class Pairs:
    images: torch.Tensor  # [n, 1, 36, 36] uint8: the two digits added, clipped at 255
    labels: torch.Tensor  # [n, 2] int64: (base, partner) classes, always different
    digits: torch.Tensor | None  # [n, 2, 1, 36, 36] uint8: each digit alone, as shifted
    shifts: torch.Tensor  # [n, 2, 2] int64: (dy, dx) of the base digit and of the partner
    partners: torch.Tensor  # [n] int64: the partner's index in the split


class Pairing:
    """Draws pairs from one split (the training digits, the validation digits or the test
    digits): images [N, 28, 28] or [N, 1, 28, 28] uint8 and labels [N], on any device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = MAX_SHIFT):
        if images.dim() == 4:
            images = images[:, 0]
        if images.shape[1:] != (28, 28):
            raise ValueError(f"MultiMNIST pairs 28x28 digits; got images {tuple(images.shape)}")
        if not 0 <= max_shift <= PAD:
            raise ValueError(f"max_shift must be in [0, {PAD}], got {max_shift}")
        classes = torch.unique(labels)
        if len(classes) < 2:
            raise ValueError("MultiMNIST needs digits of at least two classes to pair")
        self.images, self.labels, self.max_shift = images, labels, max_shift
        num_classes = int(labels.max()) + 1
        # Digits sorted by class: the partner of a digit of class c is drawn uniformly from the
        # N - count[c] digits outside c's block (the authors' rule: any digit of another class).
        self.by_class = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        return self.images.shape[0]

    def partners(self, base: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        c = self.labels[base]
        others = len(self) - self.counts[c]
        j = canvas.draw(base, seed, epoch, _PARTNER) % others
        j = j + self.counts[c] * (j >= self.starts[c])  # skip class c's block
        return self.by_class[j]

    def shifts(self, base: torch.Tensor, seed: int, epoch: int, stream: int) -> torch.Tensor:
        h = canvas.draw(base, seed, epoch, stream)
        s = self.max_shift
        return torch.stack([canvas.integers(h, -s, s), canvas.integers(h >> 32, -s, s)], dim=1)

    def pairs(self, base: torch.Tensor, seed: int, epoch: int, digits: bool = True) -> Pairs:
        """The pairs of the base digits `base` ([n] indices into the split) in `epoch`."""
        base = base.to(self.images.device).long()
        partner = self.partners(base, seed, epoch)
        shift = torch.stack(
            [
                self.shifts(base, seed, epoch, _SHIFT_BASE),
                self.shifts(base, seed, epoch, _SHIFT_TOP),
            ],
            dim=1,
        )  # [n, 2, (dy, dx)]
        placed = [
            canvas.place(self.images[idx], PAD + shift[:, k, 0], PAD + shift[:, k, 1], SIZE)
            for k, idx in enumerate((base, partner))
        ]
        merged = (placed[0].int() + placed[1].int()).clamp_(max=255).to(torch.uint8)
        labels = torch.stack([self.labels[base], self.labels[partner]], dim=1)
        parts = torch.stack(placed, dim=1).unsqueeze(2) if digits else None
        return Pairs(merged.unsqueeze(1), labels, parts, shift, partner)

    def fixed_set(self, n: int, seed: int, digits: bool = False) -> Pairs:
        """n pairs that do not depend on any training choice: pair i has base digit i mod N;
        each further round over the split draws new partners and shifts (its `epoch`)."""
        index = torch.arange(n, device=self.images.device)
        base, rounds = index % len(self), index // len(self)
        parts = [
            self.pairs(base[rounds == r], seed, int(r), digits)
            for r in range(int(rounds.max()) + 1 if n else 0)
        ]
        return Pairs(
            *(
                torch.cat([getattr(p, f) for p in parts])
                if parts and getattr(parts[0], f) is not None
                else None
                for f in ("images", "labels", "digits", "shifts", "partners")
            )
        )


def fixed_test_pairs(images: torch.Tensor, labels: torch.Tensor, size: int | None = None) -> Pairs:
    """The fixed MultiMNIST test set from the test digits: TEST_PAIRS pairs, or `size`."""
    return Pairing(images, labels).fixed_set(TEST_PAIRS if size is None else size, TEST_SEED)


# --------------------------------------------------------------------------- overlap
def overlap_statistics(pairs: Pairs) -> dict:
    """How much the two digits of each pair overlap, averaged over the pairs (which must carry
    their `digits`).

    - `nominal_box`: the shared fraction of the nominal 20x20 boxes (the paper's "a digit in a
      28x28 image is bounded in a 20x20 box"), which depends on the shifts only;
    - `ink_box_iou`: intersection over union of the two digits' actual ink bounding boxes;
    - `ink_box_of_smaller`: their intersection over the smaller box's area.
    """
    d = (pairs.shifts[:, 0] - pairs.shifts[:, 1]).abs().double()  # [n, 2] relative shifts
    nominal = ((20 - d).clamp_min(0) / 20).prod(dim=1)
    boxes = [canvas.ink_boxes(pairs.digits[:, k, 0]) for k in (0, 1)]
    inter = canvas.intersection(*boxes).double()
    areas = torch.stack([canvas.box_area(b) for b in boxes], dim=1).double()
    union = areas.sum(1) - inter
    return {
        "pairs": len(pairs.labels),
        "nominal_box": nominal.mean().item(),
        "ink_box_iou": (inter / union.clamp_min(1)).mean().item(),
        "ink_box_of_smaller": (inter / areas.min(1).values.clamp_min(1)).mean().item(),
    }


def expected_nominal_overlap(max_shift: int = MAX_SHIFT, box: int = 20) -> float:
    """E[(1 - |dy1 - dy2| / box)] squared, dy uniform on the integers in [-max_shift, max_shift]:
    the exact mean of `nominal_box` for independent shifts."""
    values = range(-max_shift, max_shift + 1)
    n = len(values) ** 2
    per_axis = sum(1 - abs(a - b) / box for a in values for b in values) / n
    return per_axis**2


# --------------------------------------------------------------------------- Figure 5
@torch.no_grad()
def figure5_cases(model, pairs: Pairs, n_correct: int = 6, n_wrong: int = 2, batch: int = 256):
    """Pick the paper's Figure 5 columns from `pairs`: the first n_correct pairs classified
    right (reconstructed from their labels) and the first n_wrong wrong ones, each twice (from
    the labels, then from the prediction P). Returns a list of dicts: input [1, 36, 36] float,
    reconstructions [2, 1, 36, 36], labels, used (the two classes reconstructed), predicted."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right, wrong = [], []
    for start in range(0, len(pairs.labels), batch):
        x = pairs.images[start : start + batch].to(device).float().div_(255)
        y = pairs.labels[start : start + batch].to(device)
        out = model(x)
        predicted = out.scores.topk(2, dim=1).indices
        ok = correct(out.scores, y)
        for i in range(x.shape[0]):
            target = right if ok[i] else wrong
            if len(target) < (n_correct if ok[i] else n_wrong):
                target.append((x[i], y[i], predicted[i], out.poses[i]))
        if len(right) >= n_correct and len(wrong) >= n_wrong:
            break
    cases = []
    for x, y, p, poses in right + wrong:
        for used, kind in ((y, "label"), (p, "prediction")):
            recon = model.decode(poses.unsqueeze(0).expand(2, -1, -1), used)
            cases.append(dict(input=x.cpu(), reconstructions=recon.float().cpu(),
                              labels=y.tolist(), used=used.tolist(), predicted=p.tolist(),
                              kind=kind, correct=bool(torch.equal(y.sort().values, p.sort().values))))  # fmt: skip
            if cases[-1]["correct"]:
                break  # a right answer: label and prediction are the same two digits
    model.train(was_training)
    return cases


def overlay(reconstructions: torch.Tensor) -> torch.Tensor:
    """Two reconstructions [2, 1, H, W] in [0, 1] -> an RGB image [H, W, 3]: the first digit in
    red, the second in green (yellow where both are)."""
    rgb = torch.zeros(*reconstructions.shape[-2:], 3)
    rgb[..., 0], rgb[..., 1] = reconstructions[0, 0], reconstructions[1, 0]
    return rgb.clamp(0, 1)


def draw_figure5(cases: list[dict], path: str | Path) -> Path:
    """Draw Figure 5 from `figure5_cases`: the input above, below it the two reconstructions
    overlaid in red and green (`overlay`); titles L:(labels), then R:(reconstructed from the
    labels) or P:(from the prediction). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not cases:
        raise ValueError("no MultiMNIST pairs to draw")
    fig, axes = plt.subplots(2, len(cases), figsize=(1.3 * len(cases), 3.0), squeeze=False)
    for col, case in enumerate(cases):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(case["input"][0].numpy(), cmap="gray", vmin=0, vmax=1)
        bottom.imshow(overlay(case["reconstructions"]).numpy())
        tag = "R" if case["kind"] == "label" else "P"
        mark = "" if case["correct"] else " (wrong)"
        top.set_title(f"L:({case['labels'][0]},{case['labels'][1]}){mark}", fontsize=7)
        bottom.set_title(f"{tag}:({case['used'][0]},{case['used'][1]})", fontsize=7)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("MultiMNIST: input (top), reconstructions in red and green (bottom)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:  # a full disk leaves no half-written PNG
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


def save_figure5(model, pairs: Pairs, path: str | Path, n_correct: int = 6, n_wrong: int = 2):
    """Figure 5 of the paper for `model` on `pairs` (e.g. the first test pairs)."""
    return draw_figure5(figure5_cases(model, pairs, n_correct, n_wrong), path)
