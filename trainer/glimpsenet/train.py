"""Train GlimpseNet in the paper's two stages, with checkpoints and resume.

1. **fcgn**: the FCGN regresses the lesion masks of labels.csv (union of benign and malignant
   masks, as the paper trains on every annotated lesion; images labelled normal have an empty
   mask, positive images without a mask are left out), λ-penalised squared error, Adam 1e-3.
   The epoch with the lowest validation loss is kept. `fcgn_masks="malignant"` (ours) fits
   the malignant masks only, so the mask the ensemble turns into a SEG marks malignancy.
2. **mil**: with the FCGN frozen, each image's glimpses are selected and cropped once; the
   Inception V3 classifier and its head learn the image labels through MIL pooling: Adam 1e-4
   halved every 30 epochs, dropout 0.4 (in the architecture), weight decay 0.01, class-balanced
   sampling, random glimpse flips. The epoch with the best validation AUC is kept.

Three classes, in the paper's order (BWC, BENIGN, MALIGNANT). labels.csv has `malignant` and
`benign`; it has no "benign without callback" label, and in our synthetic data a finding that
needs no callback is indistinguishable from no finding. So the BWC target is 0 for every image
(the class learns "no BWC finding seen") and p(benign) is in effect the BENIGN class; a benign
label that is not given (empty cell) trains nothing for that class.

Every epoch's randomness comes from (seed, epoch), so a resumed run ends where an uninterrupted
one ends (same device and thread count).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.ensemble import resolve_device
from models.family import get_family
from models.glimpsenet import PRESETS, GlimpseNet, GlimpseNetConfig
from models.modelfile import ModelCard, load_model, read_card, save_model

from .. import objectives
from ..card import training_card
from ..checkpoint import Checkpoint
from ..evaluate import report, reports_to_json, score_images
from ..metrics import roc_auc
from ..numerics import flush_denormal
from ..prepare import InputCache
from ..sitedata import SiteData, SiteDataError, SiteImage, load_site_data
from ..split import split_site_data
from .localisation import mask_peaks
from .objectives import FCGN_LOSSES, PAPER_LAMBDA, fcgn_loss, mil_loss

STAGES = ("fcgn", "mil", "both")
FCGN_MASKS = ("all", "malignant")
CHECKPOINT_FORMAT = 1
LR_HALVING_EPOCHS = 30
BWC_HANDLING = (
    "labels.csv has no benign-without-callback label; BWC target 0 for every image, so "
    "p(benign) = 1 - (1 - p_BWC)(1 - p_BENIGN) is in effect the BENIGN class"
)


MASK_WORDS = {
    "all": "union of benign and malignant lesion masks",
    "malignant": "malignant lesion masks only",
}


class GlimpseNetTrainingError(ValueError):
    """A GlimpseNet training run that cannot start or continue; says what to change."""


@dataclass
class GlimpseNetOptions:
    site_data: Path
    out: Path
    base: Path | None = None
    arch: str | None = None
    """"demo" or "paper" (from `--arch glimpsenet-demo|glimpsenet-paper`)."""
    stage: str = "both"
    fcgn_epochs: int = 30
    fcgn_lr: float = 1e-3
    fcgn_schedule: str = "constant"
    """"constant": Adam at `fcgn_lr` throughout (the paper); "cosine": annealed to 0 over
    `fcgn_epochs` (ours: at a constant 1e-3 the demo FCGN's training loss stalls and climbs
    again, and its mask stays diffuse)."""
    fcgn_loss: str = "weighted"
    fcgn_masks: str = "all"
    """"all": the union of benign and malignant masks (the paper); "malignant": malignant
    masks only, so the mask (the ensemble's malignancy map) ignores benign findings."""
    lam: float = PAPER_LAMBDA
    pooling: dict[str, Any] | None = None
    """MIL pooling (the architecture's `pooling` section) replacing the preset's or the base's;
    it has no weights, so a base's classifier carries over."""
    epochs: int = 20
    """Epochs of the MIL stage."""
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    augment: str = "flips"
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    work_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    name: str | None = None
    version: str | None = None
    intended_use: str | None = None
    n_boot: int = 1000
    overwrite: bool = False

    def training_key(self) -> str:
        ignore = {"resume", "progress", "device", "work_dir", "overwrite", "n_boot", "name",
                  "version", "intended_use", "out"}  # fmt: skip
        keep = {k: str(v) for k, v in asdict(self).items() if k not in ignore}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


@dataclass
class GlimpseNetResult:
    out: Path
    card: ModelCard
    history: list[dict[str, Any]]
    test: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _epoch_seed(seed: int, epoch: int, stage: str) -> int:
    return (seed * 1_000_003 + epoch * 7919 + (17 if stage == "fcgn" else 29)) % (2**63)


def _check(o: GlimpseNetOptions) -> None:
    if (o.base is None) == (o.arch is None):
        raise GlimpseNetTrainingError(
            "give exactly one of --base MODEL or --arch glimpsenet-PRESET"
        )
    if o.arch is not None and o.arch not in PRESETS:
        raise GlimpseNetTrainingError(
            f"unknown GlimpseNet preset {o.arch!r}; known: "
            + ", ".join(f"glimpsenet-{p}" for p in PRESETS)
        )
    if o.stage not in STAGES:
        raise GlimpseNetTrainingError(
            f"--stage must be one of {', '.join(STAGES)}, not {o.stage!r}"
        )
    if o.stage == "mil" and o.base is None:
        raise GlimpseNetTrainingError(
            "--stage mil trains the classifier on the glimpses of a trained FCGN: give --base "
            "with a model file from --stage fcgn (or use --stage both)"
        )
    if o.fcgn_masks not in FCGN_MASKS:
        raise GlimpseNetTrainingError(f"--fcgn-masks must be one of {', '.join(FCGN_MASKS)}")
    if o.fcgn_schedule not in objectives.SCHEDULES:
        raise GlimpseNetTrainingError(
            f"--fcgn-schedule must be one of {', '.join(objectives.SCHEDULES)}"
        )
    if o.fcgn_loss not in FCGN_LOSSES:
        raise GlimpseNetTrainingError(f"--fcgn-loss must be one of {', '.join(FCGN_LOSSES)}")
    if min(o.fcgn_epochs, o.epochs, o.batch_size) < 1 or o.lam <= 0:
        raise GlimpseNetTrainingError("epochs and batch size must be at least 1, λ above 0")
    if o.batch_size < 2 and o.stage != "mil":
        raise GlimpseNetTrainingError("the FCGN's batch norm needs --batch-size of at least 2")
    if o.augment not in ("flips", "none"):
        raise GlimpseNetTrainingError("GlimpseNet trains with --augment flips or none")
    out = Path(o.out)
    if o.base is not None and out.resolve() == Path(o.base).resolve():
        raise GlimpseNetTrainingError(
            "--out must differ from --base: the base is never overwritten"
        )
    if out.exists() and not o.overwrite:
        raise GlimpseNetTrainingError(f"{out} exists; choose another --out or pass --overwrite")


def _mask_target(
    cache: InputCache, im: SiteImage, size: int, which: str = "all"
) -> torch.Tensor | None:
    """(1, size, size) lesion fraction on the FCGN grid; zeros where the label says there is
    no such lesion; None for a positive image without its mask (unknown where it is)."""
    positive = bool(im.malignant) if which == "malignant" else bool(im.malignant or im.benign)
    masks = cache.masks(im)
    if masks is None or (which == "malignant" and im.malignant_mask is None):
        return None if positive else torch.zeros(1, size, size)
    chosen = masks[1:] if which == "malignant" else masks.amax(dim=0, keepdim=True)
    return F.adaptive_avg_pool2d(chosen.float()[None] / 255.0, size)[0]


def _flip_pairs(x: torch.Tensor, y: torch.Tensor | None, g: torch.Generator):
    """Random horizontal and vertical flips per sample (same flips for input and target)."""
    for axis in (-1, -2):
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(axis), x)
        if y is not None:
            y = torch.where(flip.view(-1, *[1] * (y.dim() - 1)), y.flip(axis), y)
    return x, y


