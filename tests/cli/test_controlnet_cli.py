"""``medfm diffusion superres / generate / inpaint --controlnet / make-dataset /
controlnet-train`` on tiny volumes: geometry, determinism, resume, nnU-Net's check, refusals."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.diffusion.controlnet import ControlNet
from medfm.diffusion.model import DiffusionModel
from tests.diffusion.conftest import tiny_config, untrained

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["diffusion", *[str(a) for a in args]])


def _stir(net):
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cncli")
    untrained(tiny_config()).save_pretrained(root / "model")
    untrained(tiny_config(), seed=1).save_pretrained(root / "other")
    base = DiffusionModel.from_pretrained(root / "model")
    _stir(ControlNet.from_base(base, "superres")).save_pretrained(root / "sr")
    _stir(ControlNet.from_base(base, "mask", labels=2)).save_pretrained(root / "mask_cn")
    rng = np.random.default_rng(0)
    affine = np.array([[0, 0, 2.0, 10], [0.9, 0, 0, -5], [0, 0.8, 0, 3], [0, 0, 0, 1]])
    low = (rng.random((8, 10, 5)) * 300 + 50).astype(np.float32)
    nib.save(nib.Nifti1Image(low, affine), str(root / "low.nii.gz"))
    nib.save(nib.Nifti1Image(low[..., :1], affine), str(root / "one.nii.gz"))
    mask = np.zeros((8, 10, 20), np.uint8)
    mask[2:5, 3:7, 5:10] = 1
    mask[2:5, 3:7, 10:14] = 2
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / "mask.nii.gz"))
    image = (rng.random((8, 10, 20)) * 300 + 50).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "img.nii.gz"))
    labels = root / "labels"
    labels.mkdir()
    for i in range(2):
        m = np.zeros((8, 10, 20), np.uint8)
        m[2 + i : 6, 3:7, 4 + 3 * i : 12] = 1
        m[2 + i : 6, 3:7, 12:15] = 2
        nib.save(nib.Nifti1Image(m, np.diag([1.0, 1.0, 2.0, 1.0])), str(labels / f"c{i}.nii.gz"))
    return root


def _read(path):
    img = nib.load(str(path))
    return img.get_fdata(), img.affine


@pytest.mark.parametrize("how", [["--controlnet", "sr"], ["--zero-shot"]])
def test_superres_keeps_input_slices_in_place(files, tmp_path, how):
    out = tmp_path / "high.nii.gz"
    extra = [files / h if h == "sr" else h for h in how]
    r = run("superres", "--model", files / "model", "--input", files / "low.nii.gz",
            "--factor", "4", "--out", out, "--steps", "2", *extra)  # fmt: skip
    assert r.exit_code == 0, r.output
    high, affine = _read(out)
    low, low_affine = _read(files / "low.nii.gz")
    assert high.shape == (8, 10, 17)
    assert np.allclose(high[..., ::4], low, atol=1e-3)
    for k in range(5):  # slice 4k of the output lies where slice k of the input lay
        assert np.allclose(affine @ [1, 2, 4 * k, 1], low_affine @ [1, 2, k, 1])
    assert np.allclose(np.linalg.norm(affine[:3, 2]), 0.5)  # the spacing divided by 4
    assert np.allclose(affine[:3, :2], low_affine[:3, :2])


def test_superres_refusals(files, tmp_path):
    base = ["--model", files / "model", "--out", tmp_path / "o.nii.gz"]
    cases = [
        (["--input", files / "low.nii.gz", "--factor", "1"], "--factor must be 2 or more"),
        (["--input", files / "one.nii.gz", "--factor", "2"], "at least 2"),
        (["--input", files / "low.nii.gz", "--factor", "2", "--axis", "5"], "--axis 5"),
        (["--input", files / "low.nii.gz", "--factor", "2", "--controlnet", files / "mask_cn"],
         "does the mask task, not superres"),
    ]  # fmt: skip
    for args, msg in cases:
        r = run("superres", *base, *args)
        assert r.exit_code == 2 and msg in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = run("superres", "--model", files / "other", "--out", tmp_path / "o.nii.gz", "--input",
            files / "low.nii.gz", "--factor", "2", "--controlnet", files / "sr")  # fmt: skip
    assert r.exit_code == 2 and "trained on model" in r.output and "not on other" in r.output


def test_generate_and_guided_inpaint(files, tmp_path):
    out = tmp_path / "gen.nii.gz"
    r = run("generate", "--model", files / "model", "--controlnet", files / "mask_cn",
            "--mask", files / "mask.nii.gz", "--out", out, "--steps", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    data, _ = _read(out)
    assert data.shape == (8, 10, 20) and 0 <= data.min() and data.max() <= 1  # MRI in [0, 1]
    inside = tmp_path / "inside.nii.gz"
    r = run("generate", "--model", files / "model", "--controlnet", files / "mask_cn",
            "--mask", files / "mask.nii.gz", "--image", files / "img.nii.gz", "--out", inside,
            "--steps", "4")  # fmt: skip
    assert r.exit_code == 0, r.output
    data, _ = _read(inside)
    src, _ = _read(files / "img.nii.gz")
    keep = _read(files / "mask.nii.gz")[0] == 0
    assert np.allclose(data[keep], src[keep], atol=1e-2) and not np.allclose(data, src)
    guided = tmp_path / "guided.nii.gz"
    r = run("inpaint", "--model", files / "model", "--input", files / "img.nii.gz",
            "--mask", files / "mask.nii.gz", "--controlnet", files / "mask_cn",
            "--condition", files / "mask.nii.gz", "--out", guided, "--steps", "4",
            "--jump-length", "2", "--jump-n-sample", "2")  # fmt: skip
    assert r.exit_code == 0 and "guided" in r.output, r.output
    r = run("generate", "--model", files / "model", "--controlnet", files / "mask_cn",
            "--mask", files / "labels" / "c0.nii.gz", "--image", files / "low.nii.gz",
            "--out", tmp_path / "x.nii.gz")  # fmt: skip
    assert r.exit_code == 2 and "give a mask on the image's grid" in r.output
    r = run("generate", "--model", files / "model", "--controlnet", files / "sr",
            "--mask", files / "mask.nii.gz", "--out", tmp_path / "y.nii.gz")  # fmt: skip
    assert r.exit_code == 2 and "does the superres task, not mask" in r.output
    r = run("generate", "--model", files / "model", "--mask", files / "mask.nii.gz",
            "--out", tmp_path / "z.nii.gz")  # fmt: skip
    assert r.exit_code == 2 and "give --controlnet" in r.output


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".gz", ".png")}  # fmt: skip


@pytest.mark.parametrize("dim", [3, 2])
def test_make_dataset_is_deterministic_resumable_and_valid(files, tmp_path, dim, nnunet_verify):
    common = ["--model", files / "model", "--controlnet", files / "mask_cn", "--masks",
              files / "labels", "-n", "3", "--steps", "2", "--dim", dim, "--seed", "4"]  # fmt: skip
    r = run("make-dataset", *common, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    a = _files(tmp_path / "a")
    ext = ".nii.gz" if dim == 3 else ".png"
    manifest = [json.loads(x) for x in (tmp_path / "a" / "manifest.jsonl").read_text().split()]
    n_labels = len([p for p in a if str(p).startswith("labelsTr")])
    assert n_labels == sum(len(m["cases"]) for m in manifest) == (3 if dim == 3 else n_labels)
    if dim == 2:  # the labelled slices along the last axis: c0's 4..14, c1's 7..14
        assert manifest[0]["cases"][0] == "diff_00000_k004" and len(manifest[0]["cases"]) == 11
        assert len(manifest[1]["cases"]) == 8
    assert [m["mask"] for m in manifest] == ["c0.nii.gz", "c1.nii.gz", "c0.nii.gz~elastic1"]
    assert all(len(m["controlnet_sha256"]) == 64 and len(m["model_sha256"]) == 64
               for m in manifest)  # fmt: skip
    ds = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert ds["file_ending"] == ext and ds["labels"] == {"background": 0, "structure_1": 1,
                                                          "structure_2": 2}  # fmt: skip
    nnunet_verify(tmp_path / "a")
    # two shards into one folder give the same files
    for k in (0, 1):
        r = run("make-dataset", *common, "--out", tmp_path / "b", "--shard", f"{k}/2")
        assert r.exit_code == 0, r.output
    assert _files(tmp_path / "b") == a
    # a killed run (a case's label missing) resumes: only that case is made again
    label = sorted((tmp_path / "b" / "labelsTr").iterdir())[-1]
    label.unlink()
    r = run("make-dataset", *common, "--out", tmp_path / "b")
    assert r.exit_code == 0 and "1 cases written, 2 already there" in r.output, r.output
    assert _files(tmp_path / "b") == a
    r = run("make-dataset", *[c if c != "4" else "5" for c in common], "--out", tmp_path / "b")
    assert r.exit_code == 2 and "different arguments (seed)" in r.output


def test_make_dataset_from_synth_masks(files, tmp_path):
    r = run("make-dataset", "--model", files / "model", "--controlnet", files / "mask_cn",
            "--masks", "synth:2", "--steps", "2", "--out", tmp_path / "s")  # fmt: skip
    assert r.exit_code == 0, r.output
    labels = sorted((tmp_path / "s" / "labelsTr").iterdir())
    assert len(labels) == 2
    lab, _ = _read(labels[0])
    assert lab.shape == (8, 8, 16) and lab.max() <= 2  # the model's patch, the CN's labels
    r = run("make-dataset", "--model", files / "model", "--controlnet", files / "mask_cn",
            "--masks", "synth:x", "--out", tmp_path / "t")  # fmt: skip
    assert r.exit_code == 2 and "synth:N" in r.output
    r = run("make-dataset", "--model", files / "model", "--controlnet", files / "mask_cn",
            "--masks", files / "labels", "--out", files / "labels")  # fmt: skip
    assert r.exit_code == 2


def test_controlnet_train_command(files, tmp_path):
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    shutil.copy(files / "img.nii.gz", data / "imagesTr" / "c_0000.nii.gz")
    shutil.copy(files / "mask.nii.gz", data / "labelsTr" / "c.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 1, "file_ending": ".nii.gz"}))  # fmt: skip
    r = run("controlnet-train", "--model", files / "model", "--task", "mask", "--data", data,
            "--out", tmp_path / "run", "--steps", "2", "--batch", "1")  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["task"] == "mask" and config["labels"] == 2
    r = run("controlnet-train", "--model", files / "model", "--task", "depth", "--data", data,
            "--out", tmp_path / "r2", "--steps", "2")  # fmt: skip
    assert r.exit_code == 2 and "task" in r.output
