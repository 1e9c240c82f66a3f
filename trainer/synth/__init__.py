"""Synthetic four-view screening exams: DICOM datasets with known lesion masks, for tests and demos.

    exam = synth_exam(seed=7, rows=512, cols=416, malignant=True)
    exam.image("L-CC").dataset          # pydicom Dataset, MG For Presentation, Explicit VR LE
    exam.image("L-CC").malignant_mask   # bool (rows, cols) on the same grid
    write_dataset("out/", n_exams=20, positive_fraction=0.3, seed=1, rows=512, cols=416)

A seed reproduces everything: pixels, masks and every UID. Positive exams have one malignant
lesion in one breast, visible in both its CC and MLO at the same distance from the chest wall;
any exam may also carry a benign finding.
"""

from .dataset import LABEL_COLUMNS, read_labels, read_mask, write_dataset
from .dicom import SYNTAXES, encode
from .exam import DEFAULT_COLS, DEFAULT_ROWS, VIEW_ORDER, SynthExam, SynthImage, synth_exam
from .look import LOOKS, DetectorLook
from .phantom import Lesion, LesionType

__all__ = [
    "DEFAULT_COLS",
    "DEFAULT_ROWS",
    "LABEL_COLUMNS",
    "LOOKS",
    "SYNTAXES",
    "DetectorLook",
    "VIEW_ORDER",
    "Lesion",
    "LesionType",
    "SynthExam",
    "SynthImage",
    "encode",
    "read_labels",
    "read_mask",
    "synth_exam",
    "write_dataset",
]
