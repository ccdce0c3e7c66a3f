"""The training loop every model family runs: a family supplies a `Task`, the `Engine` owns the
rest (optimiser and schedule, clipping, accumulation, EMA, autocast, data-parallel, the NaN
guard, checkpoints, exact resume, metrics.jsonl, progress)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medfm.engine.checkpoint import (
    finished_run,
    prepare_run_folder,
    read_checkpoint,
    saved_checkpoints,
    write_checkpoint,
)
from medfm.engine.config import EngineConfig
from medfm.engine.distributed import Dist
from medfm.engine.ema import EMA
from medfm.engine.schedule import lr_factor, step_generator
from medfm.errors import MedfmError
from medfm.io.atomic import atomic_write_text
from medfm.io.lock import RunLock


class Task:
    """What a model family gives the engine: a module, its trained parameters, one step's loss
    and its saved form. Subclass and set ``module`` (every trained parameter lives in it; under
    data-parallel training the engine wraps it in ``DistributedDataParallel`` and hands the
    wrapper to `step`, whose loss must come from calling it).
    """

    module: nn.Module
    #: DDP's find_unused_parameters: True when a step may leave some trained parameters unused
    find_unused_parameters: bool = False

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The named parameters the optimizer updates, in a fixed order."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def step(
        self, net: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """One (micro-)step's loss to backpropagate and its metrics, drawing every random
        choice from ``generator`` (a function of the run's seed and ``step``).

        Under data-parallel training each process returns its share of the step's loss: the
        loss is the sum of the processes' values, and so is each metric (one process returns
        the whole). ``None`` for a step with nothing to learn from (no optimizer step).
        """
        raise NotImplementedError

    def config(self) -> dict:
        """What goes into the config.json of checkpoints."""
        raise NotImplementedError

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps (default: the module's whole state dict)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """`trained_state`'s inverse, on resume."""
        self.module.load_state_dict(state)

    def save_model(self, folder: Path, ema: dict[str, torch.Tensor] | None) -> Path:
        """Write the final model into ``folder`` (``ema``: the EMA weights, if kept)."""
        raise NotImplementedError

    def after_step(self, step: int, out: Path, ema: EMA | None) -> None:
        """Called on the main process after optimizer step ``step`` (1-based) and its
        checkpoint: previews, samples (default: nothing). ``ema``: the EMA weights, if kept."""

    def compile(self) -> None:
        """torch.compile what is worth compiling (default: the module's forward)."""
        self.module.forward = torch.compile(self.module.forward)


class NonFiniteLoss(MedfmError):
    """A loss or gradient norm was NaN or infinite: the run stops without saving it."""


