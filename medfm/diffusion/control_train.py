"""Fine-tuning a ControlNet on a frozen base model, on the shared engine.

Each step draws ``batch`` patches as base training does (`medfm.diffusion.data`), builds each
patch's condition (super-resolution: the patch thinned to every F-th slice along the axis and
interpolated back, from a random phase; mask: the one-hot labels of the patch's label map),
noises the patch to a random timestep and trains the ControlNet alone on the base's loss
(L1 on the noise, MedDiff-FM's). The base never changes; the run's ``model/`` is the
ControlNet's own folder (config.json names the base and its weights' hash).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from medfm.devices import parse_device
from medfm.diffusion.controlnet import Controlled, ControlNet, superres_training_condition
from medfm.diffusion.data import TrainVolume, draw_labelled_patches
from medfm.diffusion.files import load_diffusion_model
from medfm.diffusion.schedulers import training_scheduler
from medfm.diffusion.train import noise_loss
from medfm.engine import Dist, EngineConfig, Task, run_training, setup_distributed
from medfm.errors import MedfmError

__all__ = ["ControlNetTrainConfig", "controlnet_sources", "controlnet_train"]


class ControlNetTrainConfig(EngineConfig):
    """One ControlNet fine-tuning run.

    ``base``: the base model (None: the bundled one); ``task``: superres or mask; ``factor``
    and ``axis``: the super-resolution trained for; ``labels``: the mask task's label count
    (None: the largest label of the data); ``patch_kinds``: whole / zoom / crop weights (None:
    crops only: both tasks work in windows at the volume's own resolution).
    """

    data: tuple[str, ...] = Field(min_length=1)
    base: str | None = None
    task: Literal["superres", "mask"]
    factor: int = Field(4, ge=2, le=16)
    axis: int = Field(2, ge=0, le=2)
    labels: int | None = Field(None, ge=1, le=64)
    batch: int = Field(4, ge=1, le=4096)
    loss: Literal["l1", "l2"] = "l1"
    patch_kinds: tuple[float, float, float] | None = None
    region: str | None = None
    lr: float = Field(1e-4, gt=0)
    warmup: int = Field(100, ge=0)
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ControlNetTrainConfig:
        if self.task == "superres" and self.labels is not None:
            raise ValueError("labels is for --task mask")
        kinds = self.patch_kinds
        if kinds is not None and (any(w < 0 for w in kinds) or sum(kinds) <= 0):
            raise ValueError("patch_kinds must be non-negative weights, not all zero")
        return self

    @property
    def kinds(self) -> tuple[float, float, float]:
        return self.patch_kinds if self.patch_kinds is not None else (0.0, 0.0, 1.0)


class ControlLoss(nn.Module):
    """The base's noise loss through a ControlNet (only the ControlNet is trained)."""

    def __init__(self, controlled: Controlled, kind: str) -> None:
        super().__init__()
        self.controlled = controlled
        self.kind = kind
        sched = training_scheduler(controlled.config.schedule)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.float(), persistent=False)

    def forward(self, x0, noise, t, boxes, regions, condition):
        net = self.controlled
        return noise_loss(
            lambda xt: net(xt, t, condition=condition, boxes=boxes, regions=regions),
            self.alphas_cumprod, x0, noise, t, net.config.schedule.prediction_type, self.kind,
        )  # fmt: skip


