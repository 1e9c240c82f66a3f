"""Glimpse selection: candidate windows scored from the FCGN mask, greedy non-maximum
suppression at IoU 0.5, the top N kept; and the crops those boxes cut from the full-resolution
input.

The paper fixes only the NMS threshold; the proposals (square windows on a regular grid, scored
by their mean mask value), their size, stride and number are ours and live in the card. The
selection is a discrete decision, so it runs in float32 on the model's device even under
autocast: reduced precision must never move a glimpse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def candidate_windows(
    mask: torch.Tensor, window: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) mean mask value of every window×window window on a stride grid, and their
    (K, 4) boxes as (top, left, bottom, right) mask pixels, in row-major order."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"glimpse selection needs an (N, 1, h, w) mask, got {tuple(mask.shape)}")
    h, w = mask.shape[-2:]
    if window > min(h, w):
        raise ValueError(f"glimpse window {window} is larger than the {h}x{w} mask")
    scores = F.avg_pool2d(mask.float(), window, stride).flatten(1)
    rows = torch.arange(0, h - window + 1, stride, device=mask.device, dtype=torch.float32)
    cols = torch.arange(0, w - window + 1, stride, device=mask.device, dtype=torch.float32)
    top, left = torch.meshgrid(rows, cols, indexing="ij")
    top, left = top.flatten(), left.flatten()
    boxes = torch.stack([top, left, top + window, left + window], dim=1)
    return scores, boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) intersection over union of (A, 4) and (B, 4) (top, left, bottom, right) boxes."""
    top = torch.maximum(a[:, None, 0], b[None, :, 0])
    left = torch.maximum(a[:, None, 1], b[None, :, 1])
    bottom = torch.minimum(a[:, None, 2], b[None, :, 2])
    right = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = (bottom - top).clamp(min=0) * (right - left).clamp(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def greedy_nms(scores: torch.Tensor, boxes: torch.Tensor, iou: float, keep: int) -> torch.Tensor:
    """Indices of at most `keep` boxes: repeatedly the best-scoring one left, then drop every
    box whose IoU with it exceeds `iou`. Ties go to the lower index. (K,) scores, (K, 4) boxes."""
    overlap = box_iou(boxes, boxes) > iou
    alive = torch.ones_like(scores, dtype=torch.bool)
    chosen = []
    for _ in range(min(keep, scores.numel())):
        masked = torch.where(alive, scores, torch.full_like(scores, float("-inf")))
        best = int(torch.argmax(masked))  # argmax returns the first of equal maxima
        if not alive[best]:
            break
        chosen.append(best)
        alive &= ~overlap[best]
    return torch.tensor(chosen, dtype=torch.long, device=scores.device)


def select_glimpses(
    mask: torch.Tensor, window: int, stride: int, count: int, iou: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, count, 4) boxes in mask pixels, best first, and their (N, count) window scores.

    When NMS leaves fewer than `count` windows (a small mask), the best suppressed windows
    fill the rest, so every image yields the same number of glimpses.
    """
    with torch.autocast(mask.device.type, enabled=False):
        scores, boxes = candidate_windows(mask.float(), window, stride)
        if scores.shape[1] < count:
            raise ValueError(
                f"{scores.shape[1]} candidate windows but {count} glimpses asked for; lower "
                "the glimpse count or the window stride"
            )
        out_boxes, out_scores = [], []
        for s in scores:
            kept = greedy_nms(s, boxes, iou, count)
            if kept.numel() < count:
                rest = torch.ones_like(s, dtype=torch.bool)
                rest[kept] = False
                order = torch.sort(
                    torch.where(rest, s, float("-inf")), descending=True, stable=True
                )
                kept = torch.cat([kept, order.indices[: count - kept.numel()]])
            out_boxes.append(boxes[kept])
            out_scores.append(s[kept])
        return torch.stack(out_boxes), torch.stack(out_scores)


def crop_glimpses(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, J, C, size, size) crops of (N, C, H, W) `image` at (N, J, 4) integer boxes in image
    pixels, resampled bilinearly (antialiased when shrinking). All boxes have one size."""
    n, j = boxes.shape[:2]
    b = boxes.round().long().tolist()
    crops = torch.stack([image[i, :, t:bo, le:ri] for i in range(n) for (t, le, bo, ri) in b[i]])
    if crops.shape[-2:] != (size, size):
        crops = F.interpolate(
            crops,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=crops.shape[-1] > size,
        )
    return crops.reshape(n, j, *crops.shape[1:])
