"""Mask thresholds per prompt kind (`Segmenter.mask_thresholds`) and their calibration on
synthetic data (`medfm.seg.calibrate`, ``medfm seg calibrate``, the recipe step)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.errors import MedfmError
from medfm.seg import models
from medfm.seg.calibrate import calibrate, threshold_dice
from medfm.seg.evaluate import evaluate
from medfm.seg.models import read_config
from medfm.seg.predict import Segmenter

from .conftest import TINY_SPEC, tiny_sam
from .test_predict import BOXES, LABELS, POINTS


@pytest.mark.parametrize("mirror", [False, True])
def test_each_prompt_kind_gets_its_threshold(ellipse_image, mirror):
    seg = Segmenter(tiny_sam(TINY_SPEC, seed=5), "vit_b", mirror=mirror)
    assert seg.mask_thresholds == {"box": 0.0, "point": 0.0}  # SAM's mask_threshold
    seg.set_image(ellipse_image)
    asks = {
        "box": {"boxes": BOXES},
        "point": {"points": POINTS, "labels": LABELS},
        "both": {"boxes": BOXES, "points": POINTS, "labels": LABELS},
    }
    logits = {k: seg.predict_logits(**a) for k, a in asks.items()}
    plain = {k: seg.predict(**a).masks for k, a in asks.items()}
    for k in asks:
        assert torch.equal(plain[k], logits[k] > 0)
    seg.mask_thresholds = {"box": -1.5, "point": 0.7}
    for k, a in asks.items():
        t = 0.7 if k == "point" else -1.5  # a prompt with a box is a box prompt
        masks = seg.predict(**a).masks
        assert torch.equal(masks, logits[k] > t)
        assert (masks >= plain[k]).all() if t < 0 else (masks <= plain[k]).all()
        assert not torch.equal(masks, plain[k])
    seg.mask_thresholds = {"point": 0.7}  # set by hand, without "box": the model's 0
    assert torch.equal(seg.predict(boxes=BOXES).masks, plain["box"])


def test_thresholds_are_checked_and_read_from_config(folder, monkeypatch):
    with pytest.raises(MedfmError, match="prompt kinds"):
        Segmenter(tiny_sam(TINY_SPEC), "vit_b", mask_thresholds={"boxes": -1.0})
    assert Segmenter.from_pretrained(folder).mask_thresholds == {"box": 0.0, "point": 0.0}
    config = read_config(folder)
    (folder / "config.json").write_text(json.dumps({**config, "mask_thresholds": {"box": -2}}))
    monkeypatch.setattr(models, "BUNDLED_DIR", folder)
    for s in (Segmenter.from_pretrained(folder), Segmenter.from_pretrained("medfm-tiny")):
        assert s.mask_thresholds == {"box": -2.0, "point": 0.0}
    (folder / "config.json").write_text(json.dumps({**config, "mask_thresholds": {"box": "x"}}))
    with pytest.raises(MedfmError, match="mask_thresholds must map"):
        Segmenter.from_pretrained(folder)


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_threshold_dice_is_the_evaluation_at_each_threshold(sets, folder, prompt):
    seg = Segmenter.from_pretrained(folder)
    for data in sets:  # a 2D .png set and a 3D .nii.gz set
        grid = [-1.0, 0.0, 0.5]
        dice = threshold_dice(seg, data, prompt, grid)
        for t, d in zip(grid, dice, strict=True):
            seg.mask_thresholds = {"box": t, "point": t}
            report = evaluate(seg, data, prompt)
            assert report["mask_threshold"] == t
            assert d == pytest.approx(report["mean_dice"], abs=1e-6)  # MONAI: float32
        seg.mask_thresholds = {"box": 0.0, "point": 0.0}
    with pytest.raises(MedfmError, match="grid is empty"):
        threshold_dice(seg, sets[0], prompt, [])


def test_calibrate_writes_the_best_threshold_of_each_prompt(sets, folder):
    before = read_config(folder)
    grid = [-3.0, -1.0, 0.0, 1.0]
    record = calibrate(folder.parent / "m", sets, ("box",), grid)
    config = read_config(folder)
    seg = Segmenter.from_pretrained(folder)  # now with the calibrated box threshold: the sweep
    # does not depend on it
    sets_dice = [threshold_dice(seg, d, "box", grid) for d in sets]
    mean = np.round(np.mean(sets_dice, axis=0), 9)
    best = [t for t, m in zip(grid, mean, strict=True) if m == mean.max()]
    want = min(best, key=abs)  # ties: the threshold nearest 0
    assert record["prompts"]["box"]["threshold"] == want
    assert record["prompts"]["box"]["mean_dice"] == pytest.approx(mean.tolist(), abs=1e-6)
    assert config["mask_thresholds"] == {"box": want}
    assert config["calibration"] == record and record["data"] == [str(d) for d in sets]
    assert config["box_crop"] is record["prompts"]["box"]["box_crop"]  # test_box_crop.py
    written = ("mask_thresholds", "calibration", "box_crop")
    assert {k: v for k, v in config.items() if k not in written} == before
    # again, for clicks: the box threshold stays
    calibrate(folder, sets[:1], ("point",), grid)
    again = read_config(folder)
    assert set(again["mask_thresholds"]) == {"box", "point"}
    assert again["mask_thresholds"]["box"] == config["mask_thresholds"]["box"]


def test_calibrate_errors(sets, folder, tmp_path):
    with pytest.raises(MedfmError, match="not a medfm model folder"):
        calibrate(tmp_path / "nothing", sets)
    with pytest.raises(MedfmError, match="at least one dataset"):
        calibrate(folder, [])
    with pytest.raises(MedfmError, match="grid is empty"):
        calibrate(folder, sets, grid=[])
    with pytest.raises(MedfmError, match="is not a folder"):
        calibrate(folder, [tmp_path / "absent"])
    assert "mask_thresholds" not in read_config(folder)  # nothing written


def test_cli_and_recipe(sets, folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["seg", "calibrate", str(folder), "--data", str(sets[0]), "--prompt", "box",
         "--grid", "-2,0"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "box: mean Dice by threshold" in r.output
    assert read_config(folder)["calibration"]["grid"] == [-2.0, 0.0]
    r = runner.invoke(app, ["seg", "calibrate", str(tmp_path / "x"), "--data", str(sets[0])])
    assert r.exit_code == 2 and "not a medfm model folder" in r.output
    r = runner.invoke(app, ["seg", "calibrate", str(folder), "--data", str(sets[0]), "--grid", "a"])
    assert r.exit_code == 2 and "comma-separated numbers" in r.output
    for model, code in ((folder, 0), ("box-ellipse", 2)):
        r = runner.invoke(
            app,
            ["seg", "evaluate", "-m", str(model), "--data", str(sets[0]), "--prompt", "box",
             "--out", str(tmp_path / "r.json"), "--overwrite", "--mask-threshold", "-1.25"],
        )  # fmt: skip
        assert r.exit_code == code, r.output
    assert json.loads((tmp_path / "r.json").read_text())["mask_threshold"] == -1.25
    assert "no mask threshold" in r.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: c\nsteps:\n  - calibrate: {{model: {folder}, data: [{sets[0]}, {sets[1]}], "
        "prompts: [point], grid: [-1, 0.5]}\n"
    )
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 0, r.output
    config = read_config(folder)
    assert config["calibration"]["prompts"].keys() == {"point"}
    assert config["mask_thresholds"]["point"] in (-1.0, 0.5)
    recipe.write_text(f"name: c\nsteps:\n  - calibrate: {{model: {folder}, data: []}}\n")
    r = runner.invoke(app, ["run", str(recipe)])
    assert r.exit_code == 2 and "steps.0" in r.output


def test_a_recipe_run_again_skips_what_the_same_inputs_made(sets, folder, tmp_path):
    """Calibrate and evaluate steps whose outputs were made from the same model, data and
    arguments are skipped (their files untouched); a change to any of them runs them again."""
    data = tmp_path / "set"
    shutil.copytree(sets[0], data)
    report = tmp_path / "r.json"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: c\nsteps:\n"
        f"  - calibrate: {{model: {folder}, data: [{data}], prompts: [box], grid: [-1, 0.5]}}\n"
        f"  - evaluate: {{model: {folder}, data: {data}, prompt: box, out: {report}}}\n"
    )
    runner = CliRunner()
    config_file = folder / "config.json"

    def run() -> tuple[str, list[tuple[bytes, int]]]:
        r = runner.invoke(app, ["run", str(recipe)])
        assert r.exit_code == 0, r.output
        return r.output, [(p.read_bytes(), p.stat().st_mtime_ns) for p in (config_file, report)]

    out, first = run()
    assert "skipped" not in out
    assert len(json.loads(report.read_text())["inputs_sha256"]) == 64
    out, again = run()
    assert out.count("skipped") == 2 and again == first
    # a threshold changed by hand: calibration runs again and puts its own back, which is
    # what the report was made with
    chosen = read_config(folder)["mask_thresholds"]["box"]
    config = read_config(folder)
    config["mask_thresholds"]["box"] = 3.0
    config_file.write_text(json.dumps(config))
    out, again = run()
    assert "calibrated from the same" not in out and f"{report} was made from the same" in out
    assert read_config(folder)["mask_thresholds"]["box"] == chosen in (-1.0, 0.5)
    assert again[1] == first[1]
    # new data (an image mirrored): both run again
    image = sorted((data / "imagesTr").iterdir())[0]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    out, _ = run()
    assert "skipped" not in out
    out, _ = run()
    assert out.count("skipped") == 2


def test_calibrate_reports_its_cases_done(sets, folder):
    calls: list[tuple[int, int]] = []
    before = read_config(folder)
    calibrate(folder, sets, ("box", "point"), [-1.0, 0.0], box_crop=(False,),
              progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    total = 2 * (3 + 2)  # two prompt kinds over a 3-case and a 2-case set
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done) and set(done) == set(range(total + 1))
    after = read_config(folder)
    assert set(after) - set(before) >= {"mask_thresholds", "calibration"}
