"""Determinism (batch, shard, workers), resume after a kill, replay, nnU-Net's verifier."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import medfm.synth.dataset as ds_mod
from medfm.errors import MedfmError
from medfm.io import iter_dataset, read_nifti, read_png
from medfm.synth.dataset import generate_dataset
from medfm.synth.manifest import read_manifest, replay

SMALL = dict(modalities="ct,mri,us", dim=2, n=6, size=48, seed=3)


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "preview.png"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    generate_dataset(out, batch=4, **SMALL)
    return out


def test_layout_and_dataset_json(reference):
    files = tree(reference)
    assert {"dataset.json", "manifest.jsonl", "synth_run.json"} <= set(files)
    ids = [f"case_{i:05d}" for i in range(6)]
    for i in ids:
        assert f"imagesTr/{i}_0000.png" in files and f"labelsTr/{i}.png" in files
    meta = json.loads(files["dataset.json"])
    assert meta["numTraining"] == 6 and meta["file_ending"] == ".png"
    assert meta["labels"]["background"] == 0 and meta["labels"]["structure_1"] == 1
    lines = read_manifest(reference)
    assert [r["modality"] for r in lines] == ["ct", "mri", "us"] * 2
    assert [r["case"] for r in lines] == ids
    # no temporary files left
    assert not [p for p in reference.rglob(".*tmp*")]


def test_same_command_twice_is_byte_identical(reference, tmp_path):
    generate_dataset(tmp_path / "b", batch=4, **SMALL)
    assert tree(tmp_path / "b") == tree(reference)


def test_batch_size_changes_nothing(reference, tmp_path):
    generate_dataset(tmp_path / "b1", batch=1, **SMALL)
    assert tree(tmp_path / "b1") == tree(reference)


def test_shards_give_the_unsharded_files(reference, tmp_path):
    out = tmp_path / "sharded"
    generate_dataset(out, batch=3, shard="0/2", **SMALL)
    assert len(list((out / "labelsTr").iterdir())) == 3
    generate_dataset(out, batch=2, shard="1/2", **SMALL)
    assert tree(out) == tree(reference)


def test_workers_change_nothing(reference, tmp_path):
    generate_dataset(tmp_path / "w", batch=1, workers=2, **SMALL)
    assert tree(tmp_path / "w") == tree(reference)


def test_replay_manifest_line_reproduces_the_case(reference):
    for rec in read_manifest(reference)[:3]:
        image, label = replay(rec)
        img = read_png(reference / "imagesTr" / f"{rec['case']}_0000.png").data
        lab = read_png(reference / "labelsTr" / f"{rec['case']}.png").data
        assert torch.equal(image, img) and torch.equal(label, lab)


def test_resume_after_a_crash_redoes_nothing(reference, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real = ds_mod.write_case
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return real(*args, **kwargs)

    monkeypatch.setattr(ds_mod, "write_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(out, batch=2, **SMALL)
    done = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert len(done) == 3
    mtimes = {p: (out / "labelsTr" / p).stat().st_mtime_ns for p in done}
    monkeypatch.setattr(ds_mod, "write_case", real)
    report = generate_dataset(out, batch=2, **SMALL)
    assert report.skipped == 3 and report.written == 3
    assert {p: (out / "labelsTr" / p).stat().st_mtime_ns for p in done} == mtimes
    assert tree(out) == tree(reference)


def test_resume_after_sigkill(tmp_path):
    """Kill a real run with SIGKILL mid-way; running it again completes it exactly."""
    args = ["--modality", "ct,us", "-n", "40", "--size", "64", "--seed", "1", "--batch", "2"]
    cmd = [sys.executable, "-m", "medfm.cli.main", "synth", "generate", *args]
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        labels = out / "labelsTr"
        if labels.is_dir() and len(list(labels.glob("*.png"))) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(list((out / "labelsTr").glob("*.png")))
    assert 4 <= n_before < 40
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, capture_output=True)
    subprocess.run(
        [*cmd, "--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True
    )
    assert tree(out) == tree(tmp_path / "clean")


def test_different_arguments_are_refused(reference, tmp_path):
    out = tmp_path / "x"
    generate_dataset(out, **SMALL)
    with pytest.raises(MedfmError, match="different arguments"):
        generate_dataset(out, **{**SMALL, "seed": 4})


def test_a_dataset_from_before_a_knob_resumes_with_the_knob_off(tmp_path):
    """A synth_run.json written before p_large / p_split existed was made with them off: the
    same arguments with them pinned to 0 resume it; the new defaults are other arguments."""
    from medfm.synth.anatomy import AnatomyConfig
    from medfm.synth.case import SynthConfig

    off = SynthConfig(anatomy=AnatomyConfig(p_large=0.0, p_split=0.0))
    out = tmp_path / "old"
    generate_dataset(out, **{**SMALL, "n": 2}, config=off)
    run_file = out / "synth_run.json"
    spec = json.loads(run_file.read_text())
    for knob in ("p_large", "p_split"):
        del spec["config"]["anatomy"][knob]
    run_file.write_text(json.dumps(spec))
    before = tree(out)
    generate_dataset(out, **{**SMALL, "n": 2}, config=off)  # resumes: nothing to do
    assert {k: v for k, v in tree(out).items() if k != "synth_run.json"} == {
        k: v for k, v in before.items() if k != "synth_run.json"
    }
    with pytest.raises(MedfmError, match="different arguments \\(config\\)"):
        generate_dataset(out, **{**SMALL, "n": 2})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modalities": "ct,xray"}, "unknown modality"),
        ({"size": 8}, "too small"),
        ({"size": "64,a"}, "--size"),
        ({"size": "64,64,64"}, "2D size"),
        ({"shard": "3/2"}, "invalid"),
        ({"shard": "1-2"}, "K/N"),
        ({"n": 0}, "-n"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, kwargs, match):
    out = tmp_path / "bad"
    with pytest.raises(MedfmError, match=match):
        generate_dataset(out, **{**SMALL, **kwargs})
    assert not out.exists()


def test_3d_nifti_with_spacing(tmp_path):
    out = tmp_path / "d3"
    generate_dataset(out, modalities="ct,mri", dim=3, n=2, size="40,48,36", spacing=(0.8, 0.8, 2.0))
    ct = read_nifti(out / "imagesTr" / "case_00000_0000.nii.gz")
    mr = read_nifti(out / "imagesTr" / "case_00001_0000.nii.gz")
    lab = read_nifti(out / "labelsTr" / "case_00000.nii.gz")
    assert ct.shape == (40, 48, 36) and ct.spacing == pytest.approx((0.8, 0.8, 2.0))
    assert ct.data.dtype == torch.int16 and mr.data.dtype == torch.float32
    assert lab.data.dtype == torch.uint8 and np.allclose(lab.affine, ct.affine)
    assert ct.data.min() <= -900 and ct.data.max() > 0  # HU: air outside the body
    assert int(lab.data.max()) >= 1


@pytest.mark.parametrize("dim, size", [(2, 48), (3, "36,40,32")])
def test_nnunet_verifier_accepts_output(tmp_path, nnunet_verify, dim, size):
    out = tmp_path / "Dataset001_synth"
    generate_dataset(out, modalities="ct,mri,us", dim=dim, n=3, size=size)
    nnunet_verify(out)
    assert len(list(iter_dataset(out))) == 3


@pytest.mark.gpu
def test_cuda_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_dataset(a, device="cuda", batch=4, **SMALL)
    generate_dataset(b, device="cuda", batch=1, **SMALL)
    assert tree(a) == tree(b)


def test_monai_shapes_ablation_set(tmp_path, nnunet_verify):
    from medfm.synth.monai_shapes import generate_monai_shapes

    out = tmp_path / "shapes"
    assert generate_monai_shapes(out, n=3, size=48, seed=1) == 3
    assert generate_monai_shapes(out, n=3, size=48, seed=1) == 0  # resumes: nothing to redo
    nnunet_verify(out)
    cases = list(iter_dataset(out))
    assert len(cases) == 3 and all(int(lab.data.max()) >= 1 for _, _, lab in cases)
    again = tmp_path / "again"
    generate_monai_shapes(again, n=3, size=48, seed=1)
    assert tree(again) == tree(out)


@pytest.mark.parametrize("text", ["{not json", '{"config": [1, 2]}', "[]", '{"n": "x"}'])
def test_an_unreadable_run_file_is_a_clear_error(tmp_path, text):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "synth_run.json").write_text(text)
    with pytest.raises(MedfmError, match="unreadable; use a new --out"):
        generate_dataset(out, **{**SMALL, "n": 1})
    assert (out / "synth_run.json").read_text() == text  # left as it was


def test_a_second_writer_of_one_folder_is_refused_while_shards_write_side_by_side(
    tmp_path, lock_holder
):
    from medfm.errors import MedfmError

    out = tmp_path / "ds"
    holder = lock_holder(out)
    with pytest.raises(MedfmError, match=f"in use by pid {holder.pid}"):
        generate_dataset(out, modalities="ct", dim=2, n=2, size=32, seed=1)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    # a shard takes its own lock: shards of one run write side by side
    generate_dataset(out, modalities="ct", dim=2, n=2, size=32, seed=1, shard="1/2")
    holder.kill()
    holder.wait()
    assert not (out / ".lock-shard-1-of-2").exists()  # released
    report = generate_dataset(out, modalities="ct", dim=2, n=2, size=32, seed=1)  # stale: taken
    assert (report.written, report.skipped) == (1, 1)  # shard 1/2 wrote case 1
    with pytest.raises(MedfmError, match="different arguments"):
        generate_dataset(out, modalities="ct", dim=2, n=2, size=32, seed=2)
