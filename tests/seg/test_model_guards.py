"""An untrusted model folder (config.json + weights) cannot make medfm build a model of any size:
its spec is bounded, checked against the weights file's header and the memory before anything
is built (`medfm.seg.models.check_pretrained`, `load_pretrained`, `seg average`)."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.errors import MedfmError
from medfm.io.memory import MEMORY_LIMIT_ENV
from medfm.seg import models
from medfm.seg.models import build_model, check_pretrained, load_pretrained, save_pretrained

from .conftest import TINY_L_SPEC, TINY_SPEC, tiny_sam


@pytest.fixture
def folder(tmp_path):
    return save_pretrained(tiny_sam(TINY_SPEC, 1), tmp_path / "a", name="vit_b")


def _edit_spec(folder, dest, **change):
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    config["spec"].update(change)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _no_build(monkeypatch):
    """Make building a real model (not the shapes-only meta build) or loading weights fail."""
    real = models.build_architecture

    def meta_only(*args, **kwargs):
        if torch.get_default_device().type != "meta":
            raise AssertionError("a model was built")
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "build_architecture", meta_only)
    monkeypatch.setattr(models, "read_state_dict", refuse)


def test_a_huge_spec_is_refused_naming_the_tensor_before_building(folder, tmp_path, monkeypatch):
    bad = _edit_spec(folder, tmp_path / "big", encoder_embed_dim=16384, encoder_depth=64)
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    _no_build(monkeypatch)
    with pytest.raises(MedfmError) as e:
        load_pretrained(bad)
    assert str(e.value) == (
        f"{bad / 'model.safetensors'} does not fit the architecture of {bad / 'config.json'}: "
        "image_encoder.pos_embed is (1, 16, 16, 32) in the file, (1, 16, 16, 16384) expected "
        "(and 31 more of other shapes, 868 missing); config.json and the weights are not of one "
        "model; restore the config.json written with them"
    )
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


@pytest.mark.parametrize(
    "change, match",
    [
        ({"encoder_embed_dim": 0}, "encoder_embed_dim: Input should be greater than or equal to 1"),
        ({"encoder_depth": -3}, "encoder_depth: Input should be greater than or equal to 1"),
        ({"encoder_depth": 10**9}, "encoder_depth: Input should be less than or equal to 256"),
        ({"patch_size": 0}, "patch_size: Input should be greater than or equal to 1"),
        ({"window_size": -1}, "window_size: Input should be greater than or equal to 0"),
        ({"encoder_num_heads": 5}, "encoder_embed_dim 32 is not a multiple of encoder_num_heads 5"),
        ({"encoder_global_attn_indexes": [7]}, r"indexes \[7\] lie outside the 2 blocks"),
        ({"encoder_embed_dim": 32.5}, "encoder_embed_dim: Input should be a valid integer"),
        ({"encoder_embed_dim": True}, "encoder_embed_dim: Input should be a valid integer"),
        ({"image_size": 8}, "patch_size 16 exceeds image_size 8"),
    ],
)  # fmt: skip
def test_spec_bounds(folder, tmp_path, monkeypatch, change, match):
    bad = _edit_spec(folder, tmp_path / "bad", **change)
    _no_build(monkeypatch)
    with pytest.raises(MedfmError, match=f"config.json: config.json's spec: .*{match}"):
        load_pretrained(bad)


def test_a_model_larger_than_the_memory_is_not_built(folder, monkeypatch):
    _, _, nbytes = check_pretrained(folder)
    weights = (folder / "model.safetensors").stat().st_size
    assert weights < nbytes < 2.1 * weights  # the model's parameters, then the loaded copy
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(nbytes - 1))
    _no_build(monkeypatch)
    with pytest.raises(MedfmError, match=f"loading the model {folder} needs ~.* memory available"):
        load_pretrained(folder)


def test_a_safetensors_checkpoint_of_another_model_is_refused_from_its_header(
    tmp_path, monkeypatch
):
    other = save_pretrained(tiny_sam(TINY_L_SPEC, 1), tmp_path / "l", name="vit_b")

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "read_state_dict", refuse)
    with pytest.raises(MedfmError, match=r"is a SAM ViT checkpoint \(embed 48, 3 blocks\)"):
        build_model("vit_b", other / "model.safetensors", spec=TINY_SPEC)


def test_seg_average_refuses_the_16384_config_in_one_line(folder, tmp_path):
    bad = _edit_spec(folder, tmp_path / "big", encoder_embed_dim=16384, encoder_depth=64)
    b = save_pretrained(tiny_sam(TINY_SPEC, 2), tmp_path / "b", name="vit_b")
    out = tmp_path / "avg"
    r = CliRunner().invoke(app, ["seg", "average", str(bad), str(b), "--out", str(out)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "image_encoder.pos_embed is (1, 16, 16, 32) in the file" in lines[0]
    assert not out.exists()


def test_seg_average_checks_the_memory_of_all_models_first(folder, tmp_path, monkeypatch):
    b = save_pretrained(tiny_sam(TINY_SPEC, 2), tmp_path / "b", name="vit_b")
    _, _, nbytes = check_pretrained(folder)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(3 * nbytes - 1))  # two models, and the mean
    out = tmp_path / "avg"
    r = CliRunner().invoke(app, ["seg", "average", str(folder), str(b), "--out", str(out)])
    assert r.exit_code == 2 and "averaging 2 models needs ~" in r.output
    assert "average fewer models at a time" in r.output and not out.exists()
