"""Reading the chosen images of an exam for the models, shared by the service's worker and
`plugin run`.

The selection policy has already chosen these images (fallbacks such as synthetic 2D or
implant-displaced views included), so they are decoded as chosen rather than judged again. An
image whose header or pixel data cannot be read is reported with the reason and left out: the
failure is in the bytes, so trying again would fail the same way. The reasons name what is
wrong, never a header value (they reach the audit trail). The headers kept for the output
builders lose the attributes those cannot copy (`header_repair`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread

from models.mammogram import Mammogram, MammogramError
from models.pixels import read_mammogram
from plugin.header_repair import copyable_header
from plugin.observability import cap
from plugin.outputs.common import header_copy


@dataclass(frozen=True)
class Decoded:
    mammograms: list[Mammogram]
    datasets: dict[str, Dataset]
    """SOPInstanceUID → data set, the sources the output builders reference."""
    failed: list[tuple[str, str]]
    """(the caller's key, reason) of images that could not be decoded."""


def decode(
    files: Sequence[tuple[str, Path]], *, keep_pixels: bool = True, native_pixels: bool = False
) -> Decoded:
    """Read each (key, path). `keep_pixels=False` keeps only the headers of the source data
    sets: only the heat-map needs the source pixels, and without them the exam's compressed
    and decoded pixel data (tens of MB per mammogram) are freed as soon as each image is read
    for the models. `native_pixels` stores a compressed source's decoded pixels natively in
    the kept data set, for sources that travel to another process: pydicom's decoded-pixel
    cache is not used after pickling (it is keyed by object ids), and the heat-map would
    decode the image a second time there (0.9 s for a 3328x2560 JPEG 2000 mammogram)."""
    mammograms, datasets, failed = [], {}, []
    for key, path in files:
        try:
            ds = dcmread(path)
            mammogram = read_mammogram(ds, require_screening=False)
            if keep_pixels and native_pixels and ds.file_meta.TransferSyntaxUID.is_compressed:
                _store_native(ds)
            kept, _ = copyable_header(ds if keep_pixels else header_copy(ds))
        except MammogramError as exc:
            failed.append((key, cap(str(exc))))
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom and codecs raise any type for bad bytes
            failed.append((key, f"image cannot be read or decoded ({type(exc).__name__})"))
            continue
        mammograms.append(mammogram)
        datasets[mammogram.sop_instance_uid] = kept
    return Decoded(mammograms, datasets, failed)


def _store_native(ds: Dataset) -> None:
    """Replace compressed pixel data by the pixels `read_mammogram` decoded (pydicom's cache),
    uncompressed, with the same photometric interpretation, bit depth and SOP Instance UID."""
    ds.set_pixel_data(
        ds.pixel_array,
        ds.PhotometricInterpretation,
        int(ds.BitsStored),
        generate_instance_uid=False,
    )
