"""Training a diffusion model on the shared engine: `DiffusionTask` and `train`.

Each step draws ``batch`` patches (`medfm.diffusion.data.draw_patches`), a timestep and noise
per patch, all from the step's generator; the loss is L1 (MedDiff-FM's) or L2 between the
model's output and its target (the noise for epsilon prediction). The engine does the rest
(AdamW, warm-up and cosine decay, EMA, bf16 autocast on CUDA, torchrun, the NaN guard,
checkpoints, exact resume, the run folder's lock, metrics.jsonl). The final ``model/`` folder
holds the EMA weights, the ones sampling uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from medfm.devices import parse_device
from medfm.diffusion.config import DiffusionConfig
from medfm.diffusion.data import TrainVolume, draw_patches
from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.schedulers import training_scheduler
from medfm.engine import Dist, EngineConfig, Task, run_training, setup_distributed
from medfm.errors import MedfmError

__all__ = ["DiffusionTask", "DiffusionTrainConfig", "NoiseLoss", "train"]


class DiffusionTrainConfig(EngineConfig):
    """One training run: the engine's settings, the model, its data and the loss.

    ``data``: the sources as given (folders, or ``synth:ct,mri``: made by the caller);
    ``patch_kinds``: the weights of the whole / zoom / crop patches; ``region``: every
    volume's region (None: each set's own); ``sample_every``: steps between sample montages
    (None: none); ``checkpointing``: activation checkpointing (memory for time).
    """

    data: tuple[str, ...] = Field(min_length=1)
    model: DiffusionConfig = DiffusionConfig()
    batch: int = Field(2, ge=1, le=4096)
    loss: Literal["l1", "l2"] = "l1"
    patch_kinds: tuple[float, float, float] = (1.0, 1.0, 1.0)
    region: str | None = None
    sample_every: int | None = Field(None, ge=1)
    checkpointing: bool = False
    lr: float = Field(1e-4, gt=0)
    warmup: int = Field(500, ge=0)
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DiffusionTrainConfig:
        if any(w < 0 for w in self.patch_kinds) or sum(self.patch_kinds) <= 0:
            raise ValueError("patch_kinds must be non-negative weights, not all zero")
        regions = self.model.unet.regions
        if self.region is not None and regions and self.region not in regions:
            raise ValueError(f"region {self.region!r} is not one of {', '.join(regions)}")
        return self


class NoiseLoss(nn.Module):
    """The training objective as a module (so DistributedDataParallel wraps one forward):
    noise clean patches to their timesteps, predict, compare."""

    def __init__(self, model: DiffusionModel, kind: str = "l1") -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        sched = training_scheduler(model.config.schedule)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.float(), persistent=False)

    def forward(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        boxes: torch.Tensor,
        regions: torch.Tensor | None,
    ) -> torch.Tensor:
        """The mean loss of clean patches ``x0`` (B, C, *patch) noised with ``noise`` at
        timesteps ``t`` (B,)."""
        return noise_loss(
            lambda xt: self.model(xt, t, boxes=boxes, regions=regions), self.alphas_cumprod,
            x0, noise, t, self.model.config.schedule.prediction_type, self.kind,
        )  # fmt: skip


def noise_loss(predict, alphas_cumprod, x0, noise, t, prediction_type: str, kind: str):
    """The diffusion loss: ``x0`` noised with ``noise`` to timesteps ``t``, ``predict(x_t)``
    against the target of ``prediction_type`` (the noise, v, or x0), L1 or L2 (``kind``)."""
    ab = alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    pred = predict(xt).float()
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    else:
        target = x0
    return F.l1_loss(pred, target) if kind == "l1" else F.mse_loss(pred, target)


class DiffusionTask(Task):
    """The engine's task for one `DiffusionTrainConfig` over ``sources`` (sequences of
    `TrainVolume`, each drawn with equal probability)."""

    def __init__(
        self,
        cfg: DiffusionTrainConfig,
        sources: Sequence[Sequence[TrainVolume]],
        dist: Dist,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not sources or any(len(s) == 0 for s in sources):
            raise MedfmError("every --data source must hold at least one volume")
        self.cfg, self.sources, self.dist, self.log = cfg, sources, dist, log
        with torch.random.fork_rng(devices=[]):  # initial weights: a function of the seed
            torch.manual_seed(cfg.seed)
            self.model = DiffusionModel(cfg.model)
        if cfg.checkpointing:
            self.model.enable_checkpointing()
        self.module = NoiseLoss(self.model, cfg.loss).to(dist.device)
        self._regions = cfg.model.unet.regions

    def step(self, net, step, generator):
        cfg = self.cfg
        x0, boxes, names = draw_patches(
            self.sources, cfg.model.patch, cfg.batch, generator, cfg.patch_kinds
        )
        n_t = cfg.model.schedule.num_train_timesteps
        t = torch.randint(n_t, (cfg.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        regions = None
        if self._regions:
            idx = [self.model.region_index(cfg.region or r) for r in names]
            regions = torch.tensor(idx, dtype=torch.long)
        mine = slice(self.dist.rank, None, self.dist.world)
        dev = self.dist.device
        share = len(range(cfg.batch)[mine]) / cfg.batch
        if share == 0:
            return None, {}
        loss = net(
            x0[mine].to(dev),
            noise[mine].to(dev),
            t[mine].to(dev),
            boxes[mine].to(dev),
            None if regions is None else regions[mine].to(dev),
        )
        return loss * share, {}

    def config(self) -> dict:
        return self.cfg.model_dump(mode="json")

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def save_model(self, folder: Path, ema: dict[str, torch.Tensor] | None) -> Path:
        """The final model: the EMA weights when kept, else the trained ones."""
        model = self.model
        if ema is not None:
            model = DiffusionModel(self.cfg.model)
            model.load_state_dict(ema)
        return model.save_pretrained(folder)

    def after_step(self, step: int, out: Path, ema) -> None:
        """Every ``sample_every`` steps: OUT/samples/step_N.png, two volumes of the patch's
        size sampled from the EMA weights (DDIM, 50 steps, seeded by the step)."""
        every = self.cfg.sample_every
        if every is None or step % every:
            return
        from medfm.diffusion.preview import write_montage
        from medfm.diffusion.tasks import synthesize

        model = DiffusionModel(self.cfg.model).to(self.dist.device)
        model.load_state_dict(ema.state_dict() if ema is not None else self.model.state_dict())
        g = torch.Generator().manual_seed(step)
        x = synthesize(model.eval(), self.cfg.model.patch, batch=2, generator=g,
                       device=self.dist.device)  # fmt: skip
        (out / "samples").mkdir(exist_ok=True)
        write_montage(list(x), out / "samples" / f"step_{step:07d}.png")

    def compile(self) -> None:
        self.model.unet.forward = torch.compile(self.model.unet.forward)


def train(
    cfg: DiffusionTrainConfig,
    sources: Sequence[Sequence[TrainVolume]] | Callable[[], Sequence[Sequence[TrainVolume]]],
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or resume) a run; returns the final model folder. ``sources``: the volumes, or
    a function that loads them (called only once the run folder is locked and not finished).
    """
    dist = setup_distributed(parse_device(cfg.device))

    def build(d: Dist) -> DiffusionTask:
        return DiffusionTask(cfg, sources() if callable(sources) else sources, d, log)

    return run_training(cfg, build, dist=dist, resume=resume, log=log, progress=progress)
