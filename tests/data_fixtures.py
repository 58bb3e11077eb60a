"""Helpers shared by the data tests (test_augment, test_data_cifar, test_data_dvs) and the sweep CLI tests."""
from __future__ import annotations

import socket
import pytest
import torch
from scipy.stats import chi2


def one_line(err: pytest.ExceptionInfo) -> str:
    """The DataError's message, checked to be a single line."""
    message = str(err.value)
    assert "\n" not in message
    return message


def closed_port() -> int:
    """A local TCP port nobody listens on: a download from it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uniform_enough(counts: torch.Tensor, expected: torch.Tensor) -> bool:
    """Chi-square goodness of fit at p = 0.001: seeds are fixed, so a pass is stable, and a wrong
    distribution (a missing offset, a biased coin) fails by a wide margin."""
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return statistic < chi2.ppf(0.999, len(counts) - 1)


def crop_offsets(out: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, left) offsets of crops of an all-ones image, read off the zero padding they show."""
    def offset(lines_lit: torch.Tensor) -> torch.Tensor:
        dark = (~lines_lit).int()
        leading = dark.cumprod(1).sum(1)
        trailing = dark.flip(1).cumprod(1).sum(1)
        return trailing - leading + padding

    return offset(out.amax(-1) > 0), offset(out.amax(-2) > 0)
