"""ControlNet: zero-initialised it changes nothing, save/load and the base check, the
conditions, the tasks (super-resolution geometry, generation, guided inpainting) and training."""

import json
import shutil

import pytest
import torch

from medfm.diffusion.conditional import generate, superres
from medfm.diffusion.controlnet import (
    Controlled,
    ControlNet,
    mask_condition,
    superres_condition,
    superres_shape,
    superres_training_condition,
)
from medfm.diffusion.model import DiffusionModel
from medfm.errors import MedfmError
from tests.diffusion.conftest import tiny_config, untrained


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base saved and loaded back (so it has a weights hash), and a second base."""
    root = tmp_path_factory.mktemp("cn")
    untrained(tiny_config()).save_pretrained(root / "base")
    untrained(tiny_config(), seed=1).save_pretrained(root / "other")
    return root


def _base(saved, name="base"):
    return DiffusionModel.from_pretrained(saved / name)


def _stir(net: ControlNet, seed: int = 0) -> ControlNet:
    """Random weights in the zero convolutions, as training gives them."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


def test_a_new_controlnet_leaves_the_base_output_unchanged(saved):
    base = _base(saved)
    cn = ControlNet.from_base(base, "mask", labels=2)
    x = torch.randn(2, 1, 8, 8, 16, generator=_g())
    cond = torch.rand(2, 2, 8, 8, 16, generator=_g(1))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        plain = base(x, t)
        steered = Controlled(base, cn)(x, t, condition=cond)
    assert torch.equal(plain, steered)
    # the copied encoder is the base's own
    own = cn.net.state_dict()
    for k, v in base.unet.state_dict().items():
        if k in own and own[k].shape == v.shape:
            assert torch.equal(own[k], v), k
    with torch.no_grad():  # trained (non-zero) it does steer
        moved = Controlled(base, _stir(cn))(x, t, condition=cond)
    assert not torch.allclose(plain, moved)


def test_save_load_round_trip_and_refusals(saved, tmp_path):
    base = _base(saved)
    cn = _stir(ControlNet.from_base(base, "superres", factor=3, axis=1))
    cn.save_pretrained(tmp_path / "cn", dtype=torch.float16)
    config = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert config["family"] == "medfm-controlnet" and config["base_sha256"] == base.weights_sha256
    assert config["base_name"] == "base" and config["factor"] == 3 and config["axis"] == 1
    back = ControlNet.from_pretrained(tmp_path / "cn", base, task="superres")
    for k, v in cn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half().float()), k
    assert back.weights_sha256 is not None
    with pytest.raises(MedfmError, match="trained on base .*not on other"):
        ControlNet.from_pretrained(tmp_path / "cn", _base(saved, "other"))
    with pytest.raises(MedfmError, match="does the superres task, not mask"):
        ControlNet.from_pretrained(tmp_path / "cn", base, task="mask")
    with pytest.raises(MedfmError, match="not a medfm ControlNet"):
        ControlNet.from_pretrained(saved / "base", base)
    unsaved = untrained(tiny_config())
    with pytest.raises(MedfmError, match="loaded from a model folder"):
        ControlNet.from_base(unsaved, "mask")


def test_superres_condition_keeps_input_slices_and_interpolates_linearly():
    low = torch.randn(1, 1, 3, 4, 5, generator=_g())
    for axis, f in ((2, 4), (0, 2), (-2, 3)):
        c = superres_condition(low, f, axis)
        a = axis % 3
        assert c.shape[2 + a] == superres_shape(low.shape[2 + a], f)
        up, known = c[:, :1].movedim(2 + a, -1), c[:, 1:].movedim(2 + a, -1)
        assert torch.equal(up[..., ::f], low.movedim(2 + a, -1))
        assert torch.allclose(up[..., 1], (1 - 1 / f) * up[..., 0] + up[..., f] / f, atol=1e-6)
        assert known[..., ::f].eq(1).all() and known.sum() == known[..., ::f].numel()
    with pytest.raises(MedfmError, match="at least 2"):
        superres_condition(low[..., :1], 4, -1)
    with pytest.raises(MedfmError, match="--factor"):
        superres_condition(low, 1, -1)
    with pytest.raises(MedfmError, match="--axis 3"):
        superres_condition(low, 2, 3)


def test_training_condition_matches_the_inference_one_inside_the_kept_span():
    x0 = torch.randn(3, 1, 4, 6, 17, generator=_g())
    c = superres_training_condition(x0, 4, 2, _g(5))
    for b in range(3):
        kept = torch.nonzero(c[b, 1, 0, 0]).flatten()
        lo, hi = int(kept[0]), int(kept[-1])
        assert (kept.diff() == 4).all()
        inner = superres_condition(x0[b : b + 1, :, :, :, lo : hi + 1 : 4], 4, 2)
        assert torch.allclose(c[b : b + 1, :, :, :, lo : hi + 1], inner, atol=1e-6)
        edge = x0[b, 0, ..., lo : lo + 1].expand_as(c[b, 0, ..., :lo])
        assert torch.equal(c[b, 0, ..., :lo], edge)


