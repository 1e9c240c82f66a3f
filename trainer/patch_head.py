"""The all-conv patch classifier, as a training-only head on the trunk.

Shen et al. first train the trunk as a classifier of lesion-centred versus background patches,
then add the top layers and train on whole images. Every cell of the trunk's last feature map
sees one patch of the input, so a 1x1 convolution on that map is the same patch classifier,
applied densely; trained against the lesion masks it teaches the trunk what a lesion looks
like, while the image-level loss trains trunk and top together. The head is not part of the
model file: inference never uses it.

GMIC needs no such head: its saliency maps are already lesion maps on a fine grid.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.family import ScoreMaps


class PatchHead(nn.Module):
    """Watches `model.trunk` and classifies each cell of its output as lesion or not."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        trunk = model.trunk
        self.classifier = nn.Conv2d(trunk.out_channels, 1, kernel_size=1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self._features: torch.Tensor | None = None
        self._hook: RemovableHandle = trunk.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._features = output if torch.is_grad_enabled() else None

    def maps(self) -> ScoreMaps:
        """Lesion probability per trunk cell for the last training forward pass, as
        `ScoreMaps` with the malignant map in both channels (there is no benign class)."""
        if self._features is None:
            raise RuntimeError("PatchHead.maps() needs a forward pass of the model with grad")
        logits = self.classifier(self._features.float())
        self._features = None
        maps = torch.sigmoid(logits).expand(-1, 2, -1, -1)
        return ScoreMaps(malignant=maps[:, 1].amax(dim=(1, 2)), benign=None, maps=maps)

    def close(self) -> None:
        self._hook.remove()


def patch_head(family: str, model: nn.Module) -> PatchHead | None:
    """The training-only mask head for `family`, or None where the model's own maps serve."""
    return PatchHead(model) if family == "allconv" else None
