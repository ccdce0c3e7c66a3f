"""``medfm diffusion``: each command on tiny volumes, and its one-line refusals."""

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medfm.cli.main import app
from tests.diffusion.conftest import tiny_config, untrained

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["diffusion", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    untrained(tiny_config()).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    image = (rng.random((8, 10, 20)) * 400 + 100).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(root / "img.nii.gz"))
    mask = np.zeros((8, 10, 20), np.uint8)
    mask[2:5, 3:6, 5:10] = 1
    nib.save(nib.Nifti1Image(mask, affine), str(root / "mask.nii.gz"))
    nib.save(nib.Nifti1Image(mask[:, :, :10], affine), str(root / "small_mask.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 10, 20, 2), np.float32), affine), str(root / "4d.nii.gz"))
    return root


def _read(path):
    img = nib.load(str(path))
    return img.get_fdata(), img.affine


def test_denoise_keeps_grid_affine_and_units(files, tmp_path):
    out = tmp_path / "clean.nii.gz"
    r = run("denoise", "--model", files / "model", "--input", files / "img.nii.gz", "--out", out,
            "--noise-std", "20", "--steps", "10")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "noise std 20" in r.output
    data, affine = _read(out)
    src, src_affine = _read(files / "img.nii.gz")
    assert data.shape == src.shape and np.allclose(affine, src_affine)
    assert abs(data.mean() - src.mean()) < 0.5 * src.std() + 200  # input units, not [-1, 1]
    again = run("denoise", "--model", files / "model", "--input", files / "img.nii.gz",
                "--out", out, "--noise-std", "20", "--steps", "10")  # fmt: skip
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_inpaint_and_anomaly_with_report(files, tmp_path):
    out = tmp_path / "filled.nii.gz"
    r = run("inpaint", "--model", files / "model", "--input", files / "img.nii.gz",
            "--mask", files / "mask.nii.gz", "--out", out, "--steps", "4",
            "--jump-length", "2", "--jump-n-sample", "2")  # fmt: skip
    assert r.exit_code == 0, r.output
    data, _ = _read(out)
    src, _ = _read(files / "img.nii.gz")
    keep = _read(files / "mask.nii.gz")[0] == 0
    assert np.allclose(data[keep], src[keep], atol=1e-2)
    report = tmp_path / "r.json"
    r = run("anomaly", "--model", files / "model", "--input", files / "img.nii.gz",
            "--out", tmp_path / "map.nii.gz", "--t", "300", "--steps", "10",
            "--mask", files / "mask.nii.gz", "--report", report)  # fmt: skip
    assert r.exit_code == 0, r.output
    scores = json.loads(report.read_text())
    assert 0 <= scores["auroc"] <= 1 and 0 < scores["best_dice"] <= 1


def test_sample_writes_the_shape_and_spacing_asked(files, tmp_path):
    out = tmp_path / "s.nii.gz"
    r = run("sample", "--model", files / "model", "--shape", "6,10,20", "--spacing", "1.5",
            "--steps", "2", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    data, affine = _read(out)
    assert data.shape == (6, 10, 20) and np.allclose(np.diag(affine)[:3], 1.5)


IMG, OUT = "--input {f}/img.nii.gz", "--out {t}/o.nii.gz"


@pytest.mark.parametrize(
    "args, message",
    [
        ("denoise --input {f}/4d.nii.gz " + OUT, "is 4D"),
        (f"denoise {IMG} --out {{f}}/img.nii.gz --overwrite", "is the input"),
        (f"denoise {IMG} --out {{t}}/o.png", "must end in .nii.gz"),
        (f"denoise {IMG} {OUT} --noise-std nan", "finite"),
        (f"denoise --input {{f}}/nope.nii.gz {OUT}", "does not exist"),
        (f"inpaint {IMG} --mask {{f}}/small_mask.nii.gz {OUT}", "image's grid"),
        (f"anomaly {IMG} {OUT} --t 1000", "--t must lie"),
        (f"anomaly {IMG} {OUT} --report {{t}}/r.json", "--report needs --mask"),
        (f"sample --shape 0,4,4 {OUT}", "positive whole"),
        (f"sample --shape 8,8,8 {OUT} --sampler euler", "unknown sampler"),
        (f"sample --shape 2000,2000,2000 {OUT}", "GiB"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, args, message):
    filled = args.format(f=files, t=tmp_path).split()
    r = run(*filled[:1], "--model", files / "model", *filled[1:])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


def test_a_segmentation_model_is_refused(tmp_path, files):
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "config.json").write_text(json.dumps({"model": "medfm-tiny"}))
    r = run("denoise", "--model", tmp_path / "seg", "--input", files / "img.nii.gz",
            "--out", tmp_path / "o.nii.gz")  # fmt: skip
    assert r.exit_code == 2 and "not a medfm diffusion model" in r.output


def test_train_a_few_steps_from_folders_and_synth(tmp_path, files):
    data = tmp_path / "vols"
    data.mkdir()
    for i in range(2):
        src = nib.load(str(files / "img.nii.gz"))
        nib.save(src, str(data / f"v{i}.nii.gz"))
    out = tmp_path / "run"
    r = run("train", "--data", data, "--data", "synth:ct", "--out", out, "--patch", "8",
            "--steps", "2", "--batch", "1", "--channels", "8,16",
            "--checkpoint-every", "1")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (out / "model" / "model.safetensors").is_file()
    bad = run("train", "--data", tmp_path / "nothing", "--out", tmp_path / "r2", "--steps", "1")
    assert bad.exit_code == 2 and "not a folder" in bad.output
    assert not (tmp_path / "r2").exists()
    bad = run("train", "--data", "synth:us", "--out", tmp_path / "r3", "--steps", "1")
    assert bad.exit_code == 2 and "2D-only" in bad.output
