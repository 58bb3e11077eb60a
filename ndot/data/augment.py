"""Batched augmentation on the training device: one call per batch, independent draws per sample.

Every op takes x of shape [B, ..., H, W] (uint8 or float) and draws from `generator`
(a torch.Generator on x's device, or None for the global one). Draws are per
sample and shared by the middle dims, so every channel and every frame of a
recording get the same crop, flip or hole. Padding and holes are zeros, as in
torchvision's RandomCrop(padding=...) and Cutout before normalisation.
"""
from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import AutoAugment, AutoAugmentPolicy, InterpolationMode
# torchvision keeps the op arithmetic, the sub-policy table and the magnitude
# bins behind these names; using them makes BatchAutoAugment torchvision's
# AutoAugment by construction. tests/test_augment.py compares the two op by op.
from torchvision.transforms.autoaugment import _apply_op

Tensor = torch.Tensor


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, size, generator=generator, device=device)


def _per_sample(mask: Tensor, x: Tensor) -> Tensor:
    """View a [B, H, W] or [B] mask so that it broadcasts over x's middle dims."""
    tail = mask.shape[1:]
    return mask.view(mask.shape[0], *([1] * (x.dim() - 1 - len(tail))), *tail)


def _remap(x: Tensor, src: Tensor, valid: Tensor) -> Tensor:
    """out[b, ..., p] = x[b, ..., src[b, p]] where valid[b, p], else 0; p runs over the flattened H*W plane."""
    b, hw = x.shape[0], x.shape[-2] * x.shape[-1]
    flat = x.reshape(b, -1, hw)
    out = flat.gather(2, src[:, None, :].expand(-1, flat.shape[1], -1))
    return out.masked_fill_(~valid[:, None, :], 0).reshape(x.shape)


def crop_at(x: Tensor, padding: int, top: Tensor, left: Tensor) -> Tensor:
    """Zero-pad by `padding`, then crop H x W at per-sample offsets (top, left) in [0, 2 * padding]."""
    h, w = x.shape[-2], x.shape[-1]
    rows = top[:, None] - padding + torch.arange(h, device=x.device)
    cols = left[:, None] - padding + torch.arange(w, device=x.device)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    src = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    return _remap(x, src.flatten(1), valid.flatten(1))


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    """torchvision's RandomCrop(size=(H, W), padding=padding) per sample: offsets uniform in [0, 2 * padding]."""
    offsets = _randint(2 * padding + 1, (2, x.shape[0]), generator, x.device)
    return crop_at(x, padding, offsets[0], offsets[1])


def random_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Horizontal flip of each sample with probability 1/2, as torchvision's RandomHorizontalFlip()."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(_per_sample(flip, x), x.flip(-1), x)


