"""The model card a training run writes: who the model is (name, licence, intended use) and
where it came from (base model, training data fingerprint and split, the run's record, test
metrics, software versions). One builder for every family's trainer, so their cards read alike
and a fine-tuned model is never labelled as validated because its base was."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from typing import Any, Protocol

import torch

import trainer
from models.modelfile import NOT_VALIDATED, ModelCard

from .sitedata import SiteData
from .split import Split

DEMO_INTENDED_USE = (
    "Demonstration model trained from scratch on synthetic mammograms only, for tests, CI and "
    "demos of the pipeline. Not for clinical use, not a medical device; its scores carry no "
    "meaning on real images."
)


class CardOptions(Protocol):
    """What a user may set on the card from the command line (each trainer's options)."""

    name: str | None
    version: str | None
    intended_use: str | None
    seed: int


def training_card(
    options: CardOptions,
    *,
    family: str,
    architecture: dict[str, Any],
    preprocessing: dict[str, Any],
    base: ModelCard | None,
    base_info: dict[str, Any] | None,
    default_name: str,
    demo: bool,
    data: SiteData,
    split: Split,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> ModelCard:
    """The card of a model trained from `base` (None: from scratch, named `default_name`, a
    demonstration model when `demo`). A fine-tune inherits its base's licence, never its
    intended use: it has not been validated."""
    now = datetime.now(UTC)
    fingerprint = data.fingerprint()
    if base is not None:
        name = options.name or f"{base.name}-finetuned"
        licence = base.licence
        intended_use = options.intended_use or NOT_VALIDATED
    else:
        name = options.name or default_name
        licence = "Apache-2.0"
        intended_use = options.intended_use or (DEMO_INTENDED_USE if demo else NOT_VALIDATED)
    provenance = {
        "base_model": base_info,
        "training_data": {
            "fingerprint_sha256": fingerprint,
            "summary": data.summary(),
            "split": {"source": split.source, "seed": options.seed, "counts": split.counts(data)},
        },
        "training": training,
        "metrics": metrics,
        "date": now.isoformat(timespec="seconds"),
        "trainer_version": trainer.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    return ModelCard(
        family=family,
        architecture=architecture,
        preprocessing=preprocessing,
        name=name,
        version=options.version or f"{now:%Y%m%d}-{fingerprint[:8]}",
        licence=licence,
        intended_use=intended_use,
        clinical_use=False,
        provenance=provenance,
        operating_points={},
    )
