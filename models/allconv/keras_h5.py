"""Import the published Keras 2.0.x full-model `.h5` files of Shen et al. into a model file.

The structure comes from the file's `model_config`, walked as a graph: a nested patch-classifier
trunk (ResNet50-style bottleneck stages or VGG16-style conv blocks), residual or VGG top blocks,
then GlobalAveragePooling2D → Dense(2, softmax). Anything else is refused, naming the layer.
Weights are then looked up by Keras layer name and variable name, never by position (the
nested trunk stores all trainable weights before all moving statistics, and `layer_names` is
in depth order), converted (HWIO → OIHW, dense kernel transposed), and checked for shape.
Dropout is skipped: it is the identity at inference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from ..modelfile import ModelCard, file_sha256, save_model
from .network import AllConvNet, ArchitectureConfig, ArchitectureError, ResNetTrunkConfig
from .preprocess import DDSM_MEAN, INBREAST_MEAN, PreprocessSpec

LICENCE = "CC BY-NC-SA 4.0 (published weights, lishen/end2end-all-conv); non-commercial use only"
_MODEL_CLASSES = ("Model", "Functional")
_TRUNK_CLASSES = {
    "InputLayer",
    "ZeroPadding2D",
    "Conv2D",
    "BatchNormalization",
    "Activation",
    "MaxPooling2D",
    "Add",
    "Dropout",
}
_TOP_CLASSES = _TRUNK_CLASSES | {"GlobalAveragePooling2D", "Dense"} | set(_MODEL_CLASSES)


class KerasImportError(ValueError):
    """A `.h5` file this importer cannot convert; the message says what and what to do."""


# -- the Keras graph ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    name: str
    cls: str
    config: dict[str, Any]
    inputs: tuple[str, ...]


class _Graph:
    """One (sub)model of `model_config`, with Dropout layers bypassed."""

    def __init__(self, model: dict[str, Any], where: str, allowed: set[str]) -> None:
        self.where = where
        config = model.get("config", {})
        raw = {}
        for entry in config.get("layers", []):
            cls = entry.get("class_name")
            name = entry.get("name") or entry.get("config", {}).get("name")
            if cls not in allowed:
                raise KerasImportError(
                    f"{where}: layer '{name}' of class {cls} is not supported by the all-conv "
                    f"importer (supported: {', '.join(sorted(allowed))})"
                )
            raw[name] = _Layer(name, cls, entry.get("config", {}), _inbound(entry, where))
        skip = {n: layer.inputs[0] for n, layer in raw.items() if layer.cls == "Dropout"}

        def resolve(name: str) -> str:
            while name in skip:
                name = skip[name]
            return name

        self.layers = {
            n: _Layer(n, layer.cls, layer.config, tuple(resolve(i) for i in layer.inputs))
            for n, layer in raw.items()
            if layer.cls != "Dropout"
        }
        self._consumers: dict[str, list[str]] = {n: [] for n in self.layers}
        for layer in self.layers.values():
            for i in layer.inputs:
                if i not in self.layers:
                    raise KerasImportError(f"{where}: layer '{layer.name}' reads unknown '{i}'")
                self._consumers[i].append(layer.name)
        inputs = [resolve(i[0]) for i in config.get("input_layers", [])]
        outputs = [resolve(o[0]) for o in config.get("output_layers", [])]
        if len(inputs) != 1 or len(outputs) != 1:
            raise KerasImportError(
                f"{where}: expected one input and one output, found inputs {inputs} and "
                f"outputs {outputs}"
            )
        self.input, self.output = inputs[0], outputs[0]

    def __getitem__(self, name: str) -> _Layer:
        return self.layers[name]

    def consumers(self, name: str) -> list[_Layer]:
        return [self.layers[c] for c in self._consumers[name]]

    def next(self, name: str, *classes: str) -> _Layer:
        """The single layer reading `name`, which must be of one of `classes`."""
        found = self.consumers(name)
        if len(found) != 1:
            got = ", ".join(f"'{c.name}' ({c.cls})" for c in found) or "nothing"
            raise KerasImportError(
                f"{self.where}: expected one {' or '.join(classes)} layer after '{name}', "
                f"found {got}; this structure is not an all-conv model the importer supports"
            )
        return self.expect(found[0], *classes)

    def expect(self, layer: _Layer, *classes: str) -> _Layer:
        if layer.cls not in classes:
            raise KerasImportError(
                f"{self.where}: layer '{layer.name}' is a {layer.cls} where the all-conv "
                f"architecture has a {' or '.join(classes)}; this model is not supported"
            )
        return layer


def _inbound(entry: dict[str, Any], where: str) -> tuple[str, ...]:
    nodes = entry.get("inbound_nodes", [])
    if not nodes:
        return ()
    if len(nodes) > 1:
        raise KerasImportError(
            f"{where}: layer '{entry.get('name')}' is shared (called {len(nodes)} times); "
            "shared layers are not supported"
        )
    if not isinstance(nodes[0], list) or not all(
        isinstance(t, list) and t and isinstance(t[0], str) for t in nodes[0]
    ):
        raise KerasImportError(
            f"{where}: layer '{entry.get('name')}' has inbound_nodes in a format this importer "
            "does not read (Keras 3?); save the model with Keras 2.x or tf-keras"
        )
    return tuple(t[0] for t in nodes[0])


def _relu(g: _Graph, layer: _Layer) -> _Layer:
    g.expect(layer, "Activation")
    if layer.config.get("activation") != "relu":
        raise KerasImportError(
            f"{g.where}: activation '{layer.name}' is {layer.config.get('activation')!r}; "
            "only 'relu' is supported"
        )
    return layer


def _pair(value: Any) -> tuple[int, int]:
    """A Keras size/stride setting as (rows, cols); (0, 0) when absent, which never matches."""
    if value is None:
        return (0, 0)
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


# -- structure → architecture + name mapping ------------------------------------------------


@dataclass(frozen=True)
class _Weights:
    """One Keras layer with weights, the HDF5 group holding it and the torch module it fills."""

    prefix: str
    layer: _Layer
    group: str
    activation: str = "linear"
    """What the Keras layer's own `activation` must be (VGG trunk convs carry their ReLU)."""
    stem: bool = False


