import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file
from segment_anything import sam_model_registry

from medfm.errors import MedfmError
from medfm.seg import models
from medfm.seg.models import (
    SEG_MODELS,
    VIT_SPECS,
    SamSpec,
    build_model,
    build_sam_vit,
    load_pretrained,
    load_sam_checkpoint,
    save_pretrained,
    spec_of,
)
from medfm.seg.tiny import TinyImageEncoder, build_medfm_tiny

from .conftest import randomize_, tiny_sam


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assert_same_weights(model, state):
    own = model.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


# ---------------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_vit_builders_match_segment_anything(name):
    # on the meta device: the full-size layouts without allocating them
    with torch.device("meta"):
        theirs = sam_model_registry[name]()
        ours = SEG_MODELS[name]()
    assert shapes(ours) == shapes(theirs)
    assert spec_of(ours) == VIT_SPECS[name]


def test_medsam_is_vit_b_layout():
    with torch.device("meta"):
        assert shapes(SEG_MODELS["medsam"]()) == shapes(SEG_MODELS["vit_b"]())


def test_tiny_spec_keeps_the_official_key_names(tiny_spec):
    with torch.device("meta"):
        official = sam_model_registry["vit_b"]().state_dict()
    first_two = {
        k
        for k in official
        if not (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)) or int(m.group(1)) < 2
    }
    model = build_sam_vit(tiny_spec)
    assert set(model.state_dict()) == first_two
    assert spec_of(model) == tiny_spec
    # the decoder is SAM's at full size, whatever the encoder
    dec = {k: v for k, v in shapes(model).items() if k.startswith("mask_decoder.")}
    assert dec == {k: tuple(v.shape) for k, v in official.items() if k.startswith("mask_decoder.")}


def test_registry_names():
    assert set(SEG_MODELS) == {"vit_b", "vit_l", "vit_h", "medsam", "medfm-tiny"}
    assert VIT_SPECS["vit_h"] == SamSpec(1280, 32, 16, (7, 15, 23, 31))


def test_unknown_model_lists_the_names():
    with pytest.raises(MedfmError, match="unknown model 'vit_x'.*vit_b.*medfm-tiny"):
        build_model("vit_x")


def test_spec_only_for_vit_models(tiny_spec):
    with pytest.raises(MedfmError, match="applies to the ViT models"):
        build_model("medfm-tiny", spec=tiny_spec)


# ---------------------------------------------------------------------------------------------
# official checkpoints


@pytest.mark.parametrize(
    ("wrap", "prefix"), [(None, ""), ("model", ""), ("state_dict", ""), (None, "module.")]
)
def test_official_format_loads_back(write_tiny_checkpoint, tiny_spec, wrap, prefix):
    path, state = write_tiny_checkpoint(wrap=wrap, prefix=prefix)
    model = build_model("vit_b", path, spec=tiny_spec)
    assert not model.training
    assert_same_weights(model, state)


def test_medsam_checkpoint_loads_as_vit_b_layout(write_tiny_checkpoint, tiny_spec):
    path, state = write_tiny_checkpoint("medsam_tiny.pth")
    assert_same_weights(build_model("medsam", path, spec=tiny_spec), state)


def test_wrong_model_is_named(write_tiny_checkpoint, tiny_spec, tiny_l_spec):
    path, _ = write_tiny_checkpoint("big.pth", spec=tiny_l_spec)
    with pytest.raises(MedfmError) as err:
        build_model("vit_b", path, spec=tiny_spec)
    msg = str(err.value)
    assert str(path) in msg
    assert "(embed 48, 3 blocks) but --model vit_b was asked for (embed 32, 2 blocks)" in msg
    assert "\n" not in msg


def _fake_vit_checkpoint(path, embed, depth):
    """Just enough of a SAM state dict to be recognised (tiny tensors)."""
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(embed, 1, 1, 1)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(depth)})
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("asked", "ckpt", "embed", "depth", "expected"),
    [
        ("vit_b", "vit_l", 1024, 24, "(embed 768, 12 blocks)"),
        ("medsam", "vit_h", 1280, 32, "(embed 768, 12 blocks)"),
        ("vit_h", "vit_b", 768, 12, "(embed 1280, 32 blocks)"),
    ],
)
def test_wrong_official_size_names_both(tmp_path, asked, ckpt, embed, depth, expected):
    path = _fake_vit_checkpoint(tmp_path / "x.pth", embed, depth)
    with torch.device("meta"):
        model = SEG_MODELS[asked]()
    with pytest.raises(MedfmError) as err:
        load_sam_checkpoint(model, path, asked)
    assert (
        f"is a {ckpt} SAM checkpoint (embed {embed}, {depth} blocks) but --model {asked} "
        f"was asked for {expected}" in str(err.value)
    )


def test_sam_checkpoint_for_medfm_tiny_is_named(tmp_path):
    path = _fake_vit_checkpoint(tmp_path / "sam_vit_b.pth", 768, 12)
    with pytest.raises(MedfmError, match="is a vit_b SAM checkpoint .* --model medfm-tiny"):
        build_model("medfm-tiny", path)


