"""GMIC against the reference outputs of the public implementation (reference/gmic/cases),
loaded the way users will: published-format `.p` → `import_checkpoint` → `load_model`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import get_family, load_model
from models.gmic import GMIC, PRESETS, GMICConfig
from models.gmic.checkpoint import import_checkpoint
from models.gmic.network import max_pool_3x3_stride_2, retrieve_roi, top_t_percent

CASES = ("0_L-CC", "legacy_0_R-CC")
ATOL = {"y_fusion": 1e-5, "y_global": 1e-5, "y_local": 1e-5, "attention": 1e-5, "saliency": 1e-4}
REFERENCE_FILE = {"attention": "patch_attns", "saliency": "saliency_map"}


@pytest.fixture(scope="module")
def gmic_ref(shared_reference: Path) -> Path:
    return shared_reference / "gmic"


@pytest.fixture(scope="module")
def model_file(gmic_ref: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gmic")
    checkpoint = tmp / "random_gmic.p"
    done = subprocess.run(
        [sys.executable, str(gmic_ref / "make_checkpoint.py"), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"make_checkpoint.py failed: {done.stdout}{done.stderr}"
    out = tmp / "gmic.safetensors"
    import_checkpoint(checkpoint, out, sample_model=1, name="random-gmic")
    return out


@pytest.fixture(scope="module")
def model(model_file: Path) -> GMIC:
    return load_model(model_file)


@pytest.fixture(scope="module")
def inputs(gmic_ref: Path) -> torch.Tensor:
    arrays = [np.load(gmic_ref / "cases" / c / "input_compressed.npz")["input"] for c in CASES]
    return torch.from_numpy(np.stack(arrays))[:, None]


@pytest.fixture(scope="module")
def single_outputs(model: GMIC, inputs: torch.Tensor) -> list:
    with torch.no_grad():
        return [model(inputs[i : i + 1]) for i in range(len(CASES))]


@pytest.fixture(scope="module")
def batched_output(model: GMIC, inputs: torch.Tensor):
    with torch.no_grad():
        return model(inputs)


def _reference(gmic_ref: Path, case: str, field: str) -> np.ndarray:
    return np.load(gmic_ref / "cases" / case / f"{REFERENCE_FILE.get(field, field)}.npy")


def test_layout_matches_published_state_dict(gmic_ref: Path) -> None:
    layout = json.loads((gmic_ref / "checkpoint_layout.json").read_text())
    state = GMIC(PRESETS["published"]).state_dict()
    assert [(k, list(v.shape), str(v.dtype)[6:]) for k, v in state.items()] == [
        (t["name"], t["shape"], t["dtype"]) for t in layout["tensors"]
    ]
    config = GMICConfig.from_dict(PRESETS["published"])
    assert config.cam_size == tuple(layout["parameters"]["cam_size"])
    assert config.top_t_count == 28


@pytest.mark.parametrize("index,case", list(enumerate(CASES)))
def test_single_image_matches_reference(gmic_ref, single_outputs, index, case) -> None:
    out = single_outputs[index]
    for field, atol in ATOL.items():
        got = getattr(out, field).numpy()
        np.testing.assert_allclose(
            got, _reference(gmic_ref, case, field), rtol=0, atol=atol, err_msg=f"{case}: {field}"
        )
    np.testing.assert_array_equal(
        out.roi_positions.numpy(), _reference(gmic_ref, case, "patch_locations")
    )


def test_batch_of_two_matches_reference(gmic_ref, batched_output) -> None:
    for i, case in enumerate(CASES):
        for field, atol in ATOL.items():
            got = getattr(batched_output, field)[i : i + 1].numpy()
            np.testing.assert_allclose(
                got,
                _reference(gmic_ref, case, field),
                rtol=0,
                atol=atol,
                err_msg=f"{case} in a batch: {field}",
            )
        np.testing.assert_array_equal(
            batched_output.roi_positions[i : i + 1].numpy(),
            _reference(gmic_ref, case, "patch_locations"),
        )


def test_score_maps_from_reference_output(batched_output) -> None:
    maps = get_family("gmic").score_maps(batched_output)
    assert torch.equal(maps.malignant, batched_output.y_fusion[:, 1])
    assert torch.equal(maps.benign, batched_output.y_fusion[:, 0])
    assert maps.has_benign and maps.maps.shape == (2, 2, 46, 30)
    corners = batched_output.roi_positions.float()
    assert torch.equal(maps.boxes, torch.cat([corners, corners + 256], dim=-1))
    assert torch.equal(maps.box_weights, batched_output.attention)


@pytest.mark.parametrize("case", CASES)
def test_roi_search_and_top_t_on_reference_map(gmic_ref: Path, case: str) -> None:
    """The two non-learned stages alone, on GMIC's own saliency map."""
    saliency = torch.from_numpy(_reference(gmic_ref, case, "saliency"))
    cells = retrieve_roi(saliency, (4, 4), 6)
    np.testing.assert_array_equal(cells.numpy(), _reference(gmic_ref, case, "small_locations"))
    info = json.loads((gmic_ref / "cases" / case / "case.json").read_text())
    for percent_t, expected in info.get("y_global_by_percent_t", {}).items():
        k = GMICConfig.from_dict(dict(PRESETS["published"], percent_t=float(percent_t)))
        got = top_t_percent(saliency, k.top_t_count)[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=percent_t)