@dataclass(frozen=True)
class _Unit:
    conv1: _Layer
    bn1: _Layer
    conv2: _Layer
    bn2: _Layer
    conv3: _Layer
    bn3: _Layer
    shortcut: tuple[_Layer, _Layer] | None

    def weights(self, prefix: str, group: str | None) -> Iterator[_Weights]:
        """`group` None: each layer is its own HDF5 group (top-level layers)."""
        roles = [(r, getattr(self, r)) for r in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")]
        if self.shortcut is not None:
            roles += [("downsample.0", self.shortcut[0]), ("downsample.1", self.shortcut[1])]
        for role, layer in roles:
            yield _Weights(f"{prefix}.{role}", layer, group or layer.name)


_Convs = list[tuple[_Layer, _Layer | None]]


def _residual_unit(g: _Graph, x: str) -> tuple[_Unit, str]:
    """Parse one bottleneck unit reading `x`; return it and the name of its output ReLU."""
    starts = g.consumers(x)
    if len(starts) != 2:
        got = ", ".join(f"'{c.name}' ({c.cls})" for c in starts) or "nothing"
        raise KerasImportError(
            f"{g.where}: expected a residual unit (two branches) after '{x}', found {got}"
        )
    branches = []
    for layer in starts:
        chain = []
        while layer.cls != "Add" and len(chain) < 8:
            chain.append(layer)
            layer = g.next(layer.name, "Conv2D", "BatchNormalization", "Activation", "Add")
        branches.append((chain, layer))
    (chain_a, add), (chain_b, add_b) = branches
    if add.cls != "Add" or add.name != add_b.name or len(add.inputs) != 2:
        raise KerasImportError(
            f"{g.where}: the two branches after '{x}' do not meet in one two-input Add layer"
        )
    residual, shortcut = (chain_a, chain_b) if len(chain_a) > len(chain_b) else (chain_b, chain_a)
    if [la.cls for la in residual] != ["Conv2D", "BatchNormalization", "Activation"] * 2 + [
        "Conv2D",
        "BatchNormalization",
    ]:
        raise KerasImportError(
            f"{g.where}: the residual branch after '{x}' is "
            f"{[f'{la.name} ({la.cls})' for la in residual]}; only the bottleneck "
            "Conv-BN-ReLU-Conv-BN-ReLU-Conv-BN branch is supported"
        )
    _relu(g, residual[2])
    _relu(g, residual[5])
    if [la.cls for la in shortcut] not in ([], ["Conv2D", "BatchNormalization"]):
        raise KerasImportError(
            f"{g.where}: the shortcut after '{x}' is {[la.name for la in shortcut]}; only an "
            "identity or a Conv + BatchNormalization projection is supported"
        )
    out = _relu(g, g.next(add.name, "Activation"))
    unit = _Unit(
        *residual[0:2],
        *residual[3:5],
        *residual[6:8],
        shortcut=(shortcut[0], shortcut[1]) if shortcut else None,
    )
    return unit, out.name


def _vgg_block(g: _Graph, x: str, with_bn: bool) -> tuple[_Convs, str]:
    """Parse convs (→ BN → ReLU) up to a 2x2/2 'valid' max pool; return them and the pool."""
    convs: _Convs = []
    layer = g.next(x, "Conv2D")
    while layer.cls == "Conv2D":
        conv, bn = layer, None
        if with_bn:
            bn = g.next(conv.name, "BatchNormalization")
            layer = _relu(g, g.next(bn.name, "Activation"))
        convs.append((conv, bn))
        layer = g.next(layer.name, "Conv2D", "MaxPooling2D")
    _check_pool(g, layer, 2)
    return convs, layer.name


def _check_pool(g: _Graph, pool: _Layer, size: int) -> None:
    cfg = pool.config
    if (_pair(cfg.get("pool_size")), _pair(cfg.get("strides")), cfg.get("padding")) != (
        (size, size),
        (2, 2),
        "valid",
    ):
        raise KerasImportError(
            f"{g.where}: max pool '{pool.name}' is {cfg.get('pool_size')} / stride "
            f"{cfg.get('strides')} / '{cfg.get('padding')}'; the architecture needs "
            f"{size}x{size} / stride 2 / 'valid' here"
        )


def _stages(units: list[_Unit], where: str) -> list[list[_Unit]]:
    """Split units into stages, each starting at a projection unit."""
    stages: list[list[_Unit]] = []
    for unit in units:
        if unit.shortcut is not None:
            stages.append([])
        elif not stages:
            raise KerasImportError(f"{where}: the first residual unit has no projection shortcut")
        stages[-1].append(unit)
    return stages


def _parse_resnet_trunk(
    g: _Graph, conv1: _Layer, stem_padding: str
) -> tuple[dict[str, Any], list[_Weights]]:
    bn = g.next(conv1.name, "BatchNormalization")
    pool = g.next(_relu(g, g.next(bn.name, "Activation")).name, "MaxPooling2D")
    _check_pool(g, pool, 3)
    if g[g.output].cls != "Activation":
        raise KerasImportError(
            f"{g.where}: the trunk ends at '{g.output}' ({g[g.output].cls}); only trunks that "
            "end with the ReLU of their last residual unit are supported"
        )
    units, x = [], pool.name
    while x != g.output:
        unit, x = _residual_unit(g, x)
        units.append(unit)
    stages = _stages(units, g.where)
    if not stages:
        raise KerasImportError(f"{g.where}: the ResNet trunk has no residual units")
    weights = [
        _Weights("trunk.conv1", conv1, g.where, stem=True),
        _Weights("trunk.bn1", bn, g.where),
    ]
    for s, stage in enumerate(stages):
        for u, unit in enumerate(stage):
            weights += unit.weights(f"trunk.layer{s + 1}.{u}", g.where)
    widths = tuple(int(stage[0].conv1.config["filters"]) for stage in stages)
    trunk = {
        "kind": "resnet",
        "widths": widths,
        "blocks": tuple(len(stage) for stage in stages),
        "expansion": int(stages[0][0].conv3.config["filters"]) // widths[0],
        "stem_width": int(conv1.config["filters"]),
        "stem_padding": stem_padding,
    }
    return trunk, weights


def _parse_trunk(model: dict[str, Any], group: str) -> tuple[dict[str, Any], list[_Weights]]:
    g = _Graph(model, group, _TRUNK_CLASSES)
    first = g.next(g.input, "Conv2D", "ZeroPadding2D")
    if first.cls == "ZeroPadding2D":
        pad = first.config.get("padding")
        conv = g.next(first.name, "Conv2D")
        if pad not in (3, [3, 3], [[3, 3], [3, 3]]) or conv.config.get("padding") != "valid":
            raise KerasImportError(
                f"{group}: stem '{first.name}' pads {pad} before a '{conv.config.get('padding')}'"
                " conv; only ZeroPadding2D(3) + 'valid' conv (or a 'same' conv) is supported"
            )
        return _parse_resnet_trunk(g, conv, "zeropad")
    if _pair(first.config.get("kernel_size")) == (7, 7):
        if first.config.get("padding") != "same":
            raise KerasImportError(
                f"{group}: stem conv '{first.name}' is 'valid' without ZeroPadding2D; only the "
                "two Keras ResNet50 stems (ZeroPadding2D(3) + 'valid', or 'same') are supported"
            )
        return _parse_resnet_trunk(g, first, "same")
    if g[g.output].cls != "MaxPooling2D":
        raise KerasImportError(
            f"{group}: the VGG trunk ends at '{g.output}' ({g[g.output].cls}); only trunks that "
            "end with a pool (block5_pool) are supported"
        )
    blocks: list[_Convs] = []
    x = g.input
    while x != g.output:
        convs, x = _vgg_block(g, x, with_bn=False)
        blocks.append(convs)
    weights = [
        _Weights(f"trunk.block{b + 1}.conv{c + 1}", conv, group, activation="relu")
        for b, convs in enumerate(blocks)
        for c, (conv, _) in enumerate(convs)
    ]
    widths = tuple(int(convs[0][0].config["filters"]) for convs in blocks)
    return {"kind": "vgg", "widths": widths, "blocks": tuple(map(len, blocks))}, weights


def _input_shape(layer: _Layer) -> tuple[int, int]:
    shape = layer.config.get("batch_input_shape") or layer.config.get("batch_shape")
    if not shape or len(shape) != 4:
        raise KerasImportError(f"input '{layer.name}' has shape {shape}; expected (N, H, W, 3)")
    if shape[3] != 3:
        raise KerasImportError(
            f"input '{layer.name}' has {shape[3]} channels; only 3-channel models are supported "
            "(the single-channel YaroslavNet model is not)"
        )
    if shape[1] is None or shape[2] is None:
        return (1152, 896)
    return (int(shape[1]), int(shape[2]))


def _parse(model_config: dict[str, Any]) -> tuple[ArchitectureConfig, list[_Weights]]:
    if model_config.get("class_name") not in _MODEL_CLASSES:
        raise KerasImportError(
            f"the file holds a Keras {model_config.get('class_name')}; the all-conv models are "
            "functional Models with the patch trunk nested as one layer"
        )
    top = _Graph(model_config, "top-level model", _TOP_CLASSES)
    input_shape = _input_shape(top[top.input])
    nested = top.next(top.input, *_MODEL_CLASSES)
    trunk, weights = _parse_trunk({"config": nested.config}, nested.name)
    units: list[_Unit] = []
    vgg_blocks: list[_Convs] = []
    x = nested.name
    while True:
        after = top.consumers(x)
        if len(after) == 1 and after[0].cls == "GlobalAveragePooling2D":
            break
        if len(after) == 2 and not vgg_blocks:
            unit, x = _residual_unit(top, x)
            units.append(unit)
        elif len(after) == 1 and after[0].cls == "Conv2D" and not units:
            convs, x = _vgg_block(top, x, with_bn=True)
            vgg_blocks.append(convs)
        else:
            got = ", ".join(f"'{c.name}' ({c.cls})" for c in after) or "nothing"
            raise KerasImportError(
                f"top-level model: after '{x}' found {got}; supported top layers are residual "
                "units or Conv-BN-ReLU-MaxPool blocks (one kind), then GlobalAveragePooling2D "
                "→ Dense(2, softmax)"
            )
    dense = top.next(after[0].name, "Dense")
    if top.output != dense.name:
        raise KerasImportError(f"top-level model: the output '{top.output}' is not '{dense.name}'")
    if dense.config.get("units") != 2 or dense.config.get("activation") != "softmax":
        raise KerasImportError(
            f"dense layer '{dense.name}' must be Dense(2, softmax), got units="
            f"{dense.config.get('units')} activation={dense.config.get('activation')!r}"
        )
    if units:
        blocks = _stages(units, "top-level model")
        depths = tuple(int(block[0].conv1.config["filters"]) for block in blocks)
        head = {
            "kind": "resnet",
            "depths": depths,
            "repetitions": tuple(map(len, blocks)),
            "enlarge": int(blocks[0][0].conv3.config["filters"]) // depths[0],
        }
        for b, block in enumerate(blocks):
            for u, unit in enumerate(block):
                weights += unit.weights(f"top.{b}.{u}", None)
    elif vgg_blocks:
        head = {
            "kind": "vgg",
            "depths": tuple(int(convs[0][0].config["filters"]) for convs in vgg_blocks),
            "repetitions": tuple(map(len, vgg_blocks)),
        }
        for b, convs in enumerate(vgg_blocks):
            for c, (conv, bn) in enumerate(convs):
                weights.append(_Weights(f"top.{b}.conv{c + 1}", conv, conv.name))
                weights.append(_Weights(f"top.{b}.bn{c + 1}", bn, bn.name))
    else:
        raise KerasImportError(
            "top-level model: no top blocks between the trunk and the global average pooling; "
            "this is a patch classifier, not a whole-image model"
        )
    weights.append(_Weights("fc", dense, dense.name, activation="softmax"))
    try:
        architecture = ArchitectureConfig.from_dict(
            {"trunk": trunk, "top": head, "input_shape": input_shape}
        )
    except ArchitectureError as exc:
        raise KerasImportError(f"model_config gives an unsupported architecture: {exc}") from None
    return architecture, weights


# -- layer settings and weights ------------------------------------------------------------


def _check_settings(w: _Weights, module: nn.Module, stem_padding: str | None) -> None:
    """Refuse a Keras layer whose settings the torch module would not reproduce."""
    cfg, name = w.layer.config, w.layer.name
    problems = []
    if cfg.get("data_format", "channels_last") != "channels_last":
        problems.append(f"data_format {cfg.get('data_format')!r}")
    if w.layer.cls == "Conv2D":
        assert isinstance(module, nn.Conv2d)
        if _pair(cfg.get("kernel_size")) != module.kernel_size:
            problems.append(f"kernel_size {cfg.get('kernel_size')}, expected {module.kernel_size}")
        if _pair(cfg.get("strides", 1)) != module.stride:
            problems.append(f"strides {cfg.get('strides')}, expected {module.stride}")
        if _pair(cfg.get("dilation_rate", 1)) != (1, 1) or cfg.get("groups", 1) != 1:
            problems.append("dilated or grouped convolution")
        if cfg.get("use_bias") is not True:
            problems.append("no bias")
        if cfg.get("activation") != w.activation:
            problems.append(f"activation {cfg.get('activation')!r}, expected {w.activation!r}")
        padding = cfg.get("padding")
        if w.stem:
            expected = {"zeropad": "valid", "same": "same"}[stem_padding or "zeropad"]
            if padding != expected:
                problems.append(f"stem padding {padding!r}")
        elif module.kernel_size != (1, 1) and padding != "same":
            problems.append(f"padding {padding!r}; only 'same' is supported for k > 1")
    elif w.layer.cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        if axis not in (-1, 3, [-1], [3]):
            problems.append(f"axis {axis}")
        if abs(float(cfg.get("epsilon", 1e-3)) - 1e-3) > 1e-9:
            problems.append(f"epsilon {cfg.get('epsilon')}, the port uses Keras' 1e-3")
        if cfg.get("center", True) is not True or cfg.get("scale", True) is not True:
            problems.append("center/scale disabled")
    elif w.layer.cls == "Dense":
        if cfg.get("use_bias") is not True:
            problems.append("no bias")
    if problems:
        raise KerasImportError(
            f"{w.group}: layer '{name}' ({w.layer.cls}) is not supported: {'; '.join(problems)}"
        )


_VARIABLES = {
    "Conv2D": {"kernel": "weight", "bias": "bias"},
    "Dense": {"kernel": "weight", "bias": "bias"},
    "BatchNormalization": {
        "gamma": "weight",
        "beta": "bias",
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
    },
}


def _names(value: Any) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value)]


