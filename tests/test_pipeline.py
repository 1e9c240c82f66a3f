"""The analysis pipeline (`plugin.pipeline`) on the real demo ensemble: many exams in flight
give what one exam at a time gives; the in-flight limit holds; a failing image is left out.

About 40 s on 2 CPU cores (512×416 synthetic exams; pool processes start once per module).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pydicom
import pytest

from models.ensemble import Ensemble, EnsembleSpec, default_member
from plugin import pipeline as stages
from plugin.isolation import NoUsableImage
from plugin.outputs import DEFAULT_KINDS, OutputKind
from plugin.pipeline import ExamRequest, Naming, Outcome, Pipeline, Settings
from tests.support.maps import assert_levels_close
from tests.support.service_harness import demo_models, exam_files
from tests.support.shared_memory import payload_memfds

EXAMS = 3


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    models = demo_models(tmp_path_factory.mktemp("models"))
    return Ensemble(EnsembleSpec(tuple(default_member(p) for p in models), device="cpu"))


@pytest.fixture(scope="module")
def exams(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[tuple[str, Path], ...]]:
    """Three exams, uncompressed and JPEG 2000, as (SOPInstanceUID, path) of each image."""
    folder = tmp_path_factory.mktemp("exams")
    out = []
    for n in range(EXAMS):
        syntax = "jpeg2000" if n % 2 else "explicit"
        paths = exam_files(folder / str(n), 70 + n, syntax)
        out.append(
            tuple(
                (str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p) for p in paths
            )
        )
    return out


def analyse(ensemble: Ensemble, exams, folder: Path, settings: Settings) -> dict[int, Outcome]:
    outcomes: dict[int, Outcome] = {}
    pipeline = Pipeline(ensemble, settings, lambda o: outcomes.__setitem__(o.request.tag, o))
    try:
        for n, files in enumerate(exams):
            pipeline.submit(ExamRequest(files, folder / str(n), Naming.BY_UID, tag=n))
        assert pipeline.wait_idle(300)
    finally:
        assert pipeline.close(60)
    return outcomes


def test_many_in_flight_gives_what_one_at_a_time_gives(ensemble, exams, tmp_path) -> None:
    kinds = (*DEFAULT_KINDS, OutputKind.TID1500_SCORES)
    serial = analyse(
        ensemble, exams, tmp_path / "serial", Settings(0, 0, in_flight=1, max_batch=1, kinds=kinds)
    )
    pipelined = analyse(
        ensemble,
        exams,
        tmp_path / "pipelined",
        Settings(1, 1, in_flight=EXAMS, max_batch=8, max_batch_wait_ms=500, kinds=kinds),
    )
    # No exam's shared memory (the output process's payloads) outlives its parts.
    assert not payload_memfds()
    assert sorted(serial) == sorted(pipelined) == list(range(EXAMS))
    for n in range(EXAMS):
        one, many = serial[n], pipelined[n]
        assert one.error is None and many.error is None
        assert one.left_out == many.left_out == ()
        # The same objects: kinds, sources, UIDs, file names; each file is what it says.
        assert [(o.kind, o.source_sop_instance_uid, o.sop_instance_uid) for o in one.objects] == [
            (o.kind, o.source_sop_instance_uid, o.sop_instance_uid) for o in many.objects
        ]
        assert [o.path.name for o in one.objects] == [o.path.name for o in many.objects]
        assert len(many.objects) == 3 + 4 * 2
        # Where the time went: every stage took some.
        for outcome in (one, many):
            t = outcome.times
            assert min(t.decode, t.ensemble, t.objects, t.build, t.write) > 0
        for o in many.objects:
            ds = pydicom.dcmread(o.path, stop_before_pixels=True)
            assert (ds.SOPInstanceUID, ds.SOPClassUID) == (o.sop_instance_uid, o.sop_class_uid)
            assert o.size == o.path.stat().st_size
        # The same scores, within 1e-5.
        a, b = one.prediction, many.prediction
        assert a is not None and b is not None
        assert a.malignant == pytest.approx(b.malignant, abs=1e-5)
        for x, y in zip(a.images, b.images, strict=True):
            assert x.sop_instance_uid == y.sop_instance_uid
            assert x.malignant == pytest.approx(y.malignant, abs=1e-5)
            assert x.per_model == pytest.approx(y.per_model, abs=1e-5)
            # The maps, 8-bit levels: from fp32 maps within 1e-5, so at most a level apart
            # where a rounding boundary falls between them; the fp32 peaks alike.
            assert_levels_close(x.malignant_map, y.malignant_map, atol=1e-5)
            assert x.malignant_peak == y.malignant_peak


def test_a_batch_waits_only_for_exams_on_their_way(ensemble, exams, tmp_path, monkeypatch):
    """The ensemble waits up to `max_batch_wait_ms` for more exams to batch with only while
    some are still being decoded: a lone exam is scored at once, however long the wait is
    set (an hour here), and exams submitted together still share one batch."""
    batches: list[int] = []
    predict = ensemble.predict_exams

    def recorded(batch):
        batches.append(len(batch))
        return predict(batch)

    monkeypatch.setattr(ensemble, "predict_exams", recorded)
    submitted = threading.Event()
    decode = stages.decode

    def gated(*args, **kwargs):  # the second pair decodes once both are submitted
        assert submitted.wait(60)
        return decode(*args, **kwargs)

    monkeypatch.setattr(stages, "decode", gated)
    outcomes: list[Outcome] = []
    settings = Settings(0, 0, in_flight=EXAMS, max_batch=8, max_batch_wait_ms=3_600_000)
    pipeline = Pipeline(ensemble, settings, outcomes.append)
    try:
        submitted.set()
        pipeline.submit(ExamRequest(exams[0], tmp_path / "0", Naming.BY_UID))
        assert pipeline.wait_idle(300)  # not held for the hour
        submitted.clear()
        for n in (1, 2):
            pipeline.submit(ExamRequest(exams[n], tmp_path / str(n), Naming.BY_UID))
        submitted.set()
        assert pipeline.wait_idle(300)
    finally:
        assert pipeline.close(60)
    assert [o.error for o in outcomes] == [None] * EXAMS
    assert batches == [1, 2]  # the second batch: two exams of four images, max_batch 8


def test_without_output_processes_the_srs_get_a_process_without_torch(
    ensemble, exams, tmp_path
) -> None:
    """With the per-view objects in threads (no output processes, below 4 CPUs), the
    exam-level SRs, pure Python that held the GIL against the views, are built in one
    process of their own. It imports no torch: no torch library is mapped in it (this
    process, for comparison, has one)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux's /proc to see which libraries a process maps")
    assert "libtorch" in Path("/proc/self/maps").read_text()
    before = set(multiprocessing.active_children())
    outcomes: list[Outcome] = []
    pipeline = Pipeline(ensemble, Settings(0, 0, in_flight=1), outcomes.append)
    try:
        pipeline.submit(ExamRequest(exams[0], tmp_path, Naming.BY_UID))
        assert pipeline.wait_idle(300)
        children = [p for p in multiprocessing.active_children() if p not in before]
        assert len(children) == 1
        assert "libtorch" not in Path(f"/proc/{children[0].pid}/maps").read_text()
    finally:
        assert pipeline.close(60)
    [outcome] = outcomes
    assert outcome.error is None
    kinds = sorted(o.kind for o in outcome.objects)
    assert kinds == sorted(
        [OutputKind.CAD_SR, OutputKind.TID1500] + [OutputKind.SEG, OutputKind.SC] * 4
    )
    assert all(o.path.stat().st_size == o.size for o in outcome.objects)


