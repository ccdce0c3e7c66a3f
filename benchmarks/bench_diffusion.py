"""Quality of a diffusion model's zero-shot tasks on real volumes it never saw; prints JSON.

    python benchmarks/bench_diffusion.py --model RUN_OR_MODEL --data DIR [--tasks ...]

The protocol (issue #24, section 5): each volume of DIR (nnU-Net raw or a folder of NIfTI) is
scaled to [0, 1] by its 0.5 / 99.5 percentiles and clipped; every output is clipped to [0, 1]
too, and PSNR is taken over the whole volume with data range 1.

- denoise: Gaussian noise of std 0.05 and 0.10 added (seeded per volume); the model is given
  the true std. Baselines: the noisy input, the best Gaussian filter (oracle sigma per volume
  from a grid), BM4D with the true sigma (the ``bm4d`` package, when installed).
- anomaly: one sphere of radius 3 to 5 voxels per volume, centred in tissue (above the
  volume's median, the whole sphere inside), +-0.35 added; voxel AUROC pooled over the volumes
  (MONAI) and the best Dice. Baseline: |x - median_filter(x, 7)|.
- inpaint: an 8^3 cube in tissue set to 0, its mask given; PSNR inside the cube. Baselines: the
  mean of the cube's 2-voxel shell, scikit-image's biharmonic inpainting.
- synthesis: ``--samples`` volumes of the real volumes' median shape, against the real ones:
  the 1-Wasserstein distance of their intensity histograms (after the same percentile scaling)
  and of their local texture (the std in 3^3 neighbourhoods) and the mean gradient magnitude;
  the same distances between two halves of the real volumes are the reference. A montage PNG
  (``--montage``) puts samples beside real volumes.

The model works in its own units: a volume is mapped by the model's intensity rule, processed
and mapped back, as ``medfm diffusion`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch


def scaled01(x: np.ndarray) -> np.ndarray:
    return scaled01_span(x)[0]


def scaled01_span(x: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``x`` scaled to [0, 1] by its 0.5 / 99.5 percentiles and clipped, and the two
    percentiles (the volume's own units of 0 and 1)."""
    lo, hi = (float(v) for v in np.percentile(x, (0.5, 99.5)))
    hi = max(hi, lo + 1e-6)
    return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32), (lo, hi)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = (np.clip(a, 0, 1) - b) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


class ModelRunner:
    """A volume in [0, 1] back in its own units (``spans[i]``: the units of 0 and 1 of volume
    i; CT's windows need Hounsfield units), through the model's intensity map, a task, and
    back to [0, 1]."""

    def __init__(self, model, steps: int, sampler: str, seed: int, spans) -> None:
        self.model, self.steps, self.sampler, self.seed = model, steps, sampler, seed
        self.spans = spans

    def _map(self, x: np.ndarray, i: int):
        from medfm.diffusion.intensity import intensity_map

        lo, hi = self.spans[i]
        t = torch.from_numpy(x) * (hi - lo) + lo
        imap = intensity_map(t, self.model.config.modality)
        return imap, imap.forward(t)[None, None]

    def _back(self, imap, y: torch.Tensor, i: int) -> np.ndarray:
        lo, hi = self.spans[i]
        return ((imap.inverse(y[0, 0]) - lo) / (hi - lo)).numpy()

    def denoise(self, noisy: np.ndarray, sigma: float, method: str, i: int) -> np.ndarray:
        from medfm.diffusion.tasks import denoise

        imap, xs = self._map(noisy, i)
        g = torch.Generator().manual_seed(self.seed)
        lo, hi = self.spans[i]
        y = denoise(self.model, xs, imap.to_model_sigma(sigma * (hi - lo)), method=method,
                    sampler=self.sampler, steps=self.steps, generator=g)  # fmt: skip
        return self._back(imap, y, i)

    def anomaly(self, x: np.ndarray, t: int, i: int) -> np.ndarray:
        from medfm.diffusion.tasks import anomaly_map

        _, xs = self._map(x, i)
        g = torch.Generator().manual_seed(self.seed)
        return anomaly_map(self.model, xs, t=t, steps=self.steps, generator=g)[0, 0].numpy()

    def inpaint(self, x: np.ndarray, mask: np.ndarray, i: int) -> np.ndarray:
        from medfm.diffusion.tasks import inpaint

        imap, xs = self._map(x, i)
        g = torch.Generator().manual_seed(self.seed)
        hole = torch.from_numpy(mask)[None, None]
        y = inpaint(self.model, xs, hole, steps=self.steps, generator=g)
        return self._back(imap, y, i)


