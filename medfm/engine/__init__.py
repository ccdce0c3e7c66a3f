"""medfm's one training engine: a model family supplies a `Task` (its module, trained
parameters, one step's loss, its saved form); the `Engine` owns the loop, AdamW with warm-up and
cosine decay, clipping, gradient accumulation, EMA weights, bf16 autocast on CUDA,
``torch.compile``, ``torchrun`` + ``DistributedDataParallel``, the NaN guard, checkpoints, exact
resume, the run folder's lock, ``metrics.jsonl`` and progress. It imports no model family."""

from medfm.engine.checkpoint import (
    SETTINGS_NAME,
    Checkpoint,
    finished_run,
    prepare_run_folder,
    read_checkpoint,
    saved_checkpoints,
    write_checkpoint,
)
from medfm.engine.config import EngineConfig
from medfm.engine.distributed import Dist, setup_distributed
from medfm.engine.ema import EMA
from medfm.engine.loop import Engine, NonFiniteLoss, Task, run_training
from medfm.engine.schedule import lr_factor, step_generator
from medfm.io.lock import RunLock

__all__ = [
    "EMA",
    "SETTINGS_NAME",
    "Checkpoint",
    "Dist",
    "Engine",
    "EngineConfig",
    "NonFiniteLoss",
    "RunLock",
    "Task",
    "finished_run",
    "lr_factor",
    "prepare_run_folder",
    "read_checkpoint",
    "run_training",
    "saved_checkpoints",
    "setup_distributed",
    "step_generator",
    "write_checkpoint",
]
