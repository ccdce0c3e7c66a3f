"""Training: deterministic steps, exact resume after a kill on the CPU, checkpoints, configs."""

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from medfm.engine import lr_factor, saved_checkpoints
from medfm.errors import MedfmError
from medfm.seg.losses import dice_loss_only, sam_loss
from medfm.seg.prompts import PromptConfig, resize_boxes, resize_points
from medfm.seg.train import (
    LOSSES,
    TrainConfig,
    coarsen_label,
    lowres_label,
    make_engine,
    prepare_run,
    simulate_low_resolution,
    train,
)
from medfm.synth.anatomy import AnatomyConfig
from medfm.synth.case import SynthConfig
from medfm.synth.dataset import generate_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(out, modalities="ct,us", dim=2, n=2, size=64, seed=5)
    return out


def _cfg(synth, out, **kw):
    base = dict(
        model="medfm-tiny", data=(str(synth),), out=str(out), steps=4, batch=1,
        prompts_per_image=1, warmup=1, checkpoint_every=2, lr=1e-3,
        prompt=PromptConfig(refine_iters=1, n_pos=(1, 1), n_neg=(0, 0)),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_after_a_kill_ends_with_the_same_weights(synth, tmp_path):
    full = _cfg(synth, tmp_path / "full")
    train(full)

    killed = _cfg(synth, tmp_path / "killed")

    def kill_at_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(killed, progress=kill_at_3)
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step_0000002"]
    with pytest.raises(MedfmError, match="--resume"):
        train(killed)
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a line cut short by the kill
    train(killed, resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl: one line per step, the re-trained step 3 once, the same losses
    logs = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "killed")
    ]
    assert [m["step"] for m in logs[1]] == [1, 2, 3, 4]
    assert [m["loss"] for m in logs[0]] == [m["loss"] for m in logs[1]]
    # only the prompt encoder and mask decoder are trained (frozen encoder, cached embeddings)
    state = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert state and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in state)
    assert any((tmp_path / "full" / "embeddings").rglob("*.npy"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_run_folder_with_other_settings_is_refused(synth, tmp_path):
    run = tmp_path / "run"
    # a start that never reached a checkpoint (a bad argument, a kill): the new settings replace
    prepare_run(_cfg(synth, run, steps=1, lr=5e-4), resume=False)
    prepare_run(_cfg(synth, run, steps=1), resume=False)
    assert TrainConfig.model_validate_json((run / "train_config.json").read_text()).lr == 1e-3
    train(_cfg(synth, run, steps=1))
    assert [p.name for p in saved_checkpoints(run)] == ["step_0000001"]
    with pytest.raises(MedfmError, match=r"other settings \(steps, lr\)"):
        prepare_run(_cfg(synth, run, steps=2, lr=5e-4), resume=True)
    with pytest.raises(MedfmError, match="--resume"):
        prepare_run(_cfg(synth, run, steps=1), resume=False)
    # a checkpoint cut short by a kill (.partial) is not one
    partial = tmp_path / "partial"
    prepare_run(_cfg(synth, partial, steps=1), resume=False)
    (partial / "checkpoints" / "step_0000001.partial").mkdir(parents=True)
    prepare_run(_cfg(synth, partial, steps=2), resume=False)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_fits_one_structure_and_the_model_loads(tmp_path):
    one = tmp_path / "one"
    cfg1 = SynthConfig(anatomy=AnatomyConfig(n_labels=(1, 1), p_nested=0, p_tube=0, p_rim=0))
    generate_dataset(one, modalities="mri", dim=2, n=1, size=64, seed=2, config=cfg1)
    losses = []
    cfg = _cfg(one, tmp_path / "fit", steps=10, lr=3e-3, checkpoint_every=100, loss="sam",
               prompt=PromptConfig(box_prob=1.0, refine_iters=0, max_shift=0))  # fmt: skip
    train(cfg, progress=lambda step, m: losses.append(m["loss"]))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    from medfm.seg.predict import Segmenter

    seg = Segmenter.from_pretrained(tmp_path / "fit")
    config = json.loads((tmp_path / "fit" / "model" / "config.json").read_text())
    assert config["model"] == "medfm-tiny" and seg.name == "medfm-tiny"


def test_lowres_label_follows_sams_resize_and_pad():
    lab = torch.zeros(50, 100, dtype=torch.long)
    lab[10:20, 30:60] = 2
    low = lowres_label(lab, 256)  # longest side 100 -> 256: rows 0..127 hold the image
    assert low.shape == (256, 256) and low.dtype == torch.uint8
    assert set(low.unique().tolist()) == {0, 2}
    assert not low[130:].any()
    rows = torch.nonzero(low.any(1)).flatten()
    assert 24 <= int(rows.min()) <= 27 and 49 <= int(rows.max()) <= 52


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.01


def test_3d_data_is_refused(tmp_path):
    out = tmp_path / "d3"
    generate_dataset(out, modalities="ct", dim=3, n=1, size=32)
    with pytest.raises(MedfmError, match="2D"):
        train(_cfg(out, tmp_path / "r3"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchrun_data_parallel_on_cpu_trains_as_one_process(synth, tmp_path):
    """Two processes (gloo, DistributedDataParallel) give the loss curve of one process with
    the same global batch; rank 0 alone writes checkpoints and the model."""
    from tests.engine.test_distributed import torchrun

    r = torchrun(2, "-m", "medfm.cli.main", "seg", "train", "--data", str(synth), "--out",
                 str(tmp_path / "ddp"), "--steps", "2", "--batch", "2", "--prompts-per-image",
                 "2", "--refine-iters", "1", "--checkpoint-every", "1", "--lr", "1e-3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("model saved") == 1
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "step_0000001", "step_0000002"]  # fmt: skip
    one = TrainConfig(model="medfm-tiny", data=(str(synth),), out=str(tmp_path / "one"), steps=2,
                      batch=2, prompts_per_image=2, checkpoint_every=1, lr=1e-3,
                      prompt=PromptConfig(refine_iters=1))  # fmt: skip
    train(one)
    logs = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("ddp", "one")
    }
    for key in ("loss", "dice", "focal", "iou"):
        assert [m[key] for m in logs["ddp"]] == pytest.approx([m[key] for m in logs["one"]],
                                                              rel=1e-4, abs=1e-6)  # fmt: skip
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_dice_iou_loss_is_dice_plus_the_iou_head_mse():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 16, 16, generator=g)
    target = torch.rand(3, 1, 16, 16, generator=g) > 0.5
    iou = torch.rand(3, 3, generator=g)
    out = LOSSES["dice_iou"](logits, target, iou)
    dice = dice_loss_only(logits, target)
    sam = sam_loss(logits, target, iou)
    assert torch.equal(out.best, dice.best)  # the output trained is the one with lowest Dice
    assert torch.allclose(out.dice, dice.dice) and torch.allclose(out.iou, sam.iou)
    assert torch.allclose(out.total, dice.dice + sam.iou)
    assert float(out.iou) > 0


def test_training_from_scratch_ignores_the_bundled_weights(synth, tmp_path, monkeypatch):
    from medfm.seg import models
    from medfm.seg.train import init_model

    bundled = models.build_medfm_tiny()
    with torch.no_grad():
        for p in bundled.parameters():
            p.fill_(0.5)
    models.save_pretrained(bundled, tmp_path / "bundled", name="medfm-tiny")
    monkeypatch.setattr(models, "BUNDLED_DIR", tmp_path / "bundled")
    a = init_model(_cfg(synth, tmp_path / "a"))
    b = init_model(_cfg(synth, tmp_path / "b"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name  # a function of the seed
    enc = a.image_encoder.stem[0][0].weight
    assert not torch.all(enc == 0.5)  # random, not the bundled weights
    tuned = init_model(_cfg(synth, tmp_path / "c", checkpoint=str(tmp_path / "bundled"),
                            keep_decoder=True, train_encoder=True))  # fmt: skip
    assert torch.all(tuned.image_encoder.stem[0][0].weight == 0.5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grad_clip_bounds_the_gradient_norm_the_optimizer_sees(synth, tmp_path):
    norms = {}
    for clip in (None, 1e-3):
        trainer = make_engine(_cfg(synth, tmp_path / str(clip), grad_clip=clip, loss="dice_ce"))
        step = trainer.opt.step

        def record(*a, _t=trainer, _step=step, _clip=clip, **k):
            grads = [p.grad for g in _t.opt.param_groups for p in g["params"] if p.grad is not None]
            norms[_clip] = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])))  # fmt: skip
            return _step(*a, **k)

        trainer.opt.step = record
        trainer.train_step(0)
    assert norms[None] > 1e-3  # the unclipped gradient is larger than the bound...
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)  # ...and is scaled down to it


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_logged_terms_average_over_single_and_multimask_prompts(synth, tmp_path):
    prompt = PromptConfig(refine_iters=0, box_prob=0.5, n_pos=(1, 2), n_neg=(0, 0))
    cfg = _cfg(synth, tmp_path / "run", loss="dice_iou", batch=2, prompts_per_image=4,
               prompt=prompt)  # fmt: skip
    trainer = make_engine(cfg)
    for step in range(4):  # Dice + IoU MSE: the logged terms add up to the step's loss
        m = trainer.train_step(step)
        assert m["dice"] + m["iou"] == pytest.approx(m["loss"], rel=1e-5)