class Baselines:
    """The slow baselines' scores (BM4D, biharmonic inpainting), which do not depend on the
    model, kept in a JSON file (``--baselines``) by volume, task and seed, so that comparing
    models or settings on the same volumes computes them once."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.scores: dict[str, float] = {}
        if path is not None and os.path.exists(path):
            with open(path) as f:
                self.scores = json.load(f)

    def get(self, key: str, compute) -> float:
        if key not in self.scores:
            self.scores[key] = float(compute())
            if self.path is not None:
                from medfm.io import atomic_write_text

                atomic_write_text(self.path, json.dumps(self.scores, indent=1))
        return self.scores[key]


def best_gaussian(noisy: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    from scipy.ndimage import gaussian_filter

    best = max((psnr(gaussian_filter(noisy, s), clean), s) for s in np.arange(0.25, 3.01, 0.25))
    return best


def tissue_centre(x: np.ndarray, radius: int, rng: np.random.Generator) -> tuple[int, ...] | None:
    """A voxel above the volume's median whose sphere (cube) of ``radius`` lies inside."""
    inner = tuple(slice(radius, n - radius) for n in x.shape)
    sub = x[inner]
    cand = np.argwhere(sub > np.median(x))
    if len(cand) == 0:
        return None
    c = cand[rng.integers(len(cand))]
    return tuple(int(v) + radius for v in c)


def run_denoise(vols, runner, args, rng_seed: int, names, cache: Baselines) -> dict:
    out: dict = {}
    try:
        import bm4d
    except ImportError:
        bm4d = None
    if args.no_bm4d:
        bm4d = None
    for sigma in (0.05, 0.10):
        rows = {"noisy": [], "gaussian_oracle": [], "bm4d": [], "medfm": []}
        for i, x in enumerate(vols):
            rng = np.random.default_rng(rng_seed + i)
            noisy = (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)
            rows["noisy"].append(psnr(noisy, x))
            rows["gaussian_oracle"].append(best_gaussian(noisy, x)[0])
            if bm4d is not None:
                key = f"bm4d:{names[i]}:{sigma}:{rng_seed + i}"
                rows["bm4d"].append(
                    cache.get(key, lambda: psnr(bm4d.bm4d(noisy, sigma_psd=sigma), x))  # noqa: B023
                )
            if runner is not None:
                rows["medfm"].append(psnr(runner.denoise(noisy, sigma, args.method, i), x))
        out[f"sigma_{sigma:.2f}"] = {k: round(float(np.mean(v)), 3) for k, v in rows.items() if v}
    if bm4d is None:
        out["bm4d"] = "skipped (--no-bm4d)" if args.no_bm4d else "not installed (pip install bm4d)"
    return out


def run_anomaly(vols, runner, args, rng_seed: int) -> dict:
    from monai.metrics import compute_roc_auc
    from scipy.ndimage import median_filter

    from medfm.diffusion.metrics import best_dice

    maps, base, truth = [], [], []
    for i, x in enumerate(vols):
        rng = np.random.default_rng(rng_seed + 1000 + i)
        r = int(rng.integers(3, 6))
        c = tissue_centre(x, r, rng)
        if c is None:
            continue
        grid = np.indices(x.shape).astype(np.float32)
        sphere = sum((g - cc) ** 2 for g, cc in zip(grid, c, strict=True)) <= r * r
        y = x + sphere * (0.35 if rng.random() < 0.5 else -0.35)
        if runner is not None:
            maps.append(runner.anomaly(y.astype(np.float32), args.t, i).ravel())
        base.append(np.abs(y - median_filter(y, 7)).ravel())
        truth.append(sphere.ravel())
    t = torch.from_numpy(np.concatenate(truth).astype(np.float32))
    res = {"volumes": len(truth), "t": args.t}
    for name, m in (("medfm", maps), ("median_filter", base)):
        if not m:
            continue
        s = torch.from_numpy(np.concatenate(m).astype(np.float32))
        res[name] = {
            "auroc": round(float(compute_roc_auc(s, t)), 4),
            "best_dice": round(best_dice(s, t.bool())[0], 4),
        }
    return res