def _weight_index(f: h5py.File, src: Path) -> dict[tuple[str, str, str], h5py.Dataset]:
    """(group, layer, variable) → dataset, from each group's `weight_names` attribute."""
    if "model_weights" not in f or "layer_names" not in f["model_weights"].attrs:
        raise KerasImportError(
            f"{src}: no model_weights/layer_names; the file is not a full "
            "Keras model saved with model.save()"
        )
    root = f["model_weights"]
    index = {}
    for group in _names(root.attrs["layer_names"]):
        attrs = root[group].attrs
        for weight_name in _names(attrs["weight_names"]) if "weight_names" in attrs else []:
            if weight_name not in root[group]:
                continue  # listed but absent: reported as missing if the model needs it
            parts = weight_name.split("/")
            layer = parts[-2] if len(parts) > 1 else group
            index[(group, layer, parts[-1].split(":")[0])] = root[group][weight_name]
    return index


def _to_torch(layer: _Layer, variable: str, value: np.ndarray) -> np.ndarray:
    if variable == "kernel" and layer.cls == "Conv2D":
        return value.transpose(3, 2, 0, 1)  # HWIO → OIHW; no spatial flip
    if variable == "kernel" and layer.cls == "Dense":
        return value.T  # (in, out) → (out, in)
    return value


