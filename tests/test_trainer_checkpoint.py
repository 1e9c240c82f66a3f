"""trainer.checkpoint.Checkpoint: a state saved whole or not at all, resumed only by the run
that wrote it (same checkpoint format, site data and options), refused with what to do."""

from __future__ import annotations

import threading

import pytest
import torch

from trainer.checkpoint import Checkpoint


class RunError(ValueError):
    pass


def _checkpoint(path, key="k1", fingerprint="f1", format_version=1) -> Checkpoint:
    return Checkpoint(path, key, fingerprint, format_version, RunError)


def test_saved_state_loads_back(tmp_path):
    path = tmp_path / "work" / "checkpoint.pt"
    _checkpoint(path).save({"epoch": 3, "model": {"w": torch.arange(4.0)}})
    state = _checkpoint(path).load()
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (dict(format_version=2), "another trainer version; delete the work folder"),
        (dict(fingerprint="f2"), "different site data; delete the work folder"),
        (dict(key="k2"), "different options; rerun with the same options or delete"),
    ],
)
def test_another_runs_checkpoint_is_refused(tmp_path, other, message):
    path = tmp_path / "checkpoint.pt"
    _checkpoint(path).save({"epoch": 0})
    with pytest.raises(RunError, match=message):
        _checkpoint(path, **other).load()


def test_a_failed_save_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint = _checkpoint(path)
    checkpoint.save({"epoch": 1})
    with pytest.raises(TypeError, match="pickle"):
        checkpoint.save({"epoch": 2, "unpicklable": threading.Lock()})
    assert checkpoint.load()["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
