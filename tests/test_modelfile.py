"""Model files: the save/load round trip, and refusals of damaged, tampered or mismatched
files, each naming the file and saying what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import ModelCard, ModelFileError, get_family, load_model, read_card, save_model
from models.allconv import PRESETS, AllConvNet
from models.modelfile import METADATA_KEY, update_card

ARCH = PRESETS["demo"]


def _card(**changes) -> ModelCard:
    fields = dict(
        family="allconv",
        architecture=ARCH,
        preprocessing=get_family("allconv").default_preprocessing(ARCH),
        name="allconv-demo-test",
        version="1.2.3",
        licence="Apache-2.0",
        provenance={"base_model": "none", "metrics": {"auc": 0.5}},
        operating_points={"default": 0.3, "high-sensitivity": 0.1},
    )
    return ModelCard(**(fields | changes))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, AllConvNet]:
    torch.manual_seed(0)
    module = get_family("allconv").build(ARCH)
    path = save_model(module, _card(), tmp_path_factory.mktemp("m") / "sub" / "demo.safetensors")
    return path, module


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        card = json.loads(f.metadata()[METADATA_KEY])
    return tensors, card


def _tampered(saved, tmp_path: Path, tensors=None, card=None, metadata=None) -> Path:
    """A copy of the saved file with its tensors and/or card replaced."""
    original_tensors, original_card = _contents(saved[0])
    path = tmp_path / "tampered.safetensors"
    if metadata is None:
        metadata = {METADATA_KEY: json.dumps(original_card if card is None else card)}
    save_file(original_tensors if tensors is None else tensors, str(path), metadata=metadata)
    return path


def _refusal(path: Path, *expected: str) -> str:
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message
    for text in expected:
        assert text in message
    return message


def test_round_trip_keeps_weights_and_card(saved):
    path, module = saved
    card = read_card(path)
    assert card == _card()
    assert card.operating_point == 0.3
    assert card.info().name == "allconv-demo-test" and not card.info().clinical_use
    loaded = load_model(path)
    assert isinstance(loaded, AllConvNet) and not loaded.training
    assert loaded.card == card
    expected = module.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_missing_and_foreign_files(saved, tmp_path: Path):
    _refusal(tmp_path / "absent.safetensors", "no such model file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _refusal(junk, "not a readable safetensors model file")
    tensors, _ = _contents(saved[0])
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    _refusal(bare, "without a mammo-ai model card", "plugin models import")


def test_card_that_is_not_json_or_not_an_object(saved, tmp_path: Path):
    _refusal(_tampered(saved, tmp_path, metadata={METADATA_KEY: "{not json"}), "not valid JSON")
    _refusal(_tampered(saved, tmp_path, card=[1, 2]), "JSON list, not an object")


def test_card_with_unknown_or_missing_fields(saved, tmp_path: Path):
    card = _contents(saved[0])[1] | {"validated_by": "nobody"}
    _refusal(
        _tampered(saved, tmp_path, card=card),
        "model card: unknown fields ['validated_by']",
        "edited by hand: re-export the model",
    )
    card = {k: v for k, v in _contents(saved[0])[1].items() if k not in ("name", "licence")}
    _refusal(_tampered(saved, tmp_path, card=card), "missing fields ['name', 'licence']")


def test_card_from_a_newer_format(saved, tmp_path: Path):
    card = _contents(saved[0])[1] | {"format_version": 99, "new_field": 1}
    _refusal(_tampered(saved, tmp_path, card=card), "format 99 is newer", "upgrade")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("clinical_use", "false", "model card: clinical_use: must be true or false, got 'false'"),
        ("clinical_use", 1, "model card: clinical_use: must be true or false, got 1"),
        ("format_version", True, "model card: format_version: must be an integer, got True"),
        ("architecture", [1, 2], "model card: architecture: must be an object, got [1, 2]"),
        ("name", "  ", "model card: name: must not be blank, got '  '"),
        (
            "operating_points",
            {"default": "0.5"},
            "model card: operating_points.default: must be a number, got '0.5'; set it again "
            "with `trainer evaluate --set-operating-point`",
        ),
    ],
)
def test_card_with_wrongly_typed_fields(saved, tmp_path: Path, field, value, expected):
    card = _contents(saved[0])[1] | {field: value}
    _refusal(_tampered(saved, tmp_path, card=card), expected)


def test_card_whose_architecture_does_not_match_the_weights(saved, tmp_path: Path):
    wider = json.loads(json.dumps(ARCH))
    wider["trunk"]["stem_width"] = 16
    card = _contents(saved[0])[1] | {"architecture": wider}
    _refusal(_tampered(saved, tmp_path, card=card), "has shape (8", "its card needs (16")
    broken = _contents(saved[0])[1] | {"architecture": ARCH | {"trunk": {"kind": "capsule"}}}
    _refusal(
        _tampered(saved, tmp_path, card=broken),
        "cannot be built (all-conv architecture: trunk.kind: must be one of 'resnet', 'vgg', "
        "got 'capsule')",
    )
    alien = _contents(saved[0])[1] | {"family": "transformer"}
    _refusal(_tampered(saved, tmp_path, card=alien), "unknown model family 'transformer'")


def test_card_with_a_bad_preprocessing_spec(saved, tmp_path: Path):
    """Refused when the file is loaded (or written), not image by image in the worker."""
    card = _contents(saved[0])[1]
    card["preprocessing"] = card["preprocessing"] | {"scale_to_16bit": "false"}
    _refusal(
        _tampered(saved, tmp_path, card=card),
        "all-conv preprocessing: scale_to_16bit: must be true or false, got 'false'",
        "re-export the model",
    )
    bad = _card(preprocessing={"target_size": [576, 448], "mean": 52.18})
    with pytest.raises(ModelFileError, match=r"all-conv preprocessing: unknown fields \['mean'\]"):
        save_model(saved[1], bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_tampered_tensors(saved, tmp_path: Path):
    tensors, _ = _contents(saved[0])
    reshaped = tensors | {"fc.weight": torch.zeros(2, 3)}
    _refusal(_tampered(saved, tmp_path, tensors=reshaped), "tensor fc.weight has shape (2, 3)")
    missing = {k: v for k, v in tensors.items() if k != "fc.bias"}
    _refusal(_tampered(saved, tmp_path, tensors=missing), "missing ['fc.bias']")
    extra = tensors | {"backdoor.weight": torch.zeros(1)}
    _refusal(_tampered(saved, tmp_path, tensors=extra), "unexpected ['backdoor.weight']")
    nan = tensors | {"fc.bias": torch.tensor([0.0, float("nan")])}
    _refusal(_tampered(saved, tmp_path, tensors=nan), "fc.bias holds NaN")
    integer = tensors | {"fc.weight": tensors["fc.weight"].to(torch.int32)}
    _refusal(_tampered(saved, tmp_path, tensors=integer), "fc.weight is torch.int32")


def test_save_refuses_a_card_that_would_not_load(saved, tmp_path: Path):
    module = saved[1]
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ModelFileError, match="operating_points.default: must be a finite number"):
        save_model(module, _card(operating_points={"default": float("nan")}), path)
    with pytest.raises(ValueError, match="unknown model family"):
        save_model(module, _card(family="transformer"), path)
    assert not list(tmp_path.iterdir())


def test_update_card_keeps_weights_and_refuses_a_bad_card(saved, tmp_path: Path):
    path, _ = saved
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    card = read_card(copy)
    card.operating_points["default"] = 0.42
    update_card(copy, card)
    assert read_card(copy).operating_point == 0.42
    before, _ = _contents(path)
    after, _ = _contents(copy)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    card.clinical_use = "false"  # a string would read as truthy: refused, file untouched
    with pytest.raises(ModelFileError):
        update_card(copy, card)
    assert read_card(copy).operating_point == 0.42
    with pytest.raises(ModelFileError):
        update_card(tmp_path / "missing.safetensors", read_card(path))
