"""The worker's warm-up (`plugin.warm_up`) on the real demo ensemble: a synthetic exam goes
through every stage and output kind and nothing of it stays; a warm-up that fails or does not
come back is a warning, never an error, and `plugin serve` then analyses exams as usual.
About 40 s on 2 CPU cores."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from models.ensemble import Ensemble, EnsembleSpec, MemberSpec
from plugin.isolation import NoUsableImage
from plugin.outputs import DEFAULT_KINDS
from plugin.pipeline import Outcome, Pipeline, Settings
from plugin.warm_up import WarmUp, warm_up
from tests.support.service_harness import (
    Serve,
    counts,
    demo_models,
    exam_files,
    free_port,
    storescu,
    wait_until,
    write_config,
)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Ensemble:
    models = demo_models(tmp_path_factory.mktemp("models"))
    return Ensemble(EnsembleSpec(tuple(MemberSpec(p, ("none",)) for p in models), device="cpu"))


def _pipeline(ensemble: Ensemble, seen: list[Outcome]) -> Pipeline:
    def on_outcome(outcome: Outcome) -> None:
        seen.append(outcome)
        if isinstance(outcome.request.tag, WarmUp):
            outcome.request.tag.finish(outcome)

    return Pipeline(ensemble, Settings(0, 0, in_flight=1, kinds=DEFAULT_KINDS), on_outcome)


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "plugin.warm_up"]


def test_every_stage_and_kind_runs_and_nothing_stays(ensemble, tmp_path, caplog) -> None:
    seen: list[Outcome] = []
    pipeline = _pipeline(ensemble, seen)
    folder = tmp_path / "warm-up" / "node-cpu"
    (folder / "results").mkdir(parents=True)
    (folder / "results" / ".cad_sr.dcm.0badc0de.tmp").write_bytes(b"killed mid-write")
    try:
        with caplog.at_level(logging.INFO, logger="plugin.warm_up"):
            seconds = warm_up(pipeline, folder)
    finally:
        assert pipeline.close(60)
    assert seconds is not None and seconds > 0
    [outcome] = seen
    assert outcome.error is None and outcome.left_out == ()
    assert sorted(o.kind.value for o in outcome.objects) == sorted(
        ["cad_sr", "tid1500"] + ["seg"] * 4 + ["sc"] * 4
    )
    assert not folder.exists() and not any((tmp_path / "warm-up").iterdir())
    assert _said(caplog) == ["warm-up analysis done"]


def test_a_failing_warm_up_is_a_warning(ensemble, tmp_path, monkeypatch, caplog) -> None:
    def broken(exams):
        raise RuntimeError("no memory on the device")

    seen: list[Outcome] = []
    pipeline = _pipeline(ensemble, seen)
    monkeypatch.setattr(ensemble, "predict_exams", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="plugin.warm_up"):
            assert warm_up(pipeline, tmp_path / "w") is None
    finally:
        assert pipeline.close(60)
    assert isinstance(seen[-1].error, NoUsableImage)  # every image failed the ensemble
    assert _said(caplog) == [
        "warm-up analysis failed; the first exam will be slower (NoUsableImage)"
    ]
    assert not (tmp_path / "w").exists()


def test_a_warm_up_that_does_not_come_back_lets_the_worker_go_on(
    ensemble, tmp_path, monkeypatch, caplog
) -> None:
    pipeline = _pipeline(ensemble, [])
    monkeypatch.setattr(pipeline, "submit", lambda request: None)  # lost on its way
    try:
        with caplog.at_level(logging.WARNING, logger="plugin.warm_up"):
            assert warm_up(pipeline, tmp_path / "w", timeout=0.1) is None
    finally:
        assert pipeline.close(60)
    assert _said(caplog) == ["warm-up analysis still running after 0.1 s; claiming exams"]
    assert not (tmp_path / "w").exists()


def test_a_request_that_cannot_be_made_is_a_warning(ensemble, tmp_path: Path, caplog) -> None:
    pipeline = _pipeline(ensemble, [])
    (tmp_path / "file").write_text("")
    try:
        with caplog.at_level(logging.WARNING, logger="plugin.warm_up"):
            assert warm_up(pipeline, tmp_path / "file" / "w") is None
    finally:
        assert pipeline.close(60)
    [said] = _said(caplog)
    assert said.startswith("warm-up analysis failed; the first exam will be slower")


def test_a_service_whose_warm_up_fails_analyses_exams_as_usual(tmp_path) -> None:
    """`plugin serve` with a spool in which the warm-up cannot make its folder (a file where
    it goes): a warning in the log, then the sent exam is analysed and delivered."""
    config = write_config(
        tmp_path / "service",
        port=free_port(),
        models=demo_models(tmp_path / "models"),
        destinations=[{"type": "folder", "name": "out", "path": "out", "outputs": ["cad_sr"]}],
    )
    spool = tmp_path / "service" / "var" / "spool"
    spool.mkdir(parents=True)
    (spool / "warm-up").write_text("not a folder")
    with Serve.start(config) as service:
        storescu(exam_files(tmp_path / "in", 5), service.port)
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered", 0) == 1,
            240,
            "the exam analysed and its CAD SR delivered",
            service,
        )
        said = [json.loads(line)["msg"] for line in service.log.splitlines() if line[:1] == "{"]
    failed = [m for m in said if m.startswith("warm-up analysis failed")]
    assert len(failed) == 1 and "warm-up analysis done" not in said
    assert said.index(failed[0]) < said.index("exam analysed")