# -- the same code on the small "demo" architecture ----------------------------------------


@pytest.fixture(scope="module")
def demo() -> GMIC:
    torch.manual_seed(0)
    return GMIC(PRESETS["demo"])


def test_demo_batch_equals_single_images(demo: GMIC) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1, *demo.config.input_shape)
    demo.eval()
    with torch.no_grad():
        batched = demo(x)
        singles = [demo(x[i : i + 1]) for i in range(2)]
    for i, single in enumerate(singles):
        for field in ("y_global", "y_local", "y_fusion", "saliency", "attention"):
            torch.testing.assert_close(
                getattr(batched, field)[i], getattr(single, field)[0], rtol=0, atol=1e-5
            )
        assert torch.equal(batched.roi_positions[i], single.roi_positions[0])
    assert batched.roi_positions.shape == (2, 4, 2)
    assert batched.saliency.shape == (2, 2, 12, 8)
    assert (batched.roi_positions >= 0).all() and (batched.roi_positions[..., 0] <= 768 - 128).all()
    torch.testing.assert_close(batched.attention.sum(1), torch.ones(2))


def test_demo_trains_through_every_branch(demo: GMIC) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 1, *demo.config.input_shape)
    demo.train()
    demo.zero_grad()
    out = demo(x)
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy
    loss = (
        bce(out.y_fusion, target)
        + bce(out.y_global, target)
        + bce(out.y_local, target)
        + out.saliency.mean()
    )
    loss.backward()
    for name in (
        "ds_net.first_conv.weight",
        "left_postprocess_net.gn_conv_last.weight",
        "dn_resnet.conv1.weight",
        "mil_attn_U.weight",
        "mil_attn_V.weight",
        "mil_attn_w.weight",
        "classifier_linear.weight",
        "fusion_dnn.weight",
    ):
        grad = demo.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    demo.eval()


def test_wrong_input_size_is_refused(demo: GMIC) -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, 768, 512\)"):
        demo(torch.zeros(1, 1, 736, 480))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"cam_size": [23, 15]}, "cam_size [23, 15] does not match input_shape [2944, 1920]"),
        ({"post_processing_dim": 512}, "post_processing_dim 512 does not match"),
        ({"percent_t": 0.0001}, "percent_t 0.0001 keeps no position"),
        ({"crop_shape": [4096, 256]}, "crop_shape [4096, 256] maps to a 64x4 window"),
        ({"colour": "blue"}, "unknown fields ['colour']; known: ['K', "),
        ({"K": "6"}, "K: must be an integer, got '6'"),
        ({"percent_t": True}, "percent_t: must be a number, got True"),
        ({"input_shape": [32, 32]}, "input_shape: must be (height, width), each at least 64"),
        ({"local_blocks": [2, 0]}, r"local_blocks[1]: must be greater than or equal to 1"),
    ],
)
def test_bad_architecture_is_refused(change: dict, message: str) -> None:
    """Strict: no coercion; every refusal names the field, the way a model card reads."""
    with pytest.raises(ValueError) as err:
        GMIC(dict(PRESETS["published"], **change))
    assert str(err.value).startswith("GMIC architecture: ")
    assert message in str(err.value)


def test_config_round_trips_and_is_frozen() -> None:
    config = GMICConfig.from_dict(PRESETS["published"])
    assert config.to_dict() == PRESETS["published"]
    assert config.cam_size == (46, 30) and config.roi_window == (4, 4)
    with pytest.raises(ValueError, match="frozen"):
        config.K = 3


@pytest.mark.parametrize("shape", [(1, 16, 736, 480), (2, 3, 7, 8), (1, 1, 3, 3), (3, 4, 9, 10)])
def test_inference_max_pool_is_max_pool2d(shape: tuple[int, ...]) -> None:
    """The CPU inference path of the global network's first pool gives max_pool2d's values
    bit for bit, odd and even sizes, NaN included."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[..., 1, 1] = float("nan")
    got, want = max_pool_3x3_stride_2(x), torch.nn.functional.max_pool2d(x, 3, stride=2)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
