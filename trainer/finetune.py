"""Fine-tune a model file (or train a preset from scratch) on a site's labelled images.

One run: read and split the site data, preprocess every image once (cached), train with the
family's staged schedule (`objectives`), class-balanced sampling and augmentation, validate on
the patient-disjoint validation split after every epoch, checkpoint, stop early when validation
AUC stops improving, and write a new model file whose card records where it came from. The base
model file is only ever read.

Every epoch draws its sampling, augmentation and dropout randomness from generators seeded by
(seed, epoch), so a run resumed from its last checkpoint ends exactly where an uninterrupted run
with the same seed ends (on the same device and thread count).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.ensemble import resolve_device
from models.family import ModelFamily, get_family
from models.modelfile import (
    ModelCard,
    file_sha256,
    load_model,
    read_card,
    save_model,
)

from . import objectives
from .augment import augment, default_augmentation
from .card import training_card
from .checkpoint import Checkpoint
from .evaluate import (
    LevelReport,
    autocast,
    report,
    reports_to_json,
    score_images,
)
from .metrics import DEFAULT_N_BOOT, roc_auc
from .numerics import flush_denormal
from .patch_head import PatchHead, patch_head
from .prepare import InputCache, mask_grid
from .progress import progress as progress_bar
from .sitedata import SiteData, SiteDataError, SiteImage, load_site_data
from .split import Split, split_site_data

CHECKPOINT_FORMAT = 1


class FinetuneError(ValueError):
    """A fine-tuning run that cannot start or continue; the message says what to change."""


@dataclass
class FinetuneOptions:
    site_data: Path
    out: Path
    base: Path | None = None
    arch: str | None = None
    """"FAMILY-PRESET" (e.g. gmic-demo, allconv-resnet50) to train from scratch."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """From scratch: entries that replace the preset's default preprocessing (e.g. GMIC's
    `scale: "fit"`, which fills the input window with the breast whatever the image size)."""
    recipe: str | None = None
    """A name in `objectives.RECIPES`; default "adapt" with a base model, "scratch" with an
    architecture. It supplies epochs, batch size, augmentation, learning rate and stages for
    whatever is left None here."""
    epochs: int | None = None
    batch_size: int | None = None
    accumulate: int = 1
    lr: float | None = None
    schedule: str = "constant"
    """A name in `objectives.SCHEDULES`: the learning rate within each stage."""
    weight_decay: float | None = None
    top_epochs: int | None = None
    beta: float = objectives.DEFAULT_BETA
    mask_weight: float = 0.0
    """Weight of `objectives.mask_loss` (lesion masks from labels.csv); 0 = image labels only."""
    bn_momentum: float = 0.1
    """BatchNorm running-statistics momentum while training (PyTorch convention)."""
    patience: int = 5
    augment: str | None = None
    """"full" (flips, rotation, zoom, intensity), "flips" or "none"; see `trainer.augment`."""
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 on CUDA where supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16"""
    work_dir: Path | None = None
    """Checkpoint and input cache; default `<out>.work` beside the output."""
    resume: bool = False
    progress: bool = True
    name: str | None = None
    version: str | None = None
    intended_use: str | None = None
    n_boot: int = DEFAULT_N_BOOT
    overwrite: bool = False

    def training_key(self) -> str:
        """Hash of everything that shapes the weights; a checkpoint only resumes under it.

        The run's length is left out: `--resume` with another `--epochs` or `--patience`
        extends a run, or ends it now and writes the best epoch so far."""
        keep = {
            k: str(v)
            for k, v in asdict(self).items()
            if k
            not in {
                "resume",
                "progress",
                "device",
                "work_dir",
                "overwrite",
                "n_boot",
                "name",
                "version",
                "intended_use",
                "out",
                "epochs",
                "patience",
            }
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


@dataclass
class FinetuneResult:
    out: Path
    card: ModelCard
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_auc: float
    test: dict[str, LevelReport]
    base_test: dict[str, LevelReport] | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def parse_arch(text: str) -> tuple[str, str, dict[str, Any]]:
    """ "gmic-demo" → ("gmic", "demo", architecture); a bare family name picks its published
    preset ("published", else the first listed)."""
    family, _, preset = text.partition("-")
    get_family(family)  # raises the "unknown family" error listing the known ones
    presets: dict[str, dict[str, Any]] = importlib.import_module(f"models.{family}").PRESETS
    if not preset:
        preset = "published" if "published" in presets else next(iter(presets))
    preset = preset.replace("-", "_") if preset.replace("-", "_") in presets else preset
    if preset not in presets:
        known = ", ".join(f"{family}-{p}" for p in presets)
        raise FinetuneError(f"unknown architecture {text!r}; known for {family}: {known}")
    return family, preset, copy.deepcopy(presets[preset])


def _preprocessing(
    family_name: str, architecture: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The preset's default preprocessing with `overrides` applied; an unknown key fails here,
    a bad value when the family reads the spec (the first image preprocessed)."""
    spec = get_family(family_name).default_preprocessing(architecture)
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise FinetuneError(
            f"--preprocessing: unknown key(s) {unknown} for {family_name}; known: {sorted(spec)}"
        )
    return {**spec, **overrides}


def with_recipe(options: FinetuneOptions) -> FinetuneOptions:
    """`options` with the recipe named and every setting it leaves open filled from it."""
    name = options.recipe or ("adapt" if options.base is not None else "scratch")
    if name not in objectives.RECIPES:
        raise FinetuneError(f"unknown recipe {name!r}; known: {', '.join(objectives.RECIPES)}")
    recipe = objectives.RECIPES[name]
    return replace(
        options,
        recipe=name,
        epochs=options.epochs if options.epochs is not None else recipe.epochs,
        batch_size=options.batch_size if options.batch_size is not None else recipe.batch_size,
        augment=options.augment if options.augment is not None else recipe.augment,
    )


def _precision(device: torch.device, precision: str) -> str:
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise FinetuneError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def _balanced_order(train: list[SiteImage], generator: torch.Generator) -> list[int]:
    """One epoch of indices drawn with replacement, each class equally likely."""
    labels = torch.tensor([im.malignant for im in train])
    counts = torch.bincount(labels, minlength=2).double()
    weights = 1.0 / counts[labels]
    return torch.multinomial(weights, len(train), replacement=True, generator=generator).tolist()


def _batch_masks(cache: InputCache, images: list[SiteImage]) -> torch.Tensor:
    """(N, 2, h, w) lesion fractions in [0, 1]; zeros for an image without masks (its `known`
    flags say whether that zero is a fact or a gap)."""
    found = [cache.masks(im) for im in images]
    shape = next((m.shape for m in found if m is not None), None)
    if shape is None:
        rows, cols = cache.get(images[0]).shape[-2:]
        shape = (2, *mask_grid((rows, cols)))
    return torch.stack([m.float() / 255.0 if m is not None else torch.zeros(shape) for m in found])


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """All-conv's BatchNorm keeps Keras' momentum (0.99, i.e. 0.01 here), which needs thousands
    of steps to track the data; a site fine-tune of a few hundred steps would validate with
    stale statistics. The momentum is not part of the saved weights, so inference is unchanged.
    """
    for m in module.modules():
        if isinstance(m, _BATCH_NORMS):
            m.momentum = momentum


def _check_classes(images: list[SiteImage], which: str) -> None:
    positives = sum(im.malignant for im in images)
    if positives == 0 or positives == len(images):
        raise SiteDataError(
            f"the {which} split has {len(images)} images of which {positives} malignant; it "
            "needs both classes. Add data, change --seed, or set a `split` column in labels.csv"
        )


def finetune(
    options: FinetuneOptions,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Run (or resume) one fine-tuning and write `options.out`.

    `on_epoch_end` is called after each epoch's checkpoint is on disk with that epoch's
    history row; an exception raised there interrupts the run as a crash would.
    """
    with flush_denormal():
        return _finetune(with_recipe(options), on_epoch_end)


@dataclass
class _Run:
    """What one run trains, on what and how: fixed at setup, recorded in the card."""

    options: FinetuneOptions
    out: Path
    data: SiteData
    split: Split
    train: list[SiteImage]
    val: list[SiteImage]
    test: list[SiteImage]
    family_name: str
    preset: str | None
    """The preset trained from scratch; None when fine-tuning a base model."""
    architecture: dict[str, Any]
    spec: dict[str, Any]
    base_card: ModelCard | None
    base_info: dict[str, Any]
    stages: list[objectives.Stage]
    lr: float
    weight_decay: float
    device: torch.device
    precision: str
    module: nn.Module
    head: PatchHead | None
    cache: InputCache
    checkpoint: Checkpoint

    @property
    def family(self) -> ModelFamily:
        return get_family(self.family_name)

    def scores(self, images: list[SiteImage]) -> np.ndarray:
        return score_images(
            self.module,
            self.family,
            self.cache,
            images,
            self.device,
            int(self.options.batch_size),
            self.precision,
        )


@dataclass
class _State:
    """Where training stands after an epoch: what the checkpoint saves and a resume restores."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_auc: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    best_state: dict[str, Any] = field(default_factory=dict)
    first_epoch: int = 0
    saved_stage: str | None = None
    saved_optimizer: dict[str, Any] | None = None
    saved_scaler: dict[str, Any] | None = None


def _finetune(
    options: FinetuneOptions, on_epoch_end: Callable[[dict[str, Any]], None] | None
) -> FinetuneResult:
    started = time.monotonic()
    run = _setup(options)
    base_test = None
    if run.base_card is not None:
        base_test = report(run.test, run.scores(run.test), n_boot=options.n_boot)
    state = _resume(run)
    _train(run, state, on_epoch_end)

    if run.head is not None:
        run.head.close()
    run.module.load_state_dict(state.best_state)
    for p in run.module.parameters():
        p.requires_grad_(True)
    test_report = report(run.test, run.scores(run.test), n_boot=options.n_boot)
    card = _card(run, state, test_report, base_test)
    save_model(run.module, card, run.out)
    return FinetuneResult(
        run.out,
        card,
        state.history,
        state.best_epoch + 1,
        state.best_auc,
        test_report,
        base_test,
        time.monotonic() - started,
    )


def _check_options(o: FinetuneOptions) -> Path:
    """Refuse options that cannot make a run, before any data is read; returns the output."""
    if (o.base is None) == (o.arch is None):
        raise FinetuneError("give exactly one of --base MODEL.safetensors or --arch FAMILY-PRESET")
    if o.base is not None and o.preprocessing:
        raise FinetuneError(
            "--preprocessing applies to --arch (from scratch) only: a base model keeps the "
            "preprocessing it was trained with"
        )
    if o.epochs < 1 or o.batch_size < 1 or o.accumulate < 1:
        raise FinetuneError("--epochs, --batch-size and --accumulate must be at least 1")
    out = Path(o.out)
    if o.base is not None and out.resolve() == Path(o.base).resolve():
        raise FinetuneError("--out must differ from --base: the base model is never overwritten")
    if out.exists() and not o.overwrite:
        raise FinetuneError(f"{out} exists; choose another --out or pass --overwrite")
    if o.mask_weight < 0:
        raise FinetuneError(f"--mask-weight must be 0 or more, not {o.mask_weight}")
    if o.schedule not in objectives.SCHEDULES:
        raise FinetuneError(
            f"--schedule must be one of {', '.join(objectives.SCHEDULES)}, not {o.schedule!r}"
        )
    return out


def _setup(o: FinetuneOptions) -> _Run:
    """Read and split the site data, build or load the model, and preprocess every image."""
    out = _check_options(o)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = load_site_data(o.site_data)
    split = split_site_data(data, seed=o.seed)
    train, val, test = (split.images(data, s) for s in ("train", "val", "test"))
    _check_classes(train, "train")
    _check_classes(val, "validation")
    if o.mask_weight > 0 and not any(im.malignant_mask for im in train):
        raise FinetuneError(
            "--mask-weight needs lesion masks, but no training image has a `malignant_mask` "
            "in labels.csv; add the column (paths to PNG masks on each image's grid) or drop "
            "--mask-weight"
        )

    torch.manual_seed(o.seed)
    if o.base is not None:
        base_path = Path(o.base)
        base_card = read_card(base_path)
        module: nn.Module = load_model(base_path)
        family_name, preset = base_card.family, None
        architecture, spec = base_card.architecture, base_card.preprocessing
        base_info: dict[str, Any] = {
            "file": base_path.name,
            "sha256": file_sha256(base_path),
            "name": base_card.name,
            "version": base_card.version,
        }
    else:
        base_card = None
        family_name, preset, architecture = parse_arch(str(o.arch))
        module = get_family(family_name).build(architecture)
        spec = _preprocessing(family_name, architecture, o.preprocessing)
        base_info = {"from_scratch": f"{family_name}-{preset}", "init_seed": o.seed}
    recipe = objectives.RECIPES[str(o.recipe)]
    lr = o.lr if o.lr is not None else recipe.lr[family_name]
    weight_decay = (
        o.weight_decay
        if o.weight_decay is not None
        else objectives.DEFAULTS[family_name].weight_decay
    )
    stages = objectives.plan_stages(
        family_name, o.epochs, lr, o.top_epochs, recipe.staged and base_card is not None
    )
    device = resolve_device(o.device)
    precision = _precision(device, o.precision)
    module.to(device)
    _set_bn_momentum(module, o.bn_momentum)
    head = patch_head(family_name, module) if o.mask_weight > 0 else None
    if head is not None:
        head.to(device)

    work = Path(o.work_dir) if o.work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    cache = InputCache(get_family(family_name), spec, work / "inputs")
    if o.mask_weight > 0:  # first, so each training image is decoded once for both
        cache.prepare(train, progress=o.progress, masks=True)
    cache.prepare([*train, *val, *test], progress=o.progress)
    return _Run(
        options=o,
        out=out,
        data=data,
        split=split,
        train=train,
        val=val,
        test=test,
        family_name=family_name,
        preset=preset,
        architecture=architecture,
        spec=spec,
        base_card=base_card,
        base_info=base_info,
        stages=stages,
        lr=lr,
        weight_decay=weight_decay,
        device=device,
        precision=precision,
        module=module,
        head=head,
        cache=cache,
        checkpoint=Checkpoint(
            work / "checkpoint.pt",
            o.training_key(),
            data.fingerprint(),
            CHECKPOINT_FORMAT,
            FinetuneError,
        ),
    )


def _resume(run: _Run) -> _State:
    """A fresh state, or the checkpoint's (weights restored into the run's model)."""
    fresh = _State(best_state=copy.deepcopy(run.module.state_dict()))
    if not run.checkpoint.path.exists():
        return fresh
    if not run.options.resume:
        raise FinetuneError(
            f"{run.checkpoint.path} exists from an earlier run; pass --resume to continue it or "
            "delete the work folder to start over"
        )
    saved = run.checkpoint.load()
    run.module.load_state_dict(saved["model"])
    if run.head is not None:
        run.head.load_state_dict(saved["patch_head"])
    return _State(
        history=saved["history"],
        best_auc=saved["best_auc"],
        best_epoch=saved["best_epoch"],
        bad_epochs=saved["bad_epochs"],
        stopped=saved["stopped"],
        best_state=saved["best_model"],
        first_epoch=saved["epoch"] + 1,
        saved_stage=saved["stage"],
        saved_optimizer=saved["optimizer"],
        saved_scaler=saved["scaler"],
    )


@dataclass
class _Labels:
    """The training split's targets as tensors, indexed by a batch's positions."""

    malignant: torch.Tensor
    benign: torch.Tensor
    mask_known: torch.Tensor

    @classmethod
    def of(cls, train: list[SiteImage]) -> _Labels:
        return cls(
            malignant=torch.tensor([float(im.malignant) for im in train]),
            benign=torch.tensor([float(-1 if im.benign is None else im.benign) for im in train]),
            mask_known=torch.tensor(
                [
                    [
                        float(im.benign == 0 or im.benign_mask is not None),
                        float(im.malignant == 0 or im.malignant_mask is not None),
                    ]
                    for im in train
                ]
            ),
        )


def _train(run: _Run, state: _State, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
    """Train from `state.first_epoch` until the last epoch or early stopping."""
    o = run.options
    scaler = torch.amp.GradScaler("cuda", enabled=run.precision == "fp16")
    if state.saved_scaler:
        scaler.load_state_dict(state.saved_scaler)
    labels = _Labels.of(run.train)
    optimizer: torch.optim.Optimizer | None = None
    frozen: nn.Module | None = None
    stage_name: str | None = None
    for epoch in range(state.first_epoch, int(o.epochs)):
        if state.stopped:
            break
        stage, in_stage = objectives.stage_at(run.stages, epoch)
        if stage.name != stage_name or optimizer is None:
            optimizer, frozen = _stage_optimizer(run, state, stage)
            stage_name = stage.name
        lr = objectives.epoch_lr(stage, in_stage, o.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_started = time.monotonic()
        loss = _epoch(run, epoch, stage, optimizer, frozen, scaler, labels)
        row = _validate(run, state, epoch, stage, lr, loss, time.monotonic() - epoch_started)
        run.checkpoint.save(
            {
                "epoch": epoch,
                "stage": stage.name,
                "model": run.module.state_dict(),
                "patch_head": run.head.state_dict() if run.head is not None else {},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "best_model": state.best_state,
                "best_auc": state.best_auc,
                "best_epoch": state.best_epoch,
                "bad_epochs": state.bad_epochs,
                "stopped": state.stopped,
                "history": state.history,
            }
        )
        if on_epoch_end is not None:
            on_epoch_end(row)


def _stage_optimizer(
    run: _Run, state: _State, stage: objectives.Stage
) -> tuple[torch.optim.Optimizer, nn.Module | None]:
    """A stage's optimizer over what it trains (the checkpoint's, when resuming in that stage),
    and the part it keeps frozen."""
    frozen = objectives.frozen_part(run.module, stage)
    frozen_ids = {id(p) for p in frozen.parameters()} if frozen is not None else set()
    for p in run.module.parameters():
        p.requires_grad_(id(p) not in frozen_ids)
    params = [p for p in run.module.parameters() if p.requires_grad]
    if run.head is not None:
        params += list(run.head.parameters())
    optimizer = torch.optim.Adam(params, lr=stage.lr, weight_decay=run.weight_decay)
    if state.saved_optimizer is not None and state.saved_stage == stage.name:
        optimizer.load_state_dict(state.saved_optimizer)
    state.saved_optimizer = None
    return optimizer, frozen


def _epoch(
    run: _Run,
    epoch: int,
    stage: objectives.Stage,
    optimizer: torch.optim.Optimizer,
    frozen: nn.Module | None,
    scaler: torch.amp.GradScaler,
    labels: _Labels,
) -> float:
    """One pass over a class-balanced draw of the training split; returns the mean loss."""
    o, module, device = run.options, run.module, run.device
    batch_size, mask_weight = int(o.batch_size), o.mask_weight
    generator = torch.Generator().manual_seed(_epoch_seed(o.seed, epoch))
    torch.manual_seed(_epoch_seed(o.seed, epoch) + 1)
    module.train()
    if frozen is not None:
        frozen.eval()
    aug_config = default_augmentation(run.family_name, o.augment)
    order = _balanced_order(run.train, generator)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    total_loss = 0.0
    optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(batches, f"epoch {epoch + 1}/{o.epochs} ({stage.name})", "batch", o.progress)
    for step, idx in enumerate(bar):
        images = [run.train[i] for i in idx]
        x = run.cache.batch(images)
        masks = _batch_masks(run.cache, images) if mask_weight > 0 else None
        if aug_config is not None:
            x, masks = augment(x, aug_config, generator, masks)
        x = x.to(device, non_blocking=True)
        with autocast(device, run.precision):
            output = module(x)
        loss = objectives.loss(
            run.family_name,
            output,
            labels.malignant[idx].to(device),
            labels.benign[idx].to(device),
            o.beta,
        )
        if masks is not None:
            maps = run.head.maps() if run.head is not None else run.family.score_maps(output)
            dense = objectives.mask_loss(maps, masks.to(device), labels.mask_known[idx].to(device))
            loss = loss + mask_weight * dense
        scaler.scale(loss / o.accumulate).backward()
        if (step + 1) % o.accumulate == 0 or step + 1 == len(batches):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        total_loss += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return total_loss / len(order)


def _validate(
    run: _Run,
    state: _State,
    epoch: int,
    stage: objectives.Stage,
    lr: float,
    loss: float,
    seconds: float,
) -> dict[str, Any]:
    """Score the validation split, keep the best weights, count epochs without improvement,
    and append (and print) the epoch's history row."""
    o = run.options
    val_auc = roc_auc(np.array([im.malignant for im in run.val]), run.scores(run.val))
    if val_auc > state.best_auc:
        state.best_auc, state.best_epoch, state.bad_epochs = val_auc, epoch, 0
        state.best_state = copy.deepcopy(run.module.state_dict())
    elif stage.name == run.stages[-1].name:
        state.bad_epochs += 1
    state.stopped = state.bad_epochs >= o.patience
    row = {
        "epoch": epoch + 1,
        "stage": stage.name,
        "lr": lr,
        "train_loss": loss,
        "val_auc": val_auc,
        "seconds": round(seconds, 2),
    }
    state.history.append(row)
    print(
        f"epoch {epoch + 1}/{o.epochs} ({stage.name}): loss {row['train_loss']:.4f}  "
        f"val AUC {val_auc:.3f}  {row['seconds']:.0f} s"
        + ("  (best)" if state.best_epoch == epoch else "")
        + ("  early stop" if state.stopped else ""),
        flush=True,
    )
    return row


