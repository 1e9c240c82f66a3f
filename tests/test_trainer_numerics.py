"""trainer.numerics.flush_denormal: on inside the block, what it found after it."""

from __future__ import annotations

import pytest
import torch

from trainer.numerics import flush_denormal


def _flushing() -> bool:
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@pytest.fixture(autouse=True)
def _restore_mode():
    was_on = _flushing()
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal needs SSE3)")
    yield
    torch.set_flush_denormal(was_on)


@pytest.mark.parametrize("before", [False, True])
def test_restores_what_it_found(before):
    torch.set_flush_denormal(before)
    with flush_denormal():
        assert _flushing()
    assert _flushing() is before


def test_restores_when_the_block_raises():
    with pytest.raises(RuntimeError), flush_denormal():
        raise RuntimeError("training failed")
    assert not _flushing()
