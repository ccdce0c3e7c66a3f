"""medfm.seg.config: a model folder's config.json through SegModelConfig."""

import json

import pytest

from medfm.errors import MedfmError
from medfm.seg.config import SegModelConfig
from medfm.seg.models import (
    BUNDLED_DIR,
    read_config,
    read_model_config,
    save_pretrained,
    write_model_config,
)
from medfm.seg.tiny import build_medfm_tiny


def test_the_bundled_config_loads_and_writes_back_byte_for_byte(tmp_path):
    text = (BUNDLED_DIR / "config.json").read_text()
    config = read_model_config(BUNDLED_DIR)
    assert config.model == "medfm-tiny" and config.spec is None
    assert config.thresholds() == {"box": -8.0, "point": 0.5} and config.box_crop is True
    assert config.click_multimask() is False
    assert [a.folder for a in config.averaged_from] == [
        "runs/medfm_tiny/stage8a/model",
        "runs/medfm_tiny/stage8b/model",
    ]
    (tmp_path / "m").mkdir()
    write_model_config(tmp_path / "m", config)
    assert (tmp_path / "m" / "config.json").read_text() == text
    assert read_config(BUNDLED_DIR) == json.loads(text)


def test_unknown_keys_and_the_files_order_are_kept(tmp_path):
    raw = {"medfm_version": "0.0.1", "model": "medfm-tiny", "future": {"a": 1}, "spec": None}
    config = SegModelConfig.parse(raw)
    assert config.to_json() == raw and list(config.to_json()) == list(raw)
    config.box_crop = True  # set since: after the file's keys, in the declared order
    config.mask_thresholds = {"box": -1}
    assert list(config.to_json()) == [*raw, "mask_thresholds", "box_crop"]
    assert config.to_json()["mask_thresholds"] == {"box": -1.0}
    assert "trained" not in config.to_json()  # absent keys stay absent


def test_click_multimask_reads_the_average_then_the_training():
    assert SegModelConfig(model="vit_b").click_multimask() is True
    trained = SegModelConfig(model="vit_b", train_config={"prompt": {"multimask": False}})
    assert trained.click_multimask() is False
    averaged = SegModelConfig(
        model="vit_b", multimask_clicks=True, train_config={"prompt": {"multimask": False}}
    )
    assert averaged.click_multimask() is True


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("box_crop", "yes", "box_crop must be true or false, got 'yes'"),
        ("multimask_clicks", 1, "multimask_clicks must be true or false"),
        ("mask_thresholds", {"box": True}, "mask_thresholds must map prompt kinds to numbers"),
        ("mask_thresholds", {"box": float("nan")}, "mask_thresholds must map"),
        ("trained", "decoder", "'trained' input should be a valid list"),
        ("averaged_from", [{"folder": "a", "x": 1}], "'averaged_from.0.x' extra inputs"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, key, value, match):
    with pytest.raises(MedfmError, match=match) as err:
        SegModelConfig.parse({"model": "vit_b", key: value}, tmp_path / "config.json")
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_save_pretrained_takes_a_config_as_extra(tmp_path):
    extra = SegModelConfig(model="medfm-tiny", base_checkpoint=None, trained=["mask_decoder"])
    folder = save_pretrained(build_medfm_tiny(), tmp_path / "m", name="medfm-tiny", extra=extra)
    config = json.loads((folder / "config.json").read_text())
    assert list(config) == ["model", "spec", "medfm_version", "base_checkpoint", "trained"]
    assert read_model_config(folder).trained == ["mask_decoder"]