def _labels(images: list[SiteImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3) targets and known flags in the class order (BWC, BENIGN, MALIGNANT)."""
    targets = torch.tensor([[0.0, float(im.benign or 0), float(im.malignant)] for im in images])
    known = torch.tensor([[1.0, float(im.benign is not None), 1.0] for im in images])
    return targets, known


def train(o: GlimpseNetOptions) -> GlimpseNetResult:
    """Run (or resume) GlimpseNet training and write `o.out`."""
    with flush_denormal():
        return _train(o)


def _train(o: GlimpseNetOptions) -> GlimpseNetResult:
    started = time.monotonic()
    _check(o)
    out = Path(o.out)
    data = load_site_data(o.site_data)
    split = split_site_data(data, seed=o.seed)
    train_set, val, test = (split.images(data, s) for s in ("train", "val", "test"))
    for which, images in (("train", train_set), ("validation", val)):
        pos = sum(im.malignant for im in images)
        if pos in (0, len(images)):
            raise SiteDataError(
                f"the {which} split has {len(images)} images of which {pos} malignant; it needs "
                "both classes. Add data, change --seed, or set a `split` column in labels.csv"
            )

    torch.manual_seed(o.seed)
    family = get_family("glimpsenet")
    base_card = None
    if o.base is not None:
        base_card = read_card(o.base)
        if base_card.family != "glimpsenet":
            raise GlimpseNetTrainingError(f"{o.base} is a {base_card.family} model, not GlimpseNet")
        architecture = _with_pooling(base_card.architecture, o.pooling)
        spec = base_card.preprocessing
        module = load_model(o.base)
        if o.pooling is not None:  # pooling has no weights: the base's carry over
            weights = module.state_dict()
            module = GlimpseNet(architecture)
            module.load_state_dict(weights)
        base_info = {"file": Path(o.base).name, "name": base_card.name,
                     "version": base_card.version}  # fmt: skip
    else:
        architecture = _with_pooling(PRESETS[o.arch], o.pooling)
        if o.fcgn_loss == "printed":
            architecture["fcgn"]["mask_scale"] = o.lam
        module = GlimpseNet(architecture)
        spec = family.default_preprocessing(architecture)
        base_info = {"from_scratch": f"glimpsenet-{o.arch}", "init_seed": o.seed}
    want_scale = o.lam if o.fcgn_loss == "printed" else 1.0
    if o.stage != "mil" and module.config.mask_scale != want_scale:
        raise GlimpseNetTrainingError(
            f"the base FCGN's mask_scale is {module.config.mask_scale}, the {o.fcgn_loss} loss "
            f"needs {want_scale}: train with the loss form it was trained with"
        )
    device = resolve_device(o.device)
    module.to(device)

    work = Path(o.work_dir) if o.work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    cache = InputCache(family, spec, work / "inputs")
    stages = ["fcgn", "mil"] if o.stage == "both" else [o.stage]
    if "fcgn" in stages:
        cache.prepare([*train_set, *val], progress=o.progress, masks=True)
    cache.prepare([*train_set, *val, *test], progress=o.progress)

    checkpoint = Checkpoint(
        work / "glimpsenet-checkpoint.pt",
        o.training_key(),
        data.fingerprint(),
        CHECKPOINT_FORMAT,
        GlimpseNetTrainingError,
    )
    state: dict[str, Any] = {"stage": stages[0], "epoch": -1, "history": [], "finished": []}
    if checkpoint.path.exists():
        if not o.resume:
            raise GlimpseNetTrainingError(
                f"{checkpoint.path} exists from an earlier run; pass --resume to continue it or "
                "delete the work folder to start over"
            )
        state = checkpoint.load()
        module.load_state_dict(state["model"])

    for stage in stages:
        if stage in state["finished"]:
            continue
        run = _fcgn_stage if stage == "fcgn" else _mil_stage
        run(o, module, cache, train_set, val, device, checkpoint, state)
        state["finished"].append(stage)
        state["stage"], state["epoch"] = None, -1
        checkpoint.save({**state, "model": module.state_dict()})

    module.eval()
    test_scores = score_images(module, family, cache, test, device, o.batch_size)
    test_report = report(test, test_scores, n_boot=o.n_boot)
    peaks = mask_peaks(module, family, spec, test, device)
    card = _card(o, data, split, architecture, spec, base_card, base_info, device, state,
                 test_report, peaks)  # fmt: skip
    save_model(module, card, out)
    return GlimpseNetResult(out, card, state["history"], reports_to_json(test_report),
                            time.monotonic() - started)  # fmt: skip


def _with_pooling(architecture: dict[str, Any], pooling: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `architecture` whose MIL pooling `pooling` replaces when given, with every
    argument named (the card records them)."""
    architecture = copy.deepcopy(architecture)
    if pooling is not None:
        try:
            config = GlimpseNetConfig.from_dict({**architecture, "pooling": pooling})
        except ValueError as exc:
            raise GlimpseNetTrainingError(f"--pooling {pooling}: {exc}") from None
        architecture["pooling"] = config.pooling.to_dict()
    return architecture


def _resume_stage(state: dict[str, Any], stage: str, module, optimizer, scheduler=None) -> int:
    """First epoch to run; restores the optimizer (and scheduler) mid-stage."""
    if state.get("stage") != stage or state.get("epoch", -1) < 0:
        state.update(stage=stage, epoch=-1, best=None, best_metric=None, best_epoch=-1, bad=0,
                     stopped=False)  # fmt: skip
        return 0
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1


def _fcgn_stage(o, module, cache, train_set, val, device, checkpoint, state) -> None:
    size = module.config.fcgn_size

    def target(im: SiteImage) -> torch.Tensor | None:
        return _mask_target(cache, im, size, o.fcgn_masks)

    train_known = [im for im in train_set if target(im) is not None]
    val_known = [im for im in val if target(im) is not None]
    if not any(im.lesion_masks for im in train_known):
        raise GlimpseNetTrainingError(
            "the FCGN stage needs lesion masks: add malignant_mask/benign_mask columns to "
            "labels.csv (as `trainer synth` writes), or train --stage mil from a trained base"
        )
    params = list(module.fcgn.parameters())
    optimizer = torch.optim.Adam(params, lr=o.fcgn_lr)
    plan = objectives.Stage("fcgn", o.fcgn_epochs, o.fcgn_lr)
    first = _resume_stage(state, "fcgn", module, optimizer)

    def batch(images):
        x = module.fcgn_input(cache.batch(images).to(device))
        y = torch.stack([target(im) for im in images]).to(device)
        return x, y

    for epoch in range(first, o.fcgn_epochs):
        t0 = time.monotonic()
        g = torch.Generator().manual_seed(_epoch_seed(o.seed, epoch, "fcgn"))
        order = torch.randperm(len(train_known), generator=g).tolist()
        module.train()
        lr = objectives.epoch_lr(plan, epoch, o.fcgn_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        chunks = [order[i : i + o.batch_size] for i in range(0, len(order), o.batch_size)]
        chunks = [c for c in chunks if len(c) > 1]  # batch norm needs two samples
        bar = tqdm(chunks, desc=f"fcgn {epoch + 1}/{o.fcgn_epochs}", disable=not o.progress,
                   leave=False)  # fmt: skip
        for idx in bar:
            x, y = batch([train_known[i] for i in idx])
            if o.augment == "flips":
                x, y = _flip_pairs(x, y, g)
            loss = fcgn_loss(module.fcgn(x), y, o.fcgn_loss, o.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        module.eval()
        val_loss = 0.0
        with torch.no_grad():
            for i in range(0, len(val_known), o.batch_size):
                x, y = batch(val_known[i : i + o.batch_size])
                val_loss += float(fcgn_loss(module.fcgn(x), y, o.fcgn_loss, o.lam)) * len(x)
        val_loss /= max(1, len(val_known))
        row = {"stage": "fcgn", "epoch": epoch + 1, "lr": lr,
               "train_loss": total / max(1, sum(len(c) for c in chunks)),
               "val_loss": val_loss, "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
        _end_epoch(o, module, optimizer, None, checkpoint, state, row, -val_loss, "fcgn")
        if state["stopped"]:
            break
    module.load_state_dict(state["best"])


def _glimpse_crops(module, cache, images, device, batch_size) -> torch.Tensor:
    """(N, J, 1, S, S) crops of the frozen FCGN's glimpses, computed once per stage."""
    module.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = cache.batch(images[i : i + batch_size]).to(device)
            out.append(module.crops(x, module.glimpse_boxes(module.mask(x))).cpu())
    return torch.cat(out)


def _mil_stage(o, module, cache, train_set, val, device, checkpoint, state) -> None:
    crops = _glimpse_crops(module, cache, train_set, device, o.batch_size)
    val_crops = _glimpse_crops(module, cache, val, device, o.batch_size)
    targets, known = _labels(train_set)
    val_labels = np.array([im.malignant for im in val])
    params = module.classifier_parameters()
    optimizer = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, LR_HALVING_EPOCHS, gamma=0.5)
    first = _resume_stage(state, "mil", module, optimizer, scheduler)
    labels = targets[:, 2].long()
    weights = 1.0 / torch.bincount(labels, minlength=2).double()[labels]
    for epoch in range(first, o.epochs):
        t0 = time.monotonic()
        g = torch.Generator().manual_seed(_epoch_seed(o.seed, epoch, "mil"))
        torch.manual_seed(_epoch_seed(o.seed, epoch, "mil") + 1)  # dropout
        order = torch.multinomial(weights, len(train_set), replacement=True, generator=g).tolist()
        module.train()
        module.fcgn.eval()
        lr = optimizer.param_groups[0]["lr"]
        total = 0.0
        chunks = [order[i : i + o.batch_size] for i in range(0, len(order), o.batch_size)]
        chunks = [c for c in chunks if len(c) > 1]
        bar = tqdm(chunks, desc=f"mil {epoch + 1}/{o.epochs}", disable=not o.progress, leave=False)
        for idx in bar:
            x = crops[idx]
            if o.augment == "flips":
                n, j = x.shape[:2]
                x, _ = _flip_pairs(x.reshape(n * j, *x.shape[2:]), None, g)
                x = x.reshape(n, j, *x.shape[1:])
            pooled = module.pool(module.classify(x.to(device)))
            loss = mil_loss(pooled, targets[idx].to(device), known[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        scheduler.step()
        module.eval()
        with torch.no_grad():
            scores = torch.cat([
                module.pool(module.classify(val_crops[i : i + o.batch_size].to(device)))[:, 2].cpu()
                for i in range(0, len(val), o.batch_size)
            ]).double().numpy()  # fmt: skip
        val_auc = roc_auc(val_labels, scores)
        row = {"stage": "mil", "epoch": epoch + 1, "lr": lr,
               "train_loss": total / max(1, sum(len(c) for c in chunks)), "val_auc": val_auc,
               "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
        _end_epoch(o, module, optimizer, scheduler, checkpoint, state, row, val_auc, "mil")
        if state["stopped"]:
            break
    module.load_state_dict(state["best"])


def _end_epoch(o, module, optimizer, scheduler, checkpoint, state, row, metric, stage) -> None:
    """Track the best epoch, early stopping, history; checkpoint."""
    if state["best_metric"] is None or metric > state["best_metric"]:
        state.update(best=copy.deepcopy(module.state_dict()), best_metric=metric,
                     best_epoch=row["epoch"], bad=0)  # fmt: skip
    else:
        state["bad"] += 1
    state["stopped"] = state["bad"] >= o.patience
    state["history"].append(row)
    state["epoch"] = row["epoch"] - 1
    metric_text = (
        f"val loss {row['val_loss']:.4f}" if stage == "fcgn" else f"val AUC {row['val_auc']:.3f}"
    )
    tqdm.write(
        f"{stage} epoch {row['epoch']}: loss {row['train_loss']:.4f}  {metric_text}  "
        f"{row['seconds']:.0f} s"
        + ("  (best)" if state["best_epoch"] == row["epoch"] else "")
        + ("  early stop" if state["stopped"] else "")
    )
    checkpoint.save({**state, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler else {}})  # fmt: skip


def _card(o, data: SiteData, split, architecture, spec, base_card, base_info, device, state,
          test_report, peaks) -> ModelCard:  # fmt: skip
    done = state["finished"]
    stages = []
    if "fcgn" in done:
        stages.append({"name": "fcgn", "epochs": o.fcgn_epochs, "optimizer": "Adam",
                       "lr": o.fcgn_lr, "lr_schedule": o.fcgn_schedule,
                       "loss": o.fcgn_loss, "lambda": o.lam,
                       "masks": MASK_WORDS[o.fcgn_masks]})  # fmt: skip
    if "mil" in done:
        stages.append({"name": "mil", "epochs": o.epochs, "optimizer": "Adam", "lr": o.lr,
                       "lr_halved_every_epochs": LR_HALVING_EPOCHS,
                       "weight_decay": o.weight_decay,
                       "dropout": architecture["classifier"]["dropout"],
                       "pooling": architecture["pooling"], "class_balanced_sampling": True,
                       "bwc_handling": BWC_HANDLING})  # fmt: skip
    return training_card(
        o,
        family="glimpsenet",
        architecture=architecture,
        preprocessing=spec,
        base=base_card,
        base_info=base_info,
        default_name="demo-glimpsenet" if o.arch == "demo" else f"glimpsenet-{o.arch}",
        demo=o.arch == "demo",
        data=data,
        split=split,
        training={
            "stages": stages,
            "batch_size": o.batch_size,
            "augmentation": o.augment,
            "history": state["history"],
            "device": device.type,
            "precision": "fp32",
        },
        metrics={
            "test": reports_to_json(test_report),
            "test_mask_peak_within_5mm": peaks.to_json(),
        },
    )
