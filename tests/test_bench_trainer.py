"""bench.trainer's GlimpseNet rows run, one per training stage, so the benchmark does not rot
between the GPU sessions that read it. No timing is asserted. A few seconds on 2 cores."""

from __future__ import annotations

import torch

from bench.trainer import bench


def test_glimpsenet_has_a_row_per_training_stage():
    rows = bench("glimpsenet-demo", torch.device("cpu"), batch=2, steps=1, precision="bf16")
    assert [r["model"] for r in rows] == ["glimpsenet-demo fcgn", "glimpsenet-demo mil"]
    for r in rows:
        assert r["precision"] == "fp32"  # as the trainer runs GlimpseNet, whatever is asked
        assert r["train"] > 0 and r["infer"] > 0 and r["params_M"] > 0
