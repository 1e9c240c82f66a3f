"""What differs between families during training: the loss, the training stages and their
default hyper-parameters.

* GMIC (Shen et al., Med Image Anal 2021): binary cross-entropy on each of `y_global`, `y_local`
  and `y_fusion`, per class (benign, malignant), plus β times the L1 norm of the saliency maps,
  which keeps them sparse; one stage, all layers.
* All-conv (Shen et al., Sci Rep 2019): softmax cross-entropy on the malignancy class; two
  stages when fine-tuning: first the new top layers (trunk frozen), then all layers at a tenth
  of the learning rate.

Both papers first learn what a lesion looks like from outlined lesions (the all-conv trunk
starts as a patch classifier on ROI patches; GMIC's global module was pretrained on patch
labels) before learning from whole-image labels. Where labels.csv has lesion masks,
`mask_loss` gives the same kind of signal in one stage, alongside the image-level loss: GMIC's
saliency maps, or for all-conv a patch classifier on the trunk (`trainer.patch_head`), learn
which map cells hold a lesion.

Defaults are starting points for a site fine-tune, not the papers' searched values; every one
is a `trainer finetune` option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.family import ScoreMaps

_EPS = 1e-6


@dataclass(frozen=True)
class Stage:
    name: str
    """"top" (trunk frozen) or "all"."""
    epochs: int
    lr: float


@dataclass(frozen=True)
class Defaults:
    weight_decay: float
    top_epochs_fraction: float
    """Share of the epochs spent on the top-only stage when fine-tuning."""


@dataclass(frozen=True)
class Recipe:
    """A named training schedule: the defaults `trainer finetune` uses for what it is given
    no flag for."""

    name: str
    summary: str
    epochs: int
    batch_size: int
    augment: str
    lr: dict[str, float]
    """Learning rate per family."""
    staged: bool
    """All-conv fine-tuning trains the top layers alone first (the papers' schedule)."""


RECIPES = {
    "adapt": Recipe(
        "adapt",
        "move a trained model to a new scanner or site: all layers from the first epoch",
        epochs=8,
        batch_size=8,
        augment="flips",
        lr={"allconv": 3e-4, "gmic": 1e-4},
        staged=False,
    ),
    "scratch": Recipe(
        "scratch",
        "train a preset from random weights",
        epochs=20,
        batch_size=8,
        augment="flips",
        lr={"allconv": 3e-4, "gmic": 1e-3},
        staged=False,
    ),
    "paper": Recipe(
        "paper",
        "the papers' staged schedules: all-conv top layers first, then all layers at a tenth "
        "of the learning rate; GMIC all layers at 1e-5",
        epochs=20,
        batch_size=4,
        augment="full",
        lr={"allconv": 1e-4, "gmic": 1e-5},
        staged=True,
    ),
}
"""`adapt` is what moved the demo all-conv to an unseen detector look (8 epochs, all layers,
3e-4: held-out AUC 0.50 → 0.83, where the staged schedule reached 0.57-0.67); `scratch` uses
the settings the demo models learnt with (full augmentation and 1e-3 kept the all-conv demo at
chance)."""

DEFAULTS = {
    "gmic": Defaults(weight_decay=1e-5, top_epochs_fraction=0.0),
    "allconv": Defaults(weight_decay=1e-4, top_epochs_fraction=0.3),
}
ALL_LAYERS_LR_FACTOR = 0.1
DEFAULT_BETA = 3e-4
MAX_LESION_WEIGHT = 100.0
"""Cap on how much more a lesion cell weighs than a background cell in `mask_loss`."""


def plan_stages(
    family: str, epochs: int, lr: float, top_epochs: int | None, staged: bool
) -> list[Stage]:
    """The stages of one run: all layers from the first epoch unless `staged` (the papers'
    all-conv fine-tuning) or `top_epochs` asks for a top-layers-only stage first."""
    if family != "allconv" or not staged:
        top = 0 if top_epochs is None else top_epochs
    else:
        top = (
            round(epochs * DEFAULTS[family].top_epochs_fraction)
            if top_epochs is None
            else top_epochs
        )
    if family != "allconv" and top:
        raise ValueError(f"--top-epochs applies to all-conv models only, not {family}")
    top = min(top, epochs)
    stages = []
    if top:
        stages.append(Stage("top", top, lr))
    if epochs - top:
        stages.append(Stage("all", epochs - top, lr * ALL_LAYERS_LR_FACTOR if top else lr))
    return stages


def stage_at(stages: list[Stage], epoch: int) -> tuple[Stage, int]:
    """The stage that run epoch `epoch` (0-based) belongs to, and the epoch's place in it."""
    start = 0
    for stage in stages:
        if epoch < start + stage.epochs:
            return stage, epoch - start
        start += stage.epochs
    return stages[-1], epoch - (start - stages[-1].epochs)


SCHEDULES = ("constant", "cosine")
"""Learning rate within a stage: the stage's throughout, or annealed from it towards 0."""


def epoch_lr(stage: Stage, epoch_in_stage: int, schedule: str) -> float:
    """One epoch's learning rate: `stage.lr`, or with "cosine" `stage.lr`·(1 + cos(π·e/E))/2
    for epoch e of the stage's E, the values torch's CosineAnnealingLR gives when stepped once
    an epoch. A pure function of the epoch, so a resumed run sets the same rate again. A
    constant rate that suits the first epochs makes the last ones oscillate (the demo
    all-conv's validation AUC went 0.853 → 0.726 between its last epochs at 3e-4)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    if schedule == "constant":
        return stage.lr
    return (
        stage.lr
        * 0.5
        * (1.0 + math.cos(math.pi * min(epoch_in_stage, stage.epochs) / stage.epochs))
    )


def frozen_part(module: nn.Module, stage: Stage) -> nn.Module | None:
    """The submodule that stays fixed in this stage (the all-conv trunk in "top")."""
    return module.trunk if stage.name == "top" else None


def loss(
    family: str, output: Any, malignant: torch.Tensor, benign: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """Mean training loss of a batch, computed in float32 (BCE is not autocast-safe).

    `benign` may hold -1 where the label is unknown; those entries do not contribute.
    """
    if family == "gmic":
        target = torch.stack(
            [benign if benign is not None else torch.full_like(malignant, -1.0), malignant], dim=1
        ).float()
        known = (target >= 0).float()
        total = 0.0
        for y in (output.y_global, output.y_local, output.y_fusion):
            bce = F.binary_cross_entropy(
                y.float().clamp(_EPS, 1 - _EPS), target.clamp(min=0), reduction="none"
            )
            total = total + (bce * known).sum(dim=1).mean()
        sparsity = output.saliency.float().abs().sum(dim=(1, 2, 3)).mean()
        return total + beta * sparsity
    if family == "allconv":
        return F.cross_entropy(output.logits.float(), malignant.long())
    raise ValueError(f"no training objective for model family {family!r}")


def mask_loss(maps: ScoreMaps, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy between the score maps and lesion fractions.

    `masks` is (N, 2, h', w') lesion fractions in [0, 1] (channel 0 benign, 1 malignant) on
    any grid covering the input, finer than the maps. A map cell's target is the largest
    fraction inside it: a cell that holds a lesion is a lesion cell, as a patch that holds an
    ROI is a positive patch for the all-conv paper's patch classifier. (An area average would
    leave a 5 mm mass at a few percent of a coarse cell, a target indistinguishable from 0.)

    `known` (N, 2) says which channels of which images have a trustworthy target: a mask, or
    a label saying the finding is absent. Lesion cells are few, so they are weighted up to
    balance the background (at most `MAX_LESION_WEIGHT` times); without that, "no lesion
    anywhere" is a cheap minimum.
    """
    pred = maps.maps.float()
    if not maps.has_benign:  # channel 0 only repeats channel 1
        known = known * known.new_tensor([0.0, 1.0])
    target = F.adaptive_max_pool2d(masks.float(), pred.shape[-2:]).clamp(0.0, 1.0)
    cells = known[:, :, None, None].expand_as(pred)
    lesion = (target * cells).sum()
    background = ((1.0 - target) * cells).sum()
    if lesion == 0 or background == 0:
        weight_lesion = pred.new_tensor(1.0)
    else:
        weight_lesion = (background / lesion).clamp(1.0, MAX_LESION_WEIGHT)
    bce = -(
        weight_lesion * target * torch.log(pred.clamp(min=_EPS))
        + (1.0 - target) * torch.log((1.0 - pred).clamp(min=_EPS))
    )
    norm = (weight_lesion * target * cells + (1.0 - target) * cells).sum().clamp(min=1.0)
    return (bce * cells).sum() / norm
