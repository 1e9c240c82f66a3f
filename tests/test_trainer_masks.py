"""Lesion-mask supervision: masks follow the preprocessing geometry onto the input grid, the
mask loss rewards maps that outline the lesion, and `finetune --mask-weight` trains with it."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import allconv, gmic
from models.family import ScoreMaps, get_family
from models.modelfile import new_model_file, read_card
from models.reading import read_mammogram_file
from trainer import objectives
from trainer.finetune import FinetuneError, FinetuneOptions, finetune
from trainer.patch_head import patch_head
from trainer.prepare import MASK_STRIDE, InputCache
from trainer.sitedata import load_site_data
from trainer.synth import write_dataset


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mask-site")
    write_dataset(root, 8, positive_fraction=0.5, seed=91, rows=1024, cols=832)
    return root


def _centre(weights: np.ndarray) -> np.ndarray:
    """Centre of mass in continuous (row, col) pixel coordinates."""
    rows, cols = np.indices(weights.shape) + 0.5
    total = weights.sum()
    return np.array([(rows * weights).sum() / total, (cols * weights).sum() / total])


@pytest.mark.parametrize(
    "family_name, architecture",
    [("gmic", gmic.PRESETS["demo"]), ("allconv", allconv.PRESETS["demo"])],
)
def test_masks_land_where_the_lesion_lands_in_the_input(site: Path, family_name, architecture):
    """GMIC crops and turns right breasts to face left, all-conv only resizes; a mask must go
    through the same chain as its pixels, in both breasts and both views."""
    family = get_family(family_name)
    spec = family.default_preprocessing(architecture)
    cache = InputCache(family, spec)
    data = load_site_data(site)
    lesioned = [im for im in data.images if im.malignant_mask is not None]
    assert {im.laterality for im in lesioned} == {"L", "R"}, "the fixture needs both breasts"
    for im in lesioned:
        masks = cache.masks(im)
        rows, cols = cache.get(im).shape[-2:]
        assert masks.shape == (2, rows // MASK_STRIDE, cols // MASK_STRIDE)
        assert masks.dtype == torch.uint8 and masks[1].max() > 0
        source = np.asarray(Image.open(im.malignant_mask)) > 0
        geometry = family.preprocess(read_mammogram_file(im.path), spec).geometry
        expected = geometry.to_input(_centre(source.astype(float))[None])[0] / MASK_STRIDE
        found = _centre(masks[1].double().numpy())
        assert np.allclose(found, expected, atol=1.0), (im.laterality, im.view, found, expected)
    plain = next(im for im in data.images if not im.lesion_masks)
    assert cache.masks(plain) is None


def _maps(malignant: torch.Tensor, benign: torch.Tensor | None) -> ScoreMaps:
    n = malignant.shape[0]
    maps = torch.stack([benign if benign is not None else malignant, malignant], dim=1)
    return ScoreMaps(
        malignant=torch.zeros(n), benign=None if benign is None else torch.zeros(n), maps=maps
    )


def test_the_mask_loss_rewards_maps_that_outline_the_lesion():
    target = torch.zeros(1, 2, 16, 16)
    target[0, 1, 4:8, 4:8] = 1.0  # a malignant lesion on the 16x16 mask grid
    known = torch.ones(1, 2)
    outline = torch.full((1, 8, 8), 0.02)
    outline[0, 2:4, 2:4] = 0.98  # the same lesion on the map's coarser 8x8 grid
    blank = torch.full((1, 8, 8), 0.02)  # "no lesion anywhere"
    elsewhere = outline.roll(shifts=(4, 4), dims=(1, 2))
    loss = {
        name: float(objectives.mask_loss(_maps(m, torch.full_like(m, 0.02)), target, known))
        for name, m in (("outline", outline), ("blank", blank), ("elsewhere", elsewhere))
    }
    assert loss["outline"] < 0.1 < loss["blank"] < loss["elsewhere"]
    # Lesion cells are 1/16 of the map; balanced, missing them costs as much as a false map.
    assert loss["blank"] > 1.0


def test_the_mask_loss_ignores_what_is_not_known():
    target = torch.zeros(2, 2, 8, 8)
    wrong = torch.full((2, 8, 8), 0.9)  # confident lesion everywhere
    right = torch.full((2, 8, 8), 0.01)
    unknown = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # image 0: nothing known
    mixed = torch.stack([wrong[0], right[1]])
    assert float(objectives.mask_loss(_maps(mixed, None), target, unknown)) < 0.05
    # A family without a benign class: channel 0 repeats the malignant map and is not scored.
    only_benign = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = objectives.mask_loss(_maps(right, None), target, only_benign)
    assert float(loss) == 0.0


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    architecture = {**allconv.PRESETS["demo"], "input_shape": [288, 224]}
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("mask-base") / "tiny.safetensors"
    return new_model_file(path, "allconv", architecture, name="tiny-allconv")


def test_finetune_with_mask_weight_trains_on_the_masks(site: Path, tiny_base: Path, tmp_path):
    common = dict(site_data=site, base=tiny_base, epochs=1, batch_size=8, seed=1)
    plain = finetune(
        FinetuneOptions(out=tmp_path / "plain.safetensors", progress=False, n_boot=20, **common)
    )
    masked = finetune(
        FinetuneOptions(
            out=tmp_path / "masked.safetensors",
            mask_weight=1.0,
            progress=False,
            n_boot=20,
            **common,
        )
    )
    supervision = read_card(masked.out).provenance["training"]["mask_supervision"]
    assert supervision["weight"] == 1.0 and supervision["train_images_with_masks"] > 0
    assert supervision["maps"] == "trunk patch head"
    assert read_card(plain.out).provenance["training"]["mask_supervision"] is None
    # The mask term is part of the loss: the same seed gives another loss and other weights.
    assert masked.history[0]["train_loss"] > plain.history[0]["train_loss"]


def test_mask_weight_without_masks_is_refused(site: Path, tiny_base: Path, tmp_path: Path):
    copy = shutil.copytree(site, tmp_path / "site")  # a labels.csv without mask columns
    (copy / "labels.csv").unlink()
    with (site / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    with (copy / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "malignant", "benign"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    options = FinetuneOptions(
        site_data=copy,
        base=tiny_base,
        out=tmp_path / "x.safetensors",
        mask_weight=1.0,
        progress=False,
    )
    with pytest.raises(FinetuneError, match="no training image has a `malignant_mask`"):
        finetune(options)


def test_the_all_conv_patch_head_classifies_each_trunk_cell_and_stays_out_of_the_model():
    model = allconv.build({**allconv.PRESETS["demo"], "input_shape": [288, 224]})
    keys = set(model.state_dict())
    head = patch_head("allconv", model)
    assert head is not None and patch_head("gmic", model) is None
    x = torch.randn(2, 3, 288, 224)
    model(x)
    maps = head.maps()
    assert maps.maps.shape == (2, 2, *model.trunk(x).shape[-2:])  # one cell per trunk cell
    assert not maps.has_benign and torch.equal(maps.maps[:, 0], maps.maps[:, 1])
    with torch.no_grad():
        model(x)  # inference passes leave nothing behind
    with pytest.raises(RuntimeError, match="forward pass"):
        head.maps()
    head.close()
    assert set(model.state_dict()) == keys
