"""The DICOM service: listener, store, exam assembly, worker, outputs and delivery."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mammo-ai-plugin")
except PackageNotFoundError:  # a source tree that was never installed (`make install`)
    __version__ = "0+unknown"
