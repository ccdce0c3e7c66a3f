"""Evaluation protocol: prompts, metrics, averaging, report, overlays, CLI errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from scipy.ndimage import distance_transform_edt
from typer.testing import CliRunner

from medfm.cli.seg import seg_app
from medfm.errors import MedfmError
from medfm.io import DatasetJson, Volume, write_case, write_dataset_json
from medfm.seg.baselines import BoxEllipse, BoxFill
from medfm.seg.boxes import tight_box
from medfm.seg.evaluate import (
    evaluate,
    innermost_point,
    load_predictor,
    score_label,
    slice_prompts,
    write_report,
)
from medfm.seg.types import Prediction

LABELS = {"background": 0, "liver": 1, "lesion": 2}
SPACING_3D = (1.5, 1.0, 2.0)


def _disc(shape, centre, radii):
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((r - centre[0]) / radii[0]) ** 2 + ((c - centre[1]) / radii[1]) ** 2 <= 1


def _label_2d(i: int) -> np.ndarray:
    lab = np.zeros((40, 48), np.uint8)
    lab[5 : 18 + i, 6 : 30 - i] = 1  # a rectangle
    if i != 1:  # case 1 has no lesion: per-label counts differ
        lab[_disc((40, 48), (27.5 - i, 30.5 + i), (7.5, 10.5))] = 2
    return lab


def _label_3d(i: int) -> np.ndarray:
    lab = np.zeros((20, 24, 6), np.uint8)
    for k in range(1, 5):  # slices 0 and 5 stay empty
        lab[..., k][_disc((20, 24), (8 + i, 9), (4 + k % 2, 6))] = 1
    lab[12:17, 14:21, 2 : 4 + i] = 2
    return lab


def write_sets(root):
    """A 2D .png set (3 cases, 40 x 48) and a 3D .nii.gz set (2 cases, 20 x 24 x 6). The image
    encodes the label (grey = 100 * label), so `Oracle` can read the truth from the image."""
    d2, d3 = root / "d2", root / "d3"
    for i in range(3):
        lab = _label_2d(i)
        write_case(d2, f"img_{i}", Volume.from_array(lab * 100), Volume.from_array(lab), ".png")
    write_dataset_json(
        d2, DatasetJson(channel_names={"0": "US"}, labels=LABELS, numTraining=3, file_ending=".png")
    )
    for i in range(2):
        lab = _label_3d(i)
        img = Volume.from_array(lab.astype(np.float32) * 100 - 50, spacing=SPACING_3D)
        write_case(
            d3,
            f"vol_{i}",
            img,
            Volume.from_array(lab, spacing=SPACING_3D),
            ".nii.gz",
            image_dtype=np.int16,
        )
    write_dataset_json(
        d3,
        DatasetJson(
            channel_names={"0": "MRI"}, labels=LABELS, numTraining=2, file_ending=".nii.gz"
        ),
    )
    return d2, d3


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_sets(tmp_path_factory.mktemp("eval"))


class Oracle:
    """Reads the label map from the image (grey ~ 0 / 128 / 255 or 0 / 100 / 200) and answers a
    box with the label whose tight box it is, a point with the label under it; ``shift`` rolls
    the answer down by that many rows; ``empty`` answers nothing."""

    name = "oracle"

    def __init__(self, shift: int = 0, empty: bool = False):
        self.shift, self.empty = shift, empty
        self.calls: list[tuple[tuple, bool]] = []

    def set_image(self, image):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        grey = image[..., 0].astype(int)
        self.label = np.digitize(grey, [50, 150 if grey.max() <= 200 else 190])
        self.shape = grey.shape

    def predict(self, boxes=None, points=None, labels=None, *, multimask=False):
        self.calls.append((self.shape, multimask))
        masks = []
        for i in range(len(boxes) if boxes is not None else len(points)):
            if boxes is not None:
                vals = [v for v in range(1, 3) if (self.label == v).any()]
                v = next(v for v in vals if np.array_equal(tight_box(self.label == v), boxes[i]))
            else:
                x, y = points[i, 0].astype(int)
                assert labels[i, 0] == 1
                v = self.label[y, x]
            m = self.label == v
            masks.append(np.zeros_like(m) if self.empty else np.roll(m, self.shift, axis=0))
        m = torch.from_numpy(np.stack(masks))
        return Prediction(masks=m, scores=torch.ones(len(m)))


# ----------------------------------------------------------------------------- prompts


def test_innermost_point_is_the_distance_transform_maximum():
    g = np.random.default_rng(1)
    for _ in range(10):
        mask = _disc((30, 40), (g.uniform(5, 25), g.uniform(5, 35)), g.uniform(3, 9, 2))
        mask |= _disc((30, 40), (g.uniform(0, 30), g.uniform(0, 40)), g.uniform(2, 6, 2))
        x, y = innermost_point(mask).astype(int)
        assert mask[y, x]
        dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert dist[y, x] == dist.max()
        # ties: the first maximum in row-major order
        assert (y, x) == np.unravel_index(np.argmax(dist), dist.shape)
    rect = np.zeros((10, 12), bool)
    rect[2:5, 5:10] = True  # rows 2..4: the middle row 3 is innermost, cols 6..8 tie
    assert innermost_point(rect).tolist() == [6, 3]
    full = np.ones((4, 7), bool)  # the image border counts as background
    assert innermost_point(full).tolist() == [1, 1]


def test_slice_prompts_one_per_label_present():
    lab = _label_2d(0)
    sp = slice_prompts(lab)
    assert sp.values.tolist() == [1, 2]
    assert sp.boxes.shape == (2, 4) and sp.points.shape == (2, 1, 2)
    assert sp.point_labels.tolist() == [[1], [1]]
    assert sp.boxes[0].tolist() == [6, 5, 29, 17]
    for v, (x, y) in zip(sp.values, sp.points[:, 0].astype(int), strict=True):
        assert lab[y, x] == v
    assert len(slice_prompts(np.zeros((4, 5), np.uint8)).values) == 0


# ----------------------------------------------------------------------------- metrics


def test_score_label_perfect_empty_and_tolerance():
    gt = np.zeros((30, 30), bool)
    gt[8:20, 5:25] = True
    assert score_label(gt, gt, (1.0, 1.0)) == (1.0, 1.0)
    assert score_label(np.zeros_like(gt), gt, (1.0, 1.0)) == (0.0, 0.0)
    shifted = np.roll(gt, 2, axis=0)
    d, nsd = score_label(shifted, gt, (1.0, 1.0))
    assert d < 1 and nsd == 1.0  # 2 px off: within the 2 px tolerance
    assert score_label(shifted, gt, (1.5, 1.0))[1] < 1  # 3 mm off along rows
    assert score_label(np.roll(gt, 3, axis=0), gt, (1.0, 1.0))[1] < 1


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_oracle_scores_one_and_empty_scores_zero(sets, prompt):
    for folder in sets:
        report = evaluate(Oracle(), folder, prompt)
        assert report["mean_dice"] == pytest.approx(1.0)
        assert report["mean_nsd"] == pytest.approx(1.0)
        report = evaluate(Oracle(empty=True), folder, prompt)
        assert report["mean_dice"] == 0.0 and report["mean_nsd"] == 0.0


def test_report_keys_averaging_and_json(sets, tmp_path):
    d2, _ = sets
    report = evaluate(Oracle(shift=3), d2, "box")
    assert {"model", "prompt", "n_cases", "mean_dice", "mean_nsd", "per_label", "per_case"} <= set(
        report
    )
    assert report["model"] == "oracle" and report["prompt"] == "box" and report["n_cases"] == 3
    assert [c["case"] for c in report["per_case"]] == ["img_0", "img_1", "img_2"]
    assert report["per_label"]["liver"]["n"] == 3 and report["per_label"]["lesion"]["n"] == 2
    assert set(report["per_case"][1]["labels"]) == {"liver"}
    for c in report["per_case"]:  # per case: the mean over its labels
        assert c["dice"] == pytest.approx(np.mean([s["dice"] for s in c["labels"].values()]))
    # then the mean over cases (not over all labels pooled)
    assert report["mean_dice"] == pytest.approx(np.mean([c["dice"] for c in report["per_case"]]))
    lesion = [c["labels"]["lesion"]["nsd"] for c in report["per_case"] if "lesion" in c["labels"]]
    assert report["per_label"]["lesion"]["nsd"] == pytest.approx(np.mean(lesion))
    assert 0 < report["mean_dice"] < 1
    path = write_report(report, tmp_path / "sub" / "report.json")
    text = path.read_text()
    assert json.loads(text) == report and text.startswith('{\n  "model"')
    with pytest.raises(MedfmError, match="folder"):
        write_report(report, tmp_path)


def test_3d_slices_along_the_last_axis_and_spacing(sets):
    _, d3 = sets
    oracle = Oracle()
    calls = []
    report = evaluate(oracle, d3, "box", max_cases=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 1), (1, 1)] and report["n_cases"] == 1
    # 4 labelled slices (k = 1..4) of shape (i, j) = (20, 24); empty slices are not shown
    assert oracle.calls == [((20, 24), False)] * 4
    # NSD in mm: one row = 1.5 mm is within 2 mm, two rows = 3 mm are not
    assert evaluate(Oracle(shift=1), d3, "box")["mean_nsd"] == pytest.approx(1.0)
    assert evaluate(Oracle(shift=2), d3, "box")["mean_nsd"] < 0.99
    # the 3D Dice is over the whole volume: equal to Dice of the stacked per-slice masks
    lab = _label_3d(0)
    pred = np.roll(lab == 1, 2, axis=0)
    ref = 2 * (pred & (lab == 1)).sum() / (pred.sum() + (lab == 1).sum())
    got = evaluate(Oracle(shift=2), d3, "box", max_cases=1)["per_case"][0]["labels"]["liver"]
    assert got["dice"] == pytest.approx(ref)


def test_point_prompts_use_multimask(sets):
    d2, _ = sets
    oracle = Oracle()
    evaluate(oracle, d2, "point", max_cases=1)
    assert oracle.calls == [((40, 48), True)]
    oracle = Oracle()
    evaluate(oracle, d2, "point", max_cases=1, multimask=False)
    assert oracle.calls == [((40, 48), False)]
    oracle = Oracle()
    oracle.multimask_clicks = False  # a model trained with one output for single clicks
    evaluate(oracle, d2, "point", max_cases=1)
    assert oracle.calls == [((40, 48), False)]


def test_baselines_on_synthetic_shapes(sets):
    d2, _ = sets
    fill = evaluate(BoxFill(), d2, "box")
    assert fill["model"] == "box-fill"
    assert fill["per_label"]["liver"]["dice"] == 1.0  # rectangles
    ellipse = evaluate(BoxEllipse(), d2, "box")
    assert ellipse["per_label"]["lesion"]["dice"] > 0.97  # ellipses
    assert ellipse["per_label"]["lesion"]["dice"] > fill["per_label"]["lesion"]["dice"]


def test_overlays_written(sets, tmp_path):
    d2, d3 = sets
    evaluate(Oracle(shift=3), d2, "box", overlays=tmp_path / "o2")
    evaluate(Oracle(), d3, "box", overlays=tmp_path / "o3")
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [
        "img_0.png",
        "img_1.png",
        "img_2.png",
    ]
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["vol_0.png", "vol_1.png"]
    img = np.asarray(Image.open(tmp_path / "o2" / "img_0.png")).astype(int)
    assert img.shape == (256, 768, 3)
    coloured = np.ptp(img, axis=2) > 60
    assert coloured[:, :256].sum() == 0  # the image alone
    assert coloured[:, 256:512].sum() > 20 and coloured[:, 512:].sum() > 20  # truth, prediction


def test_bad_inputs(sets, tmp_path):
    d2, _ = sets
    with pytest.raises(MedfmError, match="not a folder"):
        evaluate(Oracle(), tmp_path / "missing", "box")
    with pytest.raises(MedfmError, match="dataset.json"):
        evaluate(Oracle(), tmp_path, "box")
    empty = tmp_path / "empty"
    (empty / "labelsTr").mkdir(parents=True)
    write_dataset_json(
        empty,
        DatasetJson(channel_names={"0": "CT"}, labels=LABELS, numTraining=0, file_ending=".png"),
    )
    with pytest.raises(MedfmError, match="no cases"):
        evaluate(Oracle(), empty, "box")
    with pytest.raises(MedfmError, match="unknown prompt"):
        evaluate(Oracle(), d2, "scribble")
    with pytest.raises(MedfmError, match="max-cases"):
        evaluate(Oracle(), d2, "box", max_cases=0)
    with pytest.raises(MedfmError, match="box"):
        evaluate(BoxEllipse(), d2, "point")


def test_load_predictor_baselines():
    assert isinstance(load_predictor("box-ellipse"), BoxEllipse)
    assert isinstance(load_predictor("box-fill"), BoxFill)
    with pytest.raises(MedfmError, match="checkpoint"):
        load_predictor("box-fill", "weights.pth")


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(seg_app, name="seg")


def run(*args):
    return runner.invoke(cli, ["seg", "evaluate", *(str(a) for a in args)])


def test_cli_evaluate(sets, tmp_path):
    d2, _ = sets
    out = tmp_path / "report.json"
    r = run("--model", "box-fill", "--data", d2, "--prompt", "box", "--out", out,
            "--overlays", tmp_path / "ov", "--max-cases", 2)  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["model"] == "box-fill" and report["n_cases"] == 2
    assert report["mirror"] is False
    assert f"mean Dice {report['mean_dice']:.4f}" in r.stdout and "NSD" in r.stdout
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing", "--prompt", "box"], "not a folder"),
        (["--data", "{tmp}", "--prompt", "box"], "dataset.json"),
        (["--data", "{d2}", "--prompt", "point"], "box"),
        (["--data", "{d2}", "--prompt", "lasso"], "unknown prompt"),
        (["--data", "{d2}", "--prompt", "box", "--max-cases", "0"], "max-cases"),
        (["--data", "{d2}", "--prompt", "box", "--mirror"], "no test-time mirroring"),
        (["--data", "{d2}", "--prompt", "box", "--overlays", "{d2}/dataset.json"], "is a file"),
    ],
)
def test_cli_errors_exit_2_one_line(sets, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, d2=sets[0]) for a in args]
    out = tmp_path / "report.json"
    r = run("--model", "box-ellipse", *args, "--out", out)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()


def test_cli_module_imports_no_torch():
    probe = "import sys, medfm.cli.seg; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_box3d_propagates_each_labels_3d_box(sets, tmp_path):
    """box3d: each label's tight 3D box, MedSAM's propagation. With box-fill every slice gets
    the box it is given, so the middle slice's (the 3D box) is passed on to every slice: a
    cuboid label comes out exact, the discs (radius 4 or 5 by slice) as their 3D box."""
    d2, d3 = sets
    fill = load_predictor("box-fill")
    report = evaluate(fill, d3, "box3d", overlays=tmp_path / "ov")
    assert report["prompt"] == "box3d" and report["n_cases"] == 2
    assert report["box_crop"] is False and report["mask_threshold"] is None
    for i, case in enumerate(report["per_case"]):
        lab = _label_3d(i)
        assert case["labels"]["lesion"]["dice"] == pytest.approx(1.0)
        liver = lab == 1
        rows, cols, slices = (np.flatnonzero(liver.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
        cuboid = np.zeros_like(liver)
        cuboid[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1, slices[0] : slices[-1] + 1] = True
        want = 2 * liver.sum() / (liver.sum() + cuboid.sum())
        assert case["labels"]["liver"]["dice"] == pytest.approx(want, abs=1e-6) and want < 0.9
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
    # per slice, box-fill gets each slice's own tight box: better on the discs
    assert evaluate(fill, d3, "box")["mean_dice"] > report["mean_dice"]
    with pytest.raises(MedfmError, match="need 3D cases"):
        evaluate(fill, d2, "box3d")
    with pytest.raises(MedfmError, match="box, point, box3d"):
        evaluate(fill, d3, "lasso")
    r = run("--model", "box-fill", "--data", d3, "--prompt", "box3d", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["mean_dice"] == report["mean_dice"]
    r = run("--model", "box-fill", "--data", d2, "--prompt", "box3d", "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "need 3D cases" in r.stderr and not (tmp_path / "x.json").exists()
