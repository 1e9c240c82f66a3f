"""The all-conv port against the Keras reference case (`shared/reference/allconv/cases/`), and
the network's own invariants (CAM, score maps, presets) that need no reference data.

The reference forward (ResNet50 at 1152x896, 4 flips) takes ~30 s on 2 CPU cores; it runs
once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.allconv import PRESETS, AllConvOutput, ArchitectureError, build, cancer_map
from models.allconv.keras_h5 import import_h5
from models.family import get_family
from models.mammogram import Laterality, Mammogram, View
from models.modelfile import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CASE = SHARED / "reference" / "allconv" / "cases" / "resnet50_zeropad_seed1"
H5 = CASE / "allconv_resnet50_512-512-1024x2_zeropad_seed1.h5"
FLIPS = {"original": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}


def _require_reference() -> None:
    if not H5.is_file():
        pytest.skip(
            f"all-conv reference case not found at {CASE}; it lives in ../shared beside the "
            "repository checkout"
        )


@pytest.fixture(scope="module")
def expected() -> dict:
    _require_reference()
    return json.loads((CASE / "expected.json").read_text())


@pytest.fixture(scope="module")
def probes() -> dict[str, np.ndarray]:
    _require_reference()
    return dict(np.load(CASE / "probes.npz"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):
    """The reference `.h5` through the importer and the model file, as the plugin loads it."""
    _require_reference()
    out = tmp_path_factory.mktemp("allconv") / "reference.safetensors"
    import_h5(H5, out)
    return load_model(out)


@pytest.fixture(scope="module")
def run(imported) -> dict:
    """Preprocess the raw image, run the 4 flips as one batch, capture the probes."""
    raw = np.load(CASE / "input.npz")["raw_uint16"]
    image = Mammogram(
        pixels=raw.astype(np.float32),
        laterality=Laterality.LEFT,
        view=View.CC,
        bits_stored=16,
        sop_instance_uid="1.2.3",
        series_instance_uid="1.2",
        study_instance_uid="1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
    )
    family = get_family("allconv")
    x = family.preprocess(image, imported.card.preprocessing).tensor[None]
    batch = torch.cat([torch.flip(x, dims) if dims else x for dims in FLIPS.values()])
    captured: dict[str, torch.Tensor] = {}

    def keep(name_in: str | None, name_out: str):
        def hook(module, inputs, output):
            if name_in:
                captured[name_in] = inputs[0][0].clone()
            captured[name_out] = output[0].clone()

        return hook

    hooks = [
        imported.trunk.maxpool.register_forward_hook(keep("stem_relu", "pool1")),
        imported.top[0].register_forward_hook(keep("trunk_out", "block1_out")),
        imported.top.register_forward_hook(keep(None, "features")),
    ]
    try:
        with torch.no_grad():
            output = imported(batch)
    finally:
        for h in hooks:
            h.remove()
    gap = captured.pop("features").mean(dim=(1, 2))
    return {"output": output, "family": family, "gap": gap, **captured}


def _corners(chw: torch.Tensor) -> np.ndarray:
    hwc = chw.permute(1, 2, 0).numpy()
    return np.stack([hwc[:8, :8], hwc[:8, -8:], hwc[-8:, :8], hwc[-8:, -8:]])


def test_importer_reads_the_reference_architecture(imported, expected) -> None:
    assert imported.card.architecture == PRESETS["resnet50"]
    n_params = sum(p.numel() for p in imported.parameters())
    n_stats = sum(b.numel() for k, b in imported.named_buffers() if "running" in k)
    assert n_params + n_stats == expected["params"]["total"]
    assert n_stats == expected["params"]["bn_moving_stats"]
    assert imported.card.provenance["source_sha256"] == expected["h5_sha256"]


@pytest.mark.slow
def test_probabilities_single_image_each_flip_and_tta_mean(run, expected) -> None:
    probs = run["output"].probabilities.double().numpy()
    np.testing.assert_allclose(probs[0], expected["probs"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs, expected["tta_probs"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.mean(axis=0), expected["tta_mean"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_logits_and_gap(run, expected, probes) -> None:
    logits = run["output"].logits[0].double().numpy()
    np.testing.assert_allclose(logits, expected["logits_float64"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, probes["logits"], atol=1e-4, rtol=0)
    # The CAM's spatial mean is the logits; GAP itself comes from the last feature map.
    cam = run["output"].cam[0].double()
    np.testing.assert_allclose(cam.mean(dim=(1, 2)).numpy(), logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gap(run, probes) -> None:
    np.testing.assert_allclose(run["gap"].numpy(), probes["gap"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stem_and_pool_corners(run, expected, probes) -> None:
    assert tuple(run["stem_relu"].shape) == (64, *expected["probe_shapes"]["stem_relu"][:2])
    assert tuple(run["pool1"].shape) == (64, *expected["probe_shapes"]["pool1"][:2])
    np.testing.assert_allclose(_corners(run["stem_relu"]), probes["stem_relu_corners"], atol=1e-4)
    np.testing.assert_allclose(_corners(run["pool1"]), probes["pool1_corners"], atol=1e-4)


@pytest.mark.slow
def test_trunk_and_first_block_features(run, probes) -> None:
    trunk = run["trunk_out"][:16].permute(1, 2, 0).numpy()
    block1 = run["block1_out"][:64].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(trunk, probes["trunk_out_ch0_15"], atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(block1, probes["block1_out_ch0_63"], atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_score_maps_on_the_reference(run) -> None:
    output, family = run["output"], run["family"]
    scores = family.score_maps(output)
    torch.testing.assert_close(scores.malignant, output.probabilities[:, 1])
    assert scores.maps.shape == (4, 2, 9, 7) and not scores.has_benign and scores.benign is None
    assert torch.equal(scores.maps[:, 0], scores.maps[:, 1])


# -- invariants without reference data ------------------------------------------------------


@pytest.fixture(scope="module")
def demo_output() -> AllConvOutput:
    torch.manual_seed(0)
    model = build(PRESETS["demo"]).eval()
    with torch.no_grad():
        return model(torch.randn(3, 3, *PRESETS["demo"]["input_shape"]))


def test_cam_mean_is_the_logits(demo_output: AllConvOutput) -> None:
    assert demo_output.cam.shape == (3, 2, 5, 4)
    torch.testing.assert_close(demo_output.cam.mean(dim=(2, 3)), demo_output.logits)
    torch.testing.assert_close(demo_output.probabilities, demo_output.logits.softmax(dim=1))


def test_score_maps_are_cancer_probabilities_with_one_peak_box(demo_output) -> None:
    scores = get_family("allconv").score_maps(demo_output)
    prob = cancer_map(demo_output)
    torch.testing.assert_close(prob, demo_output.cam.softmax(dim=1)[:, 1])
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    assert scores.maps.shape == (3, 2, 5, 4) and torch.equal(scores.maps[:, 1], prob)
    assert scores.boxes.shape == (3, 1, 4) and scores.box_weights.shape == (3, 1)
    for i in range(3):
        r, c = divmod(int(prob[i].flatten().argmax()), 4)
        cell_h, cell_w = 576 / 5, 448 / 4
        expected = [r * cell_h, c * cell_w, (r + 1) * cell_h, (c + 1) * cell_w]
        torch.testing.assert_close(scores.boxes[i, 0], torch.tensor(expected))
        assert float(scores.box_weights[i, 0]) == pytest.approx(float(prob[i].max()))


def test_published_parameter_counts() -> None:
    """Keras' counts (BN moving statistics included) from the reference notes."""
    for preset, total in (("resnet50", 40_942_466), ("vgg16", 19_439_426)):
        model = build(PRESETS[preset])
        assert (
            sum(
                t.numel()
                for k, t in model.state_dict().items()
                if not k.endswith("num_batches_tracked")
            )
            == total
        )


