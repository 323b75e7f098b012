"""MultiMNIST (capsfast/multimnist.py, paper section 6): the generator, the 36x36 CapsNet, its
routing kernels at I = 3200, a few training steps, Figure 5."""

import os

import pytest
import torch

from capsfast import CapsNet, multimnist
from capsfast.data import load_mnist, to_float
from capsfast.model import compute_loss
from capsfast.multimnist import MODEL, Pairing, expected_nominal_overlap, overlap_statistics


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


@pytest.fixture(scope="module")
def pairing(mnist):
    return Pairing(mnist.train_images, mnist.train_labels)


def test_pairs_follow_the_authors_rule(mnist, pairing):
    base = torch.arange(0, 60_000, 7)
    p = pairing.pairs(base, seed=3, epoch=5)
    n = len(base)
    assert p.images.shape == (n, 1, 36, 36) and p.images.dtype == torch.uint8
    assert p.digits.shape == (n, 2, 1, 36, 36)
    # labels: the base digit's and the partner's, never the same class
    assert torch.equal(p.labels[:, 0], mnist.train_labels[base])
    assert torch.equal(p.labels[:, 1], mnist.train_labels[p.partners])
    assert (p.labels[:, 0] != p.labels[:, 1]).all()
    # shifts of up to 4 px in each direction, every value used
    assert p.shifts.min() == -4 and p.shifts.max() == 4
    assert len(torch.unique(p.shifts)) == 9
    # each digit alone is the 28x28 digit at (4 + dy, 4 + dx), nothing cut off
    for k, idx in enumerate((base, p.partners)):
        for i in (0, 1, n // 2, n - 1):
            dy, dx = (4 + p.shifts[i, k]).tolist()
            alone = p.digits[i, k, 0]
            assert torch.equal(alone[dy : dy + 28, dx : dx + 28], mnist.train_images[idx[i], 0])
            assert alone.sum() == mnist.train_images[idx[i]].sum()
    # the overlay: the two added, clipped at 255 (the authors' rule, not a pixel-wise max)
    total = p.digits[:, 0].int() + p.digits[:, 1].int()
    assert torch.equal(p.images.int(), total.clamp(max=255))
    assert (total > 255).any()  # clipping happens


def test_partners_are_uniform_over_the_other_classes(mnist, pairing):
    """The partner is any digit of another class with equal probability, so its class follows
    the class frequencies without the base class."""
    base = torch.nonzero(mnist.train_labels == 1).flatten()  # every digit 1, in two epochs
    partners = [pairing.pairs(base, seed=0, epoch=e) for e in (0, 1)]
    labels = torch.cat([p.labels for p in partners])
    counts = torch.bincount(mnist.train_labels, minlength=10).double()
    counts[1] = 0
    expected = counts / counts.sum()
    seen = torch.bincount(labels[:, 1], minlength=10).double() / len(labels)
    assert seen[1] == 0
    assert (seen - expected).abs().max() < 0.01  # 13,484 draws: 4 standard errors
    first = partners[0].partners
    assert len(torch.unique(first)) > 0.8 * len(first)  # not a few favourites


def test_pairs_are_a_pure_function_of_seed_epoch_and_index(pairing):
    """The same base digit gets the same pair whatever else is in the batch, so any split of a
    global batch over processes (or any batch size) generates the same images."""
    a = pairing.pairs(torch.arange(0, 100), seed=1, epoch=2)
    b = pairing.pairs(torch.arange(50, 150), seed=1, epoch=2)
    c = pairing.pairs(torch.arange(100).flip(0), seed=1, epoch=2)
    assert torch.equal(a.images[50:], b.images[:50])
    assert torch.equal(a.images, c.images.flip(0))
    world = [pairing.pairs(torch.arange(100)[r::2], seed=1, epoch=2) for r in (0, 1)]
    interleaved = torch.stack([world[0].images, world[1].images], 1).flatten(0, 1)
    assert torch.equal(interleaved, a.images)
    other_epoch = pairing.pairs(torch.arange(100), seed=1, epoch=3)
    other_seed = pairing.pairs(torch.arange(100), seed=2, epoch=2)
    assert (other_epoch.partners != a.partners).float().mean() > 0.9
    assert (other_seed.partners != a.partners).float().mean() > 0.9
    assert not torch.equal(other_epoch.shifts, a.shifts)


def test_overlap_statistics(pairing):
    """The paper: "two digits bounding boxes on average have 80% overlap". The nominal 20x20
    boxes of two digits shifted independently by up to 4 px share 72.6% in expectation (exact);
    the real ink boxes measured on 20,000 pairs: 46% IoU, 73% of the smaller box."""
    stats = overlap_statistics(pairing.pairs(torch.arange(20_000), seed=0, epoch=0))
    assert expected_nominal_overlap() == pytest.approx(0.7256515775, abs=1e-9)
    assert expected_nominal_overlap(max_shift=0) == 1.0
    assert stats["nominal_box"] == pytest.approx(expected_nominal_overlap(), abs=0.004)
    assert 0.44 < stats["ink_box_iou"] < 0.48
    assert 0.70 < stats["ink_box_of_smaller"] < 0.75


def test_fixed_test_set(mnist):
    small = multimnist.fixed_test_pairs(mnist.test_images, mnist.test_labels, size=1_000)
    again = multimnist.fixed_test_pairs(mnist.test_images, mnist.test_labels, size=12_000)
    assert torch.equal(small.images, again.images[:1_000])  # --test-size only cuts it
    assert len(again.labels) == 12_000 and small.digits is None
    assert torch.equal(again.labels[:, 0], mnist.test_labels[torch.arange(12_000) % 10_000])
    # a second round over the 10,000 test digits draws new partners for the same digits
    assert (again.partners[10_000:] != again.partners[:2_000]).float().mean() > 0.9
    assert multimnist.TEST_PAIRS == 100_000


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_the_36x36_capsnet():
    """The paper's MNIST CapsNet on 36x36 inputs: 28x28 after Conv1, a 10x10 grid of 32 primary
    capsule types (3,200 capsules of 8D), and 11.36M parameters (the paper: 11.36M)."""
    model = CapsNet(MODEL)
    assert model.config.primary_grid == 10 and model.config.num_primary == 3_200
    arithmetic = (
        (1 * 256 * 81 + 256)  # Conv1
        + (256 * 256 * 81 + 256)  # PrimaryCaps
        + 3_200 * 10 * 16 * 8  # W
        + 10 * 16  # DigitCaps bias
        + (160 * 512 + 512)
        + (512 * 1024 + 1024)
        + (1024 * 1296 + 1296)  # decoder, 36 x 36 out
    )
    assert count(model) == arithmetic == 11_361_968
    with torch.no_grad():
        out = model(torch.rand(2, 1, 36, 36), torch.tensor([[1, 2], [3, 4]]))
    assert out.lengths.shape == (2, 10) and out.reconstructions.shape == (2, 2, 1, 36, 36)


@pytest.mark.parametrize("impl", ["triton", "fused"])
def test_routing_kernels_run_unchanged_at_3200_inputs(impl):
    """Triton routing and the fused DigitCaps at I = 3200 (the 36x36 model's primary capsules)
    against the reference, forward and backward (interpreter on CPU: one sample)."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    from capsfast.routing import digit_caps, squash

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    u = squash(torch.randn(1, 1, 8, generator=g) + 0.7 * torch.randn(1, 3200, 8, generator=g))
    W = torch.randn(3200, 10, 16, 8, generator=g) * 0.2
    bias = torch.randn(10, 16, generator=g) * 0.5
    grad_v = torch.randn(1, 10, 16, generator=g)
    results = {}
    for name in ("torch", impl):
        inputs = [t.to(device).requires_grad_() for t in (u, W, bias)]
        v = digit_caps(inputs[0], inputs[1], 3, bias=inputs[2], impl=name)
        results[name] = (v, *torch.autograd.grad(v, inputs, grad_v.to(device)))
    for what, got, ref in zip(
        ("v", "du", "dW", "dbias"), results[impl], results["torch"], strict=True
    ):
        scale = ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5 * scale, msg=what)


def test_a_few_training_steps_reduce_the_two_label_loss(pairing):
    """The 36x36 CapsNet, margin loss on both labels + both reconstructions, 8 Adam steps on 8
    real pairs: both terms fall (margin from 1.6, both capsules at ~0, to about 0.2)."""
    torch.manual_seed(0)
    model = CapsNet(MODEL, routing="torch")
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    p = pairing.pairs(torch.arange(8), seed=0, epoch=0)
    x, digits = to_float(p.images[:, 0]), p.digits.float() / 255
    losses = []
    for _ in range(8):
        out, loss, margin, recon = compute_loss(model, x, p.labels, 0.0005, recon_targets=digits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((margin.item(), recon.item()))
    assert out.reconstructions.shape == (8, 2, 1, 36, 36)
    (margin0, recon0), (margin1, recon1) = losses[0], losses[-1]
    assert margin1 < 0.5 * margin0 and recon1 < recon0, losses


def test_figure5_cases_from_a_model(mnist):
    """Right answers once, wrong ones twice (reconstructed from the labels, then from the
    prediction), from a random model (about 1 pair in 45 right)."""
    torch.manual_seed(0)
    model = CapsNet(MODEL, routing="torch")
    pairs = multimnist.fixed_test_pairs(mnist.test_images, mnist.test_labels, size=200)
    cases = multimnist.figure5_cases(model, pairs, n_correct=1, n_wrong=2)
    right = [c for c in cases if c["correct"]]
    wrong = [c for c in cases if not c["correct"]]
    assert len(right) == 1 and len(wrong) == 4
    assert [c["kind"] for c in wrong] == ["label", "prediction"] * 2
    assert sorted(right[0]["labels"]) == sorted(right[0]["predicted"])
    for c in cases:
        assert c["input"].shape == (1, 36, 36) and c["reconstructions"].shape == (2, 1, 36, 36)
        assert c["used"] == (c["labels"] if c["kind"] == "label" else c["predicted"])
        with torch.no_grad():
            poses = model.encode(c["input"].unsqueeze(0))
            expected = model.decode(poses.expand(2, -1, -1), torch.tensor(c["used"]))
        torch.testing.assert_close(c["reconstructions"], expected, atol=1e-5, rtol=1e-5)


def test_figure5_is_drawn_in_red_and_green(mnist, tmp_path):
    """The drawing, from cases whose "reconstructions" are two real digits: where only the
    first has ink the overlay is red, only the second green, both yellow; the PNG is written."""
    p = Pairing(mnist.test_images, mnist.test_labels).pairs(torch.arange(3), seed=0, epoch=0)
    digits = p.digits.float() / 255
    rgb = multimnist.overlay(digits[0])
    only_first = (digits[0, 0, 0] > 0.5) & (digits[0, 1, 0] == 0)
    only_second = (digits[0, 1, 0] > 0.5) & (digits[0, 0, 0] == 0)
    assert only_first.sum() > 20 and only_second.sum() > 20
    assert (rgb[only_first][:, 0] > 0.5).all() and (rgb[only_first][:, 1] == 0).all()
    assert (rgb[only_second][:, 1] > 0.5).all() and (rgb[only_second][:, 0] == 0).all()
    assert (rgb[..., 2] == 0).all()
    cases = [
        dict(input=p.images[i].float() / 255, reconstructions=digits[i], labels=p.labels[i].tolist(),
             used=p.labels[i].tolist(), predicted=p.labels[i].tolist(), kind="label", correct=True)
        for i in range(3)
    ]  # fmt: skip
    path = multimnist.draw_figure5(cases, tmp_path / "figure5.png")
    from PIL import Image

    with Image.open(path) as img:
        assert img.width >= 3 * 100 and img.height >= 300
        colours = img.convert("RGB").getcolors(1 << 20)
    reds = sum(n for n, (r, g, b) in colours if r > 150 and g < 60 and b < 60)
    greens = sum(n for n, (r, g, b) in colours if g > 150 and r < 60 and b < 60)
    assert reds > 100 and greens > 100