def _load_weights(f: h5py.File, src: Path, weights: list[_Weights], model: AllConvNet) -> None:
    index = _weight_index(f, src)
    modules = dict(model.named_modules())
    state = model.state_dict()
    trunk = model.config.trunk
    stem_padding = trunk.stem_padding if isinstance(trunk, ResNetTrunkConfig) else None
    used = set()
    for w in weights:
        _check_settings(w, modules[w.prefix], stem_padding)
        for variable, target in _VARIABLES[w.layer.cls].items():
            key = (w.group, w.layer.name, variable)
            if key not in index:
                raise KerasImportError(
                    f"{src}: weight '{w.group}/{w.layer.name}/{variable}:0' is missing; the "
                    "file is incomplete or was not saved by Keras 2 model.save()"
                )
            used.add(key)
            value = _to_torch(w.layer, variable, np.asarray(index[key], dtype=np.float32))
            tensor = state[f"{w.prefix}.{target}"]
            if tuple(value.shape) != tuple(tensor.shape):
                raise KerasImportError(
                    f"{src}: weight '{w.group}/{w.layer.name}/{variable}:0' has shape "
                    f"{tuple(index[key].shape)}, but the architecture in model_config needs "
                    f"{tuple(tensor.shape)} (after conversion); the file is inconsistent"
                )
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    unused = sorted("/".join(k) for k in set(index) - used)
    if unused:
        raise KerasImportError(
            f"{src}: weights {unused[:5]}{' …' if len(unused) > 5 else ''} belong to no layer "
            "of the supported architecture; refusing rather than ignoring them"
        )


