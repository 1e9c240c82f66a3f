"""Importing published-format GMIC checkpoints: what is accepted, recorded and refused."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models import load_model, read_card
from models.gmic import GMIC, PRESETS
from models.gmic.checkpoint import CheckpointError, import_checkpoint


@dataclass
class NotATensor:
    value: int


@pytest.fixture(scope="module")
def state() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(3)
    return GMIC(PRESETS["published"]).state_dict()


def save_legacy(obj, path: Path) -> Path:
    """The published files' container: torch.save in the pre-1.6, non-zip format."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def test_import_writes_a_model_file_with_card(state, tmp_path: Path) -> None:
    src = save_legacy(state, tmp_path / "sample_model_3.p")
    out = tmp_path / "models" / "gmic3.safetensors"
    card = import_checkpoint(src, out, sample_model=3, version="2024.1")
    assert read_card(out) == card
    assert card.family == "gmic" and not card.clinical_use
    assert card.licence == "AGPL-3.0 (published GMIC weights, nyukat/GMIC)"
    assert (card.name, card.version) == ("gmic-sample-model-3", "2024.1")
    assert card.architecture == dict(PRESETS["published"], percent_t=0.03)
    assert card.preprocessing["window"] == [2944, 1920]
    assert card.provenance["source_file"] == "sample_model_3.p"
    assert card.provenance["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert card.provenance["sample_model"] == 3
    assert card.provenance["upstream_commit"].startswith("594029e")
    model = load_model(out)
    assert isinstance(model, GMIC) and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unexpected_tensors_are_reported_and_left_out(state, tmp_path: Path, caplog) -> None:
    extra = OrderedDict(state)
    extra["ds_net.extra_head.weight"] = torch.zeros(4, 4)
    src = save_legacy(extra, tmp_path / "extra.p")
    with caplog.at_level(logging.WARNING, logger="models.gmic.checkpoint"):
        card = import_checkpoint(src, tmp_path / "extra.safetensors", name="with-extras")
    assert "ds_net.extra_head.weight" in caplog.text and "1 tensor(s)" in caplog.text
    assert card.provenance["unused_tensors"] == ["ds_net.extra_head.weight"]
    assert card.name == "with-extras"
    assert "ds_net.extra_head.weight" not in load_model(tmp_path / "extra.safetensors").state_dict()


def _refusal(obj, tmp_path: Path, **kwargs) -> str:
    src = save_legacy(obj, tmp_path / "bad.p")
    out = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError) as err:
        import_checkpoint(src, out, **kwargs)
    assert not out.exists()
    return str(err.value)


def test_refuses_pickled_objects(tmp_path: Path) -> None:
    message = _refusal({"ds_net.x": NotATensor(1)}, tmp_path)
    assert "Python objects other than tensors" in message and "NotATensor" in message


def test_refuses_what_is_not_a_state_dict(state, tmp_path: Path) -> None:
    assert "not a state dict (found list)" in _refusal([1, 2, 3], tmp_path)
    wrapped = _refusal({"model": state, "epoch": 3}, tmp_path)
    assert "not a state dict" in wrapped and "'model'" in wrapped


def test_refuses_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "notes.p"
    src.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        import_checkpoint(src, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        import_checkpoint(tmp_path / "missing.p", tmp_path / "x.safetensors")


def test_refuses_other_networks(tmp_path: Path) -> None:
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}
    assert "not a GMIC checkpoint" in _refusal(resnet, tmp_path)


def test_refuses_missing_tensors(state, tmp_path: Path) -> None:
    partial = OrderedDict((k, v) for k, v in state.items() if not k.startswith("mil_attn_w"))
    message = _refusal(partial, tmp_path)
    assert "1 of 258 tensors are missing" in message and "mil_attn_w.weight" in message


def test_refuses_wrong_shapes(state, tmp_path: Path) -> None:
    bad = OrderedDict(state)
    bad["fusion_dnn.weight"] = torch.zeros(2, 1024)
    message = _refusal(bad, tmp_path)
    assert "fusion_dnn.weight [2, 1024] (needs [2, 768])" in message


def test_refuses_non_finite_weights(state, tmp_path: Path) -> None:
    bad = OrderedDict(state)
    bad["fusion_dnn.bias"] = torch.tensor([0.0, float("nan")])
    assert "NaN" in _refusal(bad, tmp_path)


def test_refuses_unknown_sample_model(state, tmp_path: Path) -> None:
    assert "sample model must be one of [1, 2, 3, 4, 5]" in _refusal(
        state, tmp_path, sample_model=6
    )