def test_mask_condition_is_one_hot_and_refuses_unknown_labels():
    m = torch.tensor([0, 1, 2, 2, 0]).float().view(1, 1, 5, 1, 1)
    c = mask_condition(m, 2)
    assert c.shape == (1, 2, 5, 1, 1)
    assert c[0, 0].flatten().tolist() == [0, 1, 0, 0, 0]
    assert c[0, 1].flatten().tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(MedfmError, match="labels 0..2; this ControlNet knows 0..1"):
        mask_condition(m, 1)


def test_superres_keeps_the_input_slices_and_is_deterministic(saved):
    base = _base(saved)
    low = 0.5 * torch.randn(1, 1, 8, 6, 5, generator=_g())
    cn = _stir(ControlNet.from_base(base, "superres"))
    for net in (None, cn):
        y = superres(base, low, 4, axis=-1, controlnet=net, steps=3, t_start=500, generator=_g(2))
        again = superres(base, low, 4, controlnet=net, steps=3, t_start=500, generator=_g(2))
        assert y.shape == (1, 1, 8, 6, 17) and torch.equal(y, again)
        assert torch.equal(y[..., ::4], low)
        assert y.abs().max() <= 1 + 1e-6 or low.abs().max() > 1
    mask_cn = ControlNet.from_base(base, "mask")
    with pytest.raises(MedfmError, match="does the mask task, not superres"):
        superres(base, low, 4, controlnet=mask_cn, steps=1)
    with pytest.raises(MedfmError, match="start step"):
        superres(base, low, 4, t_start=1000)


def test_generate_follows_the_mask_grid_and_keeps_the_image_outside(saved):
    base = _base(saved)
    cn = _stir(ControlNet.from_base(base, "mask", labels=2))
    mask = torch.zeros(1, 1, 6, 9, 20)
    mask[..., 2:4, 3:6, 5:12] = 1
    mask[..., 2:4, 3:6, 12:15] = 2
    y = generate(base, cn, mask, steps=3, generator=_g())
    assert y.shape == mask.shape
    assert torch.equal(y, generate(base, cn, mask, steps=3, generator=_g()))
    image = 0.3 * torch.randn(1, 1, 6, 9, 20, generator=_g(1))
    z = generate(base, cn, mask, image=image, steps=4, jump_length=2, jump_n_sample=2,
                 generator=_g())  # fmt: skip
    assert torch.equal(z[mask == 0], image[mask == 0])
    assert not torch.allclose(z[mask > 0], image[mask > 0])
    with pytest.raises(MedfmError, match="differs from the image"):
        generate(base, cn, mask, image=image[..., :10], steps=2)
    with pytest.raises(MedfmError, match="knows 0..2"):
        generate(base, cn, mask * 2, steps=2)


def test_controlnet_training_moves_only_the_controlnet_and_resumes(saved, tmp_path):
    from medfm.diffusion.control_train import ControlNetTrainConfig, controlnet_train
    from medfm.diffusion.data import TrainVolume

    g = _g(3)
    vols = []
    for i in range(3):
        image = (torch.rand(1, 10, 12, 20, generator=g) * 2 - 1).half()
        label = (torch.rand(1, 10, 12, 20, generator=g) * 3).long().to(torch.uint8)
        vols.append(TrainVolume(image, None, f"v{i}", label))
    kw = dict(data=("x",), base=str(saved / "base"), task="mask", steps=4, batch=2,
              checkpoint_every=2, warmup=1, lr=1e-3)  # fmt: skip
    whole = controlnet_train(ControlNetTrainConfig(out=str(tmp_path / "a"), **kw), [vols])
    cfg_b = ControlNetTrainConfig(out=str(tmp_path / "b"), **kw)
    controlnet_train(cfg_b, [vols])  # then "killed" after its step-2 checkpoint
    shutil.rmtree(tmp_path / "b" / "model")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    resumed = controlnet_train(cfg_b, [vols], resume=True)
    base = _base(saved)
    a = ControlNet.from_pretrained(whole, base, task="mask")
    b = ControlNet.from_pretrained(resumed, base, task="mask")
    assert a.config.labels == 2
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    fresh = ControlNet.from_base(base, "mask", labels=2)
    moved = [k for k, v in a.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any("controlnet_down_blocks" in k for k in moved)
    for k, v in DiffusionModel.from_pretrained(saved / "base").state_dict().items():
        assert torch.equal(v, base.state_dict()[k])
    with pytest.raises(MedfmError, match="labelled volumes"):
        unlabelled = [TrainVolume(v.image, None, v.name) for v in vols]
        controlnet_train(ControlNetTrainConfig(out=str(tmp_path / "c"), **kw), [unlabelled])


def test_superres_training_condition_runs_in_a_step(saved, tmp_path):
    from medfm.diffusion.control_train import ControlNetTrainConfig, controlnet_train
    from medfm.diffusion.data import TrainVolume

    vols = [TrainVolume((torch.rand(1, 9, 11, 24, generator=_g(i)) * 2 - 1).half(), None, "v")
            for i in range(2)]  # fmt: skip
    cfg = ControlNetTrainConfig(out=str(tmp_path / "sr"), data=("x",), base=str(saved / "base"),
                                task="superres", factor=3, steps=2, batch=2)  # fmt: skip
    cn = ControlNet.from_pretrained(controlnet_train(cfg, [vols]), _base(saved))
    assert cn.config.task == "superres" and cn.config.factor == 3
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in cn.parameters()])).all()
