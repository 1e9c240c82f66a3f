"""Import a published GMIC checkpoint (`sample_model_{1..5}.p` of nyukat/GMIC) into a model file.

The published files are bare state dicts written by `torch.save` under torch 1.1 (the legacy,
non-zip format). They are read with `weights_only=True`, so nothing but tensors is unpickled.
Every tensor the architecture needs must be present with its exact shape; tensors it does not
use are reported and left out (the published files are ~4 MB larger than the state dict of the
public class, so they may carry such extras).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..modelfile import ModelCard, file_sha256, save_model
from .network import GMIC, PRESETS
from .preprocess import default_spec

log = logging.getLogger(__name__)

UPSTREAM = "nyukat/GMIC"
UPSTREAM_COMMIT = "594029efe6184bcca3a151fa1dd46c5fd620cb25"
LICENCE = "AGPL-3.0 (published GMIC weights, nyukat/GMIC)"
PERCENT_T = {1: 0.02, 2: 0.03, 3: 0.03, 4: 0.05, 5: 0.1}
"""`percent_t` of each sample model (upstream src/constants.py); it only changes y_global."""
PUBLISHED_SHA256 = {
    1: "3b792e6de22fdccd34a43b4c1cc87a94f5f4fa8aed42722dce4e4badac347991",
    2: "b09da8d5c128f42f2a2589bfec5ffa28b16cb3d00fbc5d45913cbb402d05754e",
    3: "07800b83f06eea69c6afe05ecd83523026c391762fb6593538623acd9e715bbd",
    4: "775b3e29301fdf7d33f16f4ee5f5a5338a23d858572c66cb0097f678cd2cb4c1",
    5: "8209bef18775419e6d5575ae73a761458382aa342809fc3ff83b73e6c1fcf585",
}
"""sha256 of the five files as recorded by the repository's Git-LFS pointers."""
GMIC_PREFIXES = ("ds_net.", "left_postprocess_net.", "dn_resnet.")


class CheckpointError(ValueError):
    """A file that is not a usable GMIC checkpoint; the message says what is wrong."""


def import_checkpoint(
    src: Path,
    out: Path,
    *,
    sample_model: int = 1,
    name: str | None = None,
    version: str | None = None,
) -> ModelCard:
    """Convert `src` (a published GMIC `.p` state dict) into the model file `out`."""
    src, out = Path(src), Path(out)
    if sample_model not in PERCENT_T:
        raise CheckpointError(
            f"sample model must be one of {sorted(PERCENT_T)} (the published "
            f"sample_model_N.p), got {sample_model}"
        )
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    digest = file_sha256(src)
    state = _load_state_dict(src)

    architecture = dict(PRESETS["published"], percent_t=PERCENT_T[sample_model])
    model = GMIC(architecture)
    expected = model.state_dict()
    _check_tensors(src, state, expected)
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        log.warning(
            "%s: %d tensor(s) that GMIC does not use were left out: %s%s",
            src.name,
            len(unexpected),
            ", ".join(unexpected[:10]),
            " …" if len(unexpected) > 10 else "",
        )
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)

    matches = [n for n, h in PUBLISHED_SHA256.items() if h == digest]
    if matches and sample_model not in matches:
        log.warning(
            "%s has the published content of sample_model_%d.p, but was imported as sample "
            "model %d; its percent_t (which only affects y_global) may be wrong",
            src.name,
            matches[0],
            sample_model,
        )
    card = ModelCard(
        family="gmic",
        architecture=architecture,
        preprocessing=default_spec(architecture),
        name=name or f"gmic-sample-model-{sample_model}",
        version=version or "1.0.0",
        licence=LICENCE,
        clinical_use=False,
        provenance={
            "source_file": src.name,
            "source_sha256": digest,
            "matches_published_sha256": bool(matches),
            "upstream": UPSTREAM,
            "upstream_commit": UPSTREAM_COMMIT,
            "sample_model": sample_model,
            "unused_tensors": unexpected,
            "importer": "models.gmic.checkpoint",
        },
    )
    save_model(model, card, out)
    return card


def _load_state_dict(src: Path) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if needs:
            raise CheckpointError(
                f"{src}: refused: the file holds Python objects other than tensors (it needs "
                f"{needs.group(1)}), which are never loaded, for safety. Use the original "
                "sample_model_N.p file, a plain state dict"
            ) from None
        raise CheckpointError(
            f"{src}: not a PyTorch checkpoint that can be read safely (weights-only "
            f"unpickling failed: {_unpickler_reason(exc)})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, … for non-checkpoints
        raise CheckpointError(
            f"{src}: not a PyTorch checkpoint that can be read ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{src}: not a state dict (found {type(state).__name__}); GMIC checkpoints are a "
            "mapping of tensor names to tensors"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not all(isinstance(k, str) for k in state):
        wrapped = [k for k in not_tensors if isinstance(state[k], Mapping)]
        hint = (
            f"; it wraps a mapping under {wrapped[:3]}, extract the state dict first"
            if wrapped
            else ""
        )
        raise CheckpointError(
            f"{src}: not a state dict: {len(not_tensors)} entries are not tensors "
            f"(e.g. {not_tensors[:3]}){hint}"
        )
    return state


def _unpickler_reason(exc: Exception) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__


def _check_tensors(
    src: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    if not any(k.startswith(GMIC_PREFIXES) for k in state):
        raise CheckpointError(
            f"{src}: not a GMIC checkpoint: none of its {len(state)} tensors belongs to GMIC's "
            f"networks (ds_net, left_postprocess_net, dn_resnet); first keys: {list(state)[:3]}"
        )
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{src}: incomplete GMIC checkpoint: {len(missing)} of {len(expected)} tensors are "
            f"missing, e.g. {missing[:5]}"
        )
    wrong = [
        f"{k} {list(state[k].shape)} (needs {list(v.shape)})"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{src}: {len(wrong)} tensor(s) have the wrong shape for the published GMIC "
            f"architecture: {'; '.join(wrong[:5])}"
        )
    not_finite = [
        k for k in expected if state[k].is_floating_point() and not torch.isfinite(state[k]).all()
    ]
    if not_finite:
        raise CheckpointError(f"{src}: tensors with NaN or infinite values: {not_finite[:5]}")
