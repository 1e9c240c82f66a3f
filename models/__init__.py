"""Everything from a mammogram to predictions: reading, preprocessing, GMIC, the
all-convolutional classifier, GlimpseNet, model files and the flip-TTA ensemble. No networking,
and no imports from `plugin` or `trainer`."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

_EXPORTS = {
    "Prepared": "family",
    "ScoreMaps": "family",
    "get_family": "family",
    "Crop": "geometry",
    "Flip": "geometry",
    "Geometry": "geometry",
    "Pad": "geometry",
    "Resize": "geometry",
    "ImageKind": "mammogram",
    "Laterality": "mammogram",
    "Mammogram": "mammogram",
    "MammogramError": "mammogram",
    "View": "mammogram",
    "ModelCard": "modelfile",
    "ModelFileError": "modelfile",
    "load_model": "modelfile",
    "new_model_file": "modelfile",
    "read_card": "modelfile",
    "save_model": "modelfile",
    "BreastPrediction": "results",
    "ExamPrediction": "results",
    "ImagePrediction": "results",
    "ModelInfo": "results",
    "RegionOfInterest": "results",
}
"""The package's names and their modules, imported on first use: a process that needs only
the result types (the pipeline's exam-level output process) then never imports torch."""


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


try:
    __version__ = version("mammo-ai-plugin")
except PackageNotFoundError:  # a source tree that was never installed (`make install`)
    __version__ = "0+unknown"

__all__ = sorted(_EXPORTS)
