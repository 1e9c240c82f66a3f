"""Model inputs for site images, preprocessed once and cached, and their lesion masks on the
input grid.

A family's preprocessing is deterministic, so each image is decoded and preprocessed once per
(image file, preprocessing spec) and reused by every epoch, by validation and by evaluation.
Inputs live in memory up to a budget and on disk (one `.npy` per image, keyed by the file's
identity and the spec) when a cache folder is given, so a resumed or repeated run skips the
decode too. Lesion masks go through the same preprocessing geometry (they must land where the
lesion lands in the input) and are kept at a quarter of the input resolution, as the fraction
of each cell that is lesion: enough for model maps, which are coarser still.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.durable import write_atomically
from models.family import ModelFamily, Prepared
from models.reading import read_mammogram_file

from .progress import progress as progress_bar
from .sitedata import MaskFileError, SiteImage

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
MASK_STRIDE = 4
"""Input pixels per lesion-mask cell, per axis."""


class InputCacheError(OSError):
    """The input cache could not be written (a full disk, a file size limit, no permission)."""


class InputCache:
    def __init__(
        self,
        family: ModelFamily,
        spec: dict[str, Any],
        cache_dir: Path | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.family = family
        self.spec = spec
        self.cache_dir = cache_dir
        self.memory_budget = memory_budget
        self._spec_key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_bytes = 0
        self._masks: dict[str, torch.Tensor] = {}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def prepare(
        self, images: Sequence[SiteImage], progress: bool = True, masks: bool = False
    ) -> None:
        """Preprocess every image not yet cached (with a progress bar), and with `masks` its
        lesion masks too."""
        todo = [im for im in images if not self._cached(im, masks)]
        for im in progress_bar(todo, "preprocess", "img", enabled=progress and bool(todo)):
            if masks:
                self.masks(im)
            self.get(im)

    def get(self, image: SiteImage) -> torch.Tensor:
        """(C, H, W) float32 model input of one image."""
        key = image.sop_instance_uid
        if key in self._memory:
            return self._memory[key]
        path = self._disk_path(image, "input")
        if path is None or not path.exists():
            return self._decode(image, with_masks=False)
        tensor = torch.from_numpy(np.load(path))
        self._keep(key, tensor)
        return tensor

    def masks(self, image: SiteImage) -> torch.Tensor | None:
        """(2, H/4, W/4) uint8 lesion fractions on the input grid (channel 0 benign, 1
        malignant, as in `ScoreMaps`; 255 = the cell is all lesion), or None for an image
        without a mask in labels.csv."""
        if not image.lesion_masks:
            return None
        key = image.sop_instance_uid
        if key not in self._masks:
            path = self._disk_path(image, "masks")
            if path is not None and path.exists():
                self._masks[key] = torch.from_numpy(np.load(path))
            else:
                self._decode(image, with_masks=True)
        return self._masks[key]

    def batch(self, images: Sequence[SiteImage]) -> torch.Tensor:
        return torch.stack([self.get(im) for im in images])

    def _decode(self, image: SiteImage, with_masks: bool) -> torch.Tensor:
        """Read and preprocess one image; cache and return its input, and cache its masks
        `with_masks`."""
        prepared = self.family.preprocess(read_mammogram_file(image.path), self.spec)
        tensor = prepared.tensor.float().contiguous()
        self._save(self._disk_path(image, "input"), tensor)
        self._keep(image.sop_instance_uid, tensor)
        if with_masks and image.lesion_masks:
            masks = lesion_fractions(image, prepared)
            self._save(self._disk_path(image, "masks"), masks)
            self._masks[image.sop_instance_uid] = masks
        return tensor

    def _keep(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._memory:  # masks decoded after the input was kept
            return
        size = tensor.numel() * tensor.element_size()
        if self._memory_bytes + size <= self.memory_budget:
            self._memory[key] = tensor
            self._memory_bytes += size

    @staticmethod
    def _save(path: Path | None, tensor: torch.Tensor) -> None:
        if path is None:
            return
        # Whole or absent, through the one atomic writer: a training run killed mid-write
        # leaves no truncated entry for the next run to load (about 10 ms an entry).
        array = tensor.numpy()
        try:
            write_atomically(path, lambda fp: np.save(fp, array))
        except OSError as exc:
            # numpy reports a short write as "N requested and M written": say where and why.
            free = shutil.disk_usage(path.parent).free
            raise InputCacheError(
                f"could not write the preprocessed-input cache in {path.parent} ({exc}; "
                f"{free / 2**20:.0f} MiB free there, each image needs "
                f"{array.nbytes / 2**20:.1f} MiB): free disk space, or pass --work-dir on a "
                "disk with room, then rerun the same command: the images cached so far are kept"
            ) from exc

    def _cached(self, image: SiteImage, masks: bool) -> bool:
        def cached(memory: dict[str, torch.Tensor], kind: str) -> bool:
            path = self._disk_path(image, kind)
            return image.sop_instance_uid in memory or (path is not None and path.exists())

        need_masks = masks and bool(image.lesion_masks)
        return cached(self._memory, "input") and (not need_masks or cached(self._masks, "masks"))

    def _disk_path(self, image: SiteImage, kind: str) -> Path | None:
        if self.cache_dir is None:
            return None
        st = image.path.stat()
        ident = f"{self._spec_key}\0{image.sop_instance_uid}\0{st.st_size}\0{st.st_mtime_ns}"
        if kind == "masks":
            marks = [f"{m}\0{m.stat().st_size}\0{m.stat().st_mtime_ns}" for m in image.lesion_masks]
            ident += "\0masks\0" + "\0".join(marks)
        return self.cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".npy")


def mask_grid(input_shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the lesion-mask grid for a model input of `input_shape`."""
    return max(1, input_shape[0] // MASK_STRIDE), max(1, input_shape[1] // MASK_STRIDE)


def lesion_fractions(image: SiteImage, prepared: Prepared) -> torch.Tensor:
    """(2, H/4, W/4) uint8: the fraction of each cell covered by the benign (0) and malignant
    (1) masks of `image`, through the same geometry as its pixels."""
    geometry = prepared.geometry
    shape = mask_grid(geometry.input_shape)
    out = np.zeros((2, *shape), dtype=np.uint8)
    for channel, path in ((0, image.benign_mask), (1, image.malignant_mask)):
        if path is None:
            continue
        try:
            with Image.open(path) as png:
                mask = np.asarray(png.convert("L")) > 0
        except (OSError, ValueError) as exc:
            raise MaskFileError(f"{path}: not a readable mask image ({exc})") from exc
        if mask.shape != tuple(geometry.source_shape):
            raise MaskFileError(
                f"{path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                f"{image.path.name} is {geometry.source_shape[0]}x{geometry.source_shape[1]}; "
                "a mask must be on the image's own pixel grid"
            )
        fraction = geometry.area_to_input(mask.astype(np.float32), shape)
        out[channel] = np.rint(np.clip(fraction, 0.0, 1.0) * 255)
    return torch.from_numpy(out)
