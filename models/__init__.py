"""Everything from a mammogram to predictions: reading, preprocessing, GMIC, the
all-convolutional classifier, GlimpseNet, model files and the flip-TTA ensemble. No networking,
and no imports from `plugin` or `trainer`."""

from importlib.metadata import PackageNotFoundError, version

from .family import Prepared, ScoreMaps, get_family
from .geometry import Crop, Flip, Geometry, Pad, Resize
from .mammogram import ImageKind, Laterality, Mammogram, MammogramError, View
from .modelfile import (
    ModelCard,
    ModelFileError,
    load_model,
    new_model_file,
    read_card,
    save_model,
)
from .results import (
    BreastPrediction,
    ExamPrediction,
    ImagePrediction,
    ModelInfo,
    RegionOfInterest,
)

try:
    __version__ = version("mammo-ai-plugin")
except PackageNotFoundError:  # a source tree that was never installed (`make install`)
    __version__ = "0+unknown"

__all__ = [
    "BreastPrediction",
    "Crop",
    "ExamPrediction",
    "Flip",
    "Geometry",
    "ImageKind",
    "ImagePrediction",
    "Laterality",
    "Mammogram",
    "MammogramError",
    "ModelCard",
    "ModelFileError",
    "ModelInfo",
    "Pad",
    "Prepared",
    "RegionOfInterest",
    "Resize",
    "ScoreMaps",
    "View",
    "get_family",
    "load_model",
    "new_model_file",
    "read_card",
    "save_model",
]
