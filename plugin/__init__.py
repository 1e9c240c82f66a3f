"""The DICOM service: listener, store, exam assembly, worker, outputs and delivery."""

__version__ = "0.1.0"