def test_dice_alone_cannot_choose_among_three_outputs(synth, tmp_path):
    with pytest.raises(ValueError, match="trains no IoU head"):
        _cfg(synth, tmp_path / "run", loss="dice", prompt=PromptConfig())
    cfg = _cfg(synth, tmp_path / "run", loss="dice", prompt=PromptConfig(multimask=False))
    assert not cfg.prompt.multimask


@pytest.mark.slow  # TorchInductor compiles for minutes on 2 CPU cores
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_training_matches_eager(synth, tmp_path):
    # medfm-tiny's recipe: encoder trained; the decoder sees groups of prompts of other sizes
    # (single clicks and boxes), so its graph is recompiled with a symbolic prompt count
    losses = {}
    for compiled in (False, True):
        cfg = _cfg(synth, tmp_path / f"c{compiled}", steps=3, batch=2, train_encoder=True,
                   compile=compiled, prompt=PromptConfig(box_prob=0.5, refine_iters=0))  # fmt: skip
        losses[compiled] = []
        train(cfg, progress=lambda step, m, k=compiled: losses[k].append(m["loss"]))
    assert losses[True] == pytest.approx(losses[False], rel=1e-3, abs=1e-4)


def test_simulated_low_resolution_averages_blocks():
    img = (np.arange(60 * 90 * 3) % 251).astype(np.uint8).reshape(60, 90, 3)
    small = simulate_low_resolution(img, 3.0)
    assert small.shape == (20, 30, 3) and small.dtype == np.uint8
    block = img[3:6, 6:9].reshape(-1, 3).astype(float).mean(0)  # pixel (1, 2): its 3x3 block
    assert np.abs(small[1, 2] - block).max() <= 1
    assert np.array_equal(simulate_low_resolution(img, 1.0), img)
    assert simulate_low_resolution(img[:2], 6.0).shape == (1, 15, 3)  # at least a pixel a side


