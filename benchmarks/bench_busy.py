"""Throughput on a busy machine: seconds of a small predict-like workload with the CPU to itself
(quiet) and beside one other process spinning on a core (busy), and the ratio busy / quiet.

The workload is what ``seg predict`` does per image: the bundled medfm-tiny's ``set_image`` and
``predict`` with one box, on ``--images`` random 256 x 256 images. Each thread setting runs in
its own process, since the OpenMP runtime reads its environment when torch is loaded:

- ``old``: torch's defaults, as before medfm.threads (torch imported before medfm: one thread
  per core, GNU OpenMP's spinning wait);
- ``passive``: idle threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``);
- ``new``: what every medfm command sets (`medfm.threads.configure_threads`: a short spin,
  ``GOMP_SPINCOUNT``);
- ``new-1``: the same with ``MEDFM_THREADS=1``.

``--workload synth`` times the rendering of 16 synthetic 256 x 256 CT cases instead (many
small parallel regions: where a wait policy shows most).

Each round times the workload quiet, then with a ``while True: pass`` subprocess running, and
stops it. Prints one JSON object: per setting the median quiet and busy seconds and the median
of the rounds' busy / quiet ratios (each round's pair ran close in time, so the ratio is less
disturbed by other load on a shared machine than the two medians are).

    python benchmarks/bench_busy.py [--rounds 5] [--images 4] [--settings old,passive,new,new-1]
                                    [--workload predict|synth]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = ("old", "passive", "new", "new-1")
SPIN = "while True: pass"


def _workload(kind: str, images: int):
    """The function to time: predict-like (``images`` images) or synthetic rendering."""
    if kind == "synth":
        from medfm.synth.case import SynthConfig, render_cases, sample_case

        cases = [sample_case(SynthConfig(), "ct", (256, 256), 0, i) for i in range(16)]
        return lambda: render_cases(cases)
    import numpy as np
    import torch

    from medfm.seg.models import build_model
    from medfm.seg.predict import Segmenter

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (256, 256), dtype=np.uint8) for _ in range(images)]
    box = np.array([[64, 64, 192, 192]])
    seg = Segmenter(build_model("medfm-tiny"), "medfm-tiny", torch.device("cpu"))

    def predict() -> None:
        for img in imgs:
            seg.set_image(img)
            seg.predict(boxes=box)

    return predict


def child(setting: str, rounds: int, images: int, workload: str = "predict") -> dict:
    """Runs in a fresh process: apply ``setting``, time the workload quiet and busy."""
    if setting == "old":
        import torch  # noqa: F401 (loaded before medfm: the OpenMP runtime keeps its defaults)
    elif setting == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        import torch  # noqa: F401
    else:
        if setting == "new-1":
            os.environ["MEDFM_THREADS"] = "1"
        from medfm.threads import configure_threads

        configure_threads()
    import torch

    work = _workload(workload, images)

    def run() -> float:
        t0 = time.perf_counter()
        work()
        return time.perf_counter() - t0

    run()  # warm-up
    quiet, busy = [], []
    for _ in range(rounds):
        quiet.append(run())
        spinner = subprocess.Popen([sys.executable, "-c", SPIN])
        try:
            time.sleep(0.3)
            busy.append(run())
        finally:
            spinner.kill()
            spinner.wait()
    return {
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "quiet": quiet,
        "busy": busy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--workload", choices=("predict", "synth"), default="predict")
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.images, args.workload)))
        return

    import platform

    env = {k: v for k, v in os.environ.items()}
    omp = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    for var in (*omp, "MEDFM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    result: dict = {
        "benchmark": "busy",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "images": args.images,
        "rounds": args.rounds,
        "workload": "medfm-tiny set_image + predict(1 box) per 256x256 image"
        if args.workload == "predict"
        else "render 16 synthetic 256x256 CT cases",
    }
    for setting in args.settings.split(","):
        cmd = [sys.executable, __file__, "--child", setting]
        cmd += ["--rounds", str(args.rounds), "--images", str(args.images)]
        cmd += ["--workload", args.workload]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratios = [b / q for q, b in zip(r["quiet"], r["busy"], strict=True)]
        result[setting] = {
            "threads": r["threads"],
            "omp_wait_policy": r["omp_wait_policy"],
            "quiet_s": round(statistics.median(r["quiet"]), 3),
            "busy_s": round(statistics.median(r["busy"]), 3),
            "busy_over_quiet": round(statistics.median(ratios), 2),
            "ratios": [round(x, 2) for x in ratios],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