def test_in_flight_limit_holds_and_submit_waits_for_room(ensemble, exams, tmp_path) -> None:
    """A flood: six exams through a pipeline that may hold two. `submit` blocks while two
    are in flight, so the caller (the worker claiming jobs) never holds more in memory."""
    most = 0
    gate = threading.Event()

    def slow_commit(outcome: Outcome) -> None:
        gate.wait(60)  # the first outcome waits until the submitter has had to wait

    settings = Settings(1, 1, in_flight=2, max_batch=8, kinds=(OutputKind.CAD_SR,))
    pipeline = Pipeline(ensemble, settings, slow_commit)
    waited = []
    try:
        for n in range(6):
            files = exams[n % EXAMS]
            room = pipeline.wait_for_room(0.5 if n == 2 else 60)
            if n == 2:
                waited.append(room)  # both slots busy: no room yet
                gate.set()
                assert pipeline.wait_for_room(60)
            pipeline.submit(ExamRequest(files, tmp_path / str(n), tag=n))
            most = max(most, pipeline.in_flight)
        assert pipeline.wait_idle(300)
    finally:
        assert pipeline.close(60)
    assert waited == [False]
    assert most == 2


def test_an_unreadable_image_is_left_out_and_an_empty_exam_has_no_usable_image(
    ensemble, exams, tmp_path
) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 64)
    files = (*exams[0][:3], ("R-MLO-key", broken))
    outcomes = analyse(
        ensemble,
        [files, (("lost", broken),)],
        tmp_path / "out",
        Settings(0, 0, in_flight=2, kinds=(OutputKind.CAD_SR, OutputKind.SEG)),
    )
    partial, empty = outcomes[0], outcomes[1]
    assert partial.error is None and partial.prediction is not None
    assert [(lo.sop_instance_uid, lo.stage) for lo in partial.left_out] == [("R-MLO-key", "decode")]
    assert len(partial.prediction.images) == 3 and len(partial.objects) == 1 + 3
    assert isinstance(empty.error, NoUsableImage)
    assert [lo.stage for lo in empty.error.left_out] == ["decode"]
    assert not (tmp_path / "out" / "1").exists()


