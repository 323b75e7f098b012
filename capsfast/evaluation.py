"""The model on held-out images during training: accuracy over a split, each image counted once
across ranks; reconstructions for the tracker."""

from __future__ import annotations

import torch

from capsfast.data import to_float
from capsfast.model import correct


class EvaluationStopped(Exception):
    """A stop request cut an evaluation short (`evaluate`'s `stop`)."""


@torch.no_grad()
def evaluate(model, images, labels, accelerator, batch_size: int, desc: str | None = None,
             stop=None):  # fmt: skip
    """(accuracy, count) over all `images`, each counted exactly once across ranks: rank r takes
    a contiguous shard and the correct/total counts are summed (on-device batching has no padded
    duplicates for gather_for_metrics to drop). `desc`: a progress bar with that title. `stop`:
    a function asked before every batch; when it says yes, EvaluationStopped (one process only:
    the ranks of a group must all reach the final reduction)."""
    from tqdm.auto import tqdm

    n = images.shape[0]
    world, rank = accelerator.num_processes, accelerator.process_index
    lo, hi = n * rank // world, n * (rank + 1) // world
    was_training = model.training
    model.eval()
    right = torch.zeros((), dtype=torch.long, device=accelerator.device)
    quiet = desc is None or not accelerator.is_local_main_process
    for start in tqdm(range(lo, hi, batch_size), desc=desc, leave=False, disable=quiet):
        if stop is not None and stop():
            model.train(was_training)
            raise EvaluationStopped
        # .to: a no-op for data on the device; streamed data's evaluation sets stay on the host.
        x = to_float(images[start : min(hi, start + batch_size)].to(accelerator.device))
        with accelerator.autocast():
            scores = model(x).scores
        y = labels[start : start + x.shape[0]].to(accelerator.device)
        right += correct(scores, y).sum()
    model.train(was_training)
    counts = torch.stack([right, torch.tensor(hi - lo, device=accelerator.device)])
    counts = accelerator.reduce(counts, reduction="sum")
    return counts[0].item() / max(1, counts[1].item()), int(counts[1].item())


def log_reconstructions(accelerator, model, images, step: int, n: int = 16) -> None:
    """W&B image: n digits on top, their reconstructions (predicted capsule) below."""
    if not accelerator.is_main_process:
        return
    from torchvision.utils import make_grid

    from capsfast import tracking

    with torch.no_grad(), accelerator.autocast():
        x = to_float(images[:n].to(accelerator.device))
        rec = model(x).reconstructions
    if rec is None:  # the baseline: no decoder
        return
    grid = make_grid(torch.cat([x, rec.float()]).cpu(), nrow=n, padding=2)
    tracking.log_images(accelerator, {"reconstructions": grid.permute(1, 2, 0).numpy()}, step)
