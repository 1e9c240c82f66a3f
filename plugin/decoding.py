"""Reading the chosen images of an exam for the models, shared by the service's worker and
`plugin run`.

The selection policy has already chosen these images (fallbacks such as synthetic 2D or
implant-displaced views included), so they are decoded as chosen rather than judged again. An
image whose header or pixel data cannot be read is reported with the reason and left out: the
failure is in the bytes, so trying again would fail the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread

from models.mammogram import Mammogram, MammogramError
from models.reading import read_mammogram
from plugin.outputs.common import header_copy


@dataclass(frozen=True)
class Decoded:
    mammograms: list[Mammogram]
    datasets: dict[str, Dataset]
    """SOPInstanceUID → data set, the sources the output builders reference."""
    failed: list[tuple[str, str]]
    """(the caller's key, reason) of images that could not be decoded."""


def decode(files: Sequence[tuple[str, Path]], *, keep_pixels: bool = True) -> Decoded:
    """Read each (key, path). `keep_pixels=False` keeps only the headers of the source data
    sets: only the heat-map needs the source pixels, and without them the exam's compressed
    and decoded pixel data (tens of MB per mammogram) are freed as soon as each image is read
    for the models."""
    mammograms, datasets, failed = [], {}, []
    for key, path in files:
        try:
            ds = dcmread(path)
            mammograms.append(read_mammogram(ds, require_screening=False))
        except MammogramError as exc:
            failed.append((key, str(exc)))
            continue
        except (ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
            # pydicom and codec errors for broken pixel data.
            failed.append((key, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})"))
            continue
        datasets[str(ds.SOPInstanceUID)] = ds if keep_pixels else header_copy(ds)
    return Decoded(mammograms, datasets, failed)