def cutout_at(x: Tensor, size: int, cy: Tensor, cx: Tensor) -> Tensor:
    """Zero the size x size square centred at (cy, cx), clipped to the image (DeVries & Taylor, 2017)."""
    h, w = x.shape[-2], x.shape[-1]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= cy[:, None] - size // 2) & (rows < cy[:, None] + size // 2)
    in_cols = (cols >= cx[:, None] - size // 2) & (cols < cx[:, None] + size // 2)
    return x.masked_fill(_per_sample(in_rows[:, :, None] & in_cols[:, None, :], x), 0)


def random_cutout(x: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """One hole per sample, its centre uniform over the image, so holes near the border are clipped."""
    cy = _randint(x.shape[-2], (x.shape[0],), generator, x.device)
    cx = _randint(x.shape[-1], (x.shape[0],), generator, x.device)
    return cutout_at(x, size, cy, cx)


class Cutout:
    """Cutout for one [C, H, W] tensor, for a torchvision Compose (CPU pipeline); draws from torch's global RNG."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Tensor) -> Tensor:
        return random_cutout(img[None], self.size, None)[0]


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std per channel; the same arithmetic as ToTensor + Normalize.

    Not TF.normalize: it checks `(std == 0).any()` on every call, a device sync per batch on a GPU.
    255 is a tensor on x's device: CUDA divides by a Python scalar as x * (1/255), one bit off
    true division for about half the uint8 values, and the device pipeline must equal the CPU's."""
    shape = (-1, 1, 1)
    return x.float().div_(torch.full((), 255.0, device=x.device)).sub_(mean.view(shape)).div_(std.view(shape))


def _blurred(x: Tensor) -> Tensor:
    """torchvision's sharpness-degenerate image of a uint8 batch: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 inside,
    border kept; separable sums instead of its grouped conv2d, which is ~10x slower on CPU."""
    f = x.float()
    rows = f[..., :-2, :] + f[..., 1:-1, :] + f[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    # Sums of integers are exact in float32, and k / 13 is never halfway between integers: rounding is exact.
    out[..., 1:-1, 1:-1] = ((box + 4 * f[..., 1:-1, 1:-1]) / 13).round_().to(x.dtype)
    return out


def _equalize_lut(x: Tensor) -> Tensor:
    """torchvision's tensor `equalize` as a lookup table [B, C, 256] per image and channel (identity where it
    leaves the channel unchanged), built for the whole batch instead of in its Python loop over images."""
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    # torchvision: step = (sum of the non-zero bins but the last) // 255; the last non-zero bin is the channel's max.
    step = (flat.shape[1] - hist.gather(1, flat.amax(1, keepdim=True))) // 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = torch.nn.functional.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    identity = torch.arange(256, device=x.device)
    return torch.where(step == 0, identity, lut).to(torch.uint8).view(b, c, 256)


def _autocontrast_lut(x: Tensor, values: Tensor) -> Tensor:
    """torchvision's tensor `autocontrast` as a lookup table [B, C, 256]: each channel stretched to [0, 255]."""
    low = x.amin((-2, -1)).float()[..., None]
    high = x.amax((-2, -1)).float()[..., None]
    scale = 255 / (high - low)
    flat = ~torch.isfinite(scale)
    low, scale = low.masked_fill(flat, 0), scale.masked_fill(flat, 1)
    return ((values - low) * scale).clamp(0, 255).to(torch.uint8)


_KINDS = ("Identity", "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
          "AutoContrast", "Equalize", "Invert")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")


class BatchAutoAugment:
    """torchvision's AutoAugment applied per image to a uint8 RGB batch [B, 3, H, W], on any device.

    torchvision's own AutoAugment draws one sub-policy per call, i.e. per batch
    when given a batch. Here each image draws its own sub-policy, probabilities
    and signs exactly as AutoAugment.forward does for one image, and the ops
    reproduce torchvision's tensor arithmetic bit for bit. Each (sub-policy,
    slot, sign) is one table entry (entry 0 is the identity). Per slot, for the
    whole batch and without a host sync: geometric ops are nearest-neighbour
    remaps with zero fill, recorded once per entry by running torchvision's op
    on an image of pixel coordinates; Color and Sharpness blend with a
    grayscale or blurred image; every other op maps each pixel value alone, so
    it is one lookup table per image and channel.
    """

    def __init__(self, image_size: tuple[int, int], policy: AutoAugmentPolicy = AutoAugmentPolicy.CIFAR10) -> None:
        h, w = image_size
        if max(h, w) > 256:
            raise ValueError(f"BatchAutoAugment records remaps in uint8 coordinates: images up to 256 px, got {h}x{w}")
        self.image_size = (h, w)
        reference = AutoAugment(policy)
        space = reference._augmentation_space(10, (h, w))
        ops: list[tuple[str, float]] = [("Identity", 0.0)]
        entry = torch.zeros(len(reference.policies), 2, 2, dtype=torch.long)
        prob = torch.zeros(len(reference.policies), 2)
        for k, sub_policy in enumerate(reference.policies):
            for slot, (name, p, magnitude_id) in enumerate(sub_policy):
                magnitudes, signed = space[name]
                magnitude = float(magnitudes[magnitude_id].item()) if magnitude_id is not None else 0.0
                prob[k, slot] = p
                for sign in (0, 1):
                    entry[k, slot, sign] = len(ops)
                    # AutoAugment.forward negates a signed magnitude when its sign draw is 0.
                    ops.append((name, -magnitude if signed and sign == 0 else magnitude))
        self.ops = ops
        self._tables = {**self._build_tables(ops, h, w), "entry": entry, "prob": prob}
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}

    @staticmethod
    def _build_tables(ops: list[tuple[str, float]], h: int, w: int) -> dict[str, Tensor]:
        n = len(ops)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([rows, cols, torch.full_like(rows, 255)]).to(torch.uint8)
        src = (rows * w + cols).flatten().repeat(n, 1)
        valid = torch.ones(n, h * w, dtype=torch.bool)
        kind = torch.zeros(n, dtype=torch.long)
        ratio = torch.ones(n)
        one_minus = torch.zeros(n)
        posterize = torch.full((n,), 255, dtype=torch.uint8)
        solarize = torch.full((n,), 256.0)  # above every uint8 value: no pixel is inverted
        for i, (name, magnitude) in enumerate(ops):
            if name in _GEOMETRIC:
                moved = _apply_op(coords, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
                src[i] = (moved[0].long() * w + moved[1].long()).flatten()
                valid[i] = (moved[2] == 255).flatten()
                continue
            kind[i] = _KINDS.index(name)
            if name in _BLENDS:
                # torchvision blends with python floats: ratio and 1 - ratio rounded from float64 separately.
                ratio[i] = 1.0 + magnitude
                one_minus[i] = 1.0 - (1.0 + magnitude)
            elif name == "Posterize":
                posterize[i] = 256 - 2 ** (8 - int(magnitude))
            elif name == "Solarize":
                solarize[i] = magnitude
            elif name == "Invert":
                solarize[i] = 0.0  # solarizing from 0 inverts every value
        return {"src": src, "valid": valid, "kind": kind, "ratio": ratio, "one_minus": one_minus,
                "posterize": posterize, "solarize": solarize}

    def _tables_on(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on_device:
            self._on_device[device] = {k: v.to(device) for k, v in self._tables.items()}
        return self._on_device[device]

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Entries [n, 2] (slot 0, slot 1): the draws of AutoAugment.forward, made for each image."""
        t = self._tables_on(device)
        k = _randint(len(t["prob"]), (n,), generator, device)
        probs = torch.rand(n, 2, generator=generator, device=device)
        signs = _randint(2, (n, 2), generator, device)
        slots = torch.arange(2, device=device)
        chosen = t["entry"][k[:, None], slots, signs]
        return torch.where(probs <= t["prob"][k], chosen, 0)

    def apply(self, x: Tensor, entries: Tensor) -> Tensor:
        """Apply each image's entries [B, 2] in order."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"expected uint8 [B, 3, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {x.dtype} {list(x.shape)}")
        t = self._tables_on(x.device)
        for slot in range(entries.shape[1]):
            x = self._apply_entries(x, entries[:, slot], t)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.apply(x, self.sample(x.shape[0], generator, x.device))

    @staticmethod
    def _apply_entries(x: Tensor, e: Tensor, t: dict[str, Tensor]) -> Tensor:
        # Each image has one op per slot and every stage is exactly the identity
        # for an image whose op belongs to another stage.
        b, c = x.shape[:2]
        kind, ratio, one_minus = t["kind"][e], t["ratio"][e], t["one_minus"][e]

        def is_kind(*names: str) -> Tensor:
            # Scalar comparisons: a tensor of codes built here would be a host-to-device copy, i.e. a sync.
            mask = kind == _KINDS.index(names[0])
            for name in names[1:]:
                mask |= kind == _KINDS.index(name)
            return mask

        def per_image(v: Tensor) -> Tensor:
            return v.view(b, *([1] * (x.dim() - 1)))

        x = _remap(x, t["src"][e], t["valid"][e])

        gray = TF.rgb_to_grayscale(x)
        image_blend = is_kind("Color", "Sharpness")
        w_x = per_image(torch.where(image_blend, ratio, 1.0))
        w_gray = per_image(torch.where(is_kind("Color"), one_minus, 0.0))
        w_blur = per_image(torch.where(is_kind("Sharpness"), one_minus, 0.0))
        x = (w_x * x + w_gray * gray + w_blur * _blurred(x)).clamp(0, 255).to(torch.uint8)

        values = torch.arange(256, device=x.device, dtype=torch.uint8).expand(b, c, 256)
        lut_blend = is_kind("Brightness", "Contrast")
        mean = torch.where(is_kind("Contrast"), gray.float().mean((-3, -2, -1)), 0.0)
        lut = (torch.where(lut_blend, ratio, 1.0).view(b, 1, 1) * values
               + (torch.where(lut_blend, one_minus, 0.0) * mean).view(b, 1, 1)).clamp(0, 255).to(torch.uint8)
        lut = lut & t["posterize"][e].view(b, 1, 1)
        lut = torch.where(lut >= t["solarize"][e].view(b, 1, 1), 255 - lut, lut)
        lut = torch.where(is_kind("AutoContrast").view(b, 1, 1), _autocontrast_lut(x, values), lut)
        lut = torch.where(is_kind("Equalize").view(b, 1, 1), _equalize_lut(x), lut)
        return lut.view(b * c, 256).gather(1, x.view(b * c, -1).long()).view(x.shape)