# -- the importer ------------------------------------------------------------------------


def import_h5(
    src: Path,
    out: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    featurewise_mean: float | None = None,
) -> ModelCard:
    """Convert a published all-conv Keras `.h5` full model into the model file `out`.

    `featurewise_mean` defaults to INbreast's 44.33 when the file name says "inbreast", else
    DDSM's 52.18 (the `.h5` files do not record it). `version` defaults to the file's sha256
    prefix, so re-imports of one file agree.
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise KerasImportError(f"{src}: no such file")
    digest = file_sha256(src)
    try:
        f = h5py.File(src, "r")
    except OSError as exc:
        raise KerasImportError(f"{src}: not an HDF5 file ({exc})") from None
    with f:
        if "model_config" not in f.attrs:
            raise KerasImportError(
                f"{src}: not a Keras full-model file (no model_config attribute); weights-only "
                "files from save_weights() cannot be imported, use the model.save() file"
            )
        keras_version = _names(f.attrs.get("keras_version", "unknown"))[0]
        if keras_version.startswith("1."):
            raise KerasImportError(
                f"{src}: Keras {keras_version} files are not supported; "
                "the published models were written by Keras 2.0.x"
            )
        try:
            model_config = json.loads(_names(f.attrs["model_config"])[0])
        except json.JSONDecodeError as exc:
            raise KerasImportError(f"{src}: model_config is not valid JSON ({exc})") from None
        architecture, weights = _parse(model_config)
        model = AllConvNet(architecture)
        with torch.no_grad():
            _load_weights(f, src, weights, model)
    if featurewise_mean is None:
        inbreast = "inbreast" in src.name.lower()
        featurewise_mean = INBREAST_MEAN if inbreast else DDSM_MEAN
        mean_source = f"default for {'INbreast' if inbreast else 'DDSM'} models (from file name)"
    else:
        mean_source = "given at import"
    card = ModelCard(
        family="allconv",
        architecture=architecture.to_dict(),
        preprocessing=PreprocessSpec(
            target_size=architecture.input_shape, featurewise_mean=float(featurewise_mean)
        ).to_dict(),
        name=name or src.stem,
        version=version or digest[:12],
        licence=LICENCE,
        clinical_use=False,
        provenance={
            "base_model": "Shen et al., Sci Rep 2019 (lishen/end2end-all-conv), Keras .h5",
            "source_file": src.name,
            "source_sha256": digest,
            "keras_version": keras_version,
            "featurewise_mean": float(featurewise_mean),
            "featurewise_mean_source": mean_source,
        },
    )
    save_model(model.eval(), card, out)
    return card
