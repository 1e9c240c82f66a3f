"""A small batch of the kinds of objects the service delivers, written to disk for sender tests.

Two synthetic mammograms (one Explicit VR LE, one JPEG-LS lossless: the same SOP class in two
transfer syntaxes), a binary SEG of one of them and a Comprehensive SR referencing both, all
built with highdicom. Four objects, three SOP classes, four (SOP class, transfer syntax) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from trainer.synth import encode, synth_exam


@dataclass(frozen=True)
class SampleObject:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def write_sample_batch(folder: Path, seed: int = 3) -> list[SampleObject]:
    """Write the batch into `folder` (created) and describe each file; UIDs differ per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    exam = synth_exam(seed, rows=64, cols=64, malignant=True, benign=False)
    left = exam.image("L-CC")
    right = encode(exam.image("R-CC").dataset, "jpegls")
    objects = [left.dataset, right, _seg(left.dataset, left.malignant_mask), _sr(left.dataset)]
    written = []
    for ds in objects:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(
            SampleObject(
                path, ds.SOPClassUID, ds.SOPInstanceUID, str(ds.file_meta.TransferSyntaxUID)
            )
        )
    return written


def _seg(image: Dataset, mask: np.ndarray) -> Dataset:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="delivery-test", version="1", family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    return hd.seg.Segmentation(
        source_images=[image],
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="mammo-ai-plugin tests",
        manufacturer_model_name="delivery-test",
        software_versions="1",
        device_serial_number="1",
    )


def _sr(image: Dataset) -> Dataset:
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Finding,
            value="delivery test",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    return hd.sr.ComprehensiveSR(
        evidence=[image],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="mammo-ai-plugin tests",
    )
