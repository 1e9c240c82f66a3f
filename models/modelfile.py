"""Model files: one `.safetensors` file holding the weights and, in its metadata, everything
needed to rebuild, preprocess, label and trust the model (`ModelCard`).

Loading never unpickles anything: safetensors holds only tensors, and the card is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .config import explain
from .durable import write_atomically
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


def _not_blank(name: str) -> str:
    if not name.strip():
        raise ValueError(f"must not be blank, got {name!r}")
    return name


@dataclass
class ModelCard:
    """What a model file says of its model. Built freely in code; checked strictly (pydantic,
    no coercion: `"false"` is no boolean, `1` no boolean, `true` no integer) whenever it is
    read from or written to a file."""

    __pydantic_config__ = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    family: str
    """"gmic", "allconv" or "glimpsenet"; picks the module class and preprocessing."""
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    name: Annotated[str, AfterValidator(_not_blank)]
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
            version = json.loads(text).get("format_version", FORMAT_VERSION)
        except (json.JSONDecodeError, AttributeError):
            version = FORMAT_VERSION  # the validation below names what is wrong
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: model card format {version} is newer than this software supports "
                f"({FORMAT_VERSION}); upgrade mammo-ai-plugin"
            )
        try:
            return _CARD.validate_json(text)
        except ValidationError as exc:
            raise _card_error(exc, source) from None


_CARD = TypeAdapter(ModelCard)
_REEXPORT = "re-export the model with `plugin models import` or `trainer finetune`"


def _card_error(exc: ValidationError, source: str) -> ModelFileError:
    """The card's first problem, in the words of someone fixing a model file."""
    return ModelFileError(
        explain(
            exc,
            f"{source}: model card",
            model=ModelCard,
            advice=f"the file was written by other software or edited by hand: {_REEXPORT}",
            hints={
                "operating_points": "set it again with `trainer evaluate --set-operating-point`"
            },
        )
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
    family = get_family(card.family)  # an unknown family raises here, naming the known ones
    try:
        family.check_preprocessing(card.preprocessing)
    except ValueError as exc:
        raise ModelFileError(f"card for {path}: {exc}") from None
    data = save(tensors, metadata={METADATA_KEY: text})
    write_atomically(path, lambda f: f.write(data))
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
    try:
        family.check_preprocessing(card.preprocessing)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}; re-export the model") from None
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
