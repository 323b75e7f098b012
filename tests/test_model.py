"""CapsNet against docs/spec.md: parameter counts, capsule grouping, masking, losses, W init."""

import pytest
import torch
from torch import nn

from capsfast import CapsNet, ModelConfig, margin_loss, reconstruction_loss
from capsfast.model import PrimaryCaps
from capsfast.routing import squash


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper():
    model = CapsNet()
    assert count(model) == 8_215_728
    assert model.digit.W.numel() == 1_474_560
    assert count(model.decoder) == 1_411_344
    encoder = count(model) - count(model.decoder)
    assert encoder == 6_804_224 + 160
    no_bias = CapsNet(ModelConfig(digit_bias=False))
    assert count(no_bias) == 8_215_568
    assert no_bias.digit.bias is None


def test_primary_capsule_grouping():
    # Capsule (type k, y, x) must be channels 8k..8k+7 at (y, x), squashed.
    cfg = ModelConfig()
    caps = PrimaryCaps(cfg)
    caps.conv = nn.Identity()  # isolate the grouping: feed the conv's output directly
    y = torch.randn(2, 256, 6, 6)
    out = caps(y)
    assert out.shape == (2, 1152, 8)
    for k, yy, xx in [(0, 0, 0), (0, 0, 1), (1, 0, 0), (5, 3, 2), (31, 5, 5)]:
        i = k * 36 + yy * 6 + xx
        torch.testing.assert_close(out[:, i], squash(y[:, 8 * k : 8 * k + 8, yy, xx]))


def test_forward_shapes_and_masking():
    torch.manual_seed(0)
    model = CapsNet().eval()
    x = torch.rand(3, 1, 28, 28)
    labels = torch.tensor([1, 7, 3])
    with torch.no_grad():
        out = model(x, labels)
        assert out.lengths.shape == (3, 10)
        assert out.poses.shape == (3, 10, 16)
        assert out.reconstructions.shape == (3, 1, 28, 28)
        assert ((out.reconstructions >= 0) & (out.reconstructions <= 1)).all()
        # Training: the decoder sees the labelled capsule only.
        torch.testing.assert_close(out.reconstructions, model.decode(out.poses, labels))
        moved = out.poses.clone()
        moved[torch.arange(3), labels] += 1.0  # the labelled capsule must matter
        assert not torch.allclose(model.decode(moved, labels), out.reconstructions)
        others = out.poses.clone()
        others[:, 0] += 1.0  # capsule 0 is nobody's label here: must not matter
        torch.testing.assert_close(model.decode(others, labels), out.reconstructions)
        # Inference: the predicted capsule.
        pred = model(x)
        torch.testing.assert_close(
            pred.reconstructions, model.decode(pred.poses, pred.lengths.argmax(1))
        )
        torch.testing.assert_close(pred.lengths, pred.poses.norm(dim=-1), atol=1e-4, rtol=1e-4)


def test_lengths_are_probabilities():
    model = CapsNet()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert ((out.lengths > 0) & (out.lengths < 1)).all()


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.05, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3]])
    # label 0: present and above 0.9 -> 0; absent: 0.5 * (0.5-0.1)^2 + 0.5 * (0.3-0.1)^2
    expected = 0.5 * 0.4**2 + 0.5 * 0.2**2
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([0])), torch.tensor(expected))
    # label 2: present at 0.5 -> (0.9-0.5)^2; absent 0 at 0.95 -> 0.5 * 0.85^2; 9 -> 0.5*0.2^2
    expected2 = 0.4**2 + 0.5 * 0.85**2 + 0.5 * 0.2**2
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([2])), torch.tensor(expected2))
    # mean over the batch
    both = margin_loss(lengths.repeat(2, 1), torch.tensor([0, 2]))
    torch.testing.assert_close(both, torch.tensor((expected + expected2) / 2))


def test_reconstruction_loss_hand_computed():
    images = torch.zeros(2, 1, 28, 28)
    recon = torch.full((2, 1, 28, 28), 0.5)
    recon[1] = 0.0  # second sample is perfect
    # sum over 784 pixels of 0.25, times 0.0005, mean over the two samples
    expected = (784 * 0.25 * 0.0005 + 0.0) / 2
    torch.testing.assert_close(reconstruction_loss(recon, images), torch.tensor(expected))


def test_w_initialisation_is_small_normal():
    torch.manual_seed(0)
    W = CapsNet().digit.W
    assert 0.009 < W.std().item() < 0.011
    assert abs(W.mean().item()) < 1e-3
    assert torch.count_nonzero(CapsNet().digit.bias) == 0


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = CapsNet()
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([3, 4])
    out = model(x, y)
    loss = margin_loss(out.lengths, y) + reconstruction_loss(out.reconstructions, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_set_routing_rejects_unknown():
    with pytest.raises(ValueError, match="auto, torch, triton, fused"):
        CapsNet(routing="cuda")
    assert CapsNet().routing == "torch"  # auto on CPU


# --- several digits per image (MultiMNIST, paper section 6) -----------------------------------


def test_two_label_margin_loss_hand_computed():
    from capsfast.model import class_targets

    lengths = torch.tensor([[0.95, 0.05, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3]])
    labels = torch.tensor([[0, 2]])  # both present
    assert class_targets(labels, 10).tolist() == [[1, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
    # present: 0 at 0.95 -> 0, 2 at 0.5 -> (0.9 - 0.5)^2; absent: only 9 at 0.3 -> 0.5 * 0.2^2
    expected = 0.4**2 + 0.5 * 0.2**2
    torch.testing.assert_close(margin_loss(lengths, labels), torch.tensor(expected))
    # the order of the two labels does not matter; a single label [B] is the one-digit loss
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([[2, 0]])), torch.tensor(expected))
    one = 0.5 * 0.4**2 + 0.5 * 0.2**2  # label 0 alone: 2 at 0.5 is now absent
    torch.testing.assert_close(margin_loss(lengths, torch.tensor([0])), torch.tensor(one))


def test_top2_metric_needs_both_digits():
    from capsfast.model import correct

    scores = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # top-2 = {0, 2}
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 0.9],  # top-2 = {8, 9}
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 0.9],
        ]
    )
    labels = torch.tensor([[2, 0], [0, 1], [9, 8], [8, 7]])
    assert correct(scores, labels).tolist() == [True, False, True, False]
    # one label per image: the argmax
    assert correct(scores, torch.tensor([0, 2, 8, 9])).tolist() == [True, False, True, False]


def test_each_digit_is_reconstructed_from_its_own_capsule():
    torch.manual_seed(0)
    model = CapsNet(ModelConfig(image_size=36)).eval()
    x = torch.rand(3, 1, 36, 36)
    labels = torch.tensor([[1, 7], [3, 0], [9, 2]])
    with torch.no_grad():
        out = model(x, labels)
        assert out.reconstructions.shape == (3, 2, 1, 36, 36)
        for k in range(2):
            torch.testing.assert_close(
                out.reconstructions[:, k], model.decode(out.poses, labels[:, k])
            )
    # the loss: margin over both classes + the sum of the two reconstruction errors, each
    # against its own digit
    from capsfast.model import compute_loss

    digits = torch.rand(3, 2, 1, 36, 36)
    with torch.no_grad():
        _, total, margin, recon = compute_loss(model, x, labels, 0.0005, recon_targets=digits)
        separate = sum(
            reconstruction_loss(out.reconstructions[:, k], digits[:, k]) for k in range(2)
        )
    torch.testing.assert_close(recon, separate)
    torch.testing.assert_close(margin, margin_loss(out.lengths, labels))
    torch.testing.assert_close(total, margin + recon)
