"""Weight averaging of fine-tuned models: `average_models` (a uniform "model soup").

Models fine-tuned from one starting model, with other data, losses or seeds, often sit in one
basin of the loss, where the mean of their weights is a model at least as good as each
(Wortsman et al., "Model soups", ICML 2022). `average_models` writes that mean as a medfm model
folder: every floating-point tensor of the state dict averaged (BatchNorm's running statistics
too), integer ones (BatchNorm's batch counts) the largest. Averaging models trained from
different starting points gives a broken model; that is the caller's to avoid.

The averaged folder's config.json lists where each model came from (``averaged_from``: its
folder, starting checkpoint and training config) and whether single clicks use SAM's three
outputs (``multimask_clicks``, which the models must agree on). The models' calibrated mask
thresholds are not carried over: calibrate the average (`medfm.seg.calibrate`). Averaging the
same models into a folder that already holds their average leaves it as it is, calibration and
all (a recipe run again).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medfm.errors import MedfmError
from medfm.io.memory import check_memory
from medfm.io.weights import CONFIG_NAME, WEIGHTS_NAME, safetensors_shapes
from medfm.seg.config import AveragedFrom
from medfm.seg.models import (
    check_pretrained,
    load_pretrained,
    model_folder,
    read_model_config,
    save_pretrained,
)

__all__ = ["average_models"]


def average_models(models: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the uniform weight average of the medfm model folders (or training runs)
    ``models`` (at least two, one architecture) to the model folder ``out``; returns it."""
    if len(models) < 2:
        raise MedfmError(f"give at least two models to average, got {len(models)}")
    folders = [model_folder(m, purpose="averaging reads its weights") for m in models]
    out = Path(out)
    if any(out.resolve() == f.resolve() for f in folders):
        raise MedfmError(f"--out {out} is one of the models to average; write the average apart")
    # every folder checked (config.json against its weights) before any model is built; all
    # are held at once, with the stacked tensor of one key and the mean (one more model)
    need = [check_pretrained(f)[2] for f in folders]
    check_memory(
        sum(need) + max(need),
        f"averaging {len(folders)} models",
        hint="average fewer models at a time, or on a machine with more memory",
    )
    loaded = [load_pretrained(f) for f in folders]
    first, config0 = loaded[0]
    for folder, (_, config) in zip(folders[1:], loaded[1:], strict=True):
        if (config.model, config.spec) != (config0.model, config0.spec):
            raise MedfmError(
                f"{folder} is a {config.model} model of another architecture than "
                f"{folders[0]} ({config0.model}); only models of one architecture average"
            )
    clicks = {config.click_multimask() for _, config in loaded}
    if len(clicks) > 1:
        raise MedfmError(
            "the models disagree on single clicks (some were trained with SAM's three outputs, "
            "some with the single output); average models trained the same way"
        )
    states = [model.state_dict() for model, _ in loaded]
    mean = {}
    for key, value in states[0].items():
        stacked = torch.stack([s[key] for s in states])
        if value.is_floating_point():
            mean[key] = stacked.double().mean(dim=0).to(value.dtype)
        else:
            mean[key] = stacked.max(dim=0).values
    first.load_state_dict(mean)
    sources = [
        AveragedFrom(
            folder=str(folder),
            base_checkpoint=config.base_checkpoint,
            train_config=config.train_config,
        )
        for folder, (_, config) in zip(folders, loaded, strict=True)
    ]
    extra = {"averaged_from": sources, "multimask_clicks": clicks.pop()}
    if _written(out, first.state_dict(), extra):
        return out  # the same average again (a recipe run twice): keep it, calibration and all
    return save_pretrained(first, out, name=config0.model, extra=extra)


def _written(out: Path, state: dict[str, torch.Tensor], extra: dict) -> bool:
    """Whether the model folder ``out`` already holds exactly this average (same sources, same
    weights); what was added to its config.json since (calibration) is then kept."""
    if not (out / CONFIG_NAME).is_file() or not (out / WEIGHTS_NAME).is_file():
        return False
    try:
        config = read_model_config(out)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if safetensors_shapes(out / WEIGHTS_NAME) != shapes:
            return False  # another model: not loaded to find out
        saved = load_file(str(out / WEIGHTS_NAME))
    except (MedfmError, OSError, SafetensorError):
        return False
    same = config.averaged_from == extra["averaged_from"]
    same = same and config.multimask_clicks == extra["multimask_clicks"]
    if not same or saved.keys() != state.keys():
        return False
    return all(torch.equal(saved[k], v) for k, v in state.items())
