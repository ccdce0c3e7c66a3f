"""Segmentation speed: decoder training from the embedding cache, prompts/s, encoder latency.

Prints one JSON object with, on the chosen device (random weights; speed does not depend on
the values):

- ``train``: decoder training steps/s of a randomly initialised ViT-B (1024 x 1024 input) on
  one batch of B random images, (a) reading their embeddings (B, 256, 64, 64) from an
  `EmbeddingCache` (fp16 .npy, memory-mapped, read as `SegTask.embeddings` does) versus (b)
  recomputing them every step with the frozen image encoder (under ``torch.no_grad``). Both
  steps are otherwise `Engine.train_step` under the default `TrainConfig`: prompts drawn for
  N labels per image, `decode` with the default `PromptConfig`'s refinement iterations (each a
  decoder pass, logits fed back) and multimask outputs, `sam_loss`, backward and an AdamW step
  on the prompt encoder and mask decoder (bf16 autocast on CUDA). Target ratio >= 20x.
- ``prompts``: prompts/s of `Segmenter.predict(boxes=...)` with K box prompts per call, after
  one `set_image` of a random uint8 image (256 x 256 for medfm-tiny, 1024 x 1024 for vit_b).
- ``encoder_latency``: medfm-tiny's ``image_encoder`` on one 256 x 256 image under
  ``torch.inference_mode``, median and best of R runs (after 3 warm-up runs) in ms, for the
  default fused path (`medfm.seg.tiny`: folded weights) and for the modules themselves
  (``modules_*``). Target <= 50 ms (median) on 2 CPU cores.
- ``tiny_train``: medfm-tiny's own `Engine.train_step` end to end (encoder trained, the
  recipe's last settings, bf16 autocast on CUDA) on synthetic images generated first: median
  seconds per step of ``--tiny-batch`` images x 2 prompts (6 on the CPU, 32 on CUDA) and
  images/s.

    python benchmarks/bench_seg.py [--device cpu|cuda] [--threads 2] [--quick]

Rates are the best of 3 timed runs (this VM's timings vary by ~20%), after a warm-up. A ViT-B
forward at 1024 takes 10 s or more per image on 2 CPU cores, so (b) is timed as
``--enc-steps`` single steps (the fastest kept), warmed up by vit_b's ``set_image`` on the same
model; the first (b) step fills the cache that (a) reads.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from _common import REPEATS, best_time, environment, sync
from segment_anything.modeling import Sam

from medfm.engine import step_generator
from medfm.seg.cache import EmbeddingCache
from medfm.seg.models import BUNDLED_DIR, build_model
from medfm.seg.predict import Segmenter
from medfm.seg.prompts import (
    PromptConfig,
    random_label_masks,
    sample_prompts,
)
from medfm.seg.train import (
    LOWRES,
    TrainConfig,
    make_engine,
    prompted_loss,
    trainable_prefixes,
)


def _random_image(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 noise from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()


def _label_maps(batch: int, n_labels: int, seed: int) -> torch.Tensor:
    """(batch, LOWRES, LOWRES) uint8 label maps with labels 1..n_labels: one random rectangle
    per label, each inside its own cell of a square grid (so none covers another)."""
    g = torch.Generator().manual_seed(seed)
    per_row = math.ceil(math.sqrt(n_labels))
    cell = LOWRES // per_row
    maps = torch.zeros((batch, LOWRES, LOWRES), dtype=torch.uint8)
    for b in range(batch):
        for lab in range(1, n_labels + 1):
            row, col = divmod(lab - 1, per_row)
            h, w = torch.randint(cell // 4, cell // 2 + 1, (2,), generator=g).tolist()
            y0 = row * cell + int(torch.randint(0, cell - h + 1, (1,), generator=g))
            x0 = col * cell + int(torch.randint(0, cell - w + 1, (1,), generator=g))
            maps[b, y0 : y0 + h, x0 : x0 + w] = lab
    return maps


def _build(name: str, device: torch.device) -> tuple[Sam, float]:
    """build_model(name) on ``device`` (random weights, or medfm-tiny's bundled ones) and the
    seconds it took."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # medfm-tiny without bundled weights: random (in JSON)
        model = build_model(name).to(device)
    return model, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# 1. decoder training steps/s: embedding cache vs recomputing the embeddings


def train_bench(
    model: Sam,
    name: str,
    cfg: TrainConfig,
    steps: int,
    enc_steps: int,
    device: torch.device,
) -> dict:
    """Steps/s of one Engine.train_step on a fixed batch, from the cache and recomputing."""
    image_size = int(model.image_encoder.img_size)
    scale = image_size / LOWRES
    prefixes = trainable_prefixes(cfg)
    params = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    model.image_encoder.eval()  # frozen
    amp = cfg.amp and device.type == "cuda"

    images = [_random_image(image_size, seed=i) for i in range(cfg.batch)]
    pixels = torch.stack([torch.as_tensor(im).permute(2, 0, 1) for im in images])
    pixels = pixels.to(device, torch.float32)  # (B, 3, S, S): already at the input size
    labels = _label_maps(cfg.batch, cfg.prompts_per_image, seed=0).to(device)

    def encode() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            return model.image_encoder(model.preprocess(pixels))

    def step(step_index: int, embed: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Engine.train_step on the fixed batch, embeddings from ``embed``; returns them."""
        g = step_generator(cfg.seed, step_index)
        image_index, masks = random_label_masks(
            labels, generator=g, max_per_image=cfg.prompts_per_image
        )
        prompts = sample_prompts(masks, cfg.prompt, input_size=LOWRES, generator=g)
        emb = embed()
        total, _ = prompted_loss(
            model, emb, image_index, masks, prompts, cfg.prompt, "sam", g, scale, amp=amp
        )
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return emb

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp, f"{name}:random")

        def cached() -> torch.Tensor:
            arrays = [cache.get_array(im) for im in images]
            return torch.stack(
                [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays]
            ).to(device)

        # (b) recomputing: single steps, the fastest kept; the first one fills the cache
        enc_times = []
        for i in range(enc_steps):
            sync(device)
            t0 = time.perf_counter()
            emb = step(i, encode)
            sync(device)
            enc_times.append(time.perf_counter() - t0)
            if i == 0:
                for im, e in zip(images, emb.float(), strict=True):
                    cache.put(im, e, input_size=(image_size, image_size))
        # (a) from the cache: a warm-up step, then the best of REPEATS runs of `steps` steps
        step(0, cached)
        cached_rate = steps / best_time(lambda r: [step(s, cached) for s in range(steps)], device)
    enc_rate = 1.0 / min(enc_times)
    model.eval()
    return {
        "model": name,
        "image_size": image_size,
        "batch": cfg.batch,
        "prompts_per_image": cfg.prompts_per_image,
        "refine_iters": cfg.prompt.refine_iters,
        "multimask": cfg.prompt.multimask,
        "loss": cfg.loss,
        "amp": amp,
        "steps_timed": {"cached": steps * REPEATS, "recompute": enc_steps},
        "cached_steps_per_s": round(cached_rate, 3),
        "cached_s_per_step": round(1 / cached_rate, 3),
        "recompute_steps_per_s": round(enc_rate, 4),
        "recompute_s_per_step": round(1 / enc_rate, 2),
        "ratio": round(cached_rate / enc_rate, 1),
    }


# --------------------------------------------------------------------------------------------
# 2. prompts/s after set_image


def prompts_bench(model: Sam, name: str, n_prompts: int, calls: int, device: torch.device) -> dict:
    """set_image once on a random image, then the best of REPEATS runs of ``calls``
    predict(boxes=(n_prompts, 4)) calls."""
    seg = Segmenter(model, name, device)
    size = int(model.image_encoder.img_size)
    image = _random_image(size, seed=123)
    sync(device)
    t0 = time.perf_counter()
    seg.set_image(image)
    sync(device)
    set_image_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(7)
    xy = torch.rand((n_prompts, 2), generator=g) * (size * 0.6)
    wh = 8 + torch.rand((n_prompts, 2), generator=g) * (size * 0.35)
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1).numpy()  # (K, 4) xyxy px
    seg.predict(boxes=boxes)  # warm-up
    t = best_time(lambda r: [seg.predict(boxes=boxes) for _ in range(calls)], device)
    return {
        "image_size": size,
        "prompts_per_call": n_prompts,
        "calls_timed": calls * REPEATS,
        "set_image_s": round(set_image_s, 3),
        "prompts_per_s": round(n_prompts * calls / t, 1),
    }


# --------------------------------------------------------------------------------------------
# 3. medfm-tiny encoder latency


def latency_bench(model: Sam, runs: int, device: torch.device) -> dict:
    """model.image_encoder on one (1, 3, 256, 256) input: median and best of ``runs``, ms, for
    the default fused path (`medfm.seg.tiny`) and, interleaved run by run so that both see the
    same machine load, for the modules themselves (``fused = False``)."""
    model.eval()
    enc = model.image_encoder
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for i in range(3 + runs):
            for fused in (True, False):
                enc.fused = fused
                sync(device)
                t0 = time.perf_counter()
                enc(x)
                sync(device)
                if i >= 3:  # 3 warm-up runs
                    times[fused].append(time.perf_counter() - t0)
    enc.fused = True
    return {
        "input": [1, 3, 256, 256],
        "runs": runs,
        "median_ms": round(1000 * statistics.median(times[True]), 2),
        "best_ms": round(1000 * min(times[True]), 2),
        "modules_median_ms": round(1000 * statistics.median(times[False]), 2),
        "modules_best_ms": round(1000 * min(times[False]), 2),
    }


# --------------------------------------------------------------------------------------------
# 4. medfm-tiny's own training step, end to end


def tiny_train_bench(batch: int, steps: int, device: torch.device) -> dict:
    """Seconds per `Engine.train_step` of medfm-tiny with its recipe's last settings (encoder
    trained, 2 prompts per image, a quarter of the images shrunk, boxes or single clicks) on
    synthetic images generated here: the median of ``steps`` steps after 2 warm-up steps."""
    from medfm.synth.dataset import generate_dataset

    bundled = (BUNDLED_DIR / "model.safetensors").is_file()
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/ds"
        generate_dataset(data, modalities="ct,mri,us", dim=2, n=max(2 * batch, 12), size=256)
        cfg = TrainConfig(
            model="medfm-tiny",
            checkpoint=str(BUNDLED_DIR) if bundled else None,
            keep_decoder=True,
            train_encoder=True,
            data=(data,),
            out=f"{tmp}/run",
            steps=steps + 2,
            batch=batch,
            prompts_per_image=2,
            loss="dice_ce",
            grad_clip=1.0,
            lowres_prob=0.25,
            device=str(device),
            prompt=PromptConfig(
                box_prob=0.5, n_pos=(1, 1), n_neg=(0, 0), center_prob=0.5,
                refine_iters=0, multimask=False,
            ),
        )  # fmt: skip
        trainer = make_engine(cfg)
        times = []
        for step in range(steps + 2):
            sync(device)
            t0 = time.perf_counter()
            trainer.train_step(step)
            sync(device)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times[2:])
    return {
        "model": "medfm-tiny",
        "image_size": 256,
        "batch": batch,
        "prompts_per_image": 2,
        "amp": trainer.amp,
        "steps_timed": steps,
        "median_s_per_step": round(med, 4),
        "images_per_s": round(batch / med, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--batch", type=int, default=2, help="images per training step")
    ap.add_argument(
        "--prompts-per-image",
        type=int,
        default=TrainConfig.model_fields["prompts_per_image"].default,
    )
    ap.add_argument(
        "--refine-iters",
        type=int,
        default=PromptConfig().refine_iters,
        help="refinement decoder passes per training step (TrainConfig's default)",
    )
    ap.add_argument("--steps", type=int, default=2, help="cached steps per timed run")
    ap.add_argument("--enc-steps", type=int, default=2, help="timed steps recomputing embeddings")
    ap.add_argument("--prompts", type=int, default=16, help="box prompts per predict call")
    ap.add_argument("--calls", type=int, default=1, help="predict calls per timed run")
    ap.add_argument("--runs", type=int, default=20, help="encoder latency runs")
    ap.add_argument(
        "--tiny-batch", type=int, default=None, help="medfm-tiny training batch (6 CPU, 32 CUDA)"
    )
    ap.add_argument(
        "--tiny-steps", type=int, default=None, help="timed medfm-tiny steps (3 CPU, 20 CUDA)"
    )
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.batch, a.prompts_per_image, a.steps, a.enc_steps = 1, 1, 1, 1
        a.prompts, a.calls, a.runs = 4, 1, 5
        a.tiny_batch, a.tiny_steps = a.tiny_batch or 2, a.tiny_steps or 1
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    a.tiny_batch = a.tiny_batch or (32 if gpu else 6)
    a.tiny_steps = a.tiny_steps or (20 if gpu else 3)
    t_start = time.perf_counter()
    out: dict = {
        **environment("seg", device),
        "weights": {
            "vit_b": "random",
            "medfm-tiny": "bundled" if (BUNDLED_DIR / "model.safetensors").is_file() else "random",
        },
    }
    targets = {"train_ratio": 20.0, "tiny_encoder_median_ms": 50.0}

    vit_b, vit_b_build_s = _build("vit_b", device)
    # vit_b's set_image also warms up the encoder for the training benchmark's step (b)
    prompts = {"vit_b": prompts_bench(vit_b, "vit_b", a.prompts, a.calls, device)}
    cfg = TrainConfig(
        model="vit_b",
        data=(),
        out=".",  # nothing is written
        batch=a.batch,
        prompts_per_image=a.prompts_per_image,
        device=str(device),
        prompt=PromptConfig(refine_iters=a.refine_iters),
    )
    train = train_bench(vit_b, "vit_b", cfg, a.steps, a.enc_steps, device)
    train["vit_b_build_s"] = round(vit_b_build_s, 2)
    train["target_ratio"] = targets["train_ratio"]
    train["meets_target"] = train["ratio"] >= targets["train_ratio"]
    del vit_b

    tiny, _ = _build("medfm-tiny", device)
    prompts["medfm-tiny"] = prompts_bench(tiny, "medfm-tiny", a.prompts, a.calls, device)
    lat = latency_bench(tiny, a.runs, device)
    lat["target_median_ms"] = targets["tiny_encoder_median_ms"]
    lat["meets_target"] = lat["median_ms"] <= targets["tiny_encoder_median_ms"]

    out["train"] = train
    out["prompts"] = prompts
    out["encoder_latency"] = lat
    out["tiny_train"] = tiny_train_bench(a.tiny_batch, a.tiny_steps, device)
    out["meets_targets"] = train["meets_target"] and lat["meets_target"]
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
