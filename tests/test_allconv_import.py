"""The Keras `.h5` importer on small files written here in the Keras 2.0.x full-model layout.

The writer below builds `model_config` and `model_weights` the way Keras 2.0.x names and
stores them (nested trunk group, auto-named top layers, HWIO kernels), from a small torch
model with random weights; importing must give back the same function. Weight lists are
written in reverse order so that anything position-based would fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from models.allconv import PRESETS, AllConvNet, ArchitectureConfig, build
from models.allconv.keras_h5 import LICENCE, KerasImportError, import_h5
from models.modelfile import load_model, read_card

SMALL_VGG_TRUNK = {"kind": "vgg", "widths": [4, 8, 8], "blocks": [1, 2, 1]}
SMALL_RES_TOP = {"kind": "resnet", "depths": [8, 8], "repetitions": [2, 1], "enlarge": 2}
ARCHITECTURES = {
    "resnet_zeropad": PRESETS["demo"] | {"input_shape": [160, 128]},
    "resnet_same": PRESETS["demo"]
    | {"trunk": PRESETS["demo"]["trunk"] | {"stem_padding": "same"}, "input_shape": [160, 128]},
    "vgg_512x1_style": {
        "trunk": SMALL_VGG_TRUNK,
        "top": {"kind": "vgg", "depths": [8, 6], "repetitions": [1, 2]},
        "input_shape": [128, 96],
    },
    "vgg_hybrid_style": {"trunk": SMALL_VGG_TRUNK, "top": SMALL_RES_TOP, "input_shape": [128, 96]},
}


# -- a Keras 2.0.x full-model writer (test side) ---------------------------------------------


class _Model:
    """Layers of one Keras (sub)model: config entries and weights by layer name."""

    def __init__(self) -> None:
        self.layers: list[dict[str, Any]] = []
        self.weights: dict[str, list[tuple[str, np.ndarray]]] = {}
        self.counters: dict[str, int] = {}

    def auto(self, prefix: str) -> str:
        self.counters[prefix] = self.counters.get(prefix, 0) + 1
        return f"{prefix}_{self.counters[prefix]}"

    def add(self, cls: str, name: str, inputs: list[str], **config: Any) -> str:
        inbound = [[[i, 0, 0, {}] for i in inputs]] if inputs else []
        config = {"name": name, "trainable": True, **config}
        self.layers.append(
            {"class_name": cls, "config": config, "name": name, "inbound_nodes": inbound}
        )
        return name

    def conv(
        self,
        x: str,
        m: nn.Conv2d,
        name: str | None = None,
        padding: str = "same",
        activation: str = "linear",
    ) -> str:
        name = name or self.auto("conv2d")
        self.weights[name] = [
            ("kernel", m.weight.detach().permute(2, 3, 1, 0).numpy()),
            ("bias", m.bias.detach().numpy()),
        ]
        return self.add(
            "Conv2D",
            name,
            [x],
            filters=m.out_channels,
            kernel_size=list(m.kernel_size),
            strides=list(m.stride),
            padding=padding,
            data_format="channels_last",
            dilation_rate=[1, 1],
            activation=activation,
            use_bias=True,
        )

    def bn(self, x: str, m: nn.BatchNorm2d, name: str | None = None) -> str:
        name = name or self.auto("batch_normalization")
        self.weights[name] = [
            (v, t.detach().numpy())
            for v, t in zip(
                ("gamma", "beta", "moving_mean", "moving_variance"),
                (m.weight, m.bias, m.running_mean, m.running_var),
                strict=True,
            )
        ]
        return self.add(
            "BatchNormalization",
            name,
            [x],
            axis=-1,
            momentum=0.99,
            epsilon=0.001,
            center=True,
            scale=True,
        )

    def relu(self, x: str) -> str:
        return self.add("Activation", self.auto("activation"), [x], activation="relu")

    def dropout(self, x: str) -> str:
        return self.add("Dropout", self.auto("dropout"), [x], rate=0.0)

    def pool(self, x: str, size: int, name: str | None = None) -> str:
        return self.add(
            "MaxPooling2D",
            name or self.auto("max_pooling2d"),
            [x],
            pool_size=[size, size],
            strides=[2, 2],
            padding="valid",
            data_format="channels_last",
        )

    def bottleneck(
        self, x: str, unit: nn.Module, names: dict[str, str] | None = None, dropout: bool = False
    ) -> str:
        """names: role → layer name (trunk); None: Keras auto names (top blocks)."""
        n = names or {}
        y = x
        for i in (1, 2, 3):
            y = self.conv(y, getattr(unit, f"conv{i}"), n.get(f"conv{i}"))
            y = self.bn(y, getattr(unit, f"bn{i}"), n.get(f"bn{i}"))
            if i < 3:
                y = self.relu(y)
                y = self.dropout(y) if dropout else y
        shortcut = x
        if unit.downsample is not None:
            shortcut = self.conv(x, unit.downsample[0], n.get("conv_sc"), padding="valid")
            shortcut = self.bn(shortcut, unit.downsample[1], n.get("bn_sc"))
        out = self.relu(self.add("Add", self.auto("add"), [shortcut, y]))
        return self.dropout(out) if dropout else out

    def config(self, name: str, inputs: str, output: str, cls: str = "Model") -> dict[str, Any]:
        return {
            "class_name": cls,
            "config": {
                "name": name,
                "layers": self.layers,
                "input_layers": [[inputs, 0, 0]],
                "output_layers": [[output, 0, 0]],
            },
        }


def _trunk(model: AllConvNet) -> tuple[_Model, str]:
    t, k = model.trunk, _Model()
    x = k.add("InputLayer", "input_1", [], batch_input_shape=[None, None, None, 3])
    if model.config.trunk.kind == "vgg":
        for b in range(1, t.stages + 1):
            block = getattr(t, f"block{b}")
            for c in range(1, block.convs + 1):
                x = k.conv(x, getattr(block, f"conv{c}"), f"block{b}_conv{c}", activation="relu")
            x = k.pool(x, 2, f"block{b}_pool")
        return k, x
    if t.stem_padding == "zeropad":
        x = k.add("ZeroPadding2D", "zero_padding2d_1", [x], padding=[[3, 3], [3, 3]])
    x = k.conv(x, t.conv1, "conv1", padding="valid" if t.stem_padding == "zeropad" else "same")
    x = k.pool(k.relu(k.bn(x, t.bn1, "bn_conv1")), 3)
    for s in range(1, t.stages + 1):
        for u, unit in enumerate(getattr(t, f"layer{s}")):
            tag = f"{s + 1}{'abcdefghijklmnopqrstuvwxyz'[u]}"
            names = {f"conv{i}": f"res{tag}_branch2{'abc'[i - 1]}" for i in (1, 2, 3)}
            names |= {f"bn{i}": f"bn{tag}_branch2{'abc'[i - 1]}" for i in (1, 2, 3)}
            names |= {"conv_sc": f"res{tag}_branch1", "bn_sc": f"bn{tag}_branch1"}
            x = k.bottleneck(x, unit, names)
    return k, x


def write_keras_h5(model: AllConvNet, path: Path) -> Path:
    trunk, trunk_out = _trunk(model)
    top = _Model()
    rows, cols = model.config.input_shape
    x = top.add("InputLayer", "input_1", [], batch_input_shape=[None, rows, cols, 3])
    nested = trunk.config("model_1", "input_1", trunk_out)
    top.layers.append(nested | {"name": "model_1", "inbound_nodes": [[["input_1", 0, 0, {}]]]})
    x = "model_1"
    for block in model.top:
        if model.config.top.kind == "resnet":
            for unit in block:
                x = top.bottleneck(x, unit, dropout=True)
        else:
            for c in range(1, block.convs + 1):
                x = top.conv(x, getattr(block, f"conv{c}"))
                x = top.dropout(top.relu(top.bn(x, getattr(block, f"bn{c}"))))
            x = top.pool(x, 2)
    x = top.dropout(top.add("GlobalAveragePooling2D", "global_average_pooling2d_1", [x]))
    top.weights["dense_1"] = [
        ("kernel", model.fc.weight.detach().T.numpy()),
        ("bias", model.fc.bias.detach().numpy()),
    ]
    x = top.add("Dense", "dense_1", [x], units=2, activation="softmax", use_bias=True)
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.0.8"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(top.config("model_2", "input_1", x))
        root = f.create_group("model_weights")
        groups = [layer["name"] for layer in top.layers]
        root.attrs["layer_names"] = [n.encode() for n in reversed(groups)]
        for group in groups:
            g = root.create_group(group)
            source = trunk.weights if group == "model_1" else {group: top.weights.get(group, [])}
            names = []
            for layer, variables in source.items():
                for var, value in variables:
                    names.append(f"{layer}/{var}:0")
                    g.create_dataset(names[-1], data=np.asarray(value, dtype=np.float32))
            g.attrs["weight_names"] = [n.encode() for n in reversed(names)]
    return path


def _random_model(architecture: dict[str, Any], seed: int = 0) -> AllConvNet:
    torch.manual_seed(seed)
    model = build(architecture)
    with torch.no_grad():  # BatchNorm that is not the identity, so a mix-up shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture
def demo_h5(tmp_path: Path) -> Path:
    return write_keras_h5(_random_model(ARCHITECTURES["resnet_zeropad"]), tmp_path / "demo.h5")


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(ARCHITECTURES))
def test_round_trip_reproduces_the_model(variant: str, tmp_path: Path) -> None:
    model = _random_model(ARCHITECTURES[variant])
    src = write_keras_h5(model, tmp_path / f"ddsm_{variant}.h5")
    card = import_h5(src, tmp_path / "out.safetensors")
    assert card.architecture == ArchitectureConfig.from_dict(ARCHITECTURES[variant]).to_dict()
    loaded = load_model(tmp_path / "out.safetensors")
    x = torch.randn(2, 3, *ARCHITECTURES[variant]["input_shape"])
    with torch.no_grad():
        want, got = model(x), loaded(x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.cam, want.cam, atol=1e-5, rtol=1e-5)


def test_same_stem_is_taken_from_model_config(tmp_path: Path) -> None:
    """The 'same' stem pads (2, 3); loading its weights as the zeropad stem changes outputs."""
    arch = ARCHITECTURES["resnet_same"]
    model = _random_model(arch)
    card = import_h5(write_keras_h5(model, tmp_path / "s.h5"), tmp_path / "s.safetensors")
    assert card.architecture["trunk"]["stem_padding"] == "same"
    as_zeropad = build(arch | {"trunk": arch["trunk"] | {"stem_padding": "zeropad"}}).eval()
    as_zeropad.load_state_dict(load_model(tmp_path / "s.safetensors").state_dict())
    x = torch.randn(1, 3, *arch["input_shape"])
    with torch.no_grad():
        assert (as_zeropad(x).logits - model(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("rows", [32, 33])
def test_same_stem_pads_like_tensorflow(rows: int) -> None:
    """TF 'SAME' for 7x7/2: total = (ceil(n/2) - 1) * 2 + 7 - n, the odd pixel after."""
    trunk = _random_model(ARCHITECTURES["resnet_same"]).trunk
    x = torch.randn(1, 3, rows, 30)
    total_r, total_c = (-(-rows // 2) - 1) * 2 + 7 - rows, (15 - 1) * 2 + 7 - 30
    padded = nn.functional.pad(
        x, (total_c // 2, total_c - total_c // 2, total_r // 2, total_r - total_r // 2)
    )
    want = nn.functional.conv2d(padded, trunk.conv1.weight, trunk.conv1.bias, stride=2)
    with torch.no_grad():
        got = trunk.conv1(trunk._pad_stem(x))
    assert got.shape[-2:] == (-(-rows // 2), 15)
    torch.testing.assert_close(got, want)


def test_card_records_licence_and_provenance(demo_h5: Path, tmp_path: Path) -> None:
    inbreast = demo_h5.rename(tmp_path / "inbreast_demo.h5")
    card = import_h5(inbreast, tmp_path / "m.safetensors", name="demo", version="7")
    assert read_card(tmp_path / "m.safetensors") == card
    assert (card.family, card.name, card.version) == ("allconv", "demo", "7")
    assert card.licence == LICENCE and "non-commercial" in card.licence
    assert card.clinical_use is False
    assert card.preprocessing["featurewise_mean"] == pytest.approx(44.33)
    assert card.preprocessing["target_size"] == [160, 128]
    prov = card.provenance
    assert prov["source_file"] == "inbreast_demo.h5" and prov["keras_version"] == "2.0.8"
    assert len(prov["source_sha256"]) == 64 and prov["featurewise_mean"] == pytest.approx(44.33)
    given = import_h5(inbreast, tmp_path / "g.safetensors", featurewise_mean=40.0)
    assert given.preprocessing["featurewise_mean"] == 40.0
    assert given.version == prov["source_sha256"][:12]


# -- refusals ------------------------------------------------------------------------------


def _edit_config(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)


def _top_layer(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(la for la in config["config"]["layers"] if la["name"] == name)


def _import_fails(src: Path, tmp_path: Path, *fragments: str) -> None:
    with pytest.raises(KerasImportError) as info:
        import_h5(src, tmp_path / "refused.safetensors")
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not (tmp_path / "refused.safetensors").exists()


def test_refuses_a_file_that_is_not_hdf5(tmp_path: Path) -> None:
    (tmp_path / "x.h5").write_text("not hdf5")
    _import_fails(tmp_path / "x.h5", tmp_path, "not an HDF5 file")


def test_refuses_an_hdf5_file_that_is_not_a_keras_model(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4)))
    _import_fails(tmp_path / "data.h5", tmp_path, "not a Keras full-model file", "model_config")


def test_refuses_an_unsupported_layer_class(demo_h5: Path, tmp_path: Path) -> None:
    _edit_config(
        demo_h5,
        lambda c: _top_layer(c, "global_average_pooling2d_1").update(
            class_name="GlobalMaxPooling2D"
        ),
    )
    _import_fails(
        demo_h5, tmp_path, "'global_average_pooling2d_1'", "GlobalMaxPooling2D", "not supported"
    )


def test_refuses_an_unsupported_activation(demo_h5: Path, tmp_path: Path) -> None:
    _edit_config(
        demo_h5, lambda c: _top_layer(c, "activation_1")["config"].update(activation="sigmoid")
    )
    _import_fails(demo_h5, tmp_path, "activation_1", "'sigmoid'")


def test_refuses_a_single_channel_model(demo_h5: Path, tmp_path: Path) -> None:
    _edit_config(
        demo_h5,
        lambda c: _top_layer(c, "input_1")["config"].update(batch_input_shape=[None, 160, 128, 1]),
    )
    _import_fails(demo_h5, tmp_path, "1 channels", "YaroslavNet")


def test_refuses_a_different_batchnorm_epsilon(demo_h5: Path, tmp_path: Path) -> None:
    _edit_config(
        demo_h5, lambda c: _top_layer(c, "batch_normalization_2")["config"].update(epsilon=1e-5)
    )
    _import_fails(demo_h5, tmp_path, "batch_normalization_2", "epsilon")


@pytest.mark.parametrize("still_listed", [False, True])
def test_refuses_a_missing_weight(still_listed: bool, demo_h5: Path, tmp_path: Path) -> None:
    with h5py.File(demo_h5, "r+") as f:
        group = f["model_weights/model_1"]
        del group["res3a_branch2b/kernel:0"]
        if not still_listed:
            names = [n for n in group.attrs["weight_names"] if n != "res3a_branch2b/kernel:0"]
            assert len(names) == len(group.attrs["weight_names"]) - 1
            group.attrs["weight_names"] = [n.encode() for n in names]
    _import_fails(demo_h5, tmp_path, "model_1/res3a_branch2b/kernel:0", "missing")


def test_refuses_a_wrong_shape(demo_h5: Path, tmp_path: Path) -> None:
    with h5py.File(demo_h5, "r+") as f:
        del f["model_weights/conv2d_2/conv2d_2/kernel:0"]
        wrong = np.zeros((3, 3, 5, 32))
        f["model_weights/conv2d_2"].create_dataset("conv2d_2/kernel:0", data=wrong)
    _import_fails(demo_h5, tmp_path, "conv2d_2/conv2d_2/kernel:0", "(3, 3, 5, 32)")


def test_refuses_weights_that_belong_to_no_layer(demo_h5: Path, tmp_path: Path) -> None:
    with h5py.File(demo_h5, "r+") as f:
        group = f["model_weights/dense_1"]
        group.create_dataset("dense_1/extra:0", data=np.zeros(2))
        names = [*group.attrs["weight_names"], "dense_1/extra:0"]
        group.attrs["weight_names"] = [n.encode() for n in names]
    _import_fails(demo_h5, tmp_path, "dense_1/dense_1/extra", "belong to no layer")


def test_refuses_a_model_without_a_nested_trunk(demo_h5: Path, tmp_path: Path) -> None:
    _edit_config(demo_h5, lambda c: c.update(class_name="Sequential"))
    _import_fails(demo_h5, tmp_path, "Sequential", "nested")


def test_refuses_keras3_inbound_nodes(demo_h5: Path, tmp_path: Path) -> None:
    _edit_config(
        demo_h5,
        lambda c: _top_layer(c, "dense_1").update(inbound_nodes=[{"args": [], "kwargs": {}}]),
    )
    _import_fails(demo_h5, tmp_path, "dense_1", "Keras 3")
