"""Weight averaging of models (`medfm.seg.average`, ``medfm seg average``, the recipe step)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.errors import MedfmError
from medfm.recipe import load_recipe, run_recipe
from medfm.seg.average import average_models
from medfm.seg.models import load_pretrained, read_config, save_pretrained
from medfm.seg.predict import Segmenter
from medfm.seg.tiny import build_medfm_tiny

from .conftest import TINY_L_SPEC, TINY_SPEC, randomize_, tiny_sam
from .test_predict import BOXES, LABELS, POINTS


def _train_config(multimask: bool, seed: int) -> dict:
    return {"seed": seed, "prompt": {"multimask": multimask}}


def vit_folder(path, seed, *, spec=TINY_SPEC, multimask=False):
    extra = {"base_checkpoint": "start", "train_config": _train_config(multimask, seed)}
    return save_pretrained(tiny_sam(spec, seed), path, name="vit_b", extra=extra)


def tiny_folder(path, seed, *, batches=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = randomize_(build_medfm_tiny(), seed)
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            t.fill_(batches)
    return save_pretrained(
        model, path, name="medfm-tiny", extra={"train_config": _train_config(False, seed)}
    )


def test_the_average_is_the_mean_of_every_weight(tmp_path):
    folders = [vit_folder(tmp_path / f"m{s}", seed=s) for s in (1, 2, 3)]
    out = average_models([str(f) for f in folders], tmp_path / "avg")
    model, loaded = load_pretrained(out)
    config = loaded.to_json()  # config.json's object
    states = [load_pretrained(f)[0].state_dict() for f in folders]
    for key, value in model.state_dict().items():
        want = (states[0][key].double() + states[1][key] + states[2][key]) / 3
        torch.testing.assert_close(value.double(), want, rtol=0, atol=1e-6)
    assert config["model"] == "vit_b" and config["spec"] == read_config(folders[0])["spec"]
    assert [s["folder"] for s in config["averaged_from"]] == [str(f) for f in folders]
    assert [s["train_config"]["seed"] for s in config["averaged_from"]] == [1, 2, 3]
    assert config["averaged_from"][0]["base_checkpoint"] == "start"
    assert config["multimask_clicks"] is False and "mask_thresholds" not in config
    assert Segmenter.from_pretrained(out).multimask_clicks is False


def test_averaging_a_model_with_itself_predicts_as_it_does(tmp_path, ellipse_image):
    a = tiny_folder(tmp_path / "a", seed=1, batches=7)
    b = tiny_folder(tmp_path / "b", seed=1, batches=9)  # same weights, other batch counts
    avg = average_models([a, b], tmp_path / "avg")
    state = load_pretrained(avg)[0].state_dict()
    counts = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 9 for c in counts)  # integer buffers: the largest
    one, two = Segmenter.from_pretrained(a), Segmenter.from_pretrained(avg)
    for seg in (one, two):
        seg.set_image(ellipse_image)
    for ask in ({"boxes": BOXES}, {"points": POINTS, "labels": LABELS}):
        torch.testing.assert_close(
            two.predict_logits(**ask), one.predict_logits(**ask), rtol=0, atol=1e-5
        )


def test_a_training_runs_folder_averages_its_final_model(tmp_path):
    vit_folder(tmp_path / "run" / "model", seed=1)
    b = vit_folder(tmp_path / "b", seed=2)
    config = read_config(average_models([tmp_path / "run", b], tmp_path / "avg"))
    assert config["averaged_from"][0]["folder"] == str(tmp_path / "run" / "model")


def test_refusals(tmp_path):
    a = vit_folder(tmp_path / "a", seed=1)
    with pytest.raises(MedfmError, match="at least two models"):
        average_models([a], tmp_path / "avg")
    with pytest.raises(MedfmError, match="one of the models to average"):
        average_models([a, vit_folder(tmp_path / "b", seed=2)], a)
    with pytest.raises(MedfmError, match="another architecture"):
        average_models([a, vit_folder(tmp_path / "l", seed=2, spec=TINY_L_SPEC)], tmp_path / "x")
    with pytest.raises(MedfmError, match="another architecture"):
        average_models([a, tiny_folder(tmp_path / "t", seed=2)], tmp_path / "x")
    with pytest.raises(MedfmError, match="disagree on single clicks"):
        average_models([a, vit_folder(tmp_path / "m", seed=2, multimask=True)], tmp_path / "x")
    with pytest.raises(MedfmError, match="not a medfm model folder"):
        average_models([a, tmp_path / "absent"], tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written after a refusal


def test_cli(tmp_path):
    a, b = vit_folder(tmp_path / "a", seed=1), vit_folder(tmp_path / "b", seed=2)
    runner = CliRunner()
    r = runner.invoke(app, ["seg", "average", str(a), str(b), "--out", str(tmp_path / "avg")])
    assert r.exit_code == 0, r.output
    assert "calibrate it" in r.output and (tmp_path / "avg" / "model.safetensors").is_file()
    r = runner.invoke(app, ["seg", "average", str(a), "--out", str(tmp_path / "one")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "at least two models" in r.output


def test_recipe_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vit_folder(tmp_path / "a", seed=1)
    vit_folder(tmp_path / "b", seed=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: soup\nsteps:\n  - average: {models: [a, b], out: soup}\n")
    run_recipe(load_recipe(recipe), log=lambda m: None)
    assert json.loads((tmp_path / "soup" / "config.json").read_text())["averaged_from"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - average: {models: [a], out: soup}\n")
    with pytest.raises(MedfmError, match="average"):
        load_recipe(bad)


def test_the_same_average_again_keeps_the_folder_and_its_calibration(tmp_path):
    folders = [vit_folder(tmp_path / f"m{s}", seed=s) for s in (1, 2)]
    out = average_models(folders, tmp_path / "avg")
    config = json.loads((out / "config.json").read_text())
    config["mask_thresholds"] = {"box": -3.0}  # as medfm seg calibrate adds
    (out / "config.json").write_text(json.dumps(config))
    assert average_models(folders, out) == out
    assert json.loads((out / "config.json").read_text()) == config
    # other models: a new average replaces it, without the old calibration
    other = vit_folder(tmp_path / "m3", seed=3)
    average_models([folders[0], other], out)
    again = read_config(out)
    assert "mask_thresholds" not in again and again["averaged_from"][1]["folder"] == str(other)