def _card(
    run: _Run,
    state: _State,
    test_report: dict[str, LevelReport],
    base_test: dict[str, LevelReport] | None,
) -> ModelCard:
    o, family_name, preset = run.options, run.family_name, run.preset
    metrics: dict[str, Any] = {
        "validation": {"image_auc": state.best_auc, "best_epoch": state.best_epoch + 1},
        "test": reports_to_json(test_report),
    }
    if base_test is not None:
        metrics["base_test"] = reports_to_json(base_test)
    training = {
        "recipe": o.recipe,
        "stages": [asdict(s) for s in run.stages],
        "epochs_run": len(state.history),
        "history": state.history,
        "batch_size": o.batch_size,
        "accumulate": o.accumulate,
        "lr": run.lr,
        "lr_schedule": o.schedule,
        "weight_decay": run.weight_decay,
        "optimizer": "Adam",
        "beta_saliency_l1": o.beta if family_name == "gmic" else None,
        "mask_supervision": (
            {
                "weight": o.mask_weight,
                "maps": "trunk patch head" if family_name == "allconv" else "saliency",
                "train_images_with_masks": sum(1 for im in run.train if im.lesion_masks),
            }
            if o.mask_weight > 0
            else None
        ),
        "augmentation": (
            {"level": o.augment, **asdict(aug)}
            if (aug := default_augmentation(family_name, o.augment))
            else None
        ),
        "class_balanced_sampling": True,
        "bn_momentum": o.bn_momentum,
        "early_stopping": {"metric": "val image AUC", "patience": o.patience},
        "precision": run.precision,
        "device": run.device.type,
    }
    return training_card(
        o,
        family=family_name,
        architecture=run.architecture,
        preprocessing=run.spec,
        base=run.base_card,
        base_info=run.base_info,
        default_name=f"demo-{family_name}" if preset == "demo" else f"{family_name}-{preset}",
        demo=preset == "demo",
        data=run.data,
        split=run.split,
        training=training,
        metrics=metrics,
    )
