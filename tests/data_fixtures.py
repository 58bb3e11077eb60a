"""Fixtures shared by the data tests (test_augment, test_data_cifar, test_data_dvs) and the sweep CLI tests."""
from __future__ import annotations

import socket
from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The data tests work on small tensors, which gain nothing from intra-op threads; on a loaded
    2-core machine OpenMP barriers wait on descheduled threads and made them 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