class Engine:
    """One training run of ``task`` under ``cfg`` (see `EngineConfig`).

    ``run()`` trains from ``self.step`` to ``cfg.steps`` and writes the final model; ``resume()``
    first loads the newest checkpoint. Rank 0 writes, every rank trains.
    """

    def __init__(
        self,
        task: Task,
        cfg: EngineConfig,
        *,
        dist: Dist,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.dist = dist
        self.out = Path(cfg.out)
        self.log = (log if dist.main else None) or (lambda msg: None)
        if cfg.compile:
            task.compile()
        named = task.trained_parameters()
        self.params = [p for _, p in named]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps)
        )
        self.ema = EMA(named, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.net = task.module
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                task.module,
                device_ids=[dist.device] if dist.device.type == "cuda" else None,
                find_unused_parameters=task.find_unused_parameters,
            )
        self.step = 0

    @property
    def amp(self) -> bool:
        """bf16 autocast: asked for, and on CUDA."""
        return self.cfg.amp and self.dist.device.type == "cuda"

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step ``step``: ``accumulate`` micro-steps, clipping, the update, EMA."""
        cfg, k = self.cfg, self.cfg.accumulate
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        learned = False
        for i in range(k):
            micro = step * k + i
            sync = i == k - 1 or self.dist.world == 1
            with (contextlib.nullcontext() if sync else self.net.no_sync()),  \
                    torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):  # fmt: skip
                loss, metrics = self.task.step(self.net, micro, step_generator(cfg.seed, micro))
            if loss is None:
                continue
            names = ["loss", *metrics]
            values = self.dist.all_sum([float(loss.detach()), *metrics.values()])
            if not math.isfinite(values[0]):
                self._stop(f"the loss is {values[0]} at step {step + 1}")
            for name, v in zip(names, values, strict=True):
                sums[name] = sums.get(name, 0.0) + v / k
            scale = self.dist.world / k  # DDP averages gradients; the step's loss is their sum
            (loss * scale if scale != 1 else loss).backward()
            learned = True
        if not learned:
            return {"loss": 0.0}
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or math.inf)
        if not math.isfinite(float(norm)):
            self._stop(f"the gradient norm is {float(norm)} at step {step + 1}")
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(step)
        return {**sums, "grad_norm": float(norm), "lr": self.sched.get_last_lr()[0]}

    def _stop(self, why: str) -> None:
        done = saved_checkpoints(self.out)
        kept = f"the last good checkpoint is {done[-1]}" if done else "no checkpoint was saved"
        raise NonFiniteLoss(f"{why}: training stopped, {kept} (try a lower --lr or --grad-clip)")

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        return write_checkpoint(
            self.out,
            self.step,
            weights=self.task.trained_state(),
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            config=self.task.config(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            keep=self.cfg.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Load the newest checkpoint (weights, optimizer, schedule, EMA, step); False if none.

        A damaged checkpoint (a truncated file, a foreign optimizer state) is named in a
        notice and the next older one is used; when none can be read, the newest one's problem
        is raised."""
        done = saved_checkpoints(self.out)
        if not done:
            return False
        first_error = None
        for path in reversed(done):
            try:
                self._load(path)
            except MedfmError as e:
                first_error = first_error or e
                self.log(f"notice: {e}; trying an older checkpoint")
                continue
            self.log(f"resumed from {path} at step {self.step}")
            return True
        raise MedfmError(f"no checkpoint of {self.out} can be read: {first_error}")

    def _load(self, path: Path) -> None:
        ck = read_checkpoint(path)
        try:
            self.opt.load_state_dict(ck.optimizer)
            self.sched.load_state_dict(ck.scheduler)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise MedfmError(
                f"{path / 'optimizer.safetensors'} does not fit this run ({e})"
            ) from None
        if self.ema is not None:
            if ck.ema is None:
                raise MedfmError(f"{path} has no EMA weights (ema.safetensors)")
            self.ema.load_state_dict(ck.ema)
        try:
            self.task.load_trained_state(ck.weights)
        except (RuntimeError, KeyError) as e:
            reason = " ".join(str(e).split())[:120]
            raise MedfmError(
                f"{path / 'model.safetensors'} does not fit this model ({reason})"
            ) from None
        self.step = ck.step

    # ------------------------------------------------------------------ the loop

    def run(self, *, progress: Callable[[int, dict], None] | None = None) -> Path:
        """Train from ``self.step`` to ``cfg.steps``, then write the final model (OUT/model)."""
        self.out.mkdir(parents=True, exist_ok=True)
        log = self._open_metrics_log() if self.dist.main else None
        try:
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                self.step += 1
                metrics["s_per_step"] = time.perf_counter() - t0
                if log is not None:
                    log.write(json.dumps({"step": self.step, **metrics}) + "\n")
                    log.flush()
                if progress:
                    progress(self.step, metrics)
                if self.dist.main and (
                    self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps
                ):
                    self.save_checkpoint()
                if self.dist.main:
                    self.task.after_step(self.step, self.out, self.ema)
        finally:
            if log is not None:
                log.close()
        final = self.out / "model"
        if self.dist.main:
            ema = self.ema.state_dict() if self.ema is not None else None
            final = self.task.save_model(final, ema)
        self.dist.barrier()
        return final

    def _open_metrics_log(self):
        """OUT/metrics.jsonl, one line per step; after a resume, the lines of the steps that are
        trained again are dropped first (and a line cut short by a kill), so each step appears
        once."""
        path = self.out / "metrics.jsonl"

        def kept(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= self.step
            except (json.JSONDecodeError, AttributeError):
                return False

        if path.exists():
            keep = [line for line in path.read_text().splitlines() if kept(line)]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        return path.open("a")


__all__ = ["Engine", "NonFiniteLoss", "Task"]


def run_training(
    settings,
    build_task: Callable[[Dist], Task],
    *,
    dist: Dist,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> Path:
    """One training run from a family's ``settings`` (a pydantic model with the
    `EngineConfig` fields, e.g. a subclass): the run folder is locked (rank 0 holds the lock
    under torchrun), created or checked to hold a run of the same settings, and, when resuming
    a finished run, its model is returned with nothing built. Otherwise ``build_task(dist)``
    (called only now: loading data can be slow), the engine, the newest checkpoint if
    ``resume``, and the run. Returns the final model folder."""
    cfg = EngineConfig.of(settings)
    with RunLock(cfg.out, log=log) if dist.main else contextlib.nullcontext():
        if dist.main:
            prepare_run_folder(cfg.out, settings, resume=resume)
        dist.barrier()
        if resume and (done := finished_run(cfg.out, cfg.steps)) is not None:
            if log is not None and dist.main:  # nothing to train: no data loaded, no model built
                log(f"{cfg.out} finished training earlier; its model is {done}")
            return done
        engine = Engine(build_task(dist), cfg, dist=dist, log=log)
        if resume:
            engine.resume()
        return engine.run(progress=progress)
