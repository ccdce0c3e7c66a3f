"""``medfm seg predict / train / export`` and ``medfm run``: outputs, exit codes, errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.io import Volume, read_nifti, read_png, write_nifti, write_png

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def png(tmp_path):
    img = np.full((60, 80), 40, np.uint8)
    img[20:40, 30:60] = 200
    path = tmp_path / "img.png"
    write_png(torch.from_numpy(img)[None], path)
    return path


@pytest.fixture
def nifti(tmp_path):
    vol = np.zeros((30, 40, 12), np.float32)
    vol[10:20, 15:30, 3:9] = 500.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (10, -5, 3)
    path = tmp_path / "vol.nii.gz"
    write_nifti(Volume(torch.from_numpy(vol)[None], affine), path)
    return path, affine


def test_predict_png_with_boxes(png, tmp_path):
    out = tmp_path / "mask.png"
    r = run("seg", "predict", "--model", "box-fill", "--image", png, "--box", "30,20,59,39",
            "--box", "0,0,9,9", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    mask = read_png(out).data[0].numpy()
    assert mask.shape == (60, 80)
    assert (mask[20:40, 30:60] == 1).all() and (mask[:10, :10] == 2).all()
    assert (mask > 0).sum() == 20 * 30 + 100


def test_predict_nifti_3d_box_propagates_and_keeps_the_affine(nifti, tmp_path):
    path, affine = nifti
    out = tmp_path / "mask.nii.gz"
    # x along j (columns 15..29), y along i (rows 10..19), slices 3..8
    r = run("seg", "predict", "-m", "box-fill", "-i", path, "--box", "15,10,29,19,3,8",
            "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    mask = read_nifti(out)
    assert np.allclose(mask.affine, affine)
    m = mask.data[0].numpy()
    assert (m[10:20, 15:30, 3:9] == 1).all() and m.sum() == 10 * 15 * 6
    # a box on one slice, over the first mask (an existing mask is replaced only if asked)
    r = run("seg", "predict", "-m", "box-fill", "-i", path, "--box", "15,10,29,19,5", "-o", out)
    assert r.exit_code == 2 and "pass --overwrite to replace it" in r.output, r.output
    r = run("seg", "predict", "-m", "box-fill", "-i", path, "--box", "15,10,29,19,5", "-o", out,
            "--overwrite")  # fmt: skip
    assert r.exit_code == 0 and read_nifti(out).data[0, :, :, 5].sum() == 150
    assert read_nifti(out).data[0].sum() == 150


def test_predict_with_medfm_tiny_points(png, tmp_path):
    out = tmp_path / "m.png"
    r = run("seg", "predict", "-i", png, "--point", "40,30", "--point", "5,5,0", "-o", out)
    assert r.exit_code == 0, r.output
    assert read_png(out).data.shape == (1, 60, 80)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-i", "missing.png", "--box", "1,1,5,5"], "not found"),
        (["--box", "0,0,200,10"], "outside the image"),
        (["--box", "1,2,3"], "x0,y0,x1,y1"),
        (["--point", "500,5"], "outside the image"),
        ([], "at least one"),
        (["--point", "5,5", "-m", "box-fill"], "needs box prompts"),
        (["-m", "medfm-tiny", "--box", "1,1,5,5", "--device", "gpu"], "--device must be"),
    ],
)
def test_predict_errors_are_one_line_exit_2(png, tmp_path, args, message):
    base = ["seg", "predict", "-o", str(tmp_path / "m.png")]
    if "-i" not in args:
        base += ["-i", str(png)]
    if "-m" not in args:
        base += ["-m", "box-fill"]
    r = subprocess.run([sys.executable, "-m", "medfm.cli.main", *base, *args],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_checkpoint_of_the_wrong_model_is_a_clear_error(png, tmp_path, write_tiny_checkpoint):
    path, _ = write_tiny_checkpoint()
    r = run("seg", "predict", "-m", "vit_b", "-c", path, "-i", png, "--box", "1,1,5,5",
            "-o", tmp_path / "m.png")  # fmt: skip
    assert r.exit_code == 2 and "vit_b" in r.output


def test_export_of_medfm_tiny_is_refused(tmp_path):
    from medfm.seg.models import save_pretrained
    from medfm.seg.tiny import build_medfm_tiny

    save_pretrained(build_medfm_tiny(), tmp_path / "model", name="medfm-tiny")
    r = run("seg", "export", tmp_path, "--out", tmp_path / "x.pth")
    assert r.exit_code == 2 and "medfm-tiny" in r.output


def test_run_recipe_synth_and_evaluate(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: smoke
steps:
  - synth: {{out: {tmp_path}/synth, modalities: [us], n: 2, size: 64, preview: false}}
  - evaluate: {{model: box-ellipse, data: {tmp_path}/synth, prompt: box, out: {tmp_path}/r.json}}
  - evaluate: {{model: box-ellipse, data: {tmp_path}/absent, prompt: box, out: {tmp_path}/x.json}}
""")
    r = run("run", recipe)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.json").is_file() and "skipped" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - synth: {out: a, n: 0}\n")
    r = run("run", bad)
    assert r.exit_code == 2 and "steps.0" in r.output