def test_a_view_whose_object_fails_is_left_out_and_leaves_no_files(
    ensemble, exams, tmp_path, monkeypatch
) -> None:
    """An exam's objects are built in parts; when one view's part fails, the parts already
    written are removed, and the exam is analysed again without that view (new UIDs): the
    folder holds exactly the objects of the outcome."""
    from plugin import outputs

    build_sc = outputs.PER_IMAGE[OutputKind.SC]
    failing = exams[0][1][0]

    def sc_or_fault(exam, img, source, n, options):
        if img.sop_instance_uid == failing:
            raise ValueError("this view's heat-map cannot be built")
        return build_sc(exam, img, source, n, options)

    monkeypatch.setitem(outputs.PER_IMAGE, OutputKind.SC, sc_or_fault)
    outcome = analyse(
        ensemble, exams[:1], tmp_path, Settings(0, 0, in_flight=1, kinds=DEFAULT_KINDS)
    )[0]
    assert outcome.error is None and outcome.prediction is not None
    assert [(lo.sop_instance_uid, lo.stage, lo.reason) for lo in outcome.left_out] == [
        (failing, "output", "sc output failed (ValueError)")
    ]
    assert failing not in {i.sop_instance_uid for i in outcome.prediction.images}
    views = [o.source_sop_instance_uid for o in outcome.objects if o.source_sop_instance_uid]
    assert len(views) == 2 * 3 and failing not in views
    assert sorted(p.name for p in (tmp_path / "0").iterdir()) == sorted(
        o.path.name for o in outcome.objects
    )


def test_an_exams_pixels_and_maps_are_freed_with_its_outcome(ensemble, exams, tmp_path) -> None:
    """No reference cycle holds an exam once its outcome is recorded: with the cyclic garbage
    collector off, nothing of it is left (a cycle through the stages' future callbacks used
    to keep each exam's pixels and maps until the collector next ran)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        outcomes = analyse(ensemble, exams[:2], tmp_path, Settings(0, 0, in_flight=1))
        assert all(o.error is None for o in outcomes.values())
        del outcomes
        left = [o for o in gc.get_objects() if isinstance(o, stages._Exam)]
    finally:
        gc.enable()
    assert left == []
