"""GlimpseNet: MIL pooling against hand-computed values and limits, glimpse NMS against a
brute-force reference, geometry round trips of the mask and the glimpses, Inception V3's
parameter names and the ImageNet importer, model-file round trip. About 15 s on 2 cores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import get_family, load_model, new_model_file, read_card
from models.geometry import Geometry, Resize
from models.glimpsenet import (
    PRESETS,
    GlimpseNet,
    InceptionImportError,
    InceptionV3,
    PreprocessSpec,
    mil,
)
from models.glimpsenet import import_imagenet_state_dict as import_imagenet
from models.glimpsenet.glimpses import box_iou, crop_glimpses, greedy_nms, select_glimpses
from models.reading import read_mammogram

DEMO = Path(__file__).parents[1] / "models/weights/demo-glimpsenet.safetensors"


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- MIL pooling ----------------------------------------------------------------------------


def test_lse_matches_the_formula_by_hand():
    p = torch.tensor([[[0.2, 0.9, 0.1], [0.8, 0.3, 0.6]]], dtype=torch.float64)
    got = mil.lse_pool(p, r=5.0)[0]
    for i, (a, b) in enumerate([(0.2, 0.8), (0.9, 0.3), (0.1, 0.6)]):
        want = math.log((math.exp(5 * a) + math.exp(5 * b)) / 2) / 5
        assert got[i].item() == pytest.approx(want, abs=1e-12)


def test_lse_tends_to_max_for_large_r_and_to_mean_for_small_r():
    p = torch.rand(4, 7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(mil.lse_pool(p, r=1e5), p.amax(1), atol=1e-4)
    assert torch.allclose(mil.lse_pool(p, r=1e-6), p.mean(1), atol=1e-6)
    # Monotone in r, between the mean and the max.
    values = [mil.lse_pool(p, r=r) for r in (0.5, 5.0, 50.0)]
    assert (values[0] <= values[1] + 1e-12).all() and (values[1] <= values[2] + 1e-12).all()


def test_noisy_and_by_hand_and_at_its_ends():
    p = torch.tensor([[[0.2], [0.6]]], dtype=torch.float64)  # mean 0.4
    a, b = 10.0, 0.2
    want = (_sig(a * (0.4 - b)) - _sig(-a * b)) / (_sig(a * (1 - b)) - _sig(-a * b))
    assert mil.noisy_and_pool(p, a, b).item() == pytest.approx(want, abs=1e-12)
    assert mil.noisy_and_pool(torch.zeros(2, 5, 3), a, b).abs().max() < 1e-6
    assert (mil.noisy_and_pool(torch.ones(2, 5, 3), a, b) - 1).abs().max() < 1e-6


def test_topk_uses_the_malignant_class_to_pick_the_same_instances_for_all_classes():
    p = torch.tensor(
        [[[0.9, 0.9, 0.1], [0.1, 0.2, 0.8], [0.5, 0.4, 0.7], [0.3, 0.6, 0.2], [0.0, 0.1, 0.6]]]
    )
    # Malignant (index 2) picks instances 1, 2, 4.
    want = torch.tensor([(0.1 + 0.5 + 0.0) / 3, (0.2 + 0.4 + 0.1) / 3, (0.8 + 0.7 + 0.6) / 3])
    assert torch.allclose(mil.topk_pool(p, k=3, by=2)[0], want)
    assert torch.allclose(mil.topk_pool(p, k=5), p.mean(1))
    assert torch.allclose(mil.topk_pool(p, k=1), p[:, 1])


def test_pooling_refuses_bad_arguments():
    p = torch.rand(1, 2, 3)
    with pytest.raises(ValueError, match="k <= 2"):
        mil.topk_pool(p, k=3)
    with pytest.raises(ValueError, match="r > 0"):
        mil.lse_pool(p, r=0)
    with pytest.raises(ValueError, match="unknown MIL pooling"):
        mil.pool(p, {"kind": "max"})


# -- glimpse selection ------------------------------------------------------------------------


def _brute_force_nms(scores: list[float], boxes: list[list[float]], iou: float, keep: int):
    def inter_over_union(a, b):
        h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        return h * w / (area(a) + area(b) - h * w)

    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(inter_over_union(boxes[i], boxes[j]) <= iou for j in kept):
            kept.append(i)
    return kept[:keep]


@pytest.mark.parametrize("seed", range(20))
def test_greedy_nms_matches_a_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = 60
    top_left = torch.randint(0, 40, (n, 2), generator=g).float()
    size = torch.randint(4, 20, (n, 2), generator=g).float()
    boxes = torch.cat([top_left, top_left + size], 1)
    scores = torch.randint(0, 10, (n,), generator=g).float()  # many ties
    got = greedy_nms(scores, boxes, 0.5, 8).tolist()
    assert got == _brute_force_nms(scores.tolist(), boxes.tolist(), 0.5, 8)


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 5.0, 10.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0]]))


def test_glimpses_go_to_the_bright_spots_in_fp32_even_under_autocast():
    mask = torch.zeros(1, 1, 64, 64)
    mask[0, 0, 40:48, 8:16] = 1.0
    mask[0, 0, 4:12, 48:56] = 0.9
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, scores = select_glimpses(mask, window=8, stride=4, count=3)
    assert boxes.dtype == torch.float32 and scores.dtype == torch.float32
    assert boxes[0, 0].tolist() == [40, 8, 48, 16]
    assert boxes[0, 1].tolist() == [4, 48, 12, 56]
    # Third: a half-overlapping neighbour of the first (IoU 1/3 is allowed); of the two equal
    # ones, the first in row-major order.
    assert boxes[0, 2].tolist() == [36, 8, 44, 16]
    assert scores[0].tolist() == pytest.approx([1.0, 0.9, 0.5])
    # Kept glimpses overlap at most IoU 0.5.
    iou = box_iou(boxes[0], boxes[0]) - torch.eye(3)
    assert iou.max() <= 0.5


def test_a_small_mask_still_yields_every_glimpse():
    boxes, _ = select_glimpses(torch.rand(2, 1, 8, 8), window=8, stride=4, count=1)
    assert boxes.shape == (2, 1, 4)
    with pytest.raises(ValueError, match="candidate windows"):
        select_glimpses(torch.rand(1, 1, 8, 8), window=8, stride=4, count=2)


def test_crops_come_from_the_full_resolution_input():
    image = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32)
    boxes = torch.tensor([[[4.0, 8.0, 12.0, 16.0]]])
    crops = crop_glimpses(image, boxes, 8)
    assert torch.equal(crops[0, 0], image[0, :, 4:12, 8:16])


# -- geometry: mask and glimpses back on the source grid --------------------------------------


def test_mask_peak_and_glimpse_boxes_map_back_to_the_source(synth_exam_small):
    fam = get_family("glimpsenet")
    spec = fam.default_preprocessing(PRESETS["demo"])
    image = read_mammogram(synth_exam_small.image("L-CC").dataset)
    prepared = fam.preprocess(image, spec)
    assert prepared.tensor.shape == (1, 512, 512)
    assert prepared.geometry == Geometry(image.shape, (Resize(512, 512),))
    rows, cols = image.shape
    # A lesion mask on the source, taken onto the FCGN grid and back, peaks where it was.
    lesion = np.zeros(image.shape, np.float32)
    lesion[300:320, 100:120] = 1.0
    on_grid = prepared.geometry.area_to_input(lesion, (128, 128))
    back = prepared.geometry.map_to_source(on_grid)
    r, c = np.unravel_index(np.argmax(back), back.shape)
    assert 296 <= r < 324 and 96 <= c < 124
    # A glimpse box on the input grid maps to the source and back unchanged.
    box = (128.0, 256.0, 192.0, 320.0)
    source = prepared.geometry.box_to_source(box)
    assert source == pytest.approx((128 * rows / 512, 256 * cols / 512, 192 * rows / 512,
                                    320 * cols / 512))  # fmt: skip
    again = prepared.geometry.to_input([source[:2], source[2:]])
    assert again.ravel() == pytest.approx(box)


# -- Inception V3 -----------------------------------------------------------------------------


def test_inception_has_torchvisions_names_and_trunk_size():
    trunk = InceptionV3(1.0)
    keys = set(trunk.state_dict())
    for key in (
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6a.branch3x3dbl_3.bn.bias",
        "Mixed_6e.branch7x7dbl_5.conv.weight",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.num_batches_tracked",
    ):
        assert key in keys
    # torchvision's inception_v3 has 27,161,264 parameters; without fc (2,049,000) and
    # AuxLogits (3,326,696) that leaves the trunk's 21,785,568.
    assert sum(p.numel() for p in trunk.parameters()) == 21_785_568
    assert trunk.features == 2048
    assert trunk.Mixed_6e.branch7x7_3.conv.weight.shape == (192, 192, 7, 1)


def test_imagenet_importer_loads_by_name_and_refuses_a_mismatch(tmp_path):
    torch.manual_seed(0)
    source = InceptionV3(1.0)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    target = InceptionV3(1.0)
    unused = import_imagenet(target, path)
    assert unused == ["AuxLogits.fc.weight", "fc.weight"]
    assert torch.equal(target.Mixed_7c.branch_pool.conv.weight,
                       source.Mixed_7c.branch_pool.conv.weight)  # fmt: skip
    del state["module.Mixed_5b.branch1x1.conv.weight"]
    torch.save(state, path)
    with pytest.raises(InceptionImportError, match="missing"):
        import_imagenet(InceptionV3(1.0), path)
    with pytest.raises(InceptionImportError, match="full-width"):
        import_imagenet(InceptionV3(0.5), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionImportError, match="weights_only"):
        import_imagenet(InceptionV3(1.0), path)


# -- the model ---------------------------------------------------------------------------------


def test_fcgn_batch_norm_starts_at_scale_one_shift_001():
    model = GlimpseNet(PRESETS["demo"])
    bns = [m for m in model.fcgn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 2 * len(PRESETS["demo"]["fcgn"]["widths"])
    assert all((bn.weight == 1).all() and torch.allclose(bn.bias, torch.tensor(0.01)) for bn in bns)


def test_unshuffled_fcgn_input_keeps_a_speck_that_averaging_dilutes():
    """The demo's FCGN sees each 4x4 block as 16 channels: a one-pixel speck reaches the first
    convolution at full contrast, where the paper's averaged input holds a sixteenth of it.
    An architecture without `fcgn.input` (every card written before it) averages."""
    x = torch.zeros(1, 1, 512, 512)
    x[0, 0, 201, 302] = 1.0
    unshuffled = GlimpseNet(PRESETS["demo"])
    assert PRESETS["demo"]["fcgn"]["input"] == "unshuffle"
    assert unshuffled.fcgn_input(x).shape == (1, 16, 128, 128)
    assert unshuffled.fcgn_input(x)[0, :, 50, 75].max() == 1.0
    older = {k: v for k, v in PRESETS["demo"]["fcgn"].items() if k != "input"}
    averaged = GlimpseNet({**PRESETS["demo"], "fcgn": older})
    assert averaged.fcgn_input(x).shape == (1, 1, 128, 128)
    assert averaged.fcgn_input(x)[0, 0, 50, 75] == 1.0 / 16
    with torch.no_grad():
        assert unshuffled.eval()(x).mask.shape == averaged.eval()(x).mask.shape == (1, 1, 128, 128)


def test_model_file_round_trip_and_score_maps(tmp_path, synth_exam_small):
    torch.manual_seed(3)
    path = new_model_file(tmp_path / "gn.safetensors", "glimpsenet", PRESETS["demo"], name="gn")
    card = read_card(path)
    assert card.family == "glimpsenet" and card.architecture["pooling"] == {"kind": "lse", "r": 5.0}
    model = load_model(path)
    fam = get_family("glimpsenet")
    x = torch.stack(
        [fam.preprocess(read_mammogram(im.dataset), card.preprocessing).tensor
         for im in synth_exam_small.images[:2]]
    )  # fmt: skip
    with torch.no_grad():
        out = model(x)
        again = load_model(path)(x)
    assert torch.equal(out.probabilities, again.probabilities)
    assert torch.equal(out.boxes, again.boxes)
    maps = fam.score_maps(out)
    assert maps.maps.shape == (2, 2, 128, 128) and maps.boxes.shape == (2, 8, 4)
    p = out.probabilities
    assert torch.allclose(maps.malignant, p[:, 2])
    assert torch.allclose(maps.benign, 1 - (1 - p[:, 0]) * (1 - p[:, 1]))
    assert torch.allclose(maps.box_weights, out.glimpse_probabilities[:, :, 2])
    assert ((maps.boxes >= 0) & (maps.boxes <= 512)).all()


def test_bf16_keeps_the_mask_and_the_glimpses(synth_exam_small):
    """The FCGN runs in fp32 under autocast (its mask picks the glimpses); only the classifier
    runs at the reduced precision. The shipped demo, so that the mask has real peaks."""
    model = load_model(DEMO).eval()
    fam = get_family("glimpsenet")
    spec = read_card(DEMO).preprocessing
    x = torch.stack([fam.preprocess(read_mammogram(im.dataset), spec).tensor
                     for im in synth_exam_small.images])  # fmt: skip
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
    assert bf16.mask.dtype == torch.float32 and torch.equal(bf16.mask, fp32.mask)
    assert torch.equal(bf16.boxes, fp32.boxes)
    assert not torch.equal(bf16.glimpse_probabilities, fp32.glimpse_probabilities)
    np.testing.assert_allclose(bf16.probabilities, fp32.probabilities, atol=0.05)


def test_bad_architectures_are_refused_with_the_reason():
    arch = {**PRESETS["demo"], "fcgn_size": 100}
    with pytest.raises(ValueError, match="divisible"):
        GlimpseNet(arch)
    arch = {**PRESETS["demo"], "glimpses": {**PRESETS["demo"]["glimpses"], "size": 64}}
    with pytest.raises(ValueError, match="at least 75"):
        GlimpseNet(arch)
    arch = {**PRESETS["demo"], "pooling": {"kind": "topk", "k": 9}}
    with pytest.raises(ValueError, match="k <= 8"):
        GlimpseNet(arch)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pooling": {"kind": "lse", "k": 3}}, "pooling: unknown fields ['k'] for kind 'lse'"),
        ({"pooling": {"kind": "max"}}, "pooling.kind: must be one of 'lse', 'noisy_and', 'topk'"),
        ({"scale": 4.0}, "scale: must be an integer, got 4.0"),
        ({"classifier": {"width": 0.125}}, "classifier: missing fields ['dropout']"),
        ({"fcgn": {**PRESETS["demo"]["fcgn"], "kernels": [4]}}, "fcgn: needs one odd kernel"),
        ({"fcgn": {**PRESETS["demo"]["fcgn"], "input": "max"}}, "fcgn.input: "),
    ],
)
def test_config_is_strict_and_names_the_field(change: dict, message: str):
    """One config type per pooling kind; no coercion; the message names the field."""
    with pytest.raises(ValueError) as err:
        GlimpseNet({**PRESETS["demo"], **change})
    assert str(err.value).startswith("GlimpseNet architecture: ")
    assert message in str(err.value)


def test_preprocessing_spec_is_strict():
    assert get_family("glimpsenet").default_preprocessing(PRESETS["demo"]) == {
        "size": 512,
        "mean": "image",
    }
    for spec, message in (
        ({"size": "512"}, "GlimpseNet preprocessing: size: must be an integer, got '512'"),
        ({"size": 512, "mean": "auto"}, "mean: must be \"image\" or a number, got 'auto'"),
        ({"size": 512, "clahe": True}, "unknown fields ['clahe']; known: ['mean', 'size']"),
    ):
        with pytest.raises(ValueError) as err:
            PreprocessSpec.from_dict(spec)
        assert message in str(err.value)