def test_medfm_tiny_checkpoint_for_vit_is_named(tmp_path, tiny_spec):
    folder = save_pretrained(build_medfm_tiny(), tmp_path / "tiny", name="medfm-tiny")
    with pytest.raises(MedfmError, match="is a medfm-tiny checkpoint but --model vit_b"):
        build_model("vit_b", folder, spec=tiny_spec)


def test_missing_and_unexpected_keys(write_tiny_checkpoint, tiny_spec, tmp_path):
    _, state = write_tiny_checkpoint()
    state = dict(state)
    del state["mask_decoder.iou_token.weight"]
    state["extra.thing"] = torch.zeros(2)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(MedfmError) as err:
        build_model("vit_b", tmp_path / "edited.pth", spec=tiny_spec)
    msg = str(err.value)
    assert "1 missing (mask_decoder.iou_token.weight)" in msg
    assert "1 unexpected (extra.thing)" in msg


def test_other_shapes(write_tiny_checkpoint, tiny_spec):
    path, _ = write_tiny_checkpoint()  # image size 256: pos_embed 16x16
    other = SamSpec(**{**tiny_spec.__dict__, "image_size": 512})
    with pytest.raises(MedfmError, match=r"other shapes, e\.g\. image_encoder\.pos_embed"):
        build_model("vit_b", path, spec=other)


def test_missing_file(tmp_path):
    with pytest.raises(MedfmError, match="does not exist"):
        build_model("vit_b", tmp_path / "nope.pth", spec=SamSpec(32, 2, 2, (1,), 256))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "text"])
def test_corrupt_file(write_tiny_checkpoint, tiny_spec, damage):
    path, _ = write_tiny_checkpoint()
    data = path.read_bytes()
    content = {
        "truncate": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 8,
        "empty": b"",
        "text": b"hello",
    }[damage]
    path.write_bytes(content)
    with pytest.raises(MedfmError, match=f"cannot read checkpoint {re.escape(str(path))}"):
        build_model("vit_b", path, spec=tiny_spec)


def test_pickled_objects_are_refused(tmp_path, tiny_spec):
    import argparse

    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "a.pth")
    with pytest.raises(MedfmError, match=r"objects other than tensors \(argparse.Namespace\)"):
        build_model("vit_b", tmp_path / "a.pth", spec=tiny_spec)
    torch.save({"epoch": 3, "w": torch.zeros(1)}, tmp_path / "b.pth")
    with pytest.raises(MedfmError, match="not a plain state dict: epoch"):
        build_model("vit_b", tmp_path / "b.pth", spec=tiny_spec)


# ---------------------------------------------------------------------------------------------
# medfm's own format


def test_save_load_pretrained_round_trip_vit(tmp_path, tiny_spec):
    model = tiny_sam(tiny_spec, seed=3)
    folder = save_pretrained(model, tmp_path / "run", name="vit_b", extra={"steps": 7})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "vit_b" and config["steps"] == 7 and config["medfm_version"]
    assert SamSpec(**{**config["spec"], "encoder_global_attn_indexes": (1,)}) == tiny_spec
    loaded, cfg = load_pretrained(folder)
    assert cfg.to_json() == config and spec_of(loaded) == tiny_spec and not loaded.training
    assert_same_weights(loaded, model.state_dict())
    # a plain safetensors file, no pickle
    assert load_file(folder / "model.safetensors").keys() == model.state_dict().keys()
    # build_model takes the folder or the file as a checkpoint too
    assert_same_weights(build_model("vit_b", folder, spec=tiny_spec), model.state_dict())


def test_save_load_pretrained_round_trip_medfm_tiny(tmp_path):
    model = randomize_(build_medfm_tiny(), seed=1)
    folder = save_pretrained(model, tmp_path / "tiny", name="medfm-tiny")
    loaded, config = load_pretrained(folder)
    assert config.spec is None and config.model == "medfm-tiny"
    assert_same_weights(loaded, model.state_dict())
    from_file = build_model("medfm-tiny", folder / "model.safetensors")
    assert_same_weights(from_file, model.state_dict())


def test_save_pretrained_checks_names(tmp_path, tiny_spec):
    model = tiny_sam(tiny_spec)
    with pytest.raises(MedfmError, match="SAM ViT model under the name medfm-tiny"):
        save_pretrained(model, tmp_path / "a", name="medfm-tiny")
    with pytest.raises(MedfmError, match=r"\['model'\] would overwrite"):
        save_pretrained(model, tmp_path / "a", name="vit_b", extra={"model": "vit_h"})
    save_pretrained(model, tmp_path / "a", name="vit_b", extra={"model": "vit_b"})  # repeats
    assert not list(tmp_path.glob("a/.*"))  # no temporary files left


