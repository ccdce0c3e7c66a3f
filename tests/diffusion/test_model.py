import json

import pytest
import torch

from medfm.diffusion.model import DiffusionModel, is_diffusion_folder
from medfm.errors import MedfmError
from tests.diffusion.conftest import tiny_config, untrained


def test_output_shape_regions_and_positions_matter(tiny_model):
    x = torch.randn(2, 1, 8, 8, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        y = tiny_model(x, t)
        assert y.shape == x.shape
        chest = tiny_model(x, t, regions=torch.tensor([1, 1]))
        assert not torch.allclose(y, chest)  # default region is "other" (index 3)
        other = tiny_model(x, t, regions=torch.tensor([3, 3]))
        assert torch.equal(y, other)
        shifted = torch.tensor([[[0.0, 0.5], [-1.0, 0.0], [-0.5, 0.5]]]).expand(2, 3, 2)
        assert not torch.allclose(y, tiny_model(x, t, boxes=shifted))


def test_two_dimensional_models_work_too():
    model = untrained(tiny_config(patch=(8, 16), spatial_dims=2))
    x = torch.randn(1, 1, 8, 16)
    assert model(x, torch.tensor([5])).shape == x.shape


def test_save_load_round_trip_is_exact(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    assert is_diffusion_folder(tmp_path / "m")
    loaded = DiffusionModel.from_pretrained(tmp_path / "m")
    assert loaded.config.unet == tiny_model.config.unet
    x, t = torch.randn(1, 1, 8, 8, 16), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), tiny_model(x, t))


def test_float16_weights_half_the_file_and_load_as_float32(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "full")
    tiny_model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full, half = (tmp_path / n / "model.safetensors" for n in ("full", "half"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = DiffusionModel.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    saved = loaded.state_dict()
    for name, a in tiny_model.state_dict().items():
        expected = a.half().float() if a.is_floating_point() else a
        assert torch.equal(expected, saved[name]), name


def test_a_config_that_does_not_match_the_weights_is_refused_before_building(tmp_path, tiny_model):
    folder = tmp_path / "m"
    tiny_model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["unet"]["channels"] = [1024, 1024]  # absurd widths: never allocated
    raw["unet"]["norm_num_groups"] = 8
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MedfmError, match="does not fit the architecture"):
        DiffusionModel.from_pretrained(folder)
    raw["unet"]["channels"] = [0, 16]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MedfmError, match="config.json"):
        DiffusionModel.from_pretrained(folder)


def test_a_segmentation_folder_is_not_a_diffusion_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "medfm-tiny"}))
    assert not is_diffusion_folder(tmp_path)
    with pytest.raises(MedfmError, match="not a medfm diffusion model"):
        DiffusionModel.from_pretrained(tmp_path)


def test_unknown_region_is_one_line(tiny_model):
    with pytest.raises(MedfmError, match="unknown region 'knee'"):
        tiny_model.region_index("knee")
    assert tiny_model.region_index(None) == 3


def test_activation_checkpointing_gives_the_same_gradients():
    plain = untrained(tiny_config()).train()
    ckpt = untrained(tiny_config()).train()
    ckpt.enable_checkpointing()
    x, t = (
        torch.randn(2, 1, 8, 8, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor([5, 50]),
    )
    grads = []
    for m in (plain, ckpt):
        m(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
