"""What a `precision` setting means, in one place: the autocast dtype, the fp32 guard around
CUDA's TF32 and autotuning, and the 8-bit levels a probability map leaves `models` as.

The ensemble, `trainer evaluate` / `finetune` and the benchmarks all autocast through
`autocast`, so "bf16" means the same thing wherever it is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Each precision's autocast dtype; None runs fp32 (TF32 is switched by `fp32_guard`)."""

LEVELS = 255
"""A map value p in [0, 1] is stored as the 8-bit level round(p × 255)."""


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast to `precision`'s dtype on `device` (any device type torch autocasts on: bf16
    on the CPU too). fp32 and tf32 switch autocast off, so fp32 stays fp32 even inside a
    caller's autocast region. The callers decide what a device admits: the ensemble refuses
    fp16 off CUDA, the trainer resolves the CPU to fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@contextmanager
def fp32_guard(device: torch.device, tf32: bool) -> Iterator[None]:
    """fp32 means fp32: TF32 for CUDA matmuls and convolutions only when `tf32`; on CUDA no
    autotuning and deterministic kernels. Restores the process's settings on exit."""
    b = torch.backends
    saved = (
        b.cuda.matmul.fp32_precision,
        b.cudnn.conv.fp32_precision,
        b.cudnn.benchmark,
        b.cudnn.deterministic,
    )
    mode = "tf32" if tf32 else "ieee"
    b.cuda.matmul.fp32_precision = b.cudnn.conv.fp32_precision = mode
    if device.type == "cuda":
        b.cudnn.benchmark, b.cudnn.deterministic = False, True
    try:
        yield
    finally:
        (
            b.cuda.matmul.fp32_precision,
            b.cudnn.conv.fp32_precision,
            b.cudnn.benchmark,
            b.cudnn.deterministic,
        ) = saved


def to_levels(p: torch.Tensor) -> torch.Tensor:
    """uint8 levels of a float map in [0, 1]: floor(p × 255 + 0.5) in fp32, NaN as 0, clipped;
    on the map's own device. The one rounding rule of the maps every output stores or shows
    (`models.results.map_levels` applies it to numpy maps). Two separate fp32 operations (no
    fused multiply-add), so every device gives the same levels."""
    return to_levels_(p.to(torch.float32, copy=True).nan_to_num_(nan=0.0).clamp_(0.0, 1.0))


def to_levels_(
    p: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """`to_levels` of an fp32 map already in [0, 1] (finite, clipped: the ensemble's), which it
    overwrites, into `out` (uint8, `p`'s shape) when given: no full-size float copy.

    p × 255 + 0.5 lies in [0.5, 255.5], where truncating to int16 and narrowing to uint8 gives
    exactly the direct uint8 cast, in vectorised conversions (about 7× faster on the CPU);
    `scratch` (int16, `p`'s shape) holds the int16 step when given (a caller converting many
    strips allocates it once)."""
    if p.dtype != torch.float32:
        raise TypeError(f"to_levels_ works on an fp32 map, not {p.dtype}")
    p.mul_(LEVELS).add_(0.5)
    whole = p.to(torch.int16) if scratch is None else scratch.copy_(p)
    return whole.to(torch.uint8) if out is None else out.copy_(whole)