def test_low_resolution_needs_a_trained_encoder_and_factors_of_at_least_one(synth, tmp_path):
    with pytest.raises(ValidationError, match="train_encoder"):
        _cfg(synth, tmp_path, lowres_prob=0.5)
    with pytest.raises(ValidationError, match="lowres_factor"):
        _cfg(synth, tmp_path, train_encoder=True, lowres_prob=0.5, lowres_factor=(0.5, 2.0))


def test_low_resolution_images_are_drawn_per_step(synth, tmp_path):
    """lowres_prob = 1 shrinks every image by 1.5..6x, the same way for the same step (so a
    resumed run sees the same images); lowres_prob = 0 gives the stored images."""
    t = make_engine(_cfg(synth, tmp_path / "a", train_encoder=True, lowres_prob=1.0)).task
    stored = t.data.images[0].copy()
    sides = []
    for step in range(6):
        (im,) = t.augmented_images([0], step)
        (again,) = t.augmented_images([0], step)
        assert np.array_equal(im, again)
        assert 64 / 6 - 1 <= im.shape[1] <= 64 / 1.5 + 1 and im.shape[2] == 3
        sides.append(im.shape[1])
    assert len(set(sides)) > 1
    plain = make_engine(_cfg(synth, tmp_path / "b", train_encoder=True)).task
    assert plain.augmented_images([0], 3)[0] is plain.data.images[0]
    assert np.array_equal(t.data.images[0], stored)  # the stored images are left as they were


