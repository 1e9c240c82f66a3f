"""GlimpseNet training: the FCGN on lesion masks, then the classifier + MIL pooling on image
labels (`trainer finetune --arch glimpsenet-demo|glimpsenet-paper --stage fcgn|mil|both`)."""

from .train import GlimpseNetOptions, GlimpseNetResult, GlimpseNetTrainingError, train

__all__ = ["GlimpseNetOptions", "GlimpseNetResult", "GlimpseNetTrainingError", "train"]
