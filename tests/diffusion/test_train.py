import shutil

import pytest
import torch
from safetensors.torch import load_file

from medfm.diffusion.config import DiffusionConfig, UNetConfig
from medfm.diffusion.data import TrainVolume
from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.train import DiffusionTrainConfig, train
from tests.diffusion.conftest import tiny_config


def _sources():
    g = torch.Generator().manual_seed(0)
    vols = [TrainVolume(torch.rand(1, 10, 12, 20, generator=g).half() * 2 - 1, r, f"v{i}")
            for i, r in enumerate(("chest", None, "abdomen"))]  # fmt: skip
    return [vols]


def _cfg(out):
    return DiffusionTrainConfig(
        out=str(out), steps=4, data=("mem",), batch=2, checkpoint_every=2, warmup=1,
        lr=1e-3, model=tiny_config(),
    )  # fmt: skip


def test_training_learns_saves_ema_and_resumes_exactly(tmp_path):
    done = train(_cfg(tmp_path / "a"), _sources())
    model = DiffusionModel.from_pretrained(done)
    assert model.config.unet == tiny_config().unet
    ema = load_file(str(tmp_path / "a" / "checkpoints" / "step_0000004" / "ema.safetensors"))
    final = load_file(str(done / "model.safetensors"))
    assert all(torch.equal(final[k], ema[k]) for k in ema)  # model/ holds the EMA weights
    # a run killed after its step-2 checkpoint and resumed ends with the same weights
    train(_cfg(tmp_path / "b"), _sources())
    shutil.rmtree(tmp_path / "b" / "model")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    resumed = train(_cfg(tmp_path / "b"), _sources(), resume=True)
    other = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(final[k], other[k]) for k in final)


def test_samples_are_drawn_every_k_steps(tmp_path):
    cfg = _cfg(tmp_path / "s").model_copy(update={"sample_every": 2, "steps": 4})
    train(cfg, _sources())
    pngs = sorted(p.name for p in (tmp_path / "s" / "samples").iterdir())
    assert pngs == ["step_0000002.png", "step_0000004.png"]
    from PIL import Image

    assert Image.open(tmp_path / "s" / "samples" / pngs[0]).size == (3 * 192, 2 * 192)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="patch_kinds"):
        DiffusionTrainConfig(out="x", steps=1, data=("d",), patch_kinds=(0, 0, 0))
    with pytest.raises(ValueError, match="region 'knee'"):
        DiffusionTrainConfig(out="x", steps=1, data=("d",), region="knee")
    with pytest.raises(ValueError, match="multiples of 8"):
        DiffusionConfig.model_validate(
            {"unet": {"channels": [32, 64, 96, 128]}, "patch": [8, 8, 12]}
        )
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        UNetConfig(channels=(32, 48), attention_levels=(False, True))
    with pytest.raises(ValueError, match="attention_levels has 1 entries"):
        UNetConfig(channels=(32, 64), attention_levels=(True,))
