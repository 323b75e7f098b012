"""The paper's baseline CNN (capsfast/baseline.py): shapes, parameter counts, loss, training."""

import math

import pytest
import torch

from capsfast.baseline import (
    BaselineCNN,
    BaselineConfig,
    compute_loss,
    cross_entropy_loss,
)
from capsfast.data import load_mnist, to_float


def count(module):
    return sum(p.numel() for p in module.parameters())


def expected_count(image_size, convs=(256, 256, 128), pools=0, hidden=(328, 192), k=5):
    """The arithmetic, independently of the module: 5x5 convolutions with biases, FC layers."""
    total, channels = 0, 1
    for c in convs:
        total += k * k * channels * c + c
        channels = c
    width = channels * (image_size // 2**pools) ** 2
    for h in (*hidden, 10):
        total += width * h + h
        width = h
    return total


def test_parameter_count_is_the_papers():
    model = BaselineCNN()
    # the paper: 35.4M; "same" padding and no pooling leave 28 x 28 x 128 features for FC 328
    assert count(model) == 35_445_522 == expected_count(28)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 256, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (1, 1) for c in convs)
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(100_352, 328), (328, 192)]
    assert model.softmax_layer.in_features == 192 and model.softmax_layer.out_features == 10


@pytest.mark.parametrize("size, count_", [(36, 5_930_770), (40, 6_728_466)])
def test_pooled_variants_for_the_larger_images(size, count_):
    model = BaselineCNN(BaselineConfig(image_size=size, pool_after=(0, 1)))
    assert count(model) == count_ == expected_count(size, pools=2)
    assert model(torch.rand(2, 1, size, size)).logits.shape == (2, 10)


def test_forward_dropout_and_config_round_trip():
    torch.manual_seed(0)
    cfg = BaselineConfig(conv_channels=(8, 8, 4), hidden=(32, 16))
    model = BaselineCNN(cfg)
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    out = model(x)
    assert out.logits.shape == (4, 10) and out.reconstructions is None
    assert out.scores is out.logits
    torch.testing.assert_close(model(x).logits, out.logits)  # eval: no dropout
    model.train()
    assert not torch.allclose(model(x).logits, out.logits)  # training: dropout before softmax
    assert BaselineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown baseline config keys"):
        BaselineConfig.from_dict({**cfg.to_dict(), "wings": 2})
    with pytest.raises(ValueError, match="does not fit"):
        BaselineCNN(BaselineConfig(pool_after=(5,)))


def test_cross_entropy_one_and_two_labels_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    lse = math.log(math.exp(2) + math.exp(1) + 8)
    torch.testing.assert_close(cross_entropy_loss(logits, torch.tensor([0])), torch.tensor(lse - 2))
    # two digits present: the target is 1/2 on each, so the loss is lse - (z_0 + z_2) / 2
    two = cross_entropy_loss(logits, torch.tensor([[0, 2]]))
    torch.testing.assert_close(two, torch.tensor(lse - 1.5))


def test_full_size_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = BaselineCNN()
    mnist = load_mnist()
    x, y = to_float(mnist.train_images[:2]), mnist.train_labels[:2]
    _, loss, ce, recon = compute_loss(model, x, y)
    assert recon.item() == 0 and torch.equal(loss, ce)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_few_steps_on_real_mnist_reduce_the_loss():
    """A narrow, pooled baseline (the full one costs ~10x CapsNet's FLOPs on a CPU), 50 steps."""
    torch.manual_seed(0)
    cfg = BaselineConfig(conv_channels=(8, 8, 8), pool_after=(0, 1), hidden=(64, 32))
    model = BaselineCNN(cfg)
    mnist = load_mnist()
    x, y = to_float(mnist.train_images[:256]), mnist.train_labels[:256]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(50):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        _, loss, _, _ = compute_loss(model, x[batch], y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8  # from about 2.3 (chance)
    assert last < 0.85 * first, losses


def test_export_and_load_either_model(tmp_path):
    """The baseline exports as capsnet does; config.json names the architecture, and an export
    without it (written before the baseline existed) loads as CapsNet."""
    import json

    from capsfast import CapsNet
    from capsfast.export import ModelError, load_model, save_model

    torch.manual_seed(0)
    cfg = BaselineConfig(image_size=36, conv_channels=(8, 8, 4), pool_after=(0, 1), hidden=(16, 8))
    model = BaselineCNN(cfg).eval()
    save_model(model, tmp_path / "baseline", meta={"task": "multimnist"})
    config = json.loads((tmp_path / "baseline" / "config.json").read_text())
    assert config["architecture"] == "baseline" and config["model"]["pool_after"] == [0, 1]
    loaded = load_model(tmp_path / "baseline")
    assert isinstance(loaded, BaselineCNN) and loaded.config == cfg and not loaded.training
    x = torch.rand(3, 1, 36, 36)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)

    save_model(CapsNet(), tmp_path / "capsnet")
    path = tmp_path / "capsnet" / "config.json"
    old = json.loads(path.read_text())
    assert old.pop("architecture") == "capsnet"
    path.write_text(json.dumps(old))
    assert isinstance(load_model(tmp_path / "capsnet"), CapsNet)

    good = (tmp_path / "baseline" / "config.json").read_text()
    for key, value, message in [
        ("dropout", 1.5, "must be a number in \\[0, 1\\)"),
        ("conv_channels", [8, 0, 4], "must be a list of positive integers"),
        ("pool_after", [0, 7], "does not fit 3 convolutions"),
    ]:
        bad = json.loads(good)
        bad["model"][key] = value
        (tmp_path / "baseline" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=message):
            load_model(tmp_path / "baseline")
    bad["architecture"] = "resnet"
    (tmp_path / "baseline" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="unknown architecture 'resnet'"):
        load_model(tmp_path / "baseline")
