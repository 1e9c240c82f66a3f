"""Model inputs for site images, preprocessed once and cached.

A family's preprocessing is deterministic, so each image is decoded and preprocessed once per
(image file, preprocessing spec) and reused by every epoch, by validation and by evaluation.
Inputs live in memory up to a budget and on disk (one `.npy` per image, keyed by the file's
identity and the spec) when a cache folder is given, so a resumed or repeated run skips the
decode too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.family import ModelFamily
from models.reading import read_mammogram_file

from .sitedata import SiteImage

DEFAULT_MEMORY_BUDGET = 2 * 1024**3


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
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def prepare(self, images: Sequence[SiteImage], progress: bool = True) -> None:
        """Preprocess every image not yet cached (with a progress bar)."""
        todo = [im for im in images if not self._cached(im)]
        for im in tqdm(todo, desc="preprocess", unit="img", disable=not progress or not todo):
            self.get(im)

    def get(self, image: SiteImage) -> torch.Tensor:
        """(C, H, W) float32 model input of one image."""
        key = image.sop_instance_uid
        if key in self._memory:
            return self._memory[key]
        path = self._disk_path(image)
        if path is not None and path.exists():
            tensor = torch.from_numpy(np.load(path))
        else:
            mammogram = read_mammogram_file(image.path)
            tensor = self.family.preprocess(mammogram, self.spec).tensor.float().contiguous()
            if path is not None:
                tmp = path.with_name(path.name + ".partial.npy")
                np.save(tmp, tensor.numpy())
                os.replace(tmp, path)
        size = tensor.numel() * tensor.element_size()
        if self._memory_bytes + size <= self.memory_budget:
            self._memory[key] = tensor
            self._memory_bytes += size
        return tensor

    def batch(self, images: Sequence[SiteImage]) -> torch.Tensor:
        return torch.stack([self.get(im) for im in images])

    def _cached(self, image: SiteImage) -> bool:
        if image.sop_instance_uid in self._memory:
            return True
        path = self._disk_path(image)
        return path is not None and path.exists()

    def _disk_path(self, image: SiteImage) -> Path | None:
        if self.cache_dir is None:
            return None
        st = image.path.stat()
        ident = f"{self._spec_key}\0{image.sop_instance_uid}\0{st.st_size}\0{st.st_mtime_ns}"
        return self.cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".npy")
