"""A loader that keeps a whole dataset on the training device and batches it there.

Shuffling and augmentation draw from a generator seeded by (seed, epoch), so an
epoch's batches are the same whether or not the run was resumed in between.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

# augment(x, generator) -> x, applied per batch on the device, before `normalise`.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) * 100_003 + int(epoch))
    return g


class DeviceLoader:
    """Batches of (x, y) from tensors already on `device`.

    x holds raw samples (uint8 images or float frames); `prepare` turns a batch
    into the float input the model sees (dtype cast, augmentation, normalisation).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        prepare: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prepare = prepare
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.x.device
        g = epoch_generator(self.seed, self.epoch, device)
        order = torch.randperm(self.num_samples, generator=g, device=device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl] if order is not None else None
            x = self.x[idx] if idx is not None else self.x[sl]
            y = self.y[idx] if idx is not None else self.y[sl]
            if self.prepare is not None:
                x = self.prepare(x, g)
            yield x, y