def test_load_pretrained_errors(tmp_path, tiny_spec):
    with pytest.raises(MedfmError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedfmError, match="has no config.json"):
        load_pretrained(tmp_path / "empty")
    folder = save_pretrained(tiny_sam(tiny_spec), tmp_path / "run", name="vit_b")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config[:20])
    with pytest.raises(MedfmError, match="not valid JSON"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model": "unet"}))
    with pytest.raises(MedfmError, match="names model 'unet'"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model": "vit_b", "spec": {"x": 1}}))
    with pytest.raises(MedfmError, match="'spec' must be null or have the fields"):
        load_pretrained(folder)
    (folder / "config.json").write_text(config)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MedfmError, match="cannot read .* as a safetensors file"):
        load_pretrained(folder)
    weights.unlink()
    with pytest.raises(MedfmError, match="without model.safetensors"):
        load_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# medfm-tiny


def test_medfm_tiny_without_bundled_weights_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "BUNDLED_DIR", tmp_path / "missing")
    with pytest.warns(UserWarning, match="no bundled weights"):
        model = build_model("medfm-tiny")
    assert isinstance(model.image_encoder, TinyImageEncoder) and not model.training


def test_medfm_tiny_loads_bundled_weights(tmp_path, monkeypatch):
    trained = randomize_(build_medfm_tiny(), seed=2)
    monkeypatch.setattr(models, "BUNDLED_DIR", tmp_path / "bundled")
    save_pretrained(trained, tmp_path / "bundled", name="medfm-tiny")
    assert_same_weights(build_model("medfm-tiny"), trained.state_dict())


def test_medfm_tiny_encoder_shape_size_and_speed():
    model = build_medfm_tiny()
    enc = model.image_encoder
    n_params = sum(p.numel() for p in enc.parameters())
    assert 2_000_000 <= n_params <= 6_000_000
    # with SAM's decoder the whole model stays under 25 MB in float32 (shipped in the package)
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert total < 25e6
    assert enc.img_size == 256 and model.prompt_encoder.mask_input_size == (256, 256)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = enc(x)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                enc(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert y.shape == (1, 256, 64, 64) and torch.isfinite(y).all()
    print(f"medfm-tiny encoder: {n_params / 1e6:.2f} M parameters, {min(times) * 1e3:.1f} ms")


# ---------------------------------------------------------------------------------------------
# medfm-tiny's fused inference path (medfm.seg.tiny)


def _random_encoder(seed: int) -> TinyImageEncoder:
    enc = randomize_(build_medfm_tiny(), seed=seed, scale=0.2).image_encoder.eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bn in (m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
    return enc


def _module_path(enc, x):
    enc.fused = False  # the modules themselves
    try:
        with torch.no_grad():
            return enc(x)
    finally:
        del enc.fused


@pytest.mark.parametrize("onednn_ops", [True, False])  # oneDNN's fused conv ops, or torch's
def test_fused_encoder_equals_modules(onednn_ops, monkeypatch):
    import medfm.seg.tiny as fused

    if onednn_ops and not fused._onednn_pointwise(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN convolution_pointwise ops")
    if not onednn_ops:
        monkeypatch.setattr(fused, "_onednn_pointwise", lambda x: False)
    enc = _random_encoder(3)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    expected = _module_path(enc, x)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = enc(x[:, :, :, :])
        assert enc.__dict__.get("_medfm_fused_plan") is not None  # the fused path ran
        assert got.shape == expected.shape == (2, 256, 64, 64)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        # each image alone gives its row of the batch (no cross-talk in the folded neck)
        with mode():
            torch.testing.assert_close(enc(x[1:]), got[1:], atol=1e-5, rtol=1e-5)


def test_fused_plan_follows_the_weights():
    enc = _random_encoder(4)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = enc(x)
    enc.load_state_dict(_random_encoder(5).state_dict())  # in-place copy: new versions
    with torch.no_grad():
        after = enc(x)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _module_path(enc, x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        enc.neck[1].weight.mul_(2.0)  # in-place change of the folded LayerNorm
        torch.testing.assert_close(enc(x), _module_path(enc, x), atol=1e-4, rtol=1e-4)


def test_training_mode_keeps_the_modules_and_gradients():
    enc = _random_encoder(6)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    enc.train()
    with torch.no_grad():  # BatchNorm on batch statistics: no fold, the modules run
        enc(x)
    assert "_medfm_fused_plan" not in enc.__dict__
    enc.eval()
    enc(x).square().mean().backward()  # grad enabled in eval mode: modules, gradients flow
    assert enc.neck[2].weight.grad is not None and enc.stem[0][0].weight.grad.abs().sum() > 0
    assert "_medfm_fused_plan" not in enc.__dict__ and "_medfm_fused_plan" not in enc.state_dict()


def test_fused_path_is_taken_on_the_cpu_only():
    from medfm.seg.tiny import use_fused

    enc = _random_encoder(4)
    with torch.no_grad():
        assert use_fused(enc, torch.zeros(1, 3, 8, 8))
        assert not use_fused(enc, torch.zeros(1, 3, 8, 8, device="meta"))  # CUDA, MPS, ...
    assert not use_fused(enc, torch.zeros(1, 3, 8, 8))  # gradients recorded
