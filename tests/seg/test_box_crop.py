"""Box-prompted masks kept inside their box (`Segmenter`'s ``box_crop``, `box_region`), its
calibration (`medfm.seg.calibrate`), the CLI and recipe overrides, and MedSAM's 3D propagation
with a cropping predictor."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.errors import MedfmError
from medfm.seg import models
from medfm.seg.boxes import box_region
from medfm.seg.calibrate import calibrate, sweep_dice, threshold_dice
from medfm.seg.evaluate import evaluate, load_predictor
from medfm.seg.models import read_config
from medfm.seg.predict import Segmenter
from medfm.seg.propagate import propagate_box3d
from medfm.seg.types import Prediction

from .conftest import TINY_SPEC, tiny_sam
from .test_predict import BOXES, LABELS, POINTS, H, W, _flip_prompts


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    g = np.random.default_rng(1)
    rows, cols = np.mgrid[0:H, 0:W]
    img = 60 + g.normal(0, 10, (H, W))
    img[((rows - 15) / 9) ** 2 + ((cols - 25) / 14) ** 2 <= 1] += 110
    return np.clip(img, 0, 255).astype(np.uint8)


def test_box_region_holds_each_box_pixels_inclusive():
    boxes = np.array([[2, 1, 4, 3], [0, 0, 0, 0], [1.5, 0.2, 2.5, 0.8], [5, 4, 9, 9]])
    region = box_region(boxes, 5, 7)
    assert region.shape == (4, 5, 7) and region.dtype == torch.bool
    want = np.zeros((4, 5, 7), bool)
    want[0, 1:4, 2:5] = True  # x1 / y1 inclusive: a tight box's last pixel
    want[1, 0, 0] = True  # a one-pixel box
    want[2, 0:2, 1:4] = True  # fractional: every pixel the box touches
    want[3, 4:, 5:] = True  # beyond the image: cut at its edge
    np.testing.assert_array_equal(region.numpy(), want)
    assert box_region(np.zeros((0, 4)), 5, 7).shape == (0, 5, 7)


@pytest.mark.parametrize("mirror", [False, True])
def test_crop_keeps_box_masks_inside_their_box_and_nothing_else_changes(image, mirror):
    model = tiny_sam(TINY_SPEC, seed=5)
    plain = Segmenter(model, "vit_b", mirror=mirror)
    crop = Segmenter(model, "vit_b", mirror=mirror, box_crop=True)
    for s in (plain, crop):
        s.set_image(image)
    s_thr = {"box": -2.0, "point": 0.0}  # a low threshold: masks spill out of the small boxes
    plain.mask_thresholds = crop.mask_thresholds = s_thr
    region = box_region(BOXES, H, W)
    raw = plain.predict_logits(boxes=BOXES)
    cropped = crop.predict_logits(boxes=BOXES)
    assert torch.equal(cropped[region], raw[region])
    assert torch.isneginf(cropped[~region]).all()
    masks, want = crop.predict(boxes=BOXES), plain.predict(boxes=BOXES)
    assert torch.equal(masks.masks, want.masks & region)
    assert (want.masks & ~region).any()  # the crop did remove pixels here
    assert torch.equal(masks.masks, cropped > -2.0)
    torch.testing.assert_close(masks.scores, want.scores)
    torch.testing.assert_close(masks.logits, want.logits)  # low-resolution logits: not cropped
    # per-call override, both ways
    assert torch.equal(crop.predict(boxes=BOXES, box_crop=False).masks, want.masks)
    assert torch.equal(plain.predict(boxes=BOXES, box_crop=True).masks, masks.masks)
    assert torch.equal(plain.predict_logits(boxes=BOXES, box_crop=True), cropped)
    # clicks have no box: untouched
    clicks = crop.predict(points=POINTS, labels=LABELS).masks
    assert torch.equal(clicks, plain.predict(points=POINTS, labels=LABELS).masks)
    if not mirror:
        e = crop._embedding
        sizes = (crop._input_size, crop._original_size)
        from_emb = crop.predict_from_embedding(e, *sizes, boxes=BOXES)
        assert torch.equal(from_emb.masks, masks.masks)


def test_crop_with_mirroring_stays_flip_equivariant(image):
    seg = Segmenter(tiny_sam(TINY_SPEC, seed=5), "vit_b", mirror=True, box_crop=True)
    seg.mask_thresholds = {"box": -2.0, "point": 0.0}
    seg.set_image(image)
    out = seg.predict(boxes=BOXES).masks
    m_boxes, _ = _flip_prompts(BOXES, POINTS)
    seg.set_image(np.ascontiguousarray(image[:, ::-1]))
    assert torch.equal(seg.predict(boxes=m_boxes).masks, out.flip(-1))


def test_config_turns_it_on_and_is_checked(folder, monkeypatch):
    assert Segmenter.from_pretrained(folder).box_crop is False
    config = read_config(folder)
    (folder / "config.json").write_text(json.dumps({**config, "box_crop": True}))
    monkeypatch.setattr(models, "BUNDLED_DIR", folder)
    for s in (Segmenter.from_pretrained(folder), Segmenter.from_pretrained("medfm-tiny")):
        assert s.box_crop is True
    assert load_predictor(str(folder), box_crop=False).box_crop is False
    (folder / "config.json").write_text(json.dumps({**config, "box_crop": "yes"}))
    with pytest.raises(MedfmError, match="box_crop must be true or false"):
        Segmenter.from_pretrained(folder)
    with pytest.raises(MedfmError, match="draws inside its box"):
        load_predictor("box-ellipse", box_crop=True)


def test_sweep_rows_are_the_evaluation_with_and_without_crop(sets, folder):
    seg = Segmenter.from_pretrained(folder)
    grid = [-3.0, 0.0]
    for data in sets:  # a 2D .png set and a 3D .nii.gz set
        rows = sweep_dice(seg, data, "box", grid, (False, True))
        for crop, row in zip((False, True), rows, strict=True):
            assert threshold_dice(seg, data, "box", grid, box_crop=crop) == pytest.approx(row)
            seg.box_crop = crop
            seg.mask_thresholds = {"box": -3.0}
            report = evaluate(seg, data, "box")
            assert report["box_crop"] is crop
            assert report["mean_dice"] == pytest.approx(row[0], abs=1e-6)
        seg.box_crop = False
        # tight boxes hold their object: the crop only removes false positives
        assert all(c >= p - 1e-12 for p, c in zip(*rows, strict=True))
        assert rows[1][0] > rows[0][0]  # at -3 the random model spills out of the boxes
    assert evaluate(seg, sets[0], "point")["box_crop"] is None
    with pytest.raises(MedfmError, match="only box prompts"):
        sweep_dice(seg, sets[0], "point", grid, (True,))


def test_calibrate_chooses_the_crop_with_the_threshold(sets, folder):
    grid = [-3.0, -1.0, 0.0, 1.0]
    record = calibrate(folder, sets, ("box",), grid)
    seg = Segmenter.from_pretrained(folder)
    rows = np.round(np.mean([sweep_dice(seg, d, "box", grid, (False, True)) for d in sets], 0), 9)
    best = [(c, j) for c in range(2) for j in range(len(grid)) if rows[c, j] == rows.max()]
    c, j = min(best, key=lambda cj: (cj[0], abs(grid[cj[1]])))  # ties: no crop, then nearest 0
    config = read_config(folder)
    entry = record["prompts"]["box"]
    assert (entry["box_crop"], entry["threshold"]) == (bool(c), grid[j])
    assert config["box_crop"] is bool(c) and config["mask_thresholds"] == {"box": grid[j]}
    assert seg.box_crop is bool(c)
    assert [r["box_crop"] for r in entry["sweep"]] == [False, True]
    assert entry["sweep"][c]["mean_dice"] == entry["mean_dice"]
    assert entry["mean_dice"] == pytest.approx(rows[c].tolist(), abs=1e-6)
    # not trying the crop writes it off; calibrating clicks leaves it alone
    calibrate(folder, sets[:1], ("box",), grid, box_crop=(False,))
    assert read_config(folder)["box_crop"] is False
    assert "sweep" not in read_config(folder)["calibration"]["prompts"]["box"]
    (folder / "config.json").write_text(json.dumps({**read_config(folder), "box_crop": True}))
    calibrate(folder, sets[:1], ("point",), grid)
    assert read_config(folder)["box_crop"] is True
    assert "box_crop" not in read_config(folder)["calibration"]["prompts"]["point"]
    with pytest.raises(MedfmError, match="box crop setting"):
        calibrate(folder, sets, ("box",), grid, box_crop=())


def test_cli_and_recipe(sets, folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["seg", "calibrate", str(folder), "--data", str(sets[0]), "--prompt", "box",
         "--grid", "-2,0", "--no-box-crop"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "cropped to the box" not in r.output and read_config(folder)["box_crop"] is False
    report = tmp_path / "r.json"
    for flag, want in ((["--box-crop"], True), ([], False), (["--no-box-crop"], False)):
        r = runner.invoke(
            app,
            ["seg", "evaluate", "-m", str(folder), "--data", str(sets[0]), "--prompt", "box",
             "--out", str(report), "--overwrite", *flag],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert json.loads(report.read_text())["box_crop"] is want
    r = runner.invoke(
        app,
        ["seg", "evaluate", "-m", "box-fill", "--data", str(sets[0]), "--prompt", "box",
         "--out", str(report), "--overwrite", "--box-crop"],
    )  # fmt: skip
    assert r.exit_code == 2 and "draws inside its box" in r.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: c\nsteps:\n  - calibrate: {{model: {folder}, data: [{sets[0]}], "
        "prompts: [box], grid: [-3, 0], box_crop: [true]}\n"
        f"  - evaluate: {{model: {folder}, data: {sets[0]}, out: {report}, box_crop: false}}\n"
    )
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 0, r.output
    assert read_config(folder)["box_crop"] is True  # the only setting tried
    assert json.loads(report.read_text())["box_crop"] is False  # the step's override


class _Thresholding:
    """A predictor whose mask is the image's bright pixels, cropped to the box like
    `Segmenter` with ``box_crop`` unless asked not to; it records how it was asked."""

    name = "bright"
    box_crop = True

    def __init__(self):
        self.calls = []

    def set_image(self, image):
        self.bright = torch.from_numpy(image[..., 0] > 0)

    def predict(self, boxes=None, points=None, labels=None, *, multimask=False, box_crop=None):
        self.calls.append(box_crop)
        mask = self.bright[None].clone()
        if box_crop is not False:
            mask &= box_region(boxes, *mask.shape[1:])
        return Prediction(masks=mask, scores=torch.ones(1), logits=torch.zeros(1, 4, 4))


def test_propagation_with_a_cropping_predictor_can_grow_inside_the_3d_box():
    volume = np.zeros((20, 30, 9), np.uint8)  # an object growing from slice 4 to slice 6
    volume[8:11, 10:15, 4] = 255
    volume[6:13, 7:19, 5] = 255
    volume[2:18, 2:28, 6] = 255
    predictor = _Thresholding()
    box3d = np.array([5, 4, 20, 12, 4, 6], np.float32)
    mask = propagate_box3d(predictor, volume, box3d)
    want = np.zeros(volume.shape, bool)
    want[8:11, 10:15, 4] = True
    want[6:13, 7:19, 5] = True  # the middle slice
    want[4:13, 5:21, 6] = True  # beyond slice 5's box (it grew), cut at the 3D box
    np.testing.assert_array_equal(mask, want)
    assert predictor.calls == [None, False, False]  # the middle slice, then uncropped asks
