"""Figures of a trained model, as PNG: training curves, reconstructions, the capsule-dimension
perturbation figure (paper, fig. 4), the confusion matrix and the most confidently wrong digits.

Each figure has a function that computes its data (tensors, testable) and one that draws it.
matplotlib (Agg) is imported inside the drawing functions only, so `import capsfast` stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from capsfast.diskio import atomic_path
from capsfast.infer import Prediction, predict

DELTAS = tuple(round(-0.25 + 0.05 * i, 2) for i in range(11))  # -0.25 .. 0.25 step 0.05
DPI = 100
GAP = 2  # pixels between the digits of a grid

__all__ = [
    "DELTAS",
    "as_float_images",
    "confusion_matrix",
    "grid",
    "most_confident_wrong",
    "perturb_capsule",
    "plot_curves",
    "save_figures",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] / [N, C, H, W] or float in [0, 1] -> float [N, C, H, W] on the CPU."""
    x = images.detach().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


# --- data --------------------------------------------------------------------------------------


def grid(images: torch.Tensor, ncols: int) -> torch.Tensor:
    """[N, C, H, W] -> one [rows*(H+2)+2, ncols*(W+2)+2] image, row-major, white gaps: grey for
    C = 1, [3, ...] for colour (torchvision's make_grid; the tick positions of the perturbation
    figure assume this layout)."""
    from torchvision.utils import make_grid

    out = make_grid(images.detach().float().cpu(), nrow=ncols, padding=GAP, pad_value=1.0)
    return out[0] if images.shape[1] == 1 else out


def _imshow(ax, image: torch.Tensor) -> None:
    """A grey [H, W] or colour [3, H, W] image in [0, 1], pixels as squares."""
    if image.dim() == 3:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    else:
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")


@torch.no_grad()
def perturb_capsule(
    model: torch.nn.Module, image: torch.Tensor, deltas=DELTAS
) -> tuple[torch.Tensor, int]:
    """Decode the predicted capsule with each dimension moved by each delta.

    image [C, H, W] (or [H, W]) -> (reconstructions [D, len(deltas), H, W] ([D, len(deltas), C,
    H, W] for colour), predicted class). Row d moves dimension d alone; the other dimensions
    keep their values.
    """
    net = model
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters())
        shape = (1, 1, *image.shape) if image.dim() == 2 else (1, *image.shape[-3:])
        x = as_float_images(image.reshape(shape)).to(param.device, param.dtype)
        poses = net.encode(x)  # [1, J, D]
        device = param.device
        label = int(poses.norm(dim=-1).argmax(1))
        J, D = poses.shape[1:]
        d = torch.tensor(deltas, dtype=poses.dtype, device=device)
        batch = poses.repeat(D * len(deltas), 1, 1).view(D, len(deltas), J, D)
        batch[torch.arange(D), :, label, torch.arange(D)] += d  # row k: dim k += deltas
        labels = torch.full((D * len(deltas),), label, device=device)
        recon = net.decode(batch.view(-1, J, D), labels).float()
    finally:
        net.train(was_training)
    recon = recon.view(D, len(deltas), *recon.shape[1:]).cpu()
    return (recon.squeeze(2) if recon.shape[2] == 1 else recon), label


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = 10):
    """[num_classes, num_classes] int64 counts; row = true class, column = predicted."""
    idx = labels.long().cpu() * num_classes + predicted.long().cpu()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def most_confident_wrong(pred: Prediction, labels: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Indices of up to k misclassified images, the longest predicted capsule first."""
    labels = labels.cpu()
    wrong = torch.nonzero(pred.labels != labels).flatten()
    confidence = pred.lengths[wrong, pred.labels[wrong]]
    return wrong[confidence.argsort(descending=True)[:k]]


# --- drawing -----------------------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:  # a full disk leaves no half-written PNG
            fig.savefig(tmp, dpi=DPI)  # no bbox_inches="tight": the PNG is exactly figsize * DPI
    finally:
        _pyplot().close(fig)
    return path


def plot_curves(records: list[dict], path: str | Path) -> Path:
    """Loss, accuracy and learning rate against the optimiser step, from metrics.jsonl's records:
    one point per logged window (`kind: train`, every --log-every steps), so a run shorter than
    an epoch has a readable curve, and validation accuracy at each epoch end (`kind: epoch`).
    Keys left out or None are skipped."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    train = [r for r in records if r.get("kind", "train") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    panels = [
        (axes[0], [(train, k) for k in ("train_loss", "margin_loss", "recon_loss")], "loss", True),
        (axes[1], [(train, "train_accuracy"), (epochs, "val_accuracy")], "accuracy", False),
        (axes[2], [(train, "lr")], "learning rate", True),
    ]
    for ax, series, title, log in panels:
        drawn = False
        for rows, key in series:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = {"marker": "o", "markersize": 4} if rows is epochs or len(pts) < 30 else {}
                ax.plot(xs, ys, label=key, **style)
                drawn = True
        if drawn:
            if log and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
                ax.set_yscale("log")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _plot_reconstructions(images, recons, labels, pred_labels, path, ncols=10) -> Path:
    plt = _pyplot()
    n = images.shape[0]
    rows = math.ceil(n / ncols)
    # Each row of images is followed by the row of their reconstructions.
    pairs = []
    for r in range(rows):
        chunk = slice(r * ncols, min(n, (r + 1) * ncols))
        blank = torch.zeros(ncols - images[chunk].shape[0], *images.shape[1:])
        pairs.append(torch.cat([images[chunk], blank]))
        pairs.append(torch.cat([recons[chunk], blank]))
    image = grid(torch.cat(pairs), ncols)
    fig = plt.figure(figsize=(ncols * 0.9 + 1, rows * 1.8 + 0.8))
    ax = fig.add_axes([0.02, 0.02, 0.96, 0.96 - 0.6 / (rows * 1.8 + 0.8)])
    _imshow(ax, image)
    ax.set_axis_off()
    ok = int((pred_labels == labels).sum())
    ax.set_title(f"test images (odd rows) and reconstructions (even rows): {ok}/{n} correct")
    return _save(fig, path)


