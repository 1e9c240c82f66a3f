"""A training run's checkpoint: its state on disk, written atomically, resumed only by the
run that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.durable import write_atomically


class Checkpoint:
    """The state `torch.save`d at `path` with what it is valid for: the trainer's checkpoint
    format, the site data's fingerprint and the key of the options that shape the weights.
    `load` refuses any other with `error`, the trainer's own error type, saying what to do."""

    def __init__(
        self, path: Path, key: str, fingerprint: str, format_version: int, error: type[Exception]
    ) -> None:
        self.path, self.key, self.fingerprint = path, key, fingerprint
        self.format_version, self.error = format_version, error

    def load(self) -> dict[str, Any]:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("format") != self.format_version:
            raise self.error(
                f"{self.path}: checkpoint from another trainer version; delete the work folder "
                "to start over"
            )
        if state["fingerprint"] != self.fingerprint:
            raise self.error(
                f"{self.path}: checkpoint was made on different site data; delete the work "
                "folder to start over"
            )
        if state["key"] != self.key:
            raise self.error(
                f"{self.path}: checkpoint was made with different options; rerun with the same "
                "options or delete the work folder"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        state = {
            "format": self.format_version,
            "key": self.key,
            "fingerprint": self.fingerprint,
            **state,
        }
        write_atomically(self.path, lambda f: torch.save(state, f))
