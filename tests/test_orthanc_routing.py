"""The Orthanc plugin routes stable mammography studies exactly once, across restarts.

Real peers: Debian's Orthanc with orthanc-python running orthanc/mammo_ai_orthanc.py, and dcmtk's
storescp standing in for the listener (`-uf`: every reception is its own file, so a study sent
twice shows up as twice the files).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.dcmtk_peer import StoreSCP
from tests.support.orthanc_peer import SCRIPT, OrthancPeer, plugin_config, upload

LISTENER_AET = "MAMMO_AI"


def start_orthanc(workdir: Path, scp_port: int, stable_age: int) -> OrthancPeer:
    return OrthancPeer.start(
        workdir,
        plugins=("python",),
        python_script=SCRIPT,
        modalities={"mammoai": (LISTENER_AET, "127.0.0.1", scp_port)},
        extra_config=plugin_config(stable_age),
    )


def our_result_lookalike(source: pydicom.Dataset) -> pydicom.Dataset:
    """An MG-class image derived by us (IHE AIR Contributing Equipment): must never be routed."""
    ds = copy.deepcopy(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    item = pydicom.Dataset()
    item.Manufacturer = "mammo-ai-plugin"
    ds.ContributingEquipmentSequence = [item]
    return ds


def secondary_capture(source: pydicom.Dataset) -> pydicom.Dataset:
    ds = copy.deepcopy(source)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "OT"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    return ds


def wait_for_files(scp: StoreSCP, n: int, timeout: float) -> float:
    start = time.monotonic()
    while len(scp.received()) < n:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"listener got {len(scp.received())} of {n} images in {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - start


def routing_status(orthanc: OrthancPeer) -> dict:
    return orthanc.get("/mammo-ai/routing")


@pytest.fixture
def scp(tmp_path: Path):
    with StoreSCP.start(tmp_path / "listener", ae_title=LISTENER_AET, extra_args=["-uf"]) as peer:
        yield peer


def test_routes_stable_mammograms_once_and_never_our_results(tmp_path, scp, synth_exam_small):
    exam = synth_exam_small
    with start_orthanc(tmp_path / "orthanc", scp.port, stable_age=2) as orthanc:
        assert routing_status(orthanc)["ConfigurationProblem"] is None
        first = exam.datasets
        upload(orthanc, [*first, our_result_lookalike(first[0]), secondary_capture(first[1])])

        elapsed = wait_for_files(scp, 4, timeout=30)
        assert scp.received_uids() == {str(ds.SOPInstanceUID) for ds in first}
        assert elapsed >= 1.5  # not before the study was stable (StableAge 2 s)

        # Our results arriving make the study unstable and stable again: nothing is re-sent.
        upload(orthanc, [secondary_capture(first[2])])
        time.sleep(2 + 2.5)
        assert len(scp.received()) == 4

        # A late image (a retake) is sent on its own.
        retake = copy.deepcopy(first[0])
        retake.SOPInstanceUID = generate_uid()
        retake.file_meta.MediaStorageSOPInstanceUID = retake.SOPInstanceUID
        upload(orthanc, [retake])
        wait_for_files(scp, 5, timeout=30)
        time.sleep(1)
        assert len(scp.received()) == 5
        assert str(retake.SOPInstanceUID) in scp.received_uids()
        status = routing_status(orthanc)
        assert status["RoutedInstances"] == 5
        assert status["PendingStudies"] == 0


def test_restart_before_stable_routes_exactly_once(tmp_path, scp, synth_exam_negative_small):
    datasets = synth_exam_negative_small.datasets
    orthanc = start_orthanc(tmp_path / "orthanc", scp.port, stable_age=4)
    try:
        upload(orthanc, datasets)
        orthanc.stop()  # inside the StableAge window: Orthanc's stable event is lost
        assert scp.received() == []

        orthanc.restart()
        wait_for_files(scp, 4, timeout=30)
        assert scp.received_uids() == {str(ds.SOPInstanceUID) for ds in datasets}

        # Restarting again (and waiting past StableAge) sends nothing a second time.
        orthanc.restart()
        time.sleep(4 + 2)
        assert len(scp.received()) == 4
        assert routing_status(orthanc)["PendingStudies"] == 0
    finally:
        orthanc.stop()


def test_names_a_missing_listener_modality(tmp_path):
    config = plugin_config(2)
    config["MammoAI"]["Modality"] = "nowhere"
    with OrthancPeer.start(
        tmp_path / "orthanc", plugins=("python",), python_script=SCRIPT, extra_config=config
    ) as orthanc:
        problem = routing_status(orthanc)["ConfigurationProblem"]
        assert '"DicomModalities" has no entry "nowhere"' in problem
