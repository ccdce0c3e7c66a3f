"""Speed and memory of the diffusion model; prints JSON (issue #24, section 7).

    python benchmarks/bench_diffusion_speed.py [--model M] [--data DIR] [--quick]

- samplers: seconds per volume of one window (the model's patch) sampled from pure noise with
  DDPM-1000, DDIM-50 and DPM-Solver++-20, and, for each, denoising with the reverse process
  from the matching step (`medfm diffusion denoise --method reverse --sampler S --steps N`) on
  the first ``--volumes`` volumes of ``--data`` (scaled to [0, 1] by their 0.5 / 99.5
  percentiles, Gaussian noise of std 0.10 added, PSNR with data range 1, as
  bench_diffusion.py): seconds per volume and PSNR. The one-step posterior is timed beside them.
- windows: the time of one blended model evaluation over a volume of 2x2x2 windows (1.5 patches
  per axis at overlap 0.5) over the time of the same 8 windows evaluated alone in the same
  batches (interleaved rounds, medians): what the blending costs.
- train: optimizer steps/s at patch 32 and 64 on the chosen device, the model's own widths,
  ``--train-batch`` patches a step, on random volumes twice the patch (median of the steps
  after the first).
- controlnet_train: ControlNet fine-tuning steps/s on the frozen model at patch 32 and 64
  (`medfm diffusion controlnet-train --task superres`, ``--train-batch`` patches a step, random
  volumes twice the patch; median of the steps after the first).
- superres: seconds per volume of `medfm diffusion superres --factor 4` (its defaults) on a
  hippocampus-sized volume (36 x 50 x 9 slices -> 33), with a ControlNet of the model (the
  shipped one, else a new one: the same work) and zero-shot.
- gpu_memory (CUDA only): the peak memory of one training step of MedDiff-FM's UNet (channels
  32-64-128-256, batch 1) at 64^3 and 128^3 under bf16 autocast, with and without activation
  checkpointing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import environment, interleaved_times, load_average, sync

SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpm++", 20))


def _volumes(data: str | None, n: int) -> list[np.ndarray]:
    from bench_diffusion import scaled01

    from medfm.diffusion.data import list_volume_files
    from medfm.io import load_volume

    if data is None:
        return []
    return [scaled01(load_volume(f).data[0].float().numpy()) for f in list_volume_files(data)[:n]]


def bench_samplers(model, vols: list[np.ndarray], device, sigma: float = 0.10) -> dict:
    from bench_diffusion import psnr

    from medfm.diffusion.intensity import intensity_map
    from medfm.diffusion.tasks import denoise, synthesize

    out: dict = {}
    runs = [(s, n, "reverse") for s, n in SAMPLERS] + [("posterior", 1, "posterior")]
    for sampler, steps, method in runs:
        row: dict = {}
        if method == "reverse":
            g = torch.Generator(device).manual_seed(0)
            sync(device)
            t0 = time.perf_counter()
            synthesize(model, model.config.patch, sampler=sampler, steps=steps, generator=g,
                       device=device)  # fmt: skip
            sync(device)
            row["synthesis_s_per_volume"] = round(time.perf_counter() - t0, 3)
        times, scores = [], []
        for i, x in enumerate(vols):
            noisy = (x + sigma * np.random.default_rng(i).standard_normal(x.shape)).astype(
                np.float32
            )
            t = torch.from_numpy(noisy)
            imap = intensity_map(t, model.config.modality)
            xs = imap.forward(t)[None, None].to(device)
            g = torch.Generator(device).manual_seed(0)
            sync(device)
            t0 = time.perf_counter()
            y = denoise(model, xs, imap.to_model_sigma(sigma), method=method, sampler=sampler,
                        steps=steps, generator=g)  # fmt: skip
            sync(device)
            times.append(time.perf_counter() - t0)
            scores.append(psnr(imap.inverse(y[0, 0].cpu()).numpy(), x))
        if vols:
            row["denoise_s_per_volume"] = round(float(np.mean(times)), 3)
            row[f"denoise_psnr_sigma_{sigma:.2f}"] = round(float(np.mean(scores)), 3)
        out[f"{sampler}-{steps}" if method == "reverse" else sampler] = row
    ddpm, dpm = out["ddpm-1000"], out["dpm++-20"]
    out["dpm++20_speedup_over_ddpm1000"] = {
        k: round(ddpm[k] / dpm[k], 1) for k in ("synthesis_s_per_volume", "denoise_s_per_volume")
        if k in dpm and dpm[k] > 0
    }  # fmt: skip
    if vols:
        key = f"denoise_psnr_sigma_{sigma:.2f}"
        out["dpm++20_psnr_minus_ddpm1000_db"] = round(dpm[key] - ddpm[key], 3)
    return out


def bench_windows(model, device, rounds: int) -> dict:
    from medfm.diffusion.sampling import Windows, predict_noise

    patch = model.config.patch
    shape = tuple(p * 3 // 2 for p in patch)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    windows, positions = Windows.for_model(model, x)
    assert len(windows.starts) == 8, windows.starts
    crops = [x[windows.slices(s)] for s in windows.starts]
    pos = [positions[windows.slices(s)] for s in windows.starts]
    t = 500

    @torch.no_grad()
    def blended(_r: int) -> None:
        predict_noise(model, x, t, windows, positions=positions, batch=4)

    @torch.no_grad()
    def alone(_r: int) -> None:
        for i in range(0, 8, 4):
            ts = torch.full((4,), t, dtype=torch.long, device=device)
            model(torch.cat(crops[i : i + 4]), ts, positions=torch.cat(pos[i : i + 4]))

    blended(0)
    alone(0)
    times = interleaved_times({"blended": blended, "alone": alone}, device, rounds)
    return {
        "volume": list(shape),
        "windows": 8,
        "blended_s": round(times["blended"], 4),
        "eight_windows_alone_s": round(times["alone"], 4),
        "overhead": round(times["blended"] / times["alone"], 3),
    }


def bench_train(model_cfg, device, patch: int, batch: int, steps: int) -> dict:
    from medfm.diffusion.data import TrainVolume
    from medfm.diffusion.train import DiffusionTrainConfig, train

    cfg_model = model_cfg.model_copy(update={"patch": (patch,) * 3})
    g = torch.Generator().manual_seed(0)
    vols = [TrainVolume(torch.rand(1, *(2 * patch,) * 3, generator=g).half() * 2 - 1, None,
                        f"v{i}") for i in range(2)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DiffusionTrainConfig(
            out=str(Path(tmp) / "run"), steps=steps, data=("random",), batch=batch,
            checkpoint_every=10**6, warmup=1, model=cfg_model, device=str(device),
        )  # fmt: skip
        train(cfg, [vols])
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    per_step = statistics.median(json.loads(x)["s_per_step"] for x in lines[1:])
    return {"patch": patch, "batch": batch, "s_per_step": round(per_step, 3),
            "steps_per_s": round(1 / per_step, 3)}  # fmt: skip


def bench_controlnet_train(model, device, patch: int, batch: int, steps: int) -> dict:
    from medfm.diffusion.control_train import ControlNetTask, ControlNetTrainConfig
    from medfm.diffusion.data import TrainVolume
    from medfm.engine import run_training, setup_distributed

    g = torch.Generator().manual_seed(0)
    vols = [TrainVolume(torch.rand(1, *(2 * patch,) * 3, generator=g).half() * 2 - 1, None,
                        f"v{i}") for i in range(2)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ControlNetTrainConfig(
            out=str(Path(tmp) / "run"), steps=steps, data=("random",), batch=batch,
            checkpoint_every=10**6, warmup=1, task="superres", base=model.source,
            device=str(device),
        )  # fmt: skip
        patched = model.config.model_copy(update={"patch": (patch,) * 3})

        def build(d):
            task = ControlNetTask(cfg, [vols], d)
            task.base.config = patched  # the patch drawn; the weights are the same
            return task

        run_training(cfg, build, dist=setup_distributed(device))
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    per_step = statistics.median(json.loads(x)["s_per_step"] for x in lines[1:])
    return {"patch": patch, "batch": batch, "s_per_step": round(per_step, 3),
            "steps_per_s": round(1 / per_step, 3)}  # fmt: skip


def bench_superres(model, device, rounds: int) -> dict:
    from medfm.diffusion.conditional import SUPERRES_DEFAULTS, superres
    from medfm.diffusion.controlnet import ControlNet
    from medfm.diffusion.files import load_controlnet

    cn = load_controlnet(None, model, "superres", required=False)
    shipped = cn is not None
    if cn is None:
        cn = ControlNet.from_base(model, "superres")
    low = torch.rand(1, 1, 36, 50, 9, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low = low.to(device)
    out = {"shape_in": [36, 50, 9], "factor": 4, "settings": SUPERRES_DEFAULTS,
           "shipped_controlnet": shipped}  # fmt: skip
    for kind, net in (("controlnet", cn), ("zeroshot", None)):
        times = []
        for r in range(max(1, rounds // 2)):
            t0 = time.perf_counter()
            superres(model, low, 4, controlnet=net, generator=torch.Generator().manual_seed(r),
                     **SUPERRES_DEFAULTS[kind])  # fmt: skip
            sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{kind}_s_per_volume"] = round(statistics.median(times), 2)
    return out


def bench_gpu_memory(device) -> dict:
    from medfm.diffusion.config import DiffusionConfig, UNetConfig
    from medfm.diffusion.model import DiffusionModel
    from medfm.diffusion.position import whole_box
    from medfm.diffusion.train import NoiseLoss

    out: dict = {}
    unet = UNetConfig(channels=(32, 64, 128, 256), attention_levels=(False, False, False, True))
    for size in (64, 128):
        for ckpt in (False, True):
            model = DiffusionModel(DiffusionConfig(unet=unet, patch=(size,) * 3)).to(device)
            if ckpt:
                model.enable_checkpointing()
            loss_fn = NoiseLoss(model).to(device)
            x0 = torch.randn(1, 1, size, size, size, device=device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(x0, torch.randn_like(x0), torch.tensor([500], device=device),
                               whole_box(1, 3, device), None)  # fmt: skip
            loss.backward()
            sync(device)
            key = f"{size}^3_{'checkpointing' if ckpt else 'plain'}"
            out[key] = {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
            del model, loss_fn, x0, loss
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="run or model folder (default: bundled)")
    ap.add_argument("--data", default=None, help="volumes for the denoising PSNR")
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    args = ap.parse_args()

    from medfm.devices import parse_device
    from medfm.diffusion.files import diffusion_model_folder, load_diffusion_model

    device = parse_device(args.device)
    model = load_diffusion_model(args.model, device=device)
    result = environment("diffusion_speed", device)
    result.update(model=str(diffusion_model_folder(args.model)),
                  patch=list(model.config.patch), load_before=load_average())  # fmt: skip
    skip = set(args.skip.split(","))
    if "samplers" not in skip:
        result["samplers"] = bench_samplers(model, _volumes(args.data, args.volumes), device)
    if "windows" not in skip:
        result["windows"] = bench_windows(model, device, args.rounds)
    if "train" not in skip:
        result["train"] = [
            bench_train(model.config, device, p, args.train_batch, args.train_steps)
            for p in (32, 64)
        ]
    if "controlnet_train" not in skip:
        result["controlnet_train"] = [
            bench_controlnet_train(model, device, p, args.train_batch, args.train_steps)
            for p in (32, 64)
        ]
    if "superres" not in skip:
        result["superres"] = bench_superres(model, device, args.rounds)
    if device.type == "cuda" and "gpu_memory" not in skip:
        result["gpu_memory"] = bench_gpu_memory(device)
    result["load_after"] = load_average()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
