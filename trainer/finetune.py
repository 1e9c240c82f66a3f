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
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import trainer
from models.ensemble import resolve_device
from models.family import get_family
from models.modelfile import NOT_VALIDATED, ModelCard, load_model, read_card, save_model

from . import objectives
from .augment import augment, default_augmentation
from .evaluate import (
    LevelReport,
    autocast,
    report,
    reports_to_json,
    score_images,
)
from .metrics import DEFAULT_N_BOOT, roc_auc
from .patch_head import patch_head
from .prepare import InputCache, mask_grid
from .progress import progress as progress_bar
from .sitedata import SiteData, SiteDataError, SiteImage, load_site_data
from .split import Split, split_site_data

CHECKPOINT_FORMAT = 1
DEMO_INTENDED_USE = (
    "Demonstration model trained from scratch on synthetic mammograms only, for tests, CI and "
    "demos of the pipeline. Not for clinical use, not a medical device; its scores carry no "
    "meaning on real images."
)


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """All-conv's BatchNorm keeps Keras' momentum (0.99, i.e. 0.01 here), which needs thousands
    of steps to track the data; a site fine-tune of a few hundred steps would validate with
    stale statistics. The momentum is not part of the saved weights, so inference is unchanged.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def _check_classes(images: list[SiteImage], which: str) -> None:
    positives = sum(im.malignant for im in images)
    if positives == 0 or positives == len(images):
        raise SiteDataError(
            f"the {which} split has {len(images)} images of which {positives} malignant; it "
            "needs both classes. Add data, change --seed, or set a `split` column in labels.csv"
        )


class _Checkpoint:
    def __init__(self, path: Path, key: str, fingerprint: str) -> None:
        self.path, self.key, self.fingerprint = path, key, fingerprint

    def load(self) -> dict[str, Any]:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise FinetuneError(f"{self.path}: checkpoint from another trainer version")
        if state["fingerprint"] != self.fingerprint:
            raise FinetuneError(
                f"{self.path}: checkpoint was made on different site data; delete the work "
                "folder to start over"
            )
        if state["key"] != self.key:
            raise FinetuneError(
                f"{self.path}: checkpoint was made with different options (base/arch, epochs, "
                "learning rate, seed …); rerun with the same options or delete the work folder"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "key": self.key,
            "fingerprint": self.fingerprint,
            **state,
        }
        tmp = self.path.with_name(self.path.name + ".partial")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def finetune(
    options: FinetuneOptions,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Run (or resume) one fine-tuning and write `options.out`.

    `on_epoch_end` is called after each epoch's checkpoint is on disk with that epoch's
    history row; an exception raised there interrupts the run as a crash would.

    Denormal floats are flushed to zero for the run: on x86 CPUs, backward passes produce
    them and run several times slower without this (measured 4-5x on the demo models).
    """
    torch.set_flush_denormal(True)
    try:
        return _finetune(with_recipe(options), on_epoch_end)
    finally:
        torch.set_flush_denormal(False)