def test_family_round_trips_its_presets() -> None:
    family = get_family("allconv")
    for preset in PRESETS.values():
        spec = family.default_preprocessing(preset)
        assert spec["target_size"] == preset["input_shape"]
    model = family.build(PRESETS["demo"])
    assert type(model).__name__ == "AllConvNet"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"trunk": PRESETS["vgg16"]["trunk"] | {"stem_padding": "same"}},
            "trunk: unknown fields ['stem_padding'] for kind 'vgg'; known: ['blocks', 'kind', "
            "'widths']",
        ),
        (
            {"top": {"kind": "vgg", "depths": [32], "repetitions": [1], "enlarge": 2}},
            "top: unknown fields ['enlarge'] for kind 'vgg'",
        ),
        (
            {"trunk": PRESETS["demo"]["trunk"] | {"stem_padding": "valid"}},
            "trunk.stem_padding: must be 'zeropad' or 'same', got 'valid'",
        ),
        (
            {"top": PRESETS["demo"]["top"] | {"repetitions": [1]}},
            "top: depths and repetitions need the same length",
        ),
        ({"top": PRESETS["demo"]["top"] | {"depths": []}}, "top.depths: must have at least 1"),
        (
            {"top": {"kind": "dense", "depths": [2], "repetitions": [1]}},
            "top.kind: must be one of 'resnet', 'vgg', got 'dense'",
        ),
        ({"trunk": None}, "trunk: must be an object, got None"),
        ({"input_shape": [576, "448"]}, "input_shape[1]: must be an integer, got '448'"),
    ],
)
def test_bad_architecture_configs_are_refused(edit: dict, message: str) -> None:
    """One config type per kind: a field of another kind is an error, never ignored."""
    with pytest.raises(ArchitectureError) as err:
        build(PRESETS["demo"] | edit)
    assert str(err.value).startswith("all-conv architecture: ")
    assert message in str(err.value)