def run_inpaint(vols, runner, args, rng_seed: int, names, cache: Baselines) -> dict:
    from skimage.restoration import inpaint_biharmonic

    rows = {"shell_mean": [], "biharmonic": [], "medfm": []}
    for i, x in enumerate(vols):
        rng = np.random.default_rng(rng_seed + 2000 + i)
        c = tissue_centre(x, 6, rng)
        if c is None:
            continue
        cube = np.zeros(x.shape, bool)
        cube[tuple(slice(v - 4, v + 4) for v in c)] = True
        shell = np.zeros(x.shape, bool)
        shell[tuple(slice(v - 6, v + 6) for v in c)] = True
        shell &= ~cube
        y = np.where(cube, 0, x).astype(np.float32)
        rows["shell_mean"].append(psnr(np.where(cube, x[shell].mean(), y), x, cube))
        key = f"biharmonic:{names[i]}:{rng_seed + 2000 + i}"
        rows["biharmonic"].append(
            cache.get(key, lambda: psnr(inpaint_biharmonic(y, cube), x, cube))  # noqa: B023
        )
        if runner is not None:
            rows["medfm"].append(psnr(runner.inpaint(y, cube, i), x, cube))
    return {k: round(float(np.mean(v)), 3) for k, v in rows.items() if v} | {
        "volumes": len(rows["shell_mean"])
    }


def _stats(vols: list[np.ndarray]) -> dict[str, np.ndarray]:
    from scipy.ndimage import uniform_filter

    vals, tex, grad = [], [], []
    for v in vols:
        x = scaled01(v)
        vals.append(x.ravel())
        m = uniform_filter(x, 3)
        tex.append(np.sqrt(np.maximum(uniform_filter(x * x, 3) - m * m, 0)).ravel())
        grad.append(np.sqrt(sum(g**2 for g in np.gradient(x))).ravel())
    return {
        k: np.concatenate(v) for k, v in (("intensity", vals), ("texture", tex), ("gradient", grad))
    }


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a = a if a.size <= 200_000 else rng.choice(a, 200_000, replace=False)
    b = b if b.size <= 200_000 else rng.choice(b, 200_000, replace=False)
    return float(wasserstein_distance(a, b))


def run_synthesis(vols, model, args) -> dict:
    from medfm.diffusion.preview import write_montage
    from medfm.diffusion.tasks import synthesize

    shape = tuple(int(np.median([v.shape[a] for v in vols])) for a in range(3))
    g = torch.Generator().manual_seed(args.seed)
    samples = [synthesize(model, shape, sampler=args.sampler, steps=args.sample_steps,
                          generator=g)[0, 0].numpy() for _ in range(args.samples)]  # fmt: skip
    half = len(vols) // 2
    real_a, real_b = _stats(vols[:half]), _stats(vols[half:])
    fake = _stats(samples)
    res = {"shape": shape, "samples": len(samples)}
    for k in real_a:
        res[k] = {"samples_vs_real": round(_w1(fake[k], real_b[k]), 4),
                  "real_vs_real": round(_w1(real_a[k], real_b[k]), 4)}  # fmt: skip
    if args.montage:
        rows = [torch.from_numpy(s) for s in samples[:4]] + [torch.from_numpy(v) for v in vols[:4]]
        write_montage(rows, args.montage)
        res["montage"] = args.montage
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="run or model folder (default: bundled)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tasks", default="denoise,anomaly,inpaint,synthesis")
    ap.add_argument("--max-volumes", type=int, default=None)
    ap.add_argument("--method", default="posterior", help="denoise method")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--t", type=int, default=50, help="anomaly noise step")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--montage", default=None, help="PNG of samples beside real volumes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", default=None, help="JSON file keeping the slow baselines")
    ap.add_argument("--skip-model", action="store_true", help="baselines only")
    ap.add_argument("--no-bm4d", action="store_true", help="leave BM4D out (slow on large volumes)")
    args = ap.parse_args()

    from medfm.diffusion.data import list_volume_files
    from medfm.diffusion.files import diffusion_model_folder, load_diffusion_model
    from medfm.io import load_volume

    files = list_volume_files(args.data)[: args.max_volumes]
    scaled = [scaled01_span(load_volume(f).data[0].float().numpy()) for f in files]
    vols, spans = [v for v, _ in scaled], [s for _, s in scaled]
    names = [f.name for f in files]
    cache = Baselines(args.baselines)
    model = None if args.skip_model else load_diffusion_model(args.model)
    runner = None
    if model is not None:
        runner = ModelRunner(model, args.steps, args.sampler, args.seed, spans)
    result: dict = {"benchmark": "diffusion",
                    "model": None if model is None else str(diffusion_model_folder(args.model)),
                    "data": args.data, "volumes": len(vols), "sampler": args.sampler,
                    "steps": args.steps}  # fmt: skip
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        if task == "denoise":
            result[task] = run_denoise(vols, runner, args, args.seed, names, cache)
        elif task == "anomaly":
            result[task] = run_anomaly(vols, runner, args, args.seed)
        elif task == "inpaint":
            result[task] = run_inpaint(vols, runner, args, args.seed, names, cache)
        elif task == "synthesis":
            if model is None:
                continue
            result[task] = run_synthesis(vols, model, args)
        else:
            raise SystemExit(f"unknown task {task}")
        result[task]["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
