"""Training throughput at full resolution: images per second of `trainer finetune`'s step.

    python -m bench.trainer                      # CPU, and CUDA when present
    python -m bench.trainer --models gmic-published --device cuda --cuda-batch-size 4

One step = augmentation on the prepared batch, forward, the family's loss, backward and an Adam
step (mixed precision on CUDA, as the trainer runs it). Inputs are random tensors of each
preset's input shape, since preprocessing is cached once per run and is not part of the step.
GlimpseNet trains in two stages, in fp32 on every device as `trainer finetune` runs it: a row
each (the FCGN on a lesion mask; Inception V3 + MIL pooling on the frozen FCGN's glimpses).
The baseline in the same process is inference (forward only, no grad) of the same model and
batch: the table shows the ratio inference/training time per image.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from models.family import get_family
from trainer import objectives
from trainer.augment import augment, default_augmentation
from trainer.evaluate import autocast
from trainer.finetune import parse_arch
from trainer.glimpsenet.objectives import fcgn_loss, mil_loss
from trainer.numerics import flush_denormal

DEFAULT_MODELS = (
    "gmic-published",
    "allconv-resnet50",
    "allconv-vgg16",
    "gmic-demo",
    "allconv-demo",
    "glimpsenet-paper",
    "glimpsenet-demo",
)


def _input(family: str, architecture: dict, batch: int, generator: torch.Generator):
    channels = 1 if family == "gmic" else 3
    return torch.randn(batch, channels, *architecture["input_shape"], generator=generator)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, steps: int, step, mode) -> float:
    """Seconds per step after a warm-up step (allocations, cudnn autotune)."""
    mode()
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_glimpsenet(name: str, device: torch.device, batch: int, steps: int) -> list[dict]:
    """GlimpseNet trains in two stages (`trainer.glimpsenet.train`), in fp32: a row each. The
    FCGN stage regresses a lesion mask; the MIL stage trains Inception V3 on the frozen
    FCGN's glimpses, cut once per run, so its step starts from the crops."""
    _, _, architecture = parse_arch(name)
    torch.manual_seed(0)
    family = get_family("glimpsenet")
    module = family.build(architecture).to(device)
    c = module.config
    x = torch.rand(batch, 1, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    target = torch.zeros(batch, 1, c.fcgn_size, c.fcgn_size, device=device)
    target[:, :, c.fcgn_size // 3 : c.fcgn_size // 2, c.fcgn_size // 3 : c.fcgn_size // 2] = 1.0
    with torch.no_grad():
        crops = module.eval().crops(x, module.glimpse_boxes(module.mask(x)))
    labels = torch.tensor([[0.0, 0.0, float(i % 2)] for i in range(batch)], device=device)
    fcgn = list(module.fcgn.parameters())
    classifier = module.classifier_parameters()
    fcgn_opt = torch.optim.Adam(fcgn, lr=1e-3)
    mil_opt = torch.optim.Adam(classifier, lr=1e-4, weight_decay=0.01)

    def fcgn_step() -> None:
        fcgn_opt.zero_grad(set_to_none=True)
        fcgn_loss(module.fcgn(module.fcgn_input(x)), target).backward()
        fcgn_opt.step()

    def mil_step() -> None:
        mil_opt.zero_grad(set_to_none=True)
        pooled = module.pool(module.classify(crops))
        mil_loss(pooled, labels, torch.ones_like(labels)).backward()
        mil_opt.step()

    def mil_mode() -> None:
        module.train()
        module.fcgn.eval()

    @torch.no_grad()
    def infer_step() -> None:
        family.score_maps(module(x))

    infer = batch / _timed(device, steps, infer_step, module.eval)
    stages = (("fcgn", fcgn_step, module.train, fcgn), ("mil", mil_step, mil_mode, classifier))
    return [
        {
            "model": f"{name} {stage}",
            "device": device.type,
            "precision": "fp32",
            "batch": batch,
            "params_M": sum(p.numel() for p in params) / 1e6,
            "train": batch / _timed(device, steps, step, mode),
            "infer": infer,
        }
        for stage, step, mode, params in stages
    ]


def bench(name: str, device: torch.device, batch: int, steps: int, precision: str) -> list[dict]:
    family_name, _, architecture = parse_arch(name)
    if family_name == "glimpsenet":
        return bench_glimpsenet(name, device, batch, steps)
    family = get_family(family_name)
    torch.manual_seed(0)
    module = family.build(architecture).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-5, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(0)
    x = _input(family_name, architecture, batch, generator)
    malignant = torch.tensor([float(i % 2) for i in range(batch)], device=device)
    benign = torch.zeros(batch, device=device)
    aug = default_augmentation(family_name)

    def train_step() -> None:
        xb = augment(x, aug, generator)[0].to(device)
        with autocast(device, precision):
            out = module(xb)
        loss = objectives.loss(family_name, out, malignant, benign, objectives.DEFAULT_BETA)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step() -> None:
        with autocast(device, precision):
            family.score_maps(module(x.to(device)))

    return [
        {
            "model": name,
            "device": device.type,
            "precision": precision,
            "batch": batch,
            "params_M": sum(p.numel() for p in module.parameters()) / 1e6,
            "train": batch / _timed(device, steps, train_step, module.train),
            "infer": batch / _timed(device, steps, infer_step, module.eval),
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument(
        "--device", default="all", help="all (cpu, and cuda if present) | cpu | cuda"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model (CPU)")
    parser.add_argument("--cuda-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1, help="CPU batch")
    parser.add_argument("--cuda-batch-size", type=int, default=4)
    parser.add_argument(
        "--precision",
        default="bf16",
        choices=["fp32", "bf16", "fp16"],
        help="CUDA precision (CPU always fp32)",
    )
    args = parser.parse_args()

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)}")
    else:
        print("cuda: not available (CPU rows only)")
    header = (
        f"{'model':21s} {'device':6s} {'prec':5s} {'batch':>5s} {'params M':>8s} "
        f"{'train img/s':>11s} {'infer img/s':>11s} {'infer/train':>11s}"
    )
    print(header)
    print("-" * len(header))
    with flush_denormal():  # as `trainer finetune` trains; restored on the way out
        for device in devices:
            cuda = device.type == "cuda"
            for name in args.models.split(","):
                rows = bench(
                    name.strip(),
                    device,
                    args.cuda_batch_size if cuda else args.batch_size,
                    args.cuda_steps if cuda else args.steps,
                    args.precision if cuda else "fp32",
                )
                for r in rows:
                    print(
                        f"{r['model']:21s} {r['device']:6s} {r['precision']:5s} {r['batch']:5d} "
                        f"{r['params_M']:8.2f} {r['train']:11.3f} {r['infer']:11.3f} "
                        f"{r['infer'] / r['train']:11.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