@pytest.mark.parametrize("command", ["train", "embed"])
def test_train_and_embed_check_the_device_first(tmp_path, command):
    out = ["--out", tmp_path / "run"] if command == "train" else ["--cache", tmp_path / "c"]
    r = run("seg", command, "--data", tmp_path, *out, "--device", "gpu")
    assert r.exit_code == 2 and "--device must be cpu or cuda, got 'gpu'" in r.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_train_on_empty_masks_is_a_clear_error(tmp_path):
    from medfm.io import DatasetJson, write_case, write_dataset_json

    data = tmp_path / "empty"
    write_dataset_json(data, DatasetJson(channel_names={"0": "x"}, labels={"background": 0,
                       "a": 1}, numTraining=2, file_ending=".png"))  # fmt: skip
    for i in range(2):
        img = Volume.from_array(torch.full((32, 32), 100, dtype=torch.uint8))
        write_case(data, f"c{i}", img, Volume.from_array(torch.zeros(32, 32, dtype=torch.uint8)),
                   ".png")  # fmt: skip
    r = run("seg", "train", "--data", data, "--out", tmp_path / "run", "--steps", "1")
    assert r.exit_code == 2 and "no labelled cases" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "nan,1,5,5"], "--box 'nan,1,5,5' must be finite numbers"),
        (["--point", "3,inf"], "--point '3,inf' must be finite numbers"),
        (["--point", "3,4,2"], "the label is 1 (positive) or 0 (negative)"),
        (["--point", "3,4,0.5"], "0.5 must be a whole number"),
        (["--box", "1,1,5,5", "--mask-threshold", "nan"], "--mask-threshold must be a finite"),
    ],
)
def test_predict_refuses_numbers_that_are_not_what_they_must_be(png, tmp_path, args, message):
    out = tmp_path / "mask.png"
    r = run("seg", "predict", "-i", png, "-o", out, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_predict_refuses_fractional_slices_its_own_input_and_random_weights(nifti, png):
    path, _ = nifti
    out = path.with_name("mask.nii.gz")
    for box in ("15,10,29,19,3.5", "15,10,29,19,3,8.2"):
        r = run("seg", "predict", "-m", "box-fill", "-i", path, "--box", box, "-o", out)
        assert r.exit_code == 2 and "must be a whole number" in r.output, r.output
    before = png.read_bytes()
    r = run("seg", "predict", "-m", "box-fill", "-i", png, "--box", "1,1,5,5", "-o", png)
    assert r.exit_code == 2 and "is the input image" in r.output
    assert png.read_bytes() == before
    r = run("seg", "predict", "-m", "vit_b", "-i", png, "--box", "1,1,5,5", "-o", out)
    assert r.exit_code == 2 and "--model vit_b has no weights" in r.output, r.output


def test_calibrate_and_train_refuse_nan_and_inf(tmp_path):
    r = run("seg", "calibrate", tmp_path, "--data", tmp_path, "--grid", "-1,nan")
    assert r.exit_code == 2 and "--grid '-1,nan' must be finite numbers" in r.output, r.output
    r = run("seg", "train", "--data", tmp_path, "--out", tmp_path / "run", "--lr", "inf")
    assert r.exit_code == 2 and "--lr: Input should be a finite number" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_evaluate_average_and_train_never_write_into_their_inputs(tmp_path):
    from medfm.synth.dataset import generate_dataset

    data = tmp_path / "ds"
    generate_dataset(data, modalities="ct", dim=2, n=1, size=32, seed=0)
    before = (data / "dataset.json").read_bytes()
    r = run("seg", "evaluate", "-m", "box-fill", "--data", data, "--prompt", "box",
            "--out", data / "dataset.json")  # fmt: skip
    assert r.exit_code == 2 and "lies inside the input --data" in r.output, r.output
    r = run("seg", "evaluate", "-m", "box-fill", "--data", data, "--prompt", "box",
            "--out", tmp_path / "r.json", "--overlays", data / "labelsTr")  # fmt: skip
    assert r.exit_code == 2 and "--overlays" in r.output and "lies inside" in r.output
    assert (data / "dataset.json").read_bytes() == before
    r = run("seg", "average", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "a" / "model")
    assert r.exit_code == 2 and "lies inside the input model 1" in r.output, r.output
    r = run("seg", "train", "--data", data, "--out", data / "run")
    assert r.exit_code == 2 and "lies inside the input --data" in r.output, r.output
    assert not (data / "run").exists()


def test_predict_writes_an_overlay_of_the_prompts_and_the_mask(png, nifti, tmp_path):
    from PIL import Image

    from medfm.viz import BOX_COLOUR, CLICK_COLOURS, PALETTE

    out, picture = tmp_path / "mask.png", tmp_path / "overlay.png"
    r = run("seg", "predict", "-m", "box-fill", "-i", png, "--box", "30,20,59,39", "-o", out,
            "--overlay", picture)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "600 pixels in 1 object(s); overlay" in r.output  # 2D: pixels
    rgb = np.asarray(Image.open(picture))
    assert rgb.shape == (192, 256, 3)  # 60 x 80 enlarged to a longest side of 256
    is_box = (rgb == BOX_COLOUR).all(-1)
    rows, cols = np.nonzero(is_box)
    scale = 256 / 80
    assert rows.min() == round(20.5 * scale - 0.5) and cols.max() == round(59.5 * scale - 0.5)
    assert (rgb == PALETTE[0]).all(-1).any()  # the mask's outline
    # a volume: the slice with the largest mask, with the clicks on it
    path, _ = nifti
    r = run("seg", "predict", "-m", "box-fill", "-i", path, "--box", "15,10,29,19,5",
            "-o", tmp_path / "m.nii.gz", "--overlay", tmp_path / "o3.png")  # fmt: skip
    assert r.exit_code == 0 and "voxels in 1 object(s)" in r.output, r.output
    assert (np.asarray(Image.open(tmp_path / "o3.png")) == BOX_COLOUR).all(-1).any()
    r = run("seg", "predict", "-m", "box-fill", "-i", png, "--box", "1,1,5,5", "-o", out,
            "--overlay", out)  # fmt: skip
    assert r.exit_code == 2 and "would overwrite the image or the mask" in r.output
    assert set(CLICK_COLOURS) == {0, 1}


def test_prompt_overlay_draws_clicks_in_their_colours():
    import torch

    from medfm.viz import CLICK_COLOURS, prompt_overlay

    image = torch.zeros(300, 200)
    pic = prompt_overlay(image, torch.zeros(300, 200, dtype=torch.long),
                         points=np.array([[50.0, 60.0], [150.0, 250.0]]),
                         point_labels=np.array([1, 0]))  # fmt: skip
    assert pic.shape == (300, 200, 3)  # large enough: not enlarged
    assert (pic[60, 50] == CLICK_COLOURS[1]).all() and (pic[250, 150] == CLICK_COLOURS[0]).all()


def test_ctrl_c_stops_training_with_one_line_and_the_lock_released(tmp_path):
    """SIGINT to the process group, as a terminal's Ctrl-C: exit 130, one line, no lock left."""
    import os
    import signal
    import time

    data = tmp_path / "data"
    run("synth", "generate", "--out", data, "-n", "4", "--size", "64", "--modality", "ct")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medfm.cli.main", "seg", "train", "--data", str(data)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--steps", "100000", "--model", "medfm-tiny"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 130  # Ctrl-C stops within 2 s; a loaded machine may add more
    assert proc.stderr.read().splitlines()[-1] == (
        "interrupted: run the same command again to resume (seg train: with --resume)"
    )
    assert not (out / ".lock").exists()