def _plot_perturbation(recon: torch.Tensor, label: int, path, deltas=DELTAS) -> Path:
    plt = _pyplot()
    D, S = recon.shape[:2]
    frames = recon.reshape(D * S, *recon.shape[2:])
    image = grid(frames[:, None] if frames.dim() == 3 else frames, S)
    fig = plt.figure(figsize=(S * 0.55 + 1.2, D * 0.55 + 1.0))
    ax = fig.add_axes([0.1, 0.02, 0.88, 0.9])
    _imshow(ax, image)
    step, mid = recon.shape[-1] + GAP, recon.shape[-1] // 2
    ax.set_xticks(
        [GAP + step * i + mid for i in range(S)], [f"{d:+.2f}" for d in deltas], fontsize=7
    )
    ax.set_yticks(
        [GAP + step * i + mid for i in range(D)], [f"dim {i}" for i in range(D)], fontsize=7
    )
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.suptitle(f"capsule {label}: each dimension moved by -0.25..+0.25", fontsize=9, y=0.995)
    return _save(fig, path)


def _plot_confusion(cm: torch.Tensor, path, class_names=None) -> Path:
    plt = _pyplot()
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax)
    vmax = int(cm.max()) if cm.numel() else 0
    for i in range(k):
        for j in range(k):
            v = int(cm[i, j])
            if v and k <= 20:  # counts stay legible up to 20 classes
                color = "white" if v > vmax / 2 else "black"
                ax.text(j, i, str(v), ha="center", va="center", color=color, fontsize=8)
    size = 8 if k <= 20 else max(3, int(8 * 20 / k))
    ax.set_xticks(range(k), names, rotation=90, fontsize=size)
    ax.set_yticks(range(k), names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(cm.sum())
    acc = float(cm.diag().sum()) / max(1, total)
    ax.set_title(f"confusion matrix: {total} test images, accuracy {acc:.2%}")
    fig.tight_layout()
    return _save(fig, path)


def _plot_wrong(images, recons, labels, pred: Prediction, idx, path, ncols=8,
                class_names=None) -> Path:  # fmt: skip
    plt = _pyplot()
    n = len(idx)
    rows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(rows, ncols, figsize=(ncols * 1.6, rows * 1.9 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, idx.tolist(), strict=False):
        # The image and, beside it, what the model's chosen capsule decodes to.
        c, h = images.shape[1], images.shape[2]
        pair = torch.cat([images[i], torch.ones(c, h, 2), recons[i]], dim=2)
        _imshow(ax, pair[0] if c == 1 else pair)
        p, t = int(pred.labels[i]), int(labels[i])
        name = (lambda k: class_names[k]) if class_names is not None else str
        ax.set_title(
            f"true {name(t)} pred {name(p)}\n|v|={float(pred.lengths[i, p]):.2f}", fontsize=8
        )
    if n == 0:
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle("most confidently wrong: image | reconstruction from the predicted capsule")
    fig.tight_layout()
    return _save(fig, path)


def save_figures(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path,
    device=None,
    max_images: int = 10_000,
    num_reconstructions: int = 40,
    num_wrong: int = 24,
    progress: bool = False,
) -> dict[str, Path]:
    """Draw the four figures of a trained model on (test) `images` and `labels` into `out_dir`.

    images: uint8 [N, C, H, W] (or [N, H, W]) or float [N, C, H, W] in [0, 1], the model's input
    size; at most `max_images` are used. Axes and titles name the model's classes.
    device: where to run the model (default: where it is). The model's train/eval mode is kept.
    progress: a tqdm bar on stderr while the images are evaluated.
    Returns {"reconstructions", "capsule_dimensions", "confusion_matrix", "confident_wrong"}
    -> PNG path (the baseline CNN, which has no decoder: {"confusion_matrix"} only).
    """
    net = model if device is None else model.to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = as_float_images(images[:max_images])
    y = labels[:max_images].detach().cpu().long()
    pred = predict(net, x, progress=progress)

    num_classes = pred.lengths.shape[1]
    names = getattr(getattr(net, "config", None), "labels", None)
    cm = confusion_matrix(pred.labels, y, num_classes)
    if pred.reconstructions is None:  # the baseline CNN: no decoder, no capsules to draw
        return {"confusion_matrix": _plot_confusion(cm, out / "confusion_matrix.png", names)}
    n = min(num_reconstructions, x.shape[0])
    paths = {
        "reconstructions": _plot_reconstructions(
            x[:n], pred.reconstructions[:n], y[:n], pred.labels[:n], out / "reconstructions.png"
        )
    }
    # The perturbation figure uses the first correctly classified image (the first, if none is).
    correct = torch.nonzero(pred.labels == y).flatten()
    first = int(correct[0]) if correct.numel() else 0
    recon, label = perturb_capsule(net, x[first])
    paths["capsule_dimensions"] = _plot_perturbation(recon, label, out / "capsule_dimensions.png")
    paths["confusion_matrix"] = _plot_confusion(cm, out / "confusion_matrix.png", names)
    idx = most_confident_wrong(pred, y, num_wrong)
    paths["confident_wrong"] = _plot_wrong(
        x, pred.reconstructions, y, pred, idx, out / "confident_wrong.png", class_names=names
    )
    return paths


# --- command line: launch/visualize.py, console script capsfast-visualize --------------------


def main(argv: list[str] | None = None) -> int:
    """Draw the figures of an exported model on the test set of the data set it was trained on
    (its config.json's meta.dataset; MNIST for exports that predate it)."""
    import argparse
    import time

    from capsfast.data import centre_crop
    from capsfast.datasets import load_dataset
    from capsfast.errors import UserError
    from capsfast.export import output_dir, read_config
    from capsfast.infer import ROUTINGS, load_for_inference

    parser = argparse.ArgumentParser(
        prog="visualize",
        description="Reconstructions, capsule-dimension perturbations, confusion matrix and the "
        "most confidently wrong test digits of an exported model, as PNG.",
    )
    parser.add_argument(
        "model",
        help="exported model directory (model.safetensors + config.json), or the name of a "
        "shipped model (mnist): an existing directory of that name wins",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: MODEL/figures, inside the model's; a shipped model: "
        "./NAME-figures)",
    )
    parser.add_argument(
        "--test-size", type=int, default=10_000, help="test images used (default: all 10,000)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the data set's folder (default: MNIST: the shipped copy; the others: ./data)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--routing", default="auto", choices=ROUTINGS)
    args = parser.parse_args(argv)
    if args.test_size < 1:
        parser.error("--test-size must be at least 1")
    out = Path(args.out) if args.out else output_dir(args.model, "figures")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory (created if missing)")
    model = load_for_inference(args.model, args.device, args.routing)
    meta = read_config(args.model).get("meta", {})
    dataset = meta.get("dataset", "mnist")
    data = load_dataset(dataset, args.data_dir, image_size=model.config.input_resize,
                        test_fraction=meta.get("test_fraction", 0.2))  # fmt: skip
    images = centre_crop(data.test_images[: args.test_size], model.config.image_size)
    labels = data.test_labels[: args.test_size]
    device = next(model.parameters()).device
    shown = "MNIST" if dataset == "mnist" else dataset  # the others by their --dataset name
    source = args.data_dir or ("the copy shipped with capsfast" if dataset == "mnist" else "./data")
    print(
        f"visualize: model {args.model}: {images.shape[0]:,} {shown} test images ({source}) on "
        f"{device}, routing {model.routing}",
        flush=True,
    )
    start = time.perf_counter()
    paths = save_figures(model, images, labels, out, progress=True)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(f"visualize: {len(paths)} figures in {out}, {time.perf_counter() - start:.1f} s")
    return 0
