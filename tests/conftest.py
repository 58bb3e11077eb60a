"""Fixtures pytest hands to any test module that asks for them."""
from __future__ import annotations

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
