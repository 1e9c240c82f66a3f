"""The ensemble's arithmetic (flip TTA, member, breast and exam aggregation), geometry of its
maps and boxes, and its refusals — on real GMIC and all-conv modules at their demo sizes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ensemble as ensemble_module
from models import family as family_registry
from models import get_family, load_model, new_model_file, read_card, save_model
from models.allconv import PRESETS as ALLCONV_PRESETS
from models.allconv import AllConvFamily
from models.ensemble import (
    Ensemble,
    EnsembleSpec,
    MemberSpec,
    _MemberImage,
    _source_levels,
    default_member,
)
from models.geometry import Crop, Flip, Geometry, Resize
from models.gmic import PRESETS as GMIC_PRESETS
from models.pixels import read_mammogram_file
from models.reading import read_mammogram
from models.results import map_levels
from tests.support.maps import assert_levels_close, assert_levels_of
from tests.test_geometry import random_geometry, reference_map_to_source

ALL_FLIPS = ("none", "hflip", "vflip", "hvflip")
DEMO_ALLCONV = Path(__file__).parents[1] / "models/weights/demo-allconv.safetensors"
DEMO_GMIC = DEMO_ALLCONV.with_name("demo-gmic.safetensors")


def _model_file(folder, family: str, preset: dict, name: str, seed: int):
    torch.manual_seed(seed)
    return new_model_file(
        folder / f"{name}.safetensors",
        family,
        preset,
        name=name,
        version="test",
        operating_points={"default": 0.5},
    )


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {
        "gmic": _model_file(folder, "gmic", GMIC_PRESETS["demo"], "gmic-test", 0),
        "allconv": _model_file(folder, "allconv", ALLCONV_PRESETS["demo"], "allconv-test", 1),
    }


@pytest.fixture(scope="module")
def exam(synth_exam_small):
    return [read_mammogram(img.dataset) for img in synth_exam_small.images]


@pytest.fixture(scope="module")
def exam_negative(synth_exam_negative_small):
    return [read_mammogram(img.dataset) for img in synth_exam_negative_small.images]


def _assert_same_prediction(got, want, atol: float) -> None:
    assert got.study_instance_uid == want.study_instance_uid
    assert got.missing_views == want.missing_views
    assert got.malignant == pytest.approx(want.malignant, abs=atol)
    assert [p.sop_instance_uid for p in got.images] == [p.sop_instance_uid for p in want.images]
    for g, w in zip(got.images, want.images, strict=True):
        assert g.malignant == pytest.approx(w.malignant, abs=atol)
        assert g.per_model == pytest.approx(w.per_model, abs=atol)
        assert (g.benign is None) == (w.benign is None)
        if w.benign is not None:
            assert g.benign == pytest.approx(w.benign, abs=atol)
        assert_levels_close(g.malignant_map, w.malignant_map, atol)
        assert g.malignant_peak == w.malignant_peak
        assert [r.box for r in g.rois] == [r.box for r in w.rois]
        np.testing.assert_allclose(
            [r.weight for r in g.rois], [r.weight for r in w.rois], atol=atol
        )


@pytest.mark.parametrize("max_batch", [3, 64])
def test_predict_exams_equals_one_exam_at_a_time(model_files, exam, exam_negative, max_batch):
    """Several exams at once (forwards batched across them, in chunks that straddle exams)
    give each exam what it gets alone, in input order.

    The all-conv member has trained weights (the demo's): a randomly initialised one reaches
    activations of 1e3 and logits of ±100, where fp32 summed in another order (the CPU's
    convolution kernels change with the batch size) moves a probability near 0.3 by 1e-4 on
    some CPUs (AVX-512 Xeon, with or without oneDNN): the comparison would measure that
    model's conditioning, not the batching. The trained model's scores move by 5e-7."""
    members = (
        MemberSpec(model_files["gmic"], ("none", "vflip")),
        MemberSpec(DEMO_ALLCONV, ("none", "vflip")),
    )
    ens = Ensemble(EnsembleSpec(members, device="cpu", max_batch=max_batch))
    exams = [exam_negative, exam[2:3], exam, exam[:2]]
    together = ens.predict_exams(exams)
    assert len(together) == len(exams)
    for got, images in zip(together, exams, strict=True):
        _assert_same_prediction(got, ens.predict_exam(images), atol=1e-5)
    assert ens.predict_exams([]) == []


def test_predict_exams_batches_forwards_across_exams(model_files, exam, exam_negative):
    ens = Ensemble(
        EnsembleSpec(
            (MemberSpec(model_files["gmic"], ("none", "vflip")),), device="cpu", max_batch=16
        )
    )
    batches = []
    module = ens._members[0].module
    hook = module.register_forward_hook(lambda _m, args, _out: batches.append(len(args[0])))
    try:
        ens.predict_exams([exam, exam_negative])
    finally:
        hook.remove()
    assert batches == [16]  # 2 exams x 4 views x 2 flips in one forward pass


def _single_pass(path, image, flip: str):
    """One member, one flip, computed the long way: preprocess, flip, forward, un-flip."""
    ens = Ensemble(EnsembleSpec((MemberSpec(path, (flip,)),), device="cpu"))
    return ens.predict_exam([image]).images[0]


def _source_map(path, image, flip: str) -> np.ndarray:
    """One pass's fp32 malignancy map on the source grid, the long way: preprocess, flip,
    forward, flip the map back, resample it onto the source grid."""
    module = load_model(path)
    family = get_family(module.card.family)
    prepared = family.preprocess(image, module.card.preprocessing)
    axes = {"none": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}[flip]
    x = prepared.tensor[None]
    with torch.inference_mode():
        maps = family.score_maps(module(x.flip(axes) if axes else x)).maps[0, -1]
    maps = maps.flip(axes) if axes else maps
    return np.clip(prepared.geometry.map_to_source(maps.numpy()), 0, 1)


@pytest.mark.parametrize(
    ("family", "flips"),
    # GMIC, with a benign class, under the flips it allows; all-conv under every flip.
    [("gmic", ("none", "vflip")), ("allconv", ALL_FLIPS)],
)
def test_flip_tta_averages_probabilities_and_unflipped_maps(model_files, exam, family, flips):
    image = exam[0]
    path = model_files[family]
    passes = [_single_pass(path, image, f) for f in flips]
    tta = Ensemble(EnsembleSpec((MemberSpec(path, flips),), device="cpu"))
    result = tta.predict_exam([image]).images[0]
    assert result.malignant == pytest.approx(np.mean([p.malignant for p in passes]), abs=1e-6)
    if family == "gmic":
        assert result.benign == pytest.approx(np.mean([p.benign for p in passes]), abs=1e-6)
    expected_map = np.mean([_source_map(path, image, f) for f in flips], axis=0)
    assert_levels_of(result.malignant_map, expected_map, atol=1e-5)
    # The peak is the fp32 map's, not the first of the pixels at the top level.
    assert result.malignant_peak == np.unravel_index(np.argmax(expected_map), expected_map.shape)
    # The flips really differ, so the average is not a no-op.
    assert np.ptp([p.malignant for p in passes]) > 0


def test_hflip_pass_equals_flipped_input_with_maps_flipped_back(model_files, exam):
    """Feeding the mirror image through the "none" pass and mirroring the map back must equal
    the hflip pass: the ensemble un-flips on the input grid, before mapping to the source."""
    family = get_family("allconv")
    module = Ensemble(EnsembleSpec((MemberSpec(model_files["allconv"]),), device="cpu"))
    image = exam[1]
    card = module._members[0].card
    prepared = family.preprocess(image, card.preprocessing)
    with torch.inference_mode():
        out = family.score_maps(module._members[0].module(prepared.tensor.flip(-1)[None]))
    maps = out.maps[0].flip(-1).numpy()
    expected = np.clip(prepared.geometry.map_to_source(maps)[1], 0, 1)
    hflip = _single_pass(model_files["allconv"], image, "hflip")
    assert hflip.malignant == pytest.approx(float(out.malignant[0]), abs=1e-6)
    assert_levels_of(hflip.malignant_map, expected, atol=1e-6)


def test_members_breasts_and_exam_aggregate_as_designed(model_files, exam):
    members = (
        MemberSpec(model_files["gmic"], ("none", "vflip")),
        MemberSpec(model_files["allconv"], ALL_FLIPS),
    )
    ens = Ensemble(EnsembleSpec(members, device="cpu"))
    pred = ens.predict_exam(exam)
    assert {p.sop_instance_uid for p in pred.images} == {m.sop_instance_uid for m in exam}
    for img in pred.images:
        assert img.malignant == pytest.approx(np.mean(list(img.per_model.values())), abs=1e-7)
        assert set(img.per_model) == {"gmic-test", "allconv-test"}
        assert img.benign is not None  # from GMIC, the only member with a benign class
        assert img.malignant_map.shape == next(
            m.shape for m in exam if m.sop_instance_uid == img.sop_instance_uid
        )
        assert img.malignant_map.dtype == np.uint8  # levels round(p * 255)
        assert img.benign_map is not None and img.benign_map.dtype == np.uint8
    for breast in pred.breasts:
        own = [p.malignant for p in pred.images if p.laterality == breast.laterality]
        assert len(own) == 2
        assert breast.malignant == pytest.approx(np.mean(own), abs=1e-7)
    assert pred.malignant == max(b.malignant for b in pred.breasts)
    assert not pred.partial and pred.missing_views == ()
    assert [m.name for m in pred.models] == ["gmic-test", "allconv-test"]
    assert all(not m.clinical_use for m in pred.models)


def test_partial_exam_reports_missing_views_and_single_image_breast(model_files, exam):
    ens = Ensemble(EnsembleSpec((MemberSpec(model_files["allconv"]),), device="cpu"))
    subset = [m for m in exam if m.view_key in ("L-CC", "L-MLO", "R-CC")]
    pred = ens.predict_exam(subset)
    assert pred.partial and pred.missing_views == ("R-MLO",)
    right = next(b for b in pred.breasts if b.laterality == "R")
    assert right.malignant == pytest.approx(pred.image(right.sop_instance_uids[0]).malignant)


def test_gmic_rois_land_on_the_source_grid_of_each_side(exam):
    """The trained demo's crops: a randomly initialised GMIC may put all of them in padding."""
    ens = Ensemble(EnsembleSpec((MemberSpec(DEMO_GMIC, ("vflip",)),), device="cpu"))
    pred = ens.predict_exam(exam)
    k = GMIC_PRESETS["demo"]["K"]
    for img, src in zip(pred.images, exam, strict=True):
        assert 1 <= len(img.rois) <= k  # crops wholly in the padding are dropped
        weights = [r.weight for r in img.rois]
        assert weights == sorted(weights, reverse=True)
        assert sum(weights) <= 1.0 + 1e-5
        rows, cols = src.shape
        for roi in img.rois:
            top, left, bottom, right = roi.box
            assert 0 <= top < bottom <= rows and 0 <= left < right <= cols


def test_deterministic_and_bf16_close_to_fp32(model_files, exam):
    members = (MemberSpec(model_files["allconv"], ("none", "vflip")),)
    fp32 = Ensemble(EnsembleSpec(members, device="cpu"))
    a, b = fp32.predict_exam(exam), fp32.predict_exam(exam)
    assert [p.malignant for p in a.images] == [p.malignant for p in b.images]
    bf16 = Ensemble(EnsembleSpec(members, device="cpu", precision="bf16"))
    c = bf16.predict_exam(exam)
    np.testing.assert_allclose(
        [p.malignant for p in c.images], [p.malignant for p in a.images], atol=0.05
    )


def test_refusals(model_files, exam):
    with pytest.raises(ValueError, match="flips"):
        MemberSpec(model_files["gmic"], ("rotate",))
    with pytest.raises(ValueError, match="precision"):
        EnsembleSpec((MemberSpec(model_files["gmic"]),), precision="int8")
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleSpec(())
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        Ensemble(EnsembleSpec((MemberSpec(model_files["gmic"]),), device="cpu", precision="fp16"))
    ens = Ensemble(EnsembleSpec((MemberSpec(model_files["allconv"]),), device="cpu"))
    with pytest.raises(ValueError, match="more than one image for view"):
        ens.predict_exam([exam[0], exam[0]])
    other = copy.copy(exam[1])
    object.__setattr__(other, "study_instance_uid", "1.2.3.4")
    with pytest.raises(ValueError, match="different studies"):
        ens.predict_exam([exam[0], other])
    # GMIC turns every breast to face one way: a mirrored breast is one it never sees.
    with pytest.raises(ValueError, match="flipped by hflip, hvflip .*from none, vflip"):
        Ensemble(EnsembleSpec((MemberSpec(model_files["gmic"], ("none", "hflip", "hvflip")),)))
    assert default_member(model_files["gmic"]).flips == ("none", "vflip")
    assert default_member(model_files["allconv"]).flips == ("none", "hflip")
    with pytest.raises(ValueError, match="distinct model names"):
        Ensemble(EnsembleSpec((MemberSpec(model_files["gmic"]), MemberSpec(model_files["gmic"]))))


class _AllConvWithoutBoxes(AllConvFamily):
    """The all-conv network read through a family that proposes no ROI boxes."""

    name = "allconv-noboxes"

    def score_maps(self, output):
        return dataclasses.replace(super().score_maps(output), boxes=None, box_weights=None)


def test_member_without_boxes_scores_the_same_and_marks_nothing(
    model_files, exam, tmp_path, monkeypatch
):
    monkeypatch.setitem(family_registry._FAMILIES, "allconv-noboxes", _AllConvWithoutBoxes())
    card = dataclasses.replace(
        read_card(model_files["allconv"]), family="allconv-noboxes", name="allconv-noboxes"
    )
    path = save_model(load_model(model_files["allconv"]), card, tmp_path / "noboxes.safetensors")
    flips = ("none", "hflip")
    images = exam[:1]
    boxed = Ensemble(EnsembleSpec((MemberSpec(model_files["allconv"], flips),), device="cpu"))
    unboxed = Ensemble(EnsembleSpec((MemberSpec(path, flips),), device="cpu"))
    with_gmic = Ensemble(
        EnsembleSpec((MemberSpec(path, flips), MemberSpec(DEMO_GMIC, ("vflip",))), device="cpu")
    )
    a = boxed.predict_exam(images).images[0]
    b = unboxed.predict_exam(images).images[0]
    c = with_gmic.predict_exam(images).images[0]
    assert a.rois and b.rois == ()
    assert b.malignant == a.malignant and b.benign is None
    np.testing.assert_array_equal(b.malignant_map, a.malignant_map)
    assert c.rois and {r.model for r in c.rois} == {"demo-gmic"}
    assert c.per_model["allconv-noboxes"] == b.malignant


def test_members_sharing_preprocessing_score_alike(exam, tmp_path):
    card = dataclasses.replace(read_card(DEMO_GMIC), name="gmic-twin")
    twin = save_model(load_model(DEMO_GMIC), card, tmp_path / "twin.safetensors")
    members = (MemberSpec(DEMO_GMIC, ("vflip",)), MemberSpec(twin, ("vflip",)))
    img = Ensemble(EnsembleSpec(members, device="cpu")).predict_exam(exam[:1]).images[0]
    assert img.per_model["demo-gmic"] == img.per_model["gmic-twin"] == img.malignant
    assert len(img.rois) % 2 == 0 and {r.model for r in img.rois} == {"demo-gmic", "gmic-twin"}


def test_non_finite_scores_are_refused(model_files, exam, tmp_path):
    module = load_model(model_files["allconv"])
    with torch.no_grad():
        module.fc.weight.fill_(3e38)  # finite weights whose logits overflow to inf
    card = dataclasses.replace(module.card, name="overflowing")
    path = save_model(module, card, tmp_path / "overflowing.safetensors")
    ens = Ensemble(EnsembleSpec((MemberSpec(path),), device="cpu"))
    with pytest.raises(RuntimeError, match="'overflowing' gave NaN or infinite scores"):
        ens.predict_exam(exam[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(model_files, exam):
    members = (MemberSpec(model_files["gmic"], ("none", "vflip")),)
    cpu = Ensemble(EnsembleSpec(members, device="cpu")).predict_exam(exam)
    gpu = Ensemble(EnsembleSpec(members, device="cuda")).predict_exam(exam)
    np.testing.assert_allclose(
        [p.malignant for p in gpu.images], [p.malignant for p in cpu.images], atol=1e-4
    )


_COMPILE_TWICE = """
import hashlib, json, logging, sys
from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from models.pixels import read_mammogram_file

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
ensemble = Ensemble(EnsembleSpec((MemberSpec(sys.argv[1]),), device="cpu", compile=True))
image = read_mammogram_file(sys.argv[2])
for _ in range(2):
    img = ensemble.predict_exam([image]).images[0]
    levels = hashlib.sha256(img.malignant_map.tobytes()).hexdigest()
    print(json.dumps([img.malignant, img.per_model, levels, list(img.malignant_peak)]))
"""


def test_compile_failure_runs_eagerly_with_the_same_scores_and_says_why(tmp_path, synth_exam_small):
    """`compile: true` on a host without a C++ compiler (CXX names none, so torch's inductor
    fails for real at its first kernel): the member runs eagerly, scores as the eager
    ensemble does, and one warning says why. In a child process, so that the compiler
    setting and the compiler's caches are its own. About 25 s on 2 cores."""
    path = DEMO_ALLCONV  # trained weights: a map with many levels, a score inside (0, 1)
    source = tmp_path / "image.dcm"
    synth_exam_small.images[0].dataset.save_as(source, enforce_file_format=True)
    no_compiler = tmp_path / "no-such-c++"
    env = {**os.environ, "CXX": str(no_compiler), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    child = subprocess.run(
        [sys.executable, "-c", _COMPILE_TWICE, str(path), str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    eager = Ensemble(EnsembleSpec((MemberSpec(path),), device="cpu"))
    img = eager.predict_exam([read_mammogram_file(source)]).images[0]
    want = [
        img.malignant,
        img.per_model,
        hashlib.sha256(img.malignant_map.tobytes()).hexdigest(),
        list(img.malignant_peak),
    ]
    assert len(np.unique(img.malignant_map)) > 10  # a map that tells runs apart
    assert [json.loads(line) for line in child.stdout.splitlines()] == [want, want]
    warnings = [line for line in child.stderr.splitlines() if "torch.compile" in line]
    assert len(warnings) == 1, child.stderr  # once, though the member ran twice
    assert warnings[0].startswith("models.ensemble: torch.compile failed for model 'demo-allconv'")
    assert "No working C++ compiler" in warnings[0] and str(no_compiler) in warnings[0]
    assert warnings[0].endswith("; running it eagerly")


def _reference_source_levels(parts, shape):
    """The ensemble's maps the straightforward way: each member's whole maps onto the source
    grid (whole weight products), clamped to [0, 1], summed in member order and divided by
    their number in fp32, the peak by numpy's argmax, then the levels."""
    source = [np.clip(reference_map_to_source(p.geometry, p.maps.numpy()), 0, 1) for p in parts]

    def mean(maps):
        total = maps[0].copy()
        for m in maps[1:]:
            total += m
        return total / np.float32(len(maps)) if len(maps) > 1 else total

    malignant = mean([m[-1] for m in source])
    benign = [m[0] for m, p in zip(source, parts, strict=True) if p.benign is not None]
    peak = np.unravel_index(int(np.argmax(malignant)), shape)
    return malignant, mean(benign) if benign else None, (int(peak[0]), int(peak[1]))


def _random_parts(rng, shape, members, exact):
    """Flip-averaged member maps as `_member_image` hands them over, on random geometries.
    `exact`: power-of-two resizes and map values in sixteenths, so every product and sum is
    exact in fp32 and any order of the arithmetic gives the same floats (ties included)."""
    parts = []
    for k in range(members):
        if exact:
            factor = 2 ** int(rng.integers(0, 3))
            steps = (Crop(int(rng.integers(-8, 9)), 0, shape[0], shape[1]), Flip(1))
            geometry = Geometry(shape, steps[: int(rng.integers(0, 3))]).then(
                Resize(shape[0] * factor, shape[1] * factor)
            )
            cells = (shape[0] * factor // 8, shape[1] * factor // 8)
            maps = rng.integers(0, 17, size=(2, *cells)).astype(np.float32) / 16
            maps[:, : cells[0] // 2] = 1.0  # a saturated block: the peak is a tie
        else:
            geometry = random_geometry(rng, shape)
            cells = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
            low, high = (-0.3, 1.3) if k % 2 else (0.0, 1.0)  # some need the clamp
            maps = rng.uniform(low, high, size=(2, *cells)).astype(np.float32)
        benign = k % 3 != 1
        if benign and rng.random() < 0.3:
            maps[0] = maps[1]  # GlimpseNet: one mask for both classes, mapped once
        parts.append(
            _MemberImage(
                malignant=0.5,
                benign=0.5 if benign else None,
                maps=torch.from_numpy(maps if benign else maps[1:]),
                geometry=geometry,
                rois=[],
            )
        )
    return parts


@pytest.mark.parametrize("strip_bytes", [None, 3 * 4 * 64])
def test_source_levels_equal_the_straightforward_whole_map_path(monkeypatch, strip_bytes):
    """`_source_levels` (strips of source rows, one buffer per member, the clamp skipped
    where it provably changes nothing, the peak from row maxima) against the whole-map
    computation: the same levels and peak; bit for bit where the arithmetic is exact
    (saturated maps, peaks that tie across strips), else to fp32 rounding. Under a second."""
    if strip_bytes is not None:
        monkeypatch.setattr(ensemble_module, "_STRIP_BYTES", strip_bytes)  # 3-row strips
    rng = np.random.default_rng(11)
    cpu = torch.device("cpu")
    for case in range(24):
        exact = case % 2 == 0
        shape = (8 * int(rng.integers(3, 12)), 8 * int(rng.integers(3, 12)))
        parts = _random_parts(rng, shape, int(rng.integers(1, 4)), exact)
        malignant, benign, peak = _source_levels(parts, shape, cpu)
        want_malignant, want_benign, want_peak = _reference_source_levels(parts, shape)
        assert (benign is None) == (want_benign is None)
        if exact:
            np.testing.assert_array_equal(malignant.numpy(), map_levels(want_malignant))
            if benign is not None:
                np.testing.assert_array_equal(benign.numpy(), map_levels(want_benign))
            assert peak == want_peak
        else:
            assert_levels_of(malignant.numpy(), want_malignant, atol=1e-6)
            if benign is not None:
                assert_levels_of(benign.numpy(), want_benign, atol=1e-6)
            assert want_malignant[peak] >= want_malignant.max() - 1e-6
