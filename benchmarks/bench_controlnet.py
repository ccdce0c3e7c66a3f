"""Quality of the ControlNet tasks on real volumes no model saw; prints JSON.

    python benchmarks/bench_controlnet.py superres --data DIR [--controlnet CN] [--runs ...]
    python benchmarks/bench_controlnet.py inpaint --data NNUNET_DIR --controlnet CN

Protocol (issue #25, section 4; that of bench_diffusion.py): each volume of DIR is scaled to
[0, 1] by its 0.5 / 99.5 percentiles and clipped; outputs are clipped to [0, 1]; PSNR with
data range 1.

- superres: every ``--factor``-th slice along ``--axis`` from slice 0 is kept; the target is
  the volume's first F(n-1)+1 slices there (the kept slices are its slices F*k). PSNR over the
  whole target. Baselines: linear and cubic-spline (not-a-knot) interpolation with corners
  aligned. ``--runs``: the medfm variants, each ``zeroshot|controlnet:T_START:STEPS[:SAMPLES]``.
- inpaint: each case's labelled structure (every label of the nnU-Net raw case) becomes the
  hole: PSNR inside it for guided RePaint (the mask ControlNet given the case's own label map)
  against the base model's RePaint and scikit-image's biharmonic inpainting (same RePaint
  schedule, same seed); and a segmenter's Dice on the generated structure: the bundled
  medfm-tiny prompted with each label's box on every slice (`medfm seg evaluate`'s protocol)
  on the inpainted volumes, against the label. The real volumes give the reference.

The model sees volumes as ``medfm diffusion`` does: mapped by its intensity rule (MRI: the
input's own percentiles), processed, mapped back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_diffusion import psnr, scaled01  # noqa: E402


def load_cases(folder: str, limit: int | None, labels: bool = False):
    """[(name, volume (float32 array), label or None)] of an nnU-Net raw or NIfTI folder."""
    from medfm.diffusion.data import _case_name, list_volume_files
    from medfm.io import load_volume

    out = []
    for path in list_volume_files(folder)[:limit]:
        lab = None
        if labels:
            lab_path = os.path.join(folder, "labelsTr", _case_name(path) + ".nii.gz")
            lab = load_volume(lab_path).data[0].numpy().astype(np.int64)
        out.append((_case_name(path), load_volume(path).data[0].numpy().astype(np.float32), lab))
    return out


def _model_units(x01: np.ndarray):
    from medfm.diffusion.intensity import intensity_map

    t = torch.from_numpy(np.ascontiguousarray(x01))
    imap = intensity_map(t, "mri")
    return imap, imap.forward(t)[None, None]


def run_superres(args) -> dict:
    from scipy.interpolate import CubicSpline

    from medfm.diffusion.conditional import superres
    from medfm.diffusion.controlnet import ControlNet
    from medfm.diffusion.files import load_diffusion_model

    model = load_diffusion_model(args.model)
    cn = ControlNet.from_pretrained(args.controlnet, model) if args.controlnet else None
    f, axis = args.factor, args.axis
    runs = [r for r in args.runs.split(",") if r]
    scores: dict[str, list[float]] = {"linear": [], "cubic": [], **{r: [] for r in runs}}
    seconds = {r: 0.0 for r in runs}
    for i, (name, vol, _) in enumerate(load_cases(args.data, args.limit)):
        v = np.moveaxis(scaled01(vol), axis, -1)
        n = (v.shape[-1] - 1) // f + 1
        target = v[..., : f * (n - 1) + 1]
        low = target[..., ::f]
        grid = np.arange(target.shape[-1], dtype=np.float64)
        known = grid[::f]
        lin = np.stack([np.interp(grid, known, r) for r in low.reshape(-1, n)])
        scores["linear"].append(psnr(lin.reshape(target.shape), target))
        cub = CubicSpline(known, low, axis=-1)(grid)
        scores["cubic"].append(psnr(cub, target))
        imap, x = _model_units(np.moveaxis(low, -1, axis))
        for r in runs:
            kind, t_start, steps, *more = r.split(":")
            if kind == "controlnet" and cn is None:
                raise SystemExit("--runs controlnet:... needs --controlnet")
            t0 = time.perf_counter()
            y = superres(
                model, x, f, axis=axis, controlnet=cn if kind == "controlnet" else None,
                steps=int(steps), t_start=int(t_start), samples=int(more[0]) if more else 1,
                generator=torch.Generator().manual_seed(args.seed + i),
            )  # fmt: skip
            seconds[r] += time.perf_counter() - t0
            out = np.moveaxis(imap.inverse(y[0, 0]).numpy(), axis, -1)
            scores[r].append(psnr(out, target))
        print(f"{name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in scores.items()),
              file=sys.stderr)  # fmt: skip
    count = len(scores["linear"])
    return {
        "task": "superres", "factor": f, "axis": axis, "volumes": count,
        "psnr": {k: float(np.mean(v)) for k, v in scores.items()},
        "seconds_per_volume": {k: s / max(count, 1) for k, s in seconds.items()},
        "per_volume": {k: [round(x, 3) for x in v] for k, v in scores.items()},
    }  # fmt: skip


def run_inpaint(args) -> dict:
    from skimage.restoration import inpaint_biharmonic

    from medfm.diffusion.conditional import generate
    from medfm.diffusion.controlnet import ControlNet
    from medfm.diffusion.files import load_diffusion_model
    from medfm.diffusion.tasks import inpaint

    model = load_diffusion_model(args.model)
    cn = ControlNet.from_pretrained(args.controlnet, model, task="mask")
    scores: dict[str, list[float]] = {"biharmonic": [], "repaint": [], "guided": []}
    outputs: dict[str, dict[str, tuple]] = {"real": {}, "repaint": {}, "guided": {}}
    for i, (name, vol, lab) in enumerate(load_cases(args.data, args.limit, labels=True)):
        v = scaled01(vol)
        hole = lab > 0
        if not hole.any():
            continue
        bh = inpaint_biharmonic(np.where(hole, 0, v), hole)
        scores["biharmonic"].append(psnr(bh, v, hole))
        imap, x = _model_units(np.where(hole, 0, v).astype(np.float32))
        h = torch.from_numpy(hole)[None, None]

        def kw(i=i):
            return dict(steps=args.steps, jump_length=args.jump_length,
                        jump_n_sample=args.jump_n_sample,
                        generator=torch.Generator().manual_seed(args.seed + i))  # fmt: skip

        rp = imap.inverse(inpaint(model, x, h, **kw())[0, 0]).numpy()
        scores["repaint"].append(psnr(rp, v, hole))
        mask = torch.from_numpy(lab)[None, None].float()
        gd = imap.inverse(generate(model, cn, mask, image=x, **kw())[0, 0]).numpy()
        scores["guided"].append(psnr(gd, v, hole))
        for key, y in (("real", v), ("repaint", rp), ("guided", gd)):
            outputs[key][name] = (np.clip(y, 0, 1), lab)
        print(f"{name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in scores.items()),
              file=sys.stderr)  # fmt: skip
    dice = {key: segmenter_dice(cases, args.save_dir and os.path.join(args.save_dir, key))
            for key, cases in outputs.items()}  # fmt: skip
    return {
        "task": "inpaint", "volumes": len(scores["guided"]), "steps": args.steps,
        "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample,
        "psnr_inside": {k: float(np.mean(v)) for k, v in scores.items()},
        "segmenter_box_dice": dice,
        "per_volume": {k: [round(x, 3) for x in v] for k, v in scores.items()},
    }  # fmt: skip


def segmenter_dice(cases: dict[str, tuple], folder: str | None) -> float:
    """The bundled medfm-tiny's mean box Dice on ``cases`` {name: (volume, label)} written as
    an nnU-Net set (in ``folder``, or a temporary one)."""
    import tempfile

    from medfm.io import Volume, write_dataset
    from medfm.seg.evaluate import evaluate, load_predictor

    with tempfile.TemporaryDirectory() as tmp:
        out = folder or tmp
        items = ((n, Volume(torch.from_numpy(y.astype(np.float32))[None], np.eye(4)),
                  Volume(torch.from_numpy(lab.astype(np.uint8))[None], np.eye(4)))
                 for n, (y, lab) in cases.items())  # fmt: skip
        write_dataset(out, items, labels={"background": 0, "anterior": 1, "posterior": 2})
        report = evaluate(load_predictor("medfm-tiny"), out, "box")
    return float(report["mean_dice"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["superres", "inpaint"])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None, help="base model (default: the bundled one)")
    p.add_argument("--controlnet", default=None)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--axis", type=int, default=2)
    p.add_argument("--runs", default="zeroshot:999:10,controlnet:999:10")
    p.add_argument("--steps", type=int, default=50, help="inpaint: RePaint steps")
    p.add_argument("--jump-length", type=int, default=10, help="inpaint: RePaint's")
    p.add_argument("--jump-n-sample", type=int, default=5, help="inpaint: RePaint's")
    p.add_argument("--limit", type=int, default=None, help="the first N volumes only")
    p.add_argument("--save-dir", default=None, help="inpaint: write the outputs' sets here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("MEDFM_THREADS", torch.get_num_threads())))
    result = run_superres(args) if args.task == "superres" else run_inpaint(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