class ControlNetTask(Task):
    """The engine's task: trains ``module.controlled.controlnet``, the base frozen."""

    def __init__(
        self, cfg: ControlNetTrainConfig, sources: Sequence[Sequence[TrainVolume]], dist: Dist
    ) -> None:
        if not sources or any(len(s) == 0 for s in sources):
            raise MedfmError("every --data source must hold at least one volume")
        self.cfg, self.sources, self.dist = cfg, sources, dist
        self.base = load_diffusion_model(cfg.base)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.labels = cfg.labels or 1
        if cfg.task == "mask":
            found = [v for s in sources for v in s if v.label is not None]
            if len(found) != sum(len(s) for s in sources):
                raise MedfmError("--task mask needs labelled volumes: give nnU-Net raw folders")
            if cfg.labels is None:
                self.labels = max(1, max(int(v.label.max()) for v in found))
        settings = (
            {"factor": cfg.factor, "axis": cfg.axis}
            if cfg.task == "superres"
            else {"labels": self.labels}
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.controlnet = ControlNet.from_base(self.base, cfg.task, **settings)
        controlled = Controlled(self.base, self.controlnet)
        self.module = ControlLoss(controlled, cfg.loss).to(dist.device)
        self._regions = self.base.config.unet.regions

    def step(self, net, step, generator):
        cfg, patch = self.cfg, self.base.config.patch
        x0, boxes, names, onehot = draw_labelled_patches(
            self.sources, patch, cfg.batch, generator, cfg.kinds,
            labels=self.labels if cfg.task == "mask" else 0,
        )  # fmt: skip
        if cfg.task == "superres":
            cond = superres_training_condition(x0, cfg.factor, cfg.axis, generator)
        else:
            cond = onehot
        t = torch.randint(self.base.config.schedule.num_train_timesteps, (cfg.batch,),
                          generator=generator)  # fmt: skip
        noise = torch.randn(x0.shape, generator=generator)
        regions = None
        if self._regions:
            idx = [self.base.region_index(cfg.region or r) for r in names]
            regions = torch.tensor(idx, dtype=torch.long)
        mine = slice(self.dist.rank, None, self.dist.world)
        share = len(range(cfg.batch)[mine]) / cfg.batch
        if share == 0:
            return None, {}
        dev = self.dist.device
        loss = net(
            x0[mine].to(dev), noise[mine].to(dev), t[mine].to(dev), boxes[mine].to(dev),
            None if regions is None else regions[mine].to(dev), cond[mine].to(dev),
        )  # fmt: skip
        return loss * share, {}

    def config(self) -> dict:
        return self.cfg.model_dump(mode="json")

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.controlnet.named_parameters())

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.controlnet.state_dict().items()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        self.controlnet.load_state_dict(state)

    def save_model(self, folder: Path, ema: dict[str, torch.Tensor] | None) -> Path:
        """The final ControlNet: the EMA weights when kept, else the trained ones."""
        if ema is None:
            return self.controlnet.save_pretrained(folder)
        net = ControlNet(self.controlnet.config, self.base.config)
        net.load_state_dict(ema)
        return net.save_pretrained(folder)

    def compile(self) -> None:
        self.controlnet.net.forward = torch.compile(self.controlnet.net.forward)


def controlnet_train(
    cfg: ControlNetTrainConfig,
    sources: Sequence[Sequence[TrainVolume]] | Callable[[], Sequence[Sequence[TrainVolume]]],
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or resume) a ControlNet run; returns its ``model/`` folder."""
    dist = setup_distributed(parse_device(cfg.device))

    def build(d: Dist) -> ControlNetTask:
        return ControlNetTask(cfg, sources() if callable(sources) else sources, d)

    return run_training(cfg, build, dist=dist, resume=resume, log=log, progress=progress)


def controlnet_sources(
    cfg: ControlNetTrainConfig,
) -> Callable[[], list[list[TrainVolume]]]:
    """Check ``cfg.data`` now (folders that hold volumes; for the mask task nnU-Net raw
    folders) and return the function that loads them, each folder a source, as the base model
    sees volumes (its modality, spacing and dimension)."""
    from medfm.diffusion.data import list_volume_files, load_training_volumes
    from medfm.diffusion.files import diffusion_model_folder
    from medfm.diffusion.model import read_diffusion_config

    for entry in cfg.data:
        if entry.startswith("synth:"):
            raise MedfmError("a ControlNet trains on folders of real volumes, not synth:")
        list_volume_files(entry)
    base = read_diffusion_config(diffusion_model_folder(cfg.base))

    def load() -> list[list[TrainVolume]]:
        return [
            load_training_volumes(
                [entry],
                modality=base.modality,
                spacing=base.spacing,
                region=cfg.region,
                dims=base.unet.spatial_dims,
                labels=cfg.task == "mask",
            )  # fmt: skip
            for entry in cfg.data
        ]

    return load
