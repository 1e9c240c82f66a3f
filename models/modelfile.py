"""Model files: one `.safetensors` file holding the weights and, in its metadata, everything
needed to rebuild, preprocess, label and trust the model (`ModelCard`).

Loading never unpickles anything: safetensors holds only tensors, and the card is JSON.
"""

from __future__ import annotations

import dataclasses
import json
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
    """"gmic" or "allconv"; picks the module class and preprocessing."""
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"{source}: model card is not valid JSON ({exc})") from exc
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: model card format {data['format_version']} is newer than this "
                f"software supports ({FORMAT_VERSION}); upgrade mammo-ai-plugin"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ModelFileError(f"{source}: unknown model card fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelFileError(f"{source}: incomplete model card ({exc})") from exc


def save_model(module: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write `module`'s state dict and `card` to `path` (a new file, written atomically)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: card.to_json()})
    tmp.replace(path)
    return path


def read_card(path: str | Path) -> ModelCard:
    """The card alone, without loading any weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path}: not a safetensors model file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{path}: safetensors file without a mammo-ai model card; import published "
            "checkpoints with `plugin models import`"
        )
    return ModelCard.from_json(metadata[METADATA_KEY], source=str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the module the card describes, load its weights strictly, return it in eval mode.

    The card is attached as `module.card`.
    """
    path = Path(path)
    card = read_card(path)
    module = get_family(card.family).build(card.architecture)
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the {card.family} architecture in its card "
            f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''})"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ModelFileError(
                f"{path}: tensor {k} has shape {tuple(v.shape)}, the architecture needs "
                f"{tuple(expected[k].shape)}"
            )
    module.load_state_dict(state, strict=True)
    module.to(device).eval()
    module.card = card
    return module
