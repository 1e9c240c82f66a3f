"""GMIC's forward pass, ours against the authors' code (nyukat/GMIC), side by side on the CPU.

The authors' code is AGPL: this script only *runs* a checkout of it that you name; nothing of it
is copied here. Both models get the published parameters (`run_model.py`: cam 46x30, K = 6
crops of 256x256, percent_t 0.02) and the same random weights: the authors' module is
initialised, written as a legacy `.p` state dict like the published sample models, and imported
into a model file by our importer (`models.gmic.checkpoint`), so the comparison also exercises
that path. Outputs are checked to agree before anything is timed.

Forwards alternate (ours, theirs, theirs, ours, …) on the same published-size input with the
same torch thread count, after one warm-up each, so drift and neighbours hit both alike.

    git clone https://github.com/nyukat/GMIC /tmp/gmic-authors   # any checkout of 594029e
    python -m bench.gmic_authors --authors-code /tmp/gmic-authors [--repeats 7] [--threads 2]
    python -m bench.gmic_authors --authors-code /tmp/gmic-authors --profile   # where time goes

The authors' modules import torchvision for one helper (`conv3x3`); where torchvision is not
installed (it has no CPU build here) the script provides that helper at run time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

from models import load_model
from models.gmic import GMIC, PRESETS, import_checkpoint

PUBLISHED = PRESETS["published"]
AUTHORS_PARAMETERS = {
    # src/scripts/run_model.py (the sample models) and src/constants.py (percent_t of model 1)
    "device_type": "cpu",
    "gpu_number": 0,
    "max_crop_noise": (100, 100),
    "max_crop_size_noise": 100,
    "cam_size": tuple(PUBLISHED["cam_size"]),
    "K": PUBLISHED["K"],
    "crop_shape": tuple(PUBLISHED["crop_shape"]),
    "post_processing_dim": PUBLISHED["post_processing_dim"],
    "num_classes": 2,
    "use_v1_global": False,
    "percent_t": PUBLISHED["percent_t"],
}


class AuthorsCodeError(SystemExit):
    """The named checkout cannot be used; the message says what to do."""


def authors_gmic_class(root: Path) -> type[nn.Module]:
    """The authors' `GMIC` class from a checkout at `root` (its `src/` package on sys.path)."""
    entry = root / "src" / "modeling" / "gmic.py"
    if not entry.is_file():
        raise AuthorsCodeError(
            f"--authors-code {root}: no src/modeling/gmic.py there; pass the root of a checkout "
            "of https://github.com/nyukat/GMIC (commit 594029e)"
        )
    if importlib.util.find_spec("torchvision") is None:
        sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
        sys.modules.setdefault("torchvision.models", types.ModuleType("torchvision.models"))
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.conv3x3 = _conv3x3
        sys.modules.setdefault("torchvision.models.resnet", resnet)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("src.modeling.gmic")
    except ImportError as exc:
        raise AuthorsCodeError(
            f"--authors-code {root}: importing the authors' GMIC failed ({exc}); install what "
            "it needs or use a checkout of commit 594029e"
        ) from None
    return module.GMIC


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1):
    """torchvision's documented `conv3x3`: 3x3, padding = dilation, no bias."""
    return nn.Conv2d(
        in_planes,
        out_planes,
        3,
        stride=stride,
        padding=dilation,
        groups=groups,
        dilation=dilation,
        bias=False,
    )


def randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial weights and BatchNorm statistics (eval mode is what we time)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
            elif tensor.dim() == 1:  # BatchNorm weight
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 + 0.8)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)


def build_pair(root: Path, folder: Path, seed: int) -> tuple[nn.Module, GMIC]:
    """The authors' model and ours with the same weights, both in eval mode."""
    authors = authors_gmic_class(root)(AUTHORS_PARAMETERS)
    randomise(authors, seed)
    checkpoint = folder / "authors_random.p"
    torch.save(authors.state_dict(), checkpoint, _use_new_zipfile_serialization=False)
    import_checkpoint(checkpoint, folder / "ours.safetensors", sample_model=1)
    ours = load_model(folder / "ours.safetensors")
    return authors.eval(), ours


def compare(authors: nn.Module, ours: GMIC, x: torch.Tensor) -> dict[str, float]:
    """Largest differences between the two on `x`; the crops must be the same ones."""
    with torch.no_grad():
        y_theirs = authors(x)
        out = ours(x)
    same_crops = torch.equal(
        out.roi_positions, torch.as_tensor(authors.patch_locations).long().to(out.roi_positions)
    )
    if not same_crops:
        raise SystemExit(
            "the two models picked different crops; the comparison is meaningless: "
            f"ours {out.roi_positions.tolist()}, theirs {authors.patch_locations.tolist()}"
        )
    return {
        "y_fusion": (out.y_fusion - y_theirs).abs().max().item(),
        "y_global": (out.y_global - authors.y_global).abs().max().item(),
        "y_local": (out.y_local - authors.y_local).abs().max().item(),
        "saliency": (out.saliency - authors.saliency_map).abs().max().item(),
        "attention": (out.attention - authors.patch_attns).abs().max().item(),
    }


def time_interleaved(
    models: dict[str, nn.Module], x: torch.Tensor, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds per forward for each model, alternating which goes first."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    names = list(models)
    with torch.no_grad():
        for model in models.values():
            model(x)  # warm-up: allocator and kernel selection
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                wall, cpu = time.perf_counter(), time.process_time()
                models[name](x)
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def profile(models: dict[str, nn.Module], x: torch.Tensor, rows: int) -> None:
    """torch.profiler's table of one forward per model, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    with torch.no_grad():
        for name, model in models.items():
            model(x)
            with run_profiler(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
            print(f"\n== {name}: one forward, top {rows} operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--authors-code",
        type=Path,
        required=True,
        help="root of a checkout of https://github.com/nyukat/GMIC (commit 594029e)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows, cols = PUBLISHED["input_shape"]
    x = torch.randn(args.batch, 1, rows, cols, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        authors, ours = build_pair(args.authors_code.resolve(), Path(tmp), args.seed)
    diffs = compare(authors, ours, x)
    print("max |ours - authors| on the same input and weights (same crops): ")
    print("  " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    models = {"ours (models.gmic)": ours, "authors (nyukat/GMIC)": authors}
    if args.profile:
        profile(models, x, rows=15)
    times = time_interleaved(models, x, args.repeats)

    print(
        f"\nmachine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}; torch "
        f"{torch.__version__}; {args.threads} torch threads; input {args.batch}x1x{rows}x{cols}; "
        f"median of {args.repeats}, interleaved"
    )
    header = f"{'GMIC forward (published size)':30} {'wall s':>8} {'min s':>8} {'CPU s':>8}"
    print(header)
    print("-" * len(header))
    medians = {}
    for name, samples in times.items():
        wall = [w for w, _ in samples]
        medians[name] = statistics.median(wall)
        cpu = statistics.median(c for _, c in samples)
        print(f"{name:30} {medians[name]:8.3f} {min(wall):8.3f} {cpu:8.3f}")
    ours_s, theirs_s = medians.values()
    print(f"ratio ours/authors (median wall): {ours_s / theirs_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