def test_coarsen_label_takes_each_blocks_centre_and_keeps_the_padding():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (256, 256), generator=g, dtype=torch.uint8)
    assert torch.equal(coarsen_label(label, (256, 256), 1.0), label)
    out = coarsen_label(label, (256, 256), 4.0)  # 64 x 64 coarse pixels of 4 x 4
    want = label[2::4, 2::4].repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(out, want) and out.dtype == label.dtype
    wide = label.clone()
    wide[128:] = 0  # a 100 x 200 image fills the frame's top 128 rows
    out = coarsen_label(wide, (100, 200), 8.0)  # 12 x 25 coarse pixels
    assert not out[128:].any()
    assert torch.unique_consecutive(out[:128], dim=0).shape[0] <= 12  # a row per coarse row
    assert torch.unique_consecutive(out[:128], dim=1).shape[1] <= 25


def test_low_resolution_labels_follow_their_images(synth, tmp_path):
    """lowres_labels: a shrunk image's label map is coarsened by its factor, the same for the
    same step; images kept whole keep their labels; off, the stored labels."""
    with pytest.raises(ValidationError, match="lowres_prob"):
        _cfg(synth, tmp_path, train_encoder=True, lowres_labels=True)
    t = make_engine(
        _cfg(synth, tmp_path / "a", train_encoder=True, lowres_prob=0.5, lowres_labels=True)
    ).task
    stored = t.data.lowres_labels.clone()
    changed = kept = 0
    for step in range(8):
        factors = t.lowres_factors(2, step)  # the same image twice, drawn for separately
        labels = t.step_labels([0, 0], step)
        assert torch.equal(labels, t.step_labels([0, 0], step))
        for row, f in enumerate(factors):
            if f is None:
                kept += 1
                assert torch.equal(labels[row], stored[0])
            else:
                changed += 1
                want = coarsen_label(stored[0], t.data.images[0].shape[:2], f)
                assert torch.equal(labels[row], want)
    assert changed and kept
    assert torch.equal(t.data.lowres_labels, stored)  # the stored maps are left as they were
    plain = make_engine(_cfg(synth, tmp_path / "b", train_encoder=True, lowres_prob=0.5)).task
    assert torch.equal(plain.step_labels([0, 0], 3), plain.data.lowres_labels[[0, 0]])


