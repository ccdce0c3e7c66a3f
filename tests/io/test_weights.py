"""medfm.io.weights: state dicts read safely, config.json + safetensors written atomically."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from medfm.errors import MedfmError
from medfm.io.weights import (
    few_keys,
    read_config_json,
    read_state_dict,
    save_weights,
    write_config_json,
)


def _state():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5)}


def test_save_weights_round_trip(tmp_path):
    state = _state()
    folder = save_weights(tmp_path / "m", state, {"model": "x", "n": [1, 2]})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (
        folder / "config.json"
    ).read_text() == '{\n  "model": "x",\n  "n": [\n    1,\n    2\n  ]\n}\n'
    assert read_config_json(folder) == {"model": "x", "n": [1, 2]}
    for got in (read_state_dict(folder), read_state_dict(folder / "model.safetensors")):
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], v) for k, v in state.items())
    other = save_weights(tmp_path / "e", state, {}, name="ema.safetensors", metadata={"k": "v"})
    assert load_file(other / "ema.safetensors").keys() == state.keys()
    assert read_state_dict(other, name="ema.safetensors").keys() == state.keys()
    write_config_json(other, {"b": 1})
    assert read_config_json(other) == {"b": 1}
    assert not list(tmp_path.glob("*/.*"))  # no temporary files left


def test_pth_nested_and_ddp_prefixed(tmp_path):
    state = _state()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pth")
    got = read_state_dict(tmp_path / "a.pth")
    assert got.keys() == state.keys() and torch.equal(got["b"], state["b"])
    torch.save({"state_dict": state}, tmp_path / "b.pth")
    assert read_state_dict(tmp_path / "b.pth").keys() == state.keys()


def test_errors_are_one_line(tmp_path):
    with pytest.raises(MedfmError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "folder").mkdir()
    with pytest.raises(MedfmError, match="folder without model.safetensors"):
        read_state_dict(tmp_path / "folder")
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "a.pth")
    with pytest.raises(MedfmError, match=r"objects other than tensors \(argparse.Namespace\)"):
        read_state_dict(tmp_path / "a.pth")
    torch.save({"epoch": 3, "w": torch.zeros(1)}, tmp_path / "b.pth")
    with pytest.raises(MedfmError, match="not a plain state dict: epoch.*; give me weights"):
        read_state_dict(tmp_path / "b.pth", hint="give me weights")
    torch.save([], tmp_path / "c.pth")
    with pytest.raises(MedfmError, match=r"holds no state dict \(got list\)"):
        read_state_dict(tmp_path / "c.pth")
    (tmp_path / "d.pth").write_bytes(b"hello")
    with pytest.raises(MedfmError, match="cannot read checkpoint .*d.pth"):
        read_state_dict(tmp_path / "d.pth")
    (tmp_path / "e.safetensors").write_bytes(b"hello")
    with pytest.raises(MedfmError, match="cannot read .* as a safetensors file"):
        read_state_dict(tmp_path / "e.safetensors")
    with pytest.raises(MedfmError, match="model folder .* does not exist"):
        read_config_json(tmp_path / "none")
    with pytest.raises(MedfmError, match="has no config.json"):
        read_config_json(tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text('{"a": ')
    with pytest.raises(MedfmError, match="not valid JSON"):
        read_config_json(tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text(json.dumps([1]))
    with pytest.raises(MedfmError, match="holds list, not a JSON object"):
        read_config_json(tmp_path / "folder")


def test_few_keys():
    assert few_keys(["a", "b"]) == "a, b"
    assert few_keys(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"


def test_weights_with_nan_or_inf_are_refused(tmp_path):
    from safetensors.torch import save_file

    good = {"a.weight": torch.ones(2, 3), "steps": torch.tensor([3])}
    for ending, value in ((".safetensors", float("nan")), (".pth", float("inf"))):
        bad = {**good, "b.bias": torch.tensor([0.0, value])}
        path = tmp_path / f"w{ending}"
        save_file(bad, str(path)) if ending == ".safetensors" else torch.save(bad, path)
        with pytest.raises(MedfmError, match=r"weight b.bias holds NaN or infinite values"):
            read_state_dict(path)
    save_file(good, str(tmp_path / "ok.safetensors"))
    assert read_state_dict(tmp_path / "ok.safetensors").keys() == good.keys()
