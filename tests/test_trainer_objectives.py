"""Training objectives and augmentation (trainer.objectives, trainer.augment)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.gmic import GMICOutput
from models.modelfile import new_model_file, read_card
from trainer import objectives
from trainer.augment import AugmentConfig, augment
from trainer.finetune import FinetuneOptions, finetune
from trainer.synth import write_dataset


def _gmic_output(n: int = 3) -> GMICOutput:
    g = torch.Generator().manual_seed(0)
    y = [torch.rand(n, 2, generator=g) for _ in range(3)]
    return GMICOutput(
        y_global=y[0],
        y_local=y[1],
        y_fusion=y[2],
        saliency=torch.rand(n, 2, 6, 4, generator=g),
        roi_positions=torch.zeros(n, 1, 2, dtype=torch.int64),
        attention=torch.ones(n, 1),
        crop_shape=(8, 8),
    )


def test_gmic_loss_is_bce_on_three_heads_plus_beta_l1_of_the_saliency():
    out = _gmic_output()
    malignant = torch.tensor([1.0, 0.0, 1.0])
    benign = torch.tensor([0.0, 1.0, -1.0])  # third: benign label unknown
    target = torch.stack([benign.clamp(min=0), malignant], dim=1)
    known = torch.tensor([[1.0, 1], [1, 1], [0, 1]])
    expected = sum(
        (F.binary_cross_entropy(y, target, reduction="none") * known).sum(1).mean()
        for y in (out.y_global, out.y_local, out.y_fusion)
    )
    l1 = out.saliency.sum(dim=(1, 2, 3)).mean()
    assert objectives.loss("gmic", out, malignant, benign, 0.0) == pytest.approx(float(expected))
    assert objectives.loss("gmic", out, malignant, benign, 0.5) == pytest.approx(
        float(expected + 0.5 * l1)
    )


def test_allconv_schedule_is_top_layers_then_all_at_a_tenth():
    stages = objectives.plan_stages("allconv", 10, 1e-4, None, staged=True)
    assert [(s.name, s.epochs) for s in stages] == [("top", 3), ("all", 7)]
    assert stages[1].lr == pytest.approx(1e-5)
    assert objectives.plan_stages("allconv", 10, 1e-3, None, staged=False)[0].name == "all"
    with pytest.raises(ValueError, match="all-conv models only"):
        objectives.plan_stages("gmic", 10, 1e-5, 2, staged=True)


def test_a_cosine_schedule_anneals_each_stage_from_its_rate():
    stages = objectives.plan_stages("allconv", 7, 1e-3, 3, staged=False)
    at = [objectives.stage_at(stages, e) for e in range(8)]
    assert [(s.name, i) for s, i in at] == [
        ("top", 0), ("top", 1), ("top", 2), ("all", 0), ("all", 1), ("all", 2), ("all", 3),
        ("all", 4),  # an epoch past the plan (a resumed, extended run) stays in the last stage
    ]  # fmt: skip
    lrs = [objectives.epoch_lr(s, i, "cosine") for s, i in at[:7]]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 2.5e-4, 1e-4, 1e-4 * (2 + 2**0.5) / 4, 5e-5,
                                 1e-4 * (2 - 2**0.5) / 4])  # fmt: skip
    assert [objectives.epoch_lr(s, i, "constant") for s, i in at] == [1e-3] * 3 + [1e-4] * 5
    with pytest.raises(ValueError, match="constant, cosine"):
        objectives.epoch_lr(stages[0], 0, "step")


def test_augmentation_is_seeded_and_keeps_the_background():
    x = torch.zeros(2, 1, 64, 48)
    x[:, :, 20:40, 10:30] = 5.0
    x -= 1.0  # background -1, as after a normalisation
    config = AugmentConfig(intensity_shift=0.0)
    a, _ = augment(x, config, torch.Generator().manual_seed(1))
    b, _ = augment(x, config, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a[:, :, :3, :3].allclose(torch.tensor(-1.0))  # corners read as background
    assert not torch.equal(a, x)
    same, _ = augment(x, AugmentConfig(False, False, 0.0, (1.0, 1.0), 0.0), torch.Generator())
    assert same.allclose(x, atol=1e-5)  # identity transform resamples exactly


def test_lesion_masks_move_with_their_images():
    """A mask at a quarter of the input resolution must land where its lesion lands, through
    flips, rotation and zoom."""
    x = torch.zeros(4, 1, 64, 48)
    x[:, :, 8:16, 4:12] = 1.0  # a bright square off-centre
    masks = torch.zeros(4, 2, 16, 12)
    masks[:, 1, 2:4, 1:3] = 255.0  # the same square on the coarse grid
    config = AugmentConfig(intensity_shift=0.0)
    out, moved = augment(x, config, torch.Generator().manual_seed(3), masks)
    assert moved is not None and moved.shape == masks.shape
    for image, mask in zip(out[:, 0], moved[:, 1], strict=True):
        coarse = torch.nn.functional.avg_pool2d(image[None, None], 4)[0, 0]
        peak = torch.nonzero(coarse == coarse.max())[0]
        assert mask[tuple(peak)] > 100, "the mask's lesion is not where the image's lesion is"
    assert moved[:, 0].abs().max() == 0


def test_a_tiny_gmic_trains_end_to_end(tmp_path: Path):
    site = tmp_path / "site"
    write_dataset(site, 8, positive_fraction=0.5, seed=5, rows=512, cols=416)
    architecture = {
        "input_shape": [384, 256],
        "K": 2,
        "crop_shape": [96, 96],
        "percent_t": 0.1,
        "global_width": 4,
        "local_width": 8,
        "attention_dim": 8,
    }
    base = new_model_file(
        tmp_path / "tiny-gmic.safetensors", "gmic", architecture, name="tiny-gmic"
    )
    result = finetune(
        FinetuneOptions(
            site_data=site,
            base=base,
            out=tmp_path / "out.safetensors",
            epochs=1,
            batch_size=4,
            lr=1e-3,
            progress=False,
            n_boot=20,
        )
    )
    assert result.history[0]["train_loss"] > 0
    card = read_card(result.out)
    assert card.family == "gmic" and card.provenance["training"]["beta_saliency_l1"] > 0
    assert card.provenance["training"]["augmentation"]["hflip"] is False
