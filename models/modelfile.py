"""Model files: one `.safetensors` file holding the weights and, in its metadata, everything
needed to rebuild, preprocess, label and trust the model (`ModelCard`).

Loading never unpickles anything: safetensors holds only tensors, and the card is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .family import get_family
from .results import ModelInfo

METADATA_KEY = "mammo_ai.model_card"
FORMAT_VERSION = 1

NOT_VALIDATED = (
    "Research use only. Not validated for clinical use; not a medical device. "
    "Do not use for diagnosis."
)


class ModelFileError(ValueError):
    """A model file that cannot be used; the message says which file and what is wrong."""


@dataclass
class ModelCard:
    family: str
    """"gmic", "allconv" or "glimpsenet"; picks the module class and preprocessing."""
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    name: str
    version: str
    licence: str
    intended_use: str = NOT_VALIDATED
    clinical_use: bool = False
    """True only for a model validated for clinical use at this site."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Base model, training data summary and hash, split, metrics, dates, tool versions."""
    operating_points: dict[str, float] = field(default_factory=dict)
    """Named malignancy thresholds; "default" drives the CAD SR rendering intent."""
    format_version: int = FORMAT_VERSION

    @property
    def operating_point(self) -> float | None:
        return self.operating_points.get("default")

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            family=self.family,
            clinical_use=self.clinical_use,
            intended_use=self.intended_use,
            licence=self.licence,
            operating_point=self.operating_point,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model file") -> ModelCard:
        """Parse and check a card; every refusal names `source` and the offending field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"{source}: model card is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ModelFileError(
                f"{source}: model card is a JSON {type(data).__name__}, not an object"
            )
        version = data.get("format_version", FORMAT_VERSION)
        _check_field("format_version", version, int, source)
        if version > FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: model card format {version} is newer than this software supports "
                f"({FORMAT_VERSION}); upgrade mammo-ai-plugin"
            )
        types = _field_types()
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ModelFileError(
                f"{source}: unknown model card fields {unknown}; the file was written by other "
                "software or edited by hand. Re-export it with `plugin models import` or "
                "`trainer finetune`"
            )
        required = [f.name for f in dataclasses.fields(cls) if _is_required(f)]
        missing = [name for name in required if name not in data]
        if missing:
            raise ModelFileError(
                f"{source}: model card lacks required fields {missing}; re-export the model "
                "with `plugin models import` or `trainer finetune`"
            )
        for name, value in data.items():
            _check_field(name, value, types[name], source)
        return cls(**data)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


_JSON_WORDS = {str: "a string", dict: "an object", bool: "true or false", int: "an integer"}


def _field_types() -> dict[str, type]:
    """Each card field's JSON type, from ModelCard's annotations (`dict[str, Any]` → dict)."""
    hints = typing.get_type_hints(ModelCard)
    return {name: typing.get_origin(hint) or hint for name, hint in hints.items()}


def _check_field(name: str, value: Any, kind: type, source: str) -> None:
    # Strict: a card saying `"clinical_use": "false"` must not pass as validated for clinical
    # use, and JSON's true is no integer.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ModelFileError(
            f"{source}: model card field {name!r} must be {_JSON_WORDS[kind]}, got {value!r}"
        )
    if name == "name" and not value.strip():
        raise ModelFileError(f"{source}: model card field 'name' is empty")
    if name == "operating_points":
        for point, threshold in value.items():
            number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
            if not number or math.isnan(threshold):
                raise ModelFileError(
                    f"{source}: operating point {point!r} must be a number, got {threshold!r}; "
                    "set it again with `trainer evaluate --set-operating-point`"
                )


def save_model(module: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write `module`'s state dict and `card` to `path`, replacing it atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return _write(tensors, card, Path(path))


def update_card(path: str | Path, card: ModelCard) -> Path:
    """Replace the card of an existing model file, atomically; the weights stay bit-identical
    (e.g. to record an operating point chosen by `trainer evaluate`)."""
    path = Path(path)
    read_card(path)  # the file must be a model file already
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _write(tensors, card, path)


def _write(tensors: dict[str, torch.Tensor], card: ModelCard, path: Path) -> Path:
    """The card is checked as `load_model` will check it, so an unloadable file is never
    written; a crash leaves the old file or the new one, never a mixture."""
    text = card.to_json()
    ModelCard.from_json(text, source=f"card for {path}")
    get_family(card.family)  # an unknown family raises here, naming the known ones
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
        tmp.chmod(0o644)  # safetensors creates 0600; the service often runs as another user
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def new_model_file(
    path: str | Path,
    family: str,
    architecture: dict[str, Any],
    *,
    name: str,
    version: str = "0",
    licence: str = "Apache-2.0",
    **card_fields: Any,
) -> Path:
    """A model file with freshly initialised weights (torch's current RNG) and the family's
    default preprocessing: where training from scratch starts, and the stand-in for published
    weights in tests and benchmarks."""
    fam = get_family(family)
    card_fields.setdefault("preprocessing", fam.default_preprocessing(architecture))
    card = ModelCard(
        family=family,
        architecture=architecture,
        name=name,
        version=version,
        licence=licence,
        **card_fields,
    )
    return save_model(fam.build(architecture), card, path)


def read_card(path: str | Path) -> ModelCard:
    """The card alone, without loading any weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(
            f"{path}: not a readable safetensors model file ({exc}); import published "
            "checkpoints with `plugin models import`"
        ) from exc
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{path}: safetensors file without a mammo-ai model card; import published "
            "checkpoints with `plugin models import`"
        )
    return ModelCard.from_json(metadata[METADATA_KEY], source=str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the module the card describes, load its weights strictly, return it in eval mode.

    Every tensor must be present, with the architecture's shape, a matching kind (floating or
    integer) and finite values; anything else is a `ModelFileError` naming the tensor. The card
    is attached as `module.card`.
    """
    path = Path(path)
    card = read_card(path)
    try:
        family = get_family(card.family)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}; upgrade mammo-ai-plugin") from None
    try:
        module = family.build(card.architecture)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: the {card.family} architecture in its card cannot be built ({exc}); "
            "re-export the model"
        ) from exc
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    _check_state(path, card, state, module.state_dict())
    module.load_state_dict(state, strict=True)
    module.to(device).eval()
    module.card = card
    return module


def _check_state(
    path: Path, card: ModelCard, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the {card.family} architecture in its card "
            f"(missing {_some(missing)}, unexpected {_some(unexpected)}); the file is damaged "
            "or its card was edited: re-export the model"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ModelFileError(
                f"{path}: tensor {k} has shape {tuple(v.shape)}, the architecture in its card "
                f"needs {tuple(expected[k].shape)}; the file is damaged or its card was edited: "
                "re-export the model"
            )
        if v.is_floating_point() != expected[k].is_floating_point():
            raise ModelFileError(
                f"{path}: tensor {k} is {v.dtype}, the architecture needs "
                f"{expected[k].dtype}; re-export the model"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(
                f"{path}: tensor {k} holds NaN or infinite values; the model is unusable "
                "(a diverged training run?): use another model file"
            )


def _some(keys: list[str]) -> str:
    return f"{keys[:5]}{' …' if len(keys) > 5 else ''}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks: what importers record as provenance."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