def _finetune(
    options: FinetuneOptions, on_epoch_end: Callable[[dict[str, Any]], None] | None
) -> FinetuneResult:
    started = time.monotonic()
    o = options
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
    out.parent.mkdir(parents=True, exist_ok=True)

    data = load_site_data(o.site_data)
    split = split_site_data(data, seed=o.seed)
    train, val, test = (split.images(data, s) for s in ("train", "val", "test"))
    _check_classes(train, "train")
    _check_classes(val, "validation")
    if o.mask_weight < 0:
        raise FinetuneError(f"--mask-weight must be 0 or more, not {o.mask_weight}")
    if o.mask_weight > 0 and not any(im.malignant_mask for im in train):
        raise FinetuneError(
            "--mask-weight needs lesion masks, but no training image has a `malignant_mask` "
            "in labels.csv; add the column (paths to PNG masks on each image's grid) or drop "
            "--mask-weight"
        )

    # Model and its card template.
    torch.manual_seed(o.seed)
    if o.base is not None:
        base_path = Path(o.base)
        base_card = read_card(base_path)
        module: nn.Module = load_model(base_path)
        family_name, preset = base_card.family, None
        architecture, spec = base_card.architecture, base_card.preprocessing
        base_info: dict[str, Any] = {
            "file": base_path.name,
            "sha256": sha256_file(base_path),
            "name": base_card.name,
            "version": base_card.version,
        }
    else:
        base_card = None
        family_name, preset, architecture = parse_arch(str(o.arch))
        module = get_family(family_name).build(architecture)
        spec = _preprocessing(family_name, architecture, o.preprocessing)
        base_info = {"from_scratch": f"{family_name}-{preset}", "init_seed": o.seed}
    family = get_family(family_name)
    from_scratch = base_card is None
    defaults = objectives.DEFAULTS[family_name]
    recipe = objectives.RECIPES[str(o.recipe)]
    lr = o.lr if o.lr is not None else recipe.lr[family_name]
    weight_decay = o.weight_decay if o.weight_decay is not None else defaults.weight_decay
    stages = objectives.plan_stages(
        family_name, o.epochs, lr, o.top_epochs, recipe.staged and not from_scratch
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
    checkpoint = _Checkpoint(work / "checkpoint.pt", o.training_key(), data.fingerprint())
    cache = InputCache(family, spec, work / "inputs")
    if o.mask_weight > 0:  # first, so each training image is decoded once for both
        cache.prepare(train, progress=o.progress, masks=True)
    cache.prepare([*train, *val, *test], progress=o.progress)

    base_test = None
    if base_card is not None:
        base_scores = score_images(module, family, cache, test, device, o.batch_size, precision)
        base_test = report(test, base_scores, n_boot=o.n_boot)

    # Training state, fresh or from the checkpoint.
    history: list[dict[str, Any]] = []
    best_auc, best_epoch, bad_epochs, stopped = -1.0, -1, 0, False
    best_state = copy.deepcopy(module.state_dict())
    first_epoch, saved_stage, saved_opt, saved_scaler = 0, None, None, None
    if checkpoint.path.exists():
        if not o.resume:
            raise FinetuneError(
                f"{checkpoint.path} exists from an earlier run; pass --resume to continue it or "
                "delete the work folder to start over"
            )
        state = checkpoint.load()
        module.load_state_dict(state["model"])
        best_state = state["best_model"]
        best_auc, best_epoch = state["best_auc"], state["best_epoch"]
        bad_epochs, stopped, history = state["bad_epochs"], state["stopped"], state["history"]
        first_epoch = state["epoch"] + 1
        saved_stage, saved_opt, saved_scaler = state["stage"], state["optimizer"], state["scaler"]
        if head is not None:
            head.load_state_dict(state["patch_head"])

    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    if saved_scaler:
        scaler.load_state_dict(saved_scaler)
    aug_config = default_augmentation(family_name, o.augment)
    malignant = torch.tensor([float(im.malignant) for im in train])
    benign = torch.tensor([float(-1 if im.benign is None else im.benign) for im in train])
    mask_known = torch.tensor(
        [
            [
                float(im.benign == 0 or im.benign_mask is not None),
                float(im.malignant == 0 or im.malignant_mask is not None),
            ]
            for im in train
        ]
    )
    val_labels = np.array([im.malignant for im in val])

    optimizer, stage_name = None, None
    for epoch in range(first_epoch, o.epochs):
        if stopped:
            break
        stage = objectives.stage_at(stages, epoch)
        if stage.name != stage_name:
            frozen = objectives.frozen_part(module, stage)
            frozen_ids = {id(p) for p in frozen.parameters()} if frozen is not None else set()
            for p in module.parameters():
                p.requires_grad_(id(p) not in frozen_ids)
            params = [p for p in module.parameters() if p.requires_grad]
            if head is not None:
                params += list(head.parameters())
            optimizer = torch.optim.Adam(params, lr=stage.lr, weight_decay=weight_decay)
            if saved_opt is not None and saved_stage == stage.name:
                optimizer.load_state_dict(saved_opt)
            saved_opt, stage_name = None, stage.name

        epoch_started = time.monotonic()
        generator = torch.Generator().manual_seed(_epoch_seed(o.seed, epoch))
        torch.manual_seed(_epoch_seed(o.seed, epoch) + 1)
        module.train()
        if frozen is not None:
            frozen.eval()
        order = _balanced_order(train, generator)
        batches = [order[i : i + o.batch_size] for i in range(0, len(order), o.batch_size)]
        total_loss = 0.0
        optimizer.zero_grad(set_to_none=True)
        bar = progress_bar(
            batches, f"epoch {epoch + 1}/{o.epochs} ({stage.name})", "batch", o.progress
        )
        for step, idx in enumerate(bar):
            x = cache.batch([train[i] for i in idx])
            masks = _batch_masks(cache, [train[i] for i in idx]) if o.mask_weight > 0 else None
            if aug_config is not None:
                x, masks = augment(x, aug_config, generator, masks)
            x = x.to(device, non_blocking=True)
            with autocast(device, precision):
                output = module(x)
            loss = objectives.loss(
                family_name, output, malignant[idx].to(device), benign[idx].to(device), o.beta
            )
            if masks is not None:
                maps = head.maps() if head is not None else family.score_maps(output)
                dense = objectives.mask_loss(maps, masks.to(device), mask_known[idx].to(device))
                loss = loss + o.mask_weight * dense
            scaler.scale(loss / o.accumulate).backward()
            if (step + 1) % o.accumulate == 0 or step + 1 == len(batches):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            total_loss += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")

        val_scores = score_images(module, family, cache, val, device, o.batch_size, precision)
        val_auc = roc_auc(val_labels, val_scores)
        if val_auc > best_auc:
            best_auc, best_epoch, bad_epochs = val_auc, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        elif stage.name == stages[-1].name:
            bad_epochs += 1
        stopped = bad_epochs >= o.patience
        row = {
            "epoch": epoch + 1,
            "stage": stage.name,
            "lr": stage.lr,
            "train_loss": total_loss / len(order),
            "val_auc": val_auc,
            "seconds": round(time.monotonic() - epoch_started, 2),
        }
        history.append(row)
        print(
            f"epoch {epoch + 1}/{o.epochs} ({stage.name}): loss {row['train_loss']:.4f}  "
            f"val AUC {val_auc:.3f}  {row['seconds']:.0f} s"
            + ("  (best)" if best_epoch == epoch else "")
            + ("  early stop" if stopped else ""),
            flush=True,
        )
        checkpoint.save(
            {
                "epoch": epoch,
                "stage": stage.name,
                "model": module.state_dict(),
                "patch_head": head.state_dict() if head is not None else {},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "best_model": best_state,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "stopped": stopped,
                "history": history,
            }
        )
        if on_epoch_end is not None:
            on_epoch_end(row)

    if head is not None:
        head.close()
    module.load_state_dict(best_state)
    for p in module.parameters():
        p.requires_grad_(True)
    test_scores = score_images(module, family, cache, test, device, o.batch_size, precision)
    test_report = report(test, test_scores, n_boot=o.n_boot)

    card = _card(
        o,
        data,
        split,
        family_name,
        preset,
        architecture,
        spec,
        base_card,
        base_info,
        stages,
        lr,
        weight_decay,
        precision,
        device,
        history,
        best_epoch,
        best_auc,
        test_report,
        base_test,
    )
    save_model(module, card, out)
    return FinetuneResult(
        out,
        card,
        history,
        best_epoch + 1,
        best_auc,
        test_report,
        base_test,
        time.monotonic() - started,
    )


def _card(
    o: FinetuneOptions,
    data: SiteData,
    split: Split,
    family_name: str,
    preset: str | None,
    architecture: dict[str, Any],
    spec: dict[str, Any],
    base_card: ModelCard | None,
    base_info: dict[str, Any],
    stages: list[objectives.Stage],
    lr: float,
    weight_decay: float,
    precision: str,
    device: torch.device,
    history: list[dict[str, Any]],
    best_epoch: int,
    best_auc: float,
    test_report: dict[str, LevelReport],
    base_test: dict[str, LevelReport] | None,
) -> ModelCard:
    now = datetime.now(UTC)
    fingerprint = data.fingerprint()
    if base_card is not None:
        name = o.name or f"{base_card.name}-finetuned"
        licence = base_card.licence
        intended_use = o.intended_use or NOT_VALIDATED
    else:
        name = o.name or (f"demo-{family_name}" if preset == "demo" else f"{family_name}-{preset}")
        licence = "Apache-2.0"
        intended_use = o.intended_use or (DEMO_INTENDED_USE if preset == "demo" else NOT_VALIDATED)
    metrics: dict[str, Any] = {
        "validation": {"image_auc": best_auc, "best_epoch": best_epoch + 1},
        "test": reports_to_json(test_report),
    }
    if base_test is not None:
        metrics["base_test"] = reports_to_json(base_test)
    provenance = {
        "base_model": base_info,
        "training_data": {
            "fingerprint_sha256": fingerprint,
            "summary": data.summary(),
            "split": {"source": split.source, "seed": o.seed, "counts": split.counts(data)},
        },
        "training": {
            "recipe": o.recipe,
            "stages": [asdict(s) for s in stages],
            "epochs_run": len(history),
            "history": history,
            "batch_size": o.batch_size,
            "accumulate": o.accumulate,
            "lr": lr,
            "weight_decay": weight_decay,
            "optimizer": "Adam",
            "beta_saliency_l1": o.beta if family_name == "gmic" else None,
            "mask_supervision": (
                {
                    "weight": o.mask_weight,
                    "maps": "trunk patch head" if family_name == "allconv" else "saliency",
                    "train_images_with_masks": sum(
                        1 for im in split.images(data, "train") if im.lesion_masks
                    ),
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
            "precision": precision,
            "device": device.type,
        },
        "metrics": metrics,
        "date": now.isoformat(timespec="seconds"),
        "trainer_version": trainer.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    return ModelCard(
        family=family_name,
        architecture=architecture,
        preprocessing=spec,
        name=name,
        version=o.version or f"{now:%Y%m%d}-{fingerprint[:8]}",
        licence=licence,
        intended_use=intended_use,
        clinical_use=False,
        provenance=provenance,
        operating_points={},
    )
