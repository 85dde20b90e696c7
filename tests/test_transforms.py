"""Batched on-device transforms and the deterministic batch stream."""

import pytest
import torch
import torch.nn.functional as F

from cnnlab.core import transforms
from cnnlab.core.spec import Preprocess
from cnnlab.data.loader import CROP_PAD, TrainBatches


def test_flip_mirrors_only_masked_images():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5)
    out = transforms.flip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1], x[1])


def test_pad_crop_equals_slicing_a_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 2 * CROP_PAD + 1, (6, 2), generator=g)
    out = transforms.pad_crop(x, offsets, CROP_PAD)
    padded = F.pad(x, (CROP_PAD,) * 4)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])
    centre = transforms.pad_crop(x, torch.full((6, 2), CROP_PAD), CROP_PAD)
    assert torch.equal(centre, x)


def test_to_input_resizes_bilinearly_and_normalises():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = transforms.to_input(x, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = F.interpolate(x.double() / 255, size=224, mode="bilinear", align_corners=False) * 2 - 1
    assert torch.allclose(out.double(), expected, atol=2e-6)
    assert -1.0 - 1e-6 <= out.min() and out.max() <= 1.0 + 1e-6  # bilinear never overshoots
    same = transforms.to_input(x, 32, (0.0,), (1.0,))
    assert torch.allclose(same, x.float() / 255)
    assert transforms.to_input(x, 32, (0, 0, 0), (1, 1, 1), channels_last=True).is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,size", [((2, 3, 32, 32), 224), ((1, 1, 37, 50), 24), ((3, 2, 5, 7), 9),
                                        ((1, 3, 64, 64), 32), ((1, 1, 1, 1), 8)])
def test_resize_equals_torch_bilinear_interpolation(shape, size):
    # Against torch's kernel in float64: in float32 that kernel is itself off by up to 2e-5 here
    # (it computes source positions in float32), the matrix products by about 4e-7.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x.double(), size=(size, size), mode="bilinear", align_corners=False)
    out = transforms.resize(x, size)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert (out.double() - expected).abs().max() < 2e-6
    assert torch.allclose(transforms.resize(x.double(), size), expected, atol=1e-12)


def _batches(n=10, batch=4, augment="flip-crop", seed=0):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return TrainBatches(images, torch.arange(n), batch, Preprocess(8, images.shape[1], (0.0,), (1 / 255,)),
                        augment, seed)


def test_each_epoch_is_a_permutation_with_nothing_dropped():
    b = _batches(n=10, batch=4)
    assert len(b) == 3
    labels = torch.cat([y for _, y, _ in b.epoch(0)])
    assert sorted(labels.tolist()) == list(range(10))
    other = torch.cat([y for _, y, _ in b.epoch(1)])
    assert not torch.equal(labels, other)


def test_batches_depend_only_on_seed_and_epoch_so_resume_is_exact():
    b = _batches()
    full = list(b.epoch(3))
    resumed = list(b.epoch(3, start=1))
    assert len(resumed) == len(full) - 1
    for (x1, y1, _), (x2, y2, _) in zip(full[1:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = list(_batches().epoch(3))
    assert all(torch.equal(a[0], b_[0]) for a, b_ in zip(full, again))
    assert not torch.equal(torch.cat([y for _, y, _ in _batches(seed=1).epoch(3)]), torch.cat([y for _, y, _ in full]))


def test_ranks_split_each_batch_and_together_see_what_one_process_sees():
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1).expand(11, 3, 8, 8).contiguous()

    def make(rank, world):
        return TrainBatches(images, torch.arange(11), 4, Preprocess(8, images.shape[1], (0.0,), (1 / 255,)),
                            "flip-crop", 2, rank=rank, world=world)

    one = list(make(0, 1).epoch(5))
    two = [list(make(r, 2).epoch(5)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for (x, y, n), (x0, y0, n0), (x1, y1, n1) in zip(one, *two):
        assert n == n0 == n1 == len(y)  # every rank knows the global batch's size
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    # A last batch smaller than the number of ranks cannot be split: it is dropped, and said so.
    three = make(0, 4)
    assert len(three) == 2 and three.dropped == 3 and make(0, 1).dropped == 0


def test_augmentation_keeps_image_content_with_its_label():
    # Each image is constant (its index); padding brings zeros in, never another image's pixels.
    for x, y, _ in _batches(n=16, batch=8).epoch(0):
        for img, label in zip(x, y):
            values = set(img.unique().round().tolist())
            assert values <= {0.0, float(label)}
