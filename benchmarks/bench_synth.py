"""Synthetic-data throughput: medfm (label map + textures + physics) vs a TorchIO chain.

Prints one JSON object: cases/s per modality for 2D and 3D on the chosen device, the
throughput of TorchIO's RandomLabelsToImage -> RandomElasticDeformation -> RandomBiasField ->
RandomBlur -> RandomNoise -> RandomGamma applied to a ready-made label map of the same size
(on the CPU: TorchIO has no GPU path), and the ratios. Targets on 2 CPU cores: >= 10x in 2D
256^2, >= 5x in 3D 128^3; on a GPU >= 2000 2D cases/s.

The modalities and the TorchIO chain are timed in alternation, round after round (``--rounds``),
and each rate is the median over the rounds: on a machine that others load, the load falls on
both sides of each ratio alike. The machine's load average before and after is printed.

    python benchmarks/bench_synth.py [--device cpu|cuda] [--quick]

medfm's timing covers drawing the parameters, rendering and converting to the output dtype
(what `medfm synth generate` does before writing files); `--write` also times writing the
files of a dataset (PNG / NIfTI).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch
from _common import environment, interleaved_times, load_average, sync

from medfm.synth.case import SynthConfig, render_cases, sample_case, to_output


def medfm_run(modality: str, shape: tuple[int, ...], n: int, batch: int, device):
    """A warmed-up run(round) that draws, renders and converts n cases (seeds per round)."""
    cfg = SynthConfig()
    warm = [sample_case(cfg, modality, shape, 999, i) for i in range(min(batch, 2))]
    to_output(warm, render_cases(warm, device).image)
    sync(device)

    def run(seed: int) -> None:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            cases = [sample_case(cfg, modality, shape, seed, i) for i in range(start, stop)]
            to_output(cases, render_cases(cases, device).image)

    return run


def write_rate(dim: int, size: str, n: int, batch: int, device: str) -> float:
    from medfm.synth.dataset import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_dataset(
            f"{tmp}/ds", modalities="ct,mri,us", dim=dim, n=n, size=size, batch=batch, device=device
        )
        return n / (time.perf_counter() - t0)


def torchio_run(shape: tuple[int, ...], n: int):
    """A warmed-up run(round) of the TorchIO chain on n copies of a ready-made label map."""
    import torchio as tio

    cases = [sample_case(SynthConfig(), "ct", shape, 7, 0)]
    label = render_cases(cases).label[0]  # (1, *shape), a ready-made label map
    if len(shape) == 2:
        label = label.unsqueeze(-1)  # TorchIO images are 4D: (C, W, H, D=1)
        elastic = tio.RandomElasticDeformation(max_displacement=(7.5, 7.5, 0))
    else:
        elastic = tio.RandomElasticDeformation()
    subject = tio.Subject(label=tio.LabelMap(tensor=label.long()))
    chain = tio.Compose(
        [
            tio.RandomLabelsToImage(label_key="label"),
            elastic,
            tio.RandomBiasField(),
            tio.RandomBlur(),
            tio.RandomNoise(),
            tio.RandomGamma(),
        ]
    )

    def run(seed: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                chain(subject)

    run(0)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--size2d", type=int, default=256)
    ap.add_argument("--size3d", type=int, default=128)
    ap.add_argument("--n2d", type=int, default=96)
    ap.add_argument("--n3d", type=int, default=6)
    ap.add_argument("--batch2d", type=int, default=16)
    ap.add_argument("--batch3d", type=int, default=2)
    ap.add_argument("--torchio-n2d", type=int, default=20)
    ap.add_argument("--torchio-n3d", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--no-torchio", action="store_true")
    ap.add_argument("--write", action="store_true", help="also time writing a dataset")
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.n2d, a.n3d, a.torchio_n2d, a.torchio_n3d, a.rounds = 16, 2, 3, 1, 3
        a.size3d = min(a.size3d, 64)
    device = torch.device(a.device)
    out: dict = environment("synth", device)
    out["rounds"] = a.rounds
    out["load_average_before"] = load_average()
    targets = {"2d": 10.0, "3d": 5.0}
    ok = True
    for dim, size, n, batch, tio_n in (
        ("2d", a.size2d, a.n2d, a.batch2d, a.torchio_n2d),
        ("3d", a.size3d, a.n3d, a.batch3d, a.torchio_n3d),
    ):
        shape = (size,) * (2 if dim == "2d" else 3)
        runs = {m: medfm_run(m, shape, n, batch, device) for m in ("ct", "mri", "us")}
        counts = dict.fromkeys(runs, n)
        if not a.no_torchio:
            runs["torchio"] = torchio_run(shape, tio_n)
            counts["torchio"] = tio_n
        med = interleaved_times(runs, device, a.rounds)
        rates = {m: round(counts[m] / med[m], 2) for m in ("ct", "mri", "us")}
        res: dict = {"shape": list(shape), "batch": batch, "medfm_cases_per_s": rates}
        if not a.no_torchio:
            tio_rate = counts["torchio"] / med["torchio"]
            res["torchio_cases_per_s"] = round(tio_rate, 3)
            res["ratio"] = {m: round(r / tio_rate, 1) for m, r in rates.items()}
            res["target_ratio"] = targets[dim]
            res["meets_target"] = min(res["ratio"].values()) >= targets[dim]
            ok = ok and res["meets_target"]
        if a.write:
            res["written_cases_per_s"] = round(
                write_rate(2 if dim == "2d" else 3, str(size), n, batch, a.device), 2
            )
        out[dim] = res
    out["load_average_after"] = load_average()
    if device.type == "cuda":
        out["gpu_target_2d_cases_per_s"] = 2000
        out["meets_gpu_target"] = min(out["2d"]["medfm_cases_per_s"].values()) >= 2000
    out["meets_targets"] = ok
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
