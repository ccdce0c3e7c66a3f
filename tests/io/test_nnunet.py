import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.io import (
    DatasetJson,
    Volume,
    case_complete,
    case_paths,
    iter_dataset,
    list_cases,
    read_dataset_json,
    write_case,
    write_dataset_json,
)

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def _label(g, shape):
    lab = np.zeros(shape, np.uint8)
    lab[tuple(slice(s // 4, s // 2) for s in shape)] = 1
    lab[tuple(slice(s // 2, 3 * s // 4) for s in shape)] = 2
    lab[g.random(shape) < 0.05] = 1
    return lab


def write_2d_set(folder, n=3):
    g = np.random.default_rng(0)
    cases = {}
    for i in range(n):
        img = Volume.from_array(g.integers(0, 256, (24, 20), dtype=np.uint8))
        lab = Volume.from_array(_label(g, (24, 20)))
        write_case(folder, f"case_{i:03d}", img, lab, ".png")
        cases[f"case_{i:03d}"] = (img, lab)
    write_dataset_json(
        folder,
        DatasetJson(channel_names={"0": "US"}, labels=LABELS, numTraining=n, file_ending=".png"),
    )
    return cases


def write_3d_set(folder, n=2, channels=1):
    g = np.random.default_rng(1)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    cases = {}
    for i in range(n):
        img = Volume(torch.from_numpy(g.normal(0, 300, (channels, 10, 12, 14))).float(), affine)
        lab = Volume.from_array(_label(g, (10, 12, 14)), spacing=(1.5, 1.0, 2.0))
        write_case(folder, f"ct_{i}", img, lab, ".nii.gz", image_dtype=np.int16)
        cases[f"ct_{i}"] = (img, lab)
    names = {str(c): f"CT{c}" for c in range(channels)}
    ds = DatasetJson(
        channel_names=names, labels=LABELS, numTraining=n, file_ending=".nii.gz", name="t"
    )
    write_dataset_json(folder, ds)
    return cases


def test_2d_png_set_passes_nnunet_and_round_trips(tmp_path, nnunet_verify):
    folder = tmp_path / "Dataset001_Tiny2D"
    cases = write_2d_set(folder)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "case_000_0000.png",
        "case_001_0000.png",
        "case_002_0000.png",
    ]
    nnunet_verify(folder)
    assert list_cases(folder) == sorted(cases)
    seen = []
    for case_id, image, label in iter_dataset(folder):
        seen.append(case_id)
        img, lab = cases[case_id]
        assert image.data.dtype == torch.uint8 and label.data.dtype == torch.uint8
        assert torch.equal(image.data, img.data) and torch.equal(label.data, lab.data)
        assert set(label.data.unique().tolist()) == {0, 1, 2}
        np.testing.assert_array_equal(image.affine, np.eye(4))
    assert seen == sorted(cases)


def test_3d_nifti_set_passes_nnunet_and_round_trips(tmp_path, nnunet_verify):
    folder = tmp_path / "Dataset002_Tiny3D"
    cases = write_3d_set(folder)
    nnunet_verify(folder)
    for case_id, image, label in iter_dataset(folder):
        img, lab = cases[case_id]
        assert image.data.dtype == torch.int16 and label.data.dtype == torch.uint8
        assert torch.equal(image.data, img.data.round().to(torch.int16))
        assert torch.equal(label.data, lab.data)
        np.testing.assert_allclose(image.affine, img.affine, atol=1e-6)
        np.testing.assert_allclose(label.affine, img.affine, atol=1e-6)  # the image's affine
        assert image.spacing == pytest.approx((1.5, 1.0, 2.0))


def test_multichannel_case_is_one_file_per_channel(tmp_path, nnunet_verify):
    folder = tmp_path / "Dataset003_TwoChannels"
    cases = write_3d_set(folder, n=1, channels=2)
    assert case_paths(folder, "ct_0", ".nii.gz", channel=1)[0].is_file()
    nnunet_verify(folder)
    ((case_id, image, _),) = list(iter_dataset(folder))
    assert image.data.shape == (2, 10, 12, 14)
    assert torch.equal(image.data, cases[case_id][0].data.round().to(torch.int16))


def test_nnunet_checker_catches_a_bad_label(tmp_path, nnunet_verify):
    """The check above is only worth something if the checker fails on a broken set."""
    folder = tmp_path / "Dataset004_Bad"
    write_2d_set(folder)
    img = Volume.from_array(np.zeros((24, 20), np.uint8))
    lab = Volume.from_array(np.full((24, 20), 3, np.uint8))  # 3 is not in labels
    write_case(folder, "case_001", img, lab, ".png")
    with pytest.raises(RuntimeError, match="unexpected labels"):
        nnunet_verify(folder)


def test_resume_after_a_killed_write(tmp_path, nnunet_verify):
    folder = tmp_path / "Dataset005_Resume"
    cases = write_2d_set(folder)
    # a run killed while writing case_001: image written, a temp label half-written, no label
    _, label_path = case_paths(folder, "case_001", ".png")
    label_path.unlink()
    stale = label_path.with_name(".case_001.tmp-4242-0badc0de.png")
    stale.write_bytes(b"\x89PNG half")
    stale_img = folder / "imagesTr" / ".case_001_0000.tmp-4242-deadbeef.png"
    stale_img.write_bytes(b"\x89PNG half")
    assert not case_complete(folder, "case_001", ".png")
    assert list_cases(folder) == ["case_000", "case_002"]
    write_case(folder, "case_001", *cases["case_001"], ".png")
    assert case_complete(folder, "case_001", ".png")
    assert not stale.exists() and not stale_img.exists()
    nnunet_verify(folder)


def test_write_case_refusals(tmp_path):
    img2 = Volume.from_array(np.zeros((24, 20), np.uint8))
    lab2 = Volume.from_array(np.zeros((24, 20), np.uint8))
    with pytest.raises(MedfmError, match="differ"):
        write_case(tmp_path, "a", img2, Volume.from_array(np.zeros((20, 24), np.uint8)), ".png")
    with pytest.raises(MedfmError, match="integer"):
        write_case(tmp_path, "a", img2, Volume.from_array(np.zeros((24, 20), np.float32)), ".png")
    with pytest.raises(MedfmError, match="uint8"):
        write_case(tmp_path, "a", Volume.from_array(np.zeros((24, 20), np.float32)), lab2, ".png")
    with pytest.raises(MedfmError, match="2D"):
        vol3 = Volume.from_array(np.zeros((10, 12, 14), np.uint8))
        write_case(tmp_path, "a", vol3, vol3, ".png")
    with pytest.raises(MedfmError, match="not supported"):
        write_case(tmp_path, "a", img2, lab2, ".jpg")
    with pytest.raises(MedfmError, match="negative"):
        write_case(tmp_path, "a", img2, Volume.from_array(-np.ones((24, 20), np.int16)), ".png")
    assert list(tmp_path.iterdir()) == []  # nothing written by a refused case
    # a float image is cast for png when asked, with a range check
    f = Volume.from_array(np.full((24, 20), 254.6, np.float32))
    write_case(tmp_path, "b", f, lab2, ".png", image_dtype=np.uint8)
    ds = DatasetJson(
        channel_names={"0": "x"}, labels={"background": 0}, numTraining=1, file_ending=".png"
    )
    write_dataset_json(tmp_path, ds)
    ((_, image, _),) = list(iter_dataset(tmp_path))
    assert image.data.unique().tolist() == [255]
    with pytest.raises(MedfmError, match="outside uint8"):
        write_case(
            tmp_path, "c", Volume.from_array(f.data[0] + 1), lab2, ".png", image_dtype=np.uint8
        )


def test_iter_dataset_missing_image(tmp_path):
    write_2d_set(tmp_path)
    case_paths(tmp_path, "case_002", ".png")[0].unlink()
    it = iter_dataset(tmp_path)
    assert next(it)[0] == "case_000"
    next(it)
    with pytest.raises(MedfmError, match="case_002 has a label but no image"):
        next(it)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(labels={"organ": 1, "background": 1}), "background"),
        (dict(labels={"background": 0, "a": 2}), "0..K"),
        (dict(labels={"background": 0, "a": 1, "b": 1}), "0..K"),
        (dict(numTraining=-1), "numTraining"),
        (dict(channel_names={"1": "CT"}), "channel_names"),
        (dict(file_ending="png"), "dot"),
    ],
)
def test_dataset_json_validation(tmp_path, change, match):
    raw = dict(channel_names={"0": "CT"}, labels=LABELS, numTraining=2, file_ending=".nii.gz")
    raw.update(change)
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(MedfmError, match=rf"dataset.json is not a valid.*{match}"):
        read_dataset_json(tmp_path)


def test_dataset_json_round_trip_keeps_foreign_keys(tmp_path):
    raw = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": 5,
        "file_ending": ".nii.gz",
        "tensorImageSize": "4D",
        "release": "1.0",
        "licence": "CC-BY",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    ds = read_dataset_json(tmp_path)
    assert ds.num_channels == 2 and ds.licence == "CC-BY" and ds.tensorImageSize == "4D"
    write_dataset_json(tmp_path / "copy", ds)
    text = (tmp_path / "copy" / "dataset.json").read_text()
    assert json.loads(text) == raw and text.startswith('{\n  "channel_names"')


def test_dataset_json_missing_or_broken(tmp_path):
    with pytest.raises(MedfmError, match="dataset.json does not exist"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(MedfmError, match="dataset.json is not valid JSON"):
        read_dataset_json(tmp_path)


def test_real_hc18_first_cases(shared_data):
    folder = shared_data / "us_hc18"
    if not folder.is_dir():
        pytest.skip("us_hc18 is absent")
    for case_id, image, label in itertools.islice(iter_dataset(folder), 3):
        assert case_id.startswith("hc18_")
        assert image.data.shape == (1, 540, 800) and image.data.dtype == torch.uint8
        assert label.shape == image.shape
        values = set(label.data.unique().tolist())
        assert values == {0, 1}
        assert 0.01 < (label.data == 1).float().mean() < 0.6  # a head, not the whole image


def test_real_hippocampus_first_cases(shared_data):
    folder = shared_data / "mr_hippocampus"
    if not folder.is_dir():
        pytest.skip("mr_hippocampus is absent")
    for _, image, label in itertools.islice(iter_dataset(folder), 3):
        assert image.ndim == 3 and label.shape == image.shape
        assert all(20 <= s <= 70 for s in image.shape)
        assert set(label.data.unique().tolist()) == {0, 1, 2}
        np.testing.assert_allclose(image.spacing, (1.0, 1.0, 1.0))
        np.testing.assert_allclose(label.affine, image.affine)


@pytest.mark.slow
def test_nnunet_checker_untouched_in_its_own_process(tmp_path):
    """nnU-Net's checker exactly as its CLI runs it (spawn pool), on both kinds of set."""
    write_2d_set(tmp_path / "d2")
    write_3d_set(tmp_path / "d3")
    code = (
        "import sys\n"
        "from nnunetv2.experiment_planning.verify_dataset_integrity import "
        "verify_dataset_integrity\n"
        "for f in sys.argv[1:]:\n"
        "    verify_dataset_integrity(f, num_processes=2)\n"
    )
    env = {
        "nnUNet_raw": str(tmp_path),
        "nnUNet_preprocessed": str(tmp_path),
        "nnUNet_results": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
    }
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "d2"), str(tmp_path / "d3")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("verify_dataset_integrity Done") == 2


def test_rewriting_a_case_keeps_it_incomplete_until_the_new_label(tmp_path, monkeypatch):
    cases = write_2d_set(tmp_path)
    import medfm.io.nnunet as nnunet_mod

    def broken_png(data, path):
        raise OSError("disk full")

    monkeypatch.setattr(nnunet_mod, "write_png", broken_png)
    with pytest.raises(OSError, match="disk full"):
        write_case(tmp_path, "case_001", *cases["case_001"], ".png")
    assert not case_complete(tmp_path, "case_001", ".png")
    assert list_cases(tmp_path) == ["case_000", "case_002"]


def test_deeply_nested_json_and_yaml_are_one_line_errors(tmp_path):
    from medfm.io.weights import read_config_json
    from medfm.recipe import load_recipe

    deep = "[" * 20000 + "]" * 20000
    (tmp_path / "dataset.json").write_text(deep)
    with pytest.raises(MedfmError, match="nested too deeply to be a dataset.json"):
        read_dataset_json(tmp_path)
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(MedfmError, match="nested too deeply to be a model's config.json"):
        read_config_json(tmp_path)
    (tmp_path / "r.yaml").write_text(deep)
    with pytest.raises(MedfmError, match="nested too deeply to be a recipe"):
        load_recipe(tmp_path / "r.yaml")
