"""Batched device augmentation: exact against references per sample, and the right distributions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode
from torchvision.transforms.autoaugment import _apply_op

from data_fixtures import crop_offsets, uniform_enough
from ndot.data import augment

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_at_is_pad_then_slice_with_one_offset_for_all_frames():
    x = torch.randint(0, 256, (6, 3, 2, 9, 11), dtype=torch.uint8)  # [B, T, C, H, W]
    top, left = torch.tensor([0, 1, 4, 8, 3, 8]), torch.tensor([0, 8, 4, 2, 7, 0])
    out = augment.crop_at(x, 4, top, left)
    padded = F.pad(x, (4, 4, 4, 4))
    for b in range(len(x)):
        assert torch.equal(out[b], padded[b, ..., top[b]:top[b] + 9, left[b]:left[b] + 11])


def test_random_crop_offsets_are_uniform_and_shared_by_frames():
    n, padding = 4000, 4
    out = augment.random_crop(torch.ones(n, 3, 2, 12, 12), padding, gen(0))
    assert torch.equal(out, out[:, :1].expand_as(out)), "frames and channels of a sample must share the crop"
    top, left = crop_offsets(out[:, 0, 0], padding)
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=2 * padding + 1).float()
        assert len(counts) == 2 * padding + 1
        assert uniform_enough(counts, torch.full_like(counts, n / (2 * padding + 1)))
    # Drawn independently: every (top, left) pair as often (a shared draw would give the diagonal only).
    side = 2 * padding + 1
    pairs = torch.bincount(top * side + left, minlength=side * side).float()
    assert uniform_enough(pairs, torch.full_like(pairs, n / side**2))


def test_random_flip_flips_half_the_samples_whole():
    n = 4000
    ramp = torch.arange(10.0).expand(n, 2, 3, 5, 10)
    out = augment.random_flip(ramp, gen(1))
    flipped = out[:, 0, 0, 0, 0] > out[:, 0, 0, 0, -1]
    assert torch.equal(out[flipped], ramp[flipped].flip(-1))
    assert torch.equal(out[~flipped], ramp[~flipped])
    assert abs(flipped.float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5


def test_cutout_at_is_the_clipped_square():
    x = torch.ones(5, 3, 32, 32)
    cy, cx = torch.tensor([0, 31, 16, 5, 8]), torch.tensor([0, 31, 3, 30, 8])
    out = augment.cutout_at(x, 16, cy, cx)
    for b in range(len(x)):
        hole = torch.zeros(32, 32, dtype=torch.bool)
        hole[max(cy[b] - 8, 0):cy[b] + 8, max(cx[b] - 8, 0):cx[b] + 8] = True
        assert torch.equal(out[b] == 0, hole.expand(3, 32, 32))


def test_random_cutout_hole_area_has_the_clipped_square_expectation():
    n, size, side = 4000, 16, 32
    out = augment.random_cutout(torch.ones(n, 2, 3, side, side), size, gen(2))
    assert torch.equal(out, out[:, :1].expand_as(out))
    area = (out[:, 0, 0] == 0).sum((-2, -1)).float()
    # A centre uniform over the image; the square clipped at the border.
    lengths = torch.tensor([min(c + size // 2, side) - max(c - size // 2, 0) for c in range(side)], dtype=torch.float)
    expected_mean = lengths.mean() ** 2
    assert abs(area.mean() - expected_mean) < 4 * area.std() / n ** 0.5
    assert area.max() == size * size and area.min() == (size // 2) ** 2


def test_random_cutout_centres_are_uniform_over_every_pixel():
    # A 2x2 hole covers rows cy - 1 and cy (clipped at 0): its last row is the centre's.
    n, side = 6400, 32
    out = augment.random_cutout(torch.ones(n, 1, 1, side, side), 2, gen(7))[:, 0, 0]
    rows, cols = (out == 0).any(-1), (out == 0).any(-2)
    last = lambda lit: side - 1 - lit.flip(-1).int().argmax(-1)  # noqa: E731
    for centres in (last(rows), last(cols)):
        counts = torch.bincount(centres, minlength=side).float()
        assert len(counts) == side and uniform_enough(counts, torch.full_like(counts, n / side))


def image_kinds(n: int, g: torch.Generator) -> torch.Tensor:
    """uint8 images that reach every branch: noise, low contrast, constant, a smooth gradient."""
    noise = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    low = noise // 8 + 100
    constant = torch.full_like(noise, 77)
    ramp = (torch.arange(32).view(1, 1, 1, 32) * 4 + torch.arange(3).view(1, 3, 1, 1) * 30).expand_as(noise)
    return torch.cat([noise, low, constant, ramp.to(torch.uint8)])


def test_every_autoaugment_entry_equals_torchvision_op_on_each_image():
    aa = augment.BatchAutoAugment((32, 32))
    entries = torch.arange(len(aa.ops))
    x = image_kinds(len(entries), gen(3))
    e = torch.stack([entries.repeat(4), torch.zeros(len(x), dtype=torch.long)], 1)
    out = aa.apply(x, e)
    for i in range(len(x)):
        name, magnitude = aa.ops[int(e[i, 0])]
        ref = _apply_op(x[i], name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        assert torch.equal(out[i], ref), f"entry {int(e[i, 0])} ({name} {magnitude:+.3f}) on image {i}"


def test_sampled_sub_policies_apply_both_ops_in_order():
    aa = augment.BatchAutoAugment((32, 32))
    x = image_kinds(16, gen(4))
    e = aa.sample(len(x), gen(5), x.device)
    out = aa.apply(x, e)
    for i in range(len(x)):
        ref = x[i]
        for slot in range(2):
            name, magnitude = aa.ops[int(e[i, slot])]
            ref = _apply_op(ref, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        assert torch.equal(out[i], ref)


def test_sample_draws_autoaugment_forward_per_image():
    """Each entry's frequency equals AutoAugment.forward's: 1/25 * p * 1/2 (sign), identity otherwise.
    (The policy has an op with p = 0, never drawn.)"""
    n = 200_000
    aa = augment.BatchAutoAugment((32, 32))
    e = aa.sample(n, gen(6), torch.device("cpu"))
    policies = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    for slot in range(2):
        expected = torch.zeros(len(aa.ops))
        for k, sub_policy in enumerate(policies):
            p = sub_policy[slot][1]
            entry = 1 + 4 * k + 2 * slot
            expected[[entry, entry + 1]] += n * p / len(policies) / 2
            expected[0] += n * (1 - p) / len(policies)
        drawn = expected > 0
        counts = torch.bincount(e[:, slot], minlength=len(aa.ops)).float()
        assert counts[~drawn].sum() == 0
        assert uniform_enough(counts[drawn], expected[drawn])


def test_sample_draws_the_two_slots_of_a_sub_policy_independently():
    """AutoAugment.forward draws each slot's probability and sign on its own: both ops apply with
    probability p0·p1, and the two signs of an image are independent coins."""
    n = 200_000
    aa = augment.BatchAutoAugment((32, 32))
    e = aa.sample(n, gen(8), torch.device("cpu"))
    policies = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    both = (e > 0).all(1)
    p_both = sum(sub[0][1] * sub[1][1] for sub in policies) / len(policies)
    assert abs(both.float().mean().item() - p_both) < 4 * (p_both * (1 - p_both) / n) ** 0.5
    signs = (e[both] - 1) % 2
    pairs = torch.bincount(signs[:, 0] * 2 + signs[:, 1], minlength=4).float()
    assert uniform_enough(pairs, torch.full_like(pairs, int(both.sum()) / 4))


def test_ops_table_matches_torchvision_policy():
    aa = augment.BatchAutoAugment((32, 32))
    policies = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    assert [name for name, _ in aa.ops[1::2]] == [op[0] for sub in policies for op in sub]
    rotate = [m for name, m in aa.ops if name == "Rotate"]
    assert rotate and all(abs(m) <= 30 for m in rotate) and min(rotate) < 0 < max(rotate)


def test_autoaugment_is_seeded_and_checks_its_input():
    aa = augment.BatchAutoAugment((32, 32))
    x = image_kinds(32, gen(7))
    assert torch.equal(aa(x, gen(8)), aa(x, gen(8)))
    assert not torch.equal(aa(x, gen(8)), aa(x, gen(9)))
    with pytest.raises(ValueError, match="uint8"):
        aa(x.float(), gen(8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_ops_on_cuda_equal_the_cpu_ones():
    """The device pipeline on a GPU: the same pixels as on the CPU, where the ops are checked against torchvision."""
    aa = augment.BatchAutoAugment((32, 32))
    x = image_kinds(len(aa.ops), gen(10))
    e = torch.stack([torch.arange(len(aa.ops)).repeat(4), torch.arange(len(x)) % len(aa.ops)], 1)
    top, left = torch.randint(0, 9, (2, len(x)), generator=gen(11))
    cy, cx = torch.randint(0, 32, (2, len(x)), generator=gen(12))
    mean, std = torch.tensor((0.1, 0.2, 0.3)), torch.tensor((0.5, 0.6, 0.7))

    def pipeline(x, e, top, left, cy, cx, mean, std):  # the recipe's order (spec §5), flip aside
        return augment.normalise(augment.cutout_at(aa.apply(augment.crop_at(x, 4, top, left), e), 16, cy, cx), mean, std)

    args = (x, e, top, left, cy, cx, mean, std)
    on_cuda = pipeline(*(a.cuda() for a in args))
    assert on_cuda.is_cuda
    assert torch.equal(on_cuda.cpu(), pipeline(*args))


def test_normalise_is_to_tensor_then_normalize():
    import torchvision.transforms as T
    from PIL import Image

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    ref = torch.stack([T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(i.permute(1, 2, 0).numpy()))) for i in x])
    assert torch.equal(augment.normalise(x, torch.tensor(mean), torch.tensor(std)), ref)