def test_batched_decode_gives_each_prompt_what_sams_decoder_gives_it_alone():
    from medfm.seg.models import build_architecture
    from medfm.seg.prompts import Prompts
    from medfm.seg.train import LOWRES, decode

    torch.manual_seed(0)
    model = build_architecture("medfm-tiny").eval()
    emb = torch.randn(3, 256, 64, 64)
    # five prompts on three images: box, box + 2 points, 1 point, 2 points (one padding),
    # box with only a padding point (decoded as a box alone)
    image_index = torch.tensor([0, 2, 1, 2, 0])
    has_box = torch.tensor([True, True, False, False, True])
    boxes = torch.tensor([[10.0, 20, 90, 120], [5, 5, 200, 180], [0, 0, 0, 0], [0, 0, 0, 0],
                          [40, 30, 60, 250]])  # fmt: skip
    points = torch.rand(5, 2, 2, generator=torch.Generator().manual_seed(1)) * LOWRES
    labels = torch.tensor([[-1, -1], [1, 0], [1, -1], [1, 1], [-1, -1]])
    prompts = Prompts(boxes, has_box, points, labels)
    masks_in = torch.randn(5, 1, LOWRES, LOWRES)
    scale = 4.0  # LOWRES coordinates to a 1024 input frame
    for mask_input in (None, masks_in):
        for multimask in (False, True):
            with torch.no_grad():
                logits, iou = decode(model, emb, image_index, prompts, mask_input, multimask, scale)
            assert logits.shape == (5, 3 if multimask else 1, LOWRES, LOWRES)
            for i in range(5):
                # padding points (label -1) are SAM's not-a-point tokens, as in a batch
                pts = (resize_points(points[i : i + 1], scale, scale), labels[i : i + 1])
                with torch.no_grad():
                    sparse, dense = model.prompt_encoder(
                        points=pts if bool((labels[i] >= 0).any()) else None,
                        boxes=resize_boxes(boxes[i : i + 1], scale, scale) if has_box[i] else None,
                        masks=None if mask_input is None else mask_input[i : i + 1],
                    )
                    ref, ref_iou = model.mask_decoder(
                        emb[image_index[i] : image_index[i] + 1],
                        model.prompt_encoder.get_dense_pe(), sparse, dense, multimask,
                    )  # fmt: skip
                torch.testing.assert_close(logits[i], ref[0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(iou[i], ref_iou[0], atol=1e-5, rtol=1e-4)
    # bf16 embeddings (an encoder under autocast): the logits the loss reads stay float32
    with torch.no_grad():
        low, iou_low = decode(model, emb.bfloat16(), image_index, prompts, None, False, scale)
        full, _ = decode(model, emb, image_index, prompts, None, False, scale)
    assert low.dtype == iou_low.dtype == torch.float32
    assert float((low - full).abs().max()) < 0.05 * float(full.abs().max())


def test_upscaled_masks_match_sams_upscaling_modules_in_values_and_gradients():
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    from medfm.seg.decoder import upscaled_masks

    torch.manual_seed(0)
    decoder = MaskDecoder(
        transformer_dim=64, transformer=TwoWayTransformer(depth=1, embedding_dim=64, mlp_dim=32,
                                                          num_heads=2)
    )  # fmt: skip
    ups = decoder.output_upscaling
    for p in ups.parameters():  # non-trivial norm weights and biases too
        p.data.normal_(0, 0.3)
    n, h, w = 3, 5, 7  # a non-square grid catches swapped axes
    src = torch.randn(n, h * w, 64, requires_grad=True)
    hyper = torch.randn(n, 2, 8, requires_grad=True)
    up = ups(src.transpose(1, 2).reshape(n, 64, h, w))
    ref = (hyper @ up.flatten(2)).view(n, 2, 4 * h, 4 * w)
    out = upscaled_masks(ups, src, hyper, (h, w))
    assert out.shape == (n, 2, 4 * h, 4 * w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    wrt = [src, hyper, *ups.parameters()]
    for a, b in zip(torch.autograd.grad((ref * g).sum(), wrt),
                    torch.autograd.grad((out * g).sum(), wrt), strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_tokens", [3, 7, 8, 12])  # 4 heads x 8 tokens = internal width 32
def test_two_way_transformer_matches_sams_in_values_and_gradients(n_tokens):
    from segment_anything.modeling import TwoWayTransformer

    from medfm.seg.decoder import two_way_transformer

    torch.manual_seed(n_tokens)
    tr = TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=32, num_heads=4)
    for p in tr.parameters():  # biases and norms away from their zero / one start
        p.data.add_(torch.randn_like(p) * 0.2)
    n, h, w = 3, 5, 7
    src = torch.randn(n, 64, h, w, requires_grad=True)
    pe = torch.randn(n, 64, h, w)
    tokens = torch.randn(n, n_tokens, 64, requires_grad=True)
    ref = tr(src, pe, tokens)
    out = two_way_transformer(tr, src, pe, tokens)
    for a, b in zip(ref, out, strict=True):  # float rounding of other products
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    gq, gk = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    names = ["src", "tokens", *(k for k, _ in tr.named_parameters())]
    wrt = [src, tokens, *tr.parameters()]

    def grads(result):
        loss = (result[0] * gq).sum() + (result[1] * gk).sum()
        return torch.autograd.grad(loss, wrt, allow_unused=True)

    for name, a, b in zip(names, grads(ref), grads(out), strict=True):
        if name.endswith("k_proj.bias"):  # the softmax ignores a key bias: zero gradient
            assert float(a.abs().max()) < 1e-4 and (b is None or float(b.abs().max()) < 1e-4)
        else:  # within float rounding of the largest entry (fp32 sums over 35 image tokens)
            assert float((b - a).abs().max()) <= 1e-4 * float(a.abs().max()) + 1e-5, name


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cuda_bf16_training_step_matches_the_cpu_step(synth, tmp_path):
    # the same step (same images, prompts and initial weights) on CUDA under bf16 autocast and
    # on the CPU in float32: the losses agree to bf16 precision, and so do the gradients
    kw = dict(train_encoder=True, steps=1, batch=2, prompts_per_image=2, loss="dice_ce")
    cpu = make_engine(_cfg(synth, tmp_path / "cpu", **kw))
    gpu = make_engine(_cfg(synth, tmp_path / "gpu", device="cuda", **kw))
    assert gpu.amp and not cpu.amp
    m_cpu, m_gpu = cpu.train_step(0), gpu.train_step(0)
    assert np.isfinite(m_gpu["loss"])
    assert m_gpu["loss"] == pytest.approx(m_cpu["loss"], rel=0.03)
    grads = dict(cpu.task.model.named_parameters())
    for prefix in ("image_encoder.", "mask_decoder."):
        pairs = [(grads[k].grad, p.grad.cpu()) for k, p in gpu.task.model.named_parameters()
                 if k.startswith(prefix) and p.grad is not None]  # fmt: skip
        a = torch.cat([x.flatten() for x, _ in pairs])
        b = torch.cat([y.flatten() for _, y in pairs])
        assert b.dtype == torch.float32  # autocast keeps the weights and gradients in fp32
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.95, prefix


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_embedding_cache_key_follows_the_encoder_weights(synth, tmp_path):
    from medfm.seg.models import build_medfm_tiny, save_pretrained

    from .conftest import randomize_

    folder = tmp_path / "weights"
    save_pretrained(randomize_(build_medfm_tiny(), seed=1), folder, name="medfm-tiny")
    cfg = _cfg(synth, tmp_path / "run", checkpoint=str(folder), keep_decoder=True)
    first = make_engine(cfg).task
    assert make_engine(cfg).task.model_id() == first.model_id()  # the same weights: cache hits
    # new weights at the same path (a folder's size never changes): new key, new embeddings
    save_pretrained(randomize_(build_medfm_tiny(), seed=2), folder, name="medfm-tiny")
    second = make_engine(cfg).task
    assert second.model_id() != first.model_id()
    new = second.embeddings(list(range(len(second.data.images))), step=0)
    with torch.no_grad():
        want = second._encode(second.data.images)
    torch.testing.assert_close(new.float(), want, atol=2e-2, rtol=1e-2)  # fp16 on disk
    # a decoder-only change keeps the key
    model = second.model
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    save_pretrained(model, folder, name="medfm-tiny")
    assert make_engine(cfg).task.model_id() == second.model_id()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resuming_a_finished_run_keeps_its_model_and_calibration(synth, tmp_path):
    cfg = _cfg(synth, tmp_path / "run", steps=1)
    final = train(cfg)
    config = json.loads((final / "config.json").read_text())
    config["mask_thresholds"] = {"box": -2.0, "point": 0.5}  # as medfm seg calibrate adds
    (final / "config.json").write_text(json.dumps(config))
    weights = (final / "model.safetensors").read_bytes()
    assert train(cfg, resume=True) == final
    assert json.loads((final / "config.json").read_text()) == config
    assert (final / "model.safetensors").read_bytes() == weights


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_frozen_random_encoder_is_warned_of(synth, tmp_path):
    logs = []
    make_engine(_cfg(synth, tmp_path / "a"), log=logs.append)
    assert any("frozen image encoder has random weights" in m for m in logs)
    logs.clear()
    make_engine(_cfg(synth, tmp_path / "b", train_encoder=True), log=logs.append)
    assert not any("random weights" in m for m in logs)


@pytest.mark.parametrize("image_size", [256, 1024])
def test_lowres_label_stays_centred_like_the_image(image_size):
    lab = torch.zeros(100, 100, dtype=torch.long)
    lab[40:60, 30:70] = 1  # centred on row 49.5 and column 49.5: the image's centre
    low = lowres_label(lab, image_size).float()
    rows, cols = torch.nonzero(low, as_tuple=True)
    # at 256 exactly centred; from 1024 each 4 x 4 block is read at its pixel (2, 2), an
    # eighth of a pixel from its centre, and this label's edges fall half-way across blocks
    tol = 0 if image_size == 256 else 0.5
    assert float(rows.float().mean()) == pytest.approx(127.5, abs=tol + 1e-6)
    assert float(cols.float().mean()) == pytest.approx(127.5, abs=tol + 1e-6)
    assert low.sum() == pytest.approx(20 * 40 * 2.56**2, rel=0.05)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_run_resumes_by_a_relative_path_and_after_its_folder_was_moved(
    synth, tmp_path, monkeypatch
):
    train(_cfg(synth, tmp_path / "full"))

    def kill_at_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth, "runs/a"), progress=kill_at_3)  # started by a relative path
    (tmp_path / "runs" / "a").rename(tmp_path / "moved")
    with pytest.raises(MedfmError, match="--resume"):  # still the same run, not a new one
        train(_cfg(synth, tmp_path / "moved"))
    train(_cfg(synth, tmp_path / "moved"), resume=True)  # resumed by an absolute path
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "moved")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = TrainConfig.model_validate_json((tmp_path / "moved" / "train_config.json").read_text())
    assert saved.out == str(tmp_path / "moved")


