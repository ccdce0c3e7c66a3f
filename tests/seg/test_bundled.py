"""The bundled medfm-tiny: in the package, small, made by recipes/medfm_tiny.yaml, loaded
without a warning, and far better than its random initialisation on synthetic cases it never
saw (a seed the recipe did not use)."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from medfm.recipe import AverageStep, CalibrateStep, TrainStep, load_recipe
from medfm.seg.evaluate import evaluate
from medfm.seg.models import BUNDLED_DIR, build_architecture, build_model
from medfm.seg.predict import Segmenter
from medfm.seg.train import TrainConfig
from medfm.synth.dataset import generate_dataset

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "medfm_tiny.yaml"
# Mean Dice of the bundled weights (stage 8) on these 6 cases: box 0.64 with its calibrated
# crop to the box (0.55 without), point 0.44 (box-ellipse 0.66, box-fill 0.63; a random
# initialisation 0.02 with boxes, uncropped). Without the crop: stage 7: 0.55, 0.41; stage 6:
# 0.54, 0.40; stage 5: 0.54, 0.42; stage 4: 0.54, 0.38; stage 3: 0.50, 0.41. The generator's
# defaults now cut structures in two (p_split), which made these cases harder: stage 3 had
# 0.66, 0.56 on the cases before. Bars a little below, so that a worse model fails.
BOX_MIN, POINT_MIN = 0.55, 0.36


def test_bundled_weights_are_the_recipes_and_small():
    assert sorted(p.name for p in BUNDLED_DIR.iterdir()) == ["config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in BUNDLED_DIR.iterdir()) <= 25_000_000
    config = json.loads((BUNDLED_DIR / "config.json").read_text())
    assert config["model"] == "medfm-tiny"
    # the recipe's last average step made them, from the two training stages it names
    steps = load_recipe(RECIPE).steps
    trains = {s.train.out: s.train for s in steps if isinstance(s, TrainStep)}
    average = [s.average for s in steps if isinstance(s, AverageStep)][-1]
    assert [a["folder"] for a in config["averaged_from"]] == list(average.models)
    # (read as TrainConfig: settings added since, e.g. the engine's accumulate, take defaults)
    assert [TrainConfig.model_validate(a["train_config"]) for a in config["averaged_from"]] == [
        trains[m.removesuffix("/model")] for m in average.models
    ]
    assert config["multimask_clicks"] is False  # single clicks: SAM's single output
    # ... and the recipe calibrated that folder
    calibrated = [s.calibrate for s in steps if isinstance(s, CalibrateStep)][-1]
    assert calibrated.model == average.out
    assert config["calibration"]["data"] == list(calibrated.data)
    # boxes: the calibration's best pair of crop and threshold (test_box_crop.py)
    box = config["calibration"]["prompts"]["box"]
    assert (config["box_crop"], config["mask_thresholds"]["box"]) == (True, box["threshold"])
    assert box["box_crop"] is True and max(box["mean_dice"]) == max(
        max(row["mean_dice"]) for row in box["sweep"]
    )


def test_bundled_model_loads_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model("medfm-tiny")
    random = build_architecture("medfm-tiny")
    assert not torch.equal(
        model.mask_decoder.iou_token.weight, random.mask_decoder.iou_token.weight
    )


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    out = tmp_path_factory.mktemp("unseen") / "ds"
    generate_dataset(out, modalities="ct,mri,us", dim=2, n=6, size=256, seed=20261122)
    return out


@pytest.mark.parametrize(("prompt", "trained_min"), [("box", BOX_MIN), ("point", POINT_MIN)])
def test_bundled_model_segments_unseen_synthetic_cases(unseen, prompt, trained_min):
    seg = Segmenter.from_pretrained("medfm-tiny")
    trained = evaluate(seg, unseen, prompt)  # its own settings: boxes cropped to the box
    assert trained["n_cases"] == 6
    assert trained["mean_dice"] >= trained_min
    # what it learned: its masks uncropped, against a random initialisation's
    seg.box_crop = False
    learned = evaluate(seg, unseen, prompt)
    torch.manual_seed(0)
    random = Segmenter(build_architecture("medfm-tiny").eval(), name="random")
    untrained = evaluate(random, unseen, prompt)
    assert learned["mean_dice"] >= untrained["mean_dice"] + 0.2
    if prompt == "box":  # tight boxes: the crop only removes false positives
        assert trained["mean_dice"] > learned["mean_dice"]
