"""Adapter tests run tiny models in-process: one torch thread is fastest for them, above all on
a shared 2-core machine (several threads contend for cores they do not have)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