def test_a_second_training_on_the_same_folder_is_refused_naming_the_holder(
    synth, tmp_path, lock_holder
):
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = lock_holder(run)
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "seg", "train", "--data", str(synth),
         "--out", str(run), "--steps", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {run} is in use by pid {holder.pid} on {__import__('socket').gethostname()}; "
        "wait for it to finish or use another --out"
    ]
    assert not (run / "train_config.json").exists()  # nothing written for the refused run


def test_a_refused_run_writes_nothing_and_unnamed_labels_are_refused(synth, tmp_path):
    with pytest.raises(MedfmError, match="does not exist; is .*nope an nnU-Net"):
        train(_cfg(tmp_path / "nope", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(synth, bad)
    meta = json.loads((bad / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "one": 1}  # the cases hold more labels than that
    (bad / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedfmError, match=r"label values \[.*\] that dataset.json does not name"):
        train(_cfg(bad, tmp_path / "out2"))


def test_data_weights_choose_each_sets_share(tmp_path):
    """With data_weights a set is drawn by its weight, then an image of it; weight 0 never."""
    import torch

    from medfm.seg.train import SegTask, TrainConfig, TrainData

    cfg = TrainConfig(data=("a", "b", "c"), out=str(tmp_path), data_weights=(1.0, 0.0, 3.0))
    task = SegTask.__new__(SegTask)
    task.cfg = cfg
    task.data = TrainData(images=[None] * 6, lowres_labels=torch.zeros(6, 1, 1),
                          names=list("uvwxyz"), sources=[0, 0, 1, 1, 2, 2])  # fmt: skip
    task._by_source = None
    drawn = task.draw_images(4000, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor(drawn), minlength=6).tolist()
    assert counts[2] == counts[3] == 0
    assert abs((counts[4] + counts[5]) / 4000 - 0.75) < 0.03
    assert abs(counts[0] - counts[1]) < 150
    with pytest.raises(ValueError, match="3 sets"):
        TrainConfig(data=("a", "b", "c"), out="o", data_weights=(1.0, 1.0))
