"""Outputs across the CLI: an existing report, mask or model is replaced only with --overwrite
(atomically), an output that cannot be written is refused in one line before any model loads,
and recipes check every step's outputs before the first step runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.io import write_png

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(r, message: str) -> None:
    """Exit 2 with one line that holds ``message``."""
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], r.output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from medfm.synth.dataset import generate_dataset

    out = tmp_path_factory.mktemp("data") / "ds"
    generate_dataset(out, modalities="ct", dim=2, n=2, size=32, seed=0)
    return out


@pytest.fixture
def png(tmp_path) -> Path:
    img = np.full((60, 80), 40, np.uint8)
    img[20:40, 30:60] = 200
    write_png(torch.from_numpy(img)[None], tmp_path / "img.png")
    return tmp_path / "img.png"


def test_evaluate_replaces_a_report_only_with_overwrite(dataset, tmp_path):
    before = snapshot(dataset)
    report = tmp_path / "report.json"
    report.write_text('{"mean_dice": 0.91}')
    args = ["seg", "evaluate", "-m", "box-fill", "--data", dataset, "--prompt", "box"]
    refused(run(*args, "--out", report), f"--out {report} exists; pass --overwrite to replace it")
    assert report.read_text() == '{"mean_dice": 0.91}'
    overlays = tmp_path / "ov"
    overlays.mkdir()
    (overlays / "case.png").write_bytes(b"x")
    refused(run(*args, "--out", tmp_path / "new.json", "--overlays", overlays),
            "--overlays")  # fmt: skip
    assert not (tmp_path / "new.json").exists()
    r = run(*args, "--out", report, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads(report.read_text())["n_cases"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ov", "report.json"]  # no temporary left
    assert snapshot(dataset) == before


@pytest.mark.parametrize(
    "out, message",
    [
        ("r.xyz", "--out r.xyz must end in .json; rename the output"),
        ("/proc/r.json", "cannot write --out /proc/r.json: /proc is not writable"),
        ("blocker/r.json", "blocker is a file, not a folder"),
        (".", "--out . is a folder; give a file name"),
    ],
)
def test_evaluate_refuses_unwritable_reports_before_the_model_loads(dataset, tmp_path, out,
                                                                    message):  # fmt: skip
    (tmp_path / "blocker").write_text("x")
    # vit_b without --checkpoint is refused when loaded: the output is checked first
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "seg", "evaluate", "-m", "vit_b", "--data",
         str(dataset), "--prompt", "box", "--out", out],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


@pytest.mark.parametrize(
    "out, message",
    [
        ("mask.xyz", "--out mask.xyz must end in .png, .nii or .nii.gz"),
        ("/proc/x.png", "cannot write --out /proc/x.png: /proc is not writable"),
        ("blocker/m.png", "blocker is a file, not a folder"),
        ("sub/", "--out sub is a folder; give a file name"),
        ("old.png", "--out old.png exists; pass --overwrite to replace it"),
    ],
)
def test_predict_refuses_outputs_before_the_model_loads(png, out, message):
    folder = png.parent
    (folder / "blocker").write_text("x")
    (folder / "sub").mkdir()
    (folder / "old.png").write_bytes(b"a hand-corrected mask")
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "seg", "predict", "-m", "vit_b", "-i", "img.png",
         "--box", "30,20,59,39", "--out", out],
        capture_output=True, text=True, cwd=folder,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert (folder / "old.png").read_bytes() == b"a hand-corrected mask"
    assert sorted(os.listdir(folder)) == ["blocker", "img.png", "old.png", "sub"]


def test_average_replaces_a_model_only_with_overwrite(tmp_path):
    from medfm.seg.models import save_pretrained
    from medfm.seg.tiny import build_medfm_tiny

    from ..seg.conftest import randomize_

    a = save_pretrained(randomize_(build_medfm_tiny(), 1), tmp_path / "a", name="medfm-tiny")
    b = save_pretrained(randomize_(build_medfm_tiny(), 2), tmp_path / "b", name="medfm-tiny")
    trained = save_pretrained(randomize_(build_medfm_tiny(), 3), tmp_path / "t", name="medfm-tiny")
    before = snapshot(trained)
    message = f"--out {trained} exists; pass --overwrite to replace it, or give a new folder"
    refused(run("seg", "average", a, b, "--out", trained), message)
    assert snapshot(trained) == before
    r = run("seg", "average", a, b, "--out", trained, "--overwrite")
    assert r.exit_code == 0, r.output
    config = json.loads((trained / "config.json").read_text())
    assert [s["folder"] for s in config["averaged_from"]] == [str(a), str(b)]
    assert snapshot(trained) != before
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "t"]  # no hidden folder left
    r = run("seg", "average", a, b, "--out", tmp_path / "new")
    assert r.exit_code == 0 and (tmp_path / "new" / "model.safetensors").is_file(), r.output


def test_export_checks_its_output_before_reading_the_model(tmp_path):
    from medfm.seg.models import save_pretrained
    from medfm.seg.tiny import build_medfm_tiny

    save_pretrained(build_medfm_tiny(), tmp_path / "run" / "model", name="medfm-tiny")
    old = tmp_path / "sam.pth"
    old.write_bytes(b"an earlier export")
    refused(run("seg", "export", tmp_path / "run", "--out", old), "exists; pass --overwrite")
    refused(run("seg", "export", tmp_path / "run", "--out", tmp_path / "sam.txt"),
            "must end in .pth or .pt")  # fmt: skip
    refused(run("seg", "export", tmp_path / "run", "--out", tmp_path / "run" / "model" / "x.pth"),
            "lies inside the input model folder")  # fmt: skip
    assert old.read_bytes() == b"an earlier export"


def test_train_refuses_a_finished_run_without_resume(tmp_path, dataset):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    refused(run("seg", "train", "--data", dataset, "--out", tmp_path / "run", "--steps", "1"),
            "holds a finished run")  # fmt: skip
    assert sorted(os.listdir(tmp_path / "run")) == ["model"]


def test_synth_preview_never_writes_over_the_dataset(dataset, tmp_path):
    before = snapshot(dataset)
    image = dataset / "imagesTr" / "case_00000_0000.png"
    message = "lies inside the input dataset folder"
    refused(run("synth", "preview", dataset, "--out", image), message)
    old = tmp_path / "p.png"
    old.write_bytes(b"x")
    refused(run("synth", "preview", dataset, "--out", old), "exists; pass --overwrite")
    assert snapshot(dataset) == before and old.read_bytes() == b"x"
    r = run("synth", "preview", dataset, "--out", old, "--overwrite")
    assert r.exit_code == 0 and old.read_bytes()[:4] == b"\x89PNG", r.output


def test_a_recipe_checks_every_steps_outputs_before_the_first_step(tmp_path, dataset):
    before = snapshot(dataset)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: hostile
steps:
  - synth: {{out: {tmp_path}/synth, modalities: [ct], n: 2, size: 32}}
  - evaluate: {{model: box-fill, data: {dataset}, prompt: box, out: {dataset}/dataset.json}}
""")
    refused(run("run", recipe), f"out {dataset}/dataset.json lies inside the input data")
    assert not (tmp_path / "synth").exists() and snapshot(dataset) == before


def test_progress_bars_show_elapsed_and_remaining_time():
    from rich.progress import TimeElapsedColumn, TimeRemainingColumn

    from medfm.cli.progress import bar_callback, progress_bar

    bar = progress_bar()
    kinds = {type(c) for c in bar.columns}
    assert {TimeElapsedColumn, TimeRemainingColumn} <= kinds
    update = bar_callback(bar, "cases")
    update(3, 7)
    task = bar.tasks[-1]
    assert (task.completed, task.total, task.description) == (3, 7, "cases")
