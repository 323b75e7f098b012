"""The points of docs/spec.md that no other test pins: the input scaling, the non-linearities,
the optimiser, no augmentation at evaluation, the paper preset's budget, and checkpoint selection
on validation only."""

import json

import pytest
import torch
from safetensors.torch import load_file

from capsfast.config import parse_args
from capsfast.data import to_float
from capsfast.model import CapsNet
from capsfast.train import build_optimizer, evaluate, train
from tests.small_runs import small_cfg, synthetic_mnist


def test_images_are_scaled_to_unit_range_without_normalisation():
    images = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(3, 1, 1)
    x = to_float(images)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], images.float() / 255, rtol=0, atol=0)  # no mean/std


def test_relu_after_conv1_and_in_the_decoder():
    torch.manual_seed(0)
    model = CapsNet().eval()
    seen = {}
    model.primary.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.rand(2, 1, 28, 28)
    model(x)
    raw = model.conv1(x)
    assert raw.min() < 0, "the test needs negative Conv1 outputs"
    torch.testing.assert_close(seen["x"], torch.relu(raw))  # PrimaryCaps sees ReLU(Conv1)
    kinds = [type(m).__name__ for m in model.decoder.net]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "Sigmoid"]


def test_the_optimiser_is_adam_with_the_papers_settings():
    cfg = parse_args([])
    optimizer = build_optimizer(CapsNet(), cfg)
    assert type(optimizer) is torch.optim.Adam
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        assert group["weight_decay"] == 0 and group["lr"] == pytest.approx(1e-3)


def test_the_paper_preset_trains_100_epochs():
    cfg = parse_args([])
    assert cfg.epochs == 100 and cfg.max_steps is None


def test_evaluation_sees_the_images_unshifted():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = CapsNet(routing="torch").eval()
    images = synthetic_mnist(n_train=10, n_test=64).test_images
    with torch.no_grad():
        own = model(to_float(images)).lengths.argmax(1)  # the model's answers on plain images
    accuracy, count = evaluate(model, images, own, Accelerator(cpu=True), batch_size=16)
    assert count == 64 and accuracy == 1.0  # any shift or normalisation would change some


def test_the_export_is_the_best_validation_model_and_the_test_set_chooses_nothing(tmp_path):
    data = synthetic_mnist(n_train=96)  # 64 training images after validation: 4 steps an epoch
    runs = {}
    for test_size in (16, 64):  # two runs that differ only in the test set they report on
        out = tmp_path / f"test{test_size}"
        train(small_cfg(out, max_steps=None, epochs=3, test_size=test_size), data=data)
        runs[test_size] = out
    records = [json.loads(x) for x in (runs[16] / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: (r["val_accuracy"], -r["step"]))  # the first best
    meta = json.loads((runs[16] / "model" / "config.json").read_text())["meta"]
    assert (meta["step"], meta["val_accuracy"]) == (best["step"], best["val_accuracy"])
    a, b = (load_file(runs[n] / "model" / "model.safetensors") for n in (16, 64))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the test set selected nothing
