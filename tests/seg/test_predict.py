import inspect

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from medfm.errors import MedfmError
from medfm.seg import models
from medfm.seg.export import export_sam_checkpoint
from medfm.seg.models import build_sam_vit, save_pretrained
from medfm.seg.predict import Segmenter
from medfm.seg.prompts import resize_boxes, resize_points
from medfm.seg.tiny import build_medfm_tiny
from medfm.seg.types import Predictor, to_rgb_uint8

from .conftest import TINY_SPEC, randomize_, tiny_sam

H, W = 30, 50
BOXES = np.array([[10, 5, 38, 24], [0, 0, 49, 29], [20, 10, 21, 12]], dtype=float)
POINTS = np.array([[[22, 14], [45, 3]], [[5, 25], [5, 25]], [[30, 12], [0, 0]]], dtype=float)
LABELS = np.array([[1, 0], [1, 1], [1, -1]])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    g = np.random.default_rng(0)
    rows, cols = np.mgrid[0:H, 0:W]
    img = 40 + cols * 1.5 + g.normal(0, 8, (H, W))
    img[((rows - 14) / 8) ** 2 + ((cols - 22) / 13) ** 2 <= 1] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def seg(image) -> Segmenter:
    s = Segmenter(tiny_sam(TINY_SPEC, seed=5), "vit_b")
    s.set_image(image)
    return s


@pytest.fixture(scope="module")
def sam_predictor(seg, image, tmp_path_factory) -> SamPredictor:
    """segment-anything's own predictor on the same weights, read from the exported .pth."""
    path = export_sam_checkpoint(seg.model, tmp_path_factory.mktemp("export") / "sam.pth")
    sam = build_sam_vit(TINY_SPEC)
    sam.load_state_dict(torch.load(path, weights_only=True))
    predictor = SamPredictor(sam.eval())
    predictor.set_image(to_rgb_uint8(image))
    return predictor


def test_implements_the_predictor_protocol(seg):
    assert seg.name == "vit_b"
    for method in ("set_image", "predict"):
        want = inspect.signature(getattr(Predictor, method)).parameters
        have = inspect.signature(getattr(Segmenter, method)).parameters
        assert list(have)[: len(want)] == list(want)
        for name, param in want.items():
            assert have[name].kind == param.kind and have[name].default == param.default


def test_box_prediction_shapes(seg):
    out = seg.predict(boxes=BOXES)
    assert out.masks.shape == (3, H, W) and out.masks.dtype == torch.bool
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert out.logits.shape == (3, 64, 64)  # 4x the tiny model's 16x16 embedding
    for t in (out.masks, out.scores, out.logits):
        assert not t.is_inference() and t.device.type == "cpu"
    assert 0 < out.masks.sum() < out.masks.numel()  # not a trivial answer


def test_point_prediction_shapes(seg):
    out = seg.predict(points=POINTS, labels=LABELS, multimask=True)
    assert out.masks.shape == (3, H, W) and out.logits.shape == (3, 64, 64)


@pytest.mark.parametrize(
    ("prompt", "multimask"), [("box", False), ("point", True), ("both", False)]
)
def test_batch_equals_single_calls(seg, prompt, multimask):
    def kwargs(i):
        box = {"boxes": BOXES[i]} if prompt in ("box", "both") else {}
        pts = {"points": POINTS[i], "labels": LABELS[i]} if prompt in ("point", "both") else {}
        return {**box, **pts}

    batch = seg.predict(**kwargs(slice(None)), multimask=multimask)
    for i in range(3):
        one = seg.predict(**kwargs(slice(i, i + 1)), multimask=multimask)
        torch.testing.assert_close(one.logits[0], batch.logits[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(one.scores[0], batch.scores[i], atol=1e-5, rtol=0)
        assert torch.equal(one.masks[0], batch.masks[i])


def test_same_as_segment_anything_box(seg, sam_predictor):
    for multimask in (False, True):
        ours = seg.predict(boxes=BOXES, multimask=multimask)
        for i, box in enumerate(BOXES):
            masks, scores, low = sam_predictor.predict(box=box, multimask_output=multimask)
            best = int(np.argmax(scores))
            np.testing.assert_allclose(ours.logits[i].numpy(), low[best], atol=1e-4, rtol=0)
            np.testing.assert_allclose(float(ours.scores[i]), scores[best], atol=1e-4)
            np.testing.assert_array_equal(ours.masks[i].numpy(), masks[best])


def test_same_as_segment_anything_points(seg, sam_predictor):
    for multimask in (False, True):
        ours = seg.predict(points=POINTS[:2], labels=LABELS[:2], multimask=multimask)
        for i in range(2):
            masks, scores, low = sam_predictor.predict(
                point_coords=POINTS[i], point_labels=LABELS[i], multimask_output=multimask
            )
            best = int(np.argmax(scores))
            np.testing.assert_allclose(ours.logits[i].numpy(), low[best], atol=1e-4, rtol=0)
            np.testing.assert_array_equal(ours.masks[i].numpy(), masks[best])


def test_same_as_segment_anything_refinement(seg, sam_predictor):
    """A refinement click with the previous logits fed back, as in interactive use."""
    first = seg.predict(points=POINTS[:1, :1], labels=LABELS[:1, :1])
    ours = seg.predict(points=POINTS[:1], labels=LABELS[:1], mask_input=first.logits)
    _, _, low0 = sam_predictor.predict(POINTS[0, :1], LABELS[0, :1], multimask_output=False)
    masks, _, low = sam_predictor.predict(
        POINTS[0], LABELS[0], mask_input=low0, multimask_output=False
    )
    np.testing.assert_allclose(first.logits[0].numpy(), low0[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.logits[0].numpy(), low[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ours.masks[0].numpy(), masks[0])
    assert not torch.allclose(ours.logits, first.logits)


def test_pixel_coords_are_segment_anything_on_the_resized_prompts(seg, sam_predictor, image):
    """coords="pixel": the same decoder as SamPredictor, given the prompts moved by
    resize_boxes / resize_points instead of ResizeLongestSide's x * s."""
    pixel = Segmenter(seg.model, "vit_b", coords="pixel")
    pixel.set_image(image)
    ih, iw = pixel._input_size
    sx, sy = iw / W, ih / H
    assert sx > 1 and sy > 1  # the 30 x 50 image is enlarged to the tiny model's input
    ours = pixel.predict(boxes=BOXES)
    boxes = torch.as_tensor(resize_boxes(BOXES, sx, sy), dtype=torch.float)
    _, _, low = sam_predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    torch.testing.assert_close(ours.logits, low[:, 0], atol=1e-4, rtol=0)
    assert not torch.allclose(ours.logits, seg.predict(boxes=BOXES).logits, atol=1e-3)
    ours = pixel.predict(points=POINTS, labels=LABELS)
    pts = torch.as_tensor(resize_points(POINTS, sx, sy), dtype=torch.float)
    pts[torch.as_tensor(LABELS) == -1] = 0.0  # padding: coordinates ignored, set to 0 first
    _, _, low = sam_predictor.predict_torch(pts, torch.as_tensor(LABELS), multimask_output=False)
    torch.testing.assert_close(ours.logits, low[:, 0], atol=1e-4, rtol=0)
    # the whole image's box is the whole resized image's; SAM's x * s stops s - 1 short
    frame, _ = pixel._to_input_frame(np.array([[0.0, 0, W - 1, H - 1]]), None, (ih, iw), (H, W))
    np.testing.assert_allclose(frame, [[0, 0, iw - 1, ih - 1]], atol=1e-9)
    sam_frame, _ = seg._to_input_frame(np.array([[0.0, 0, W - 1, H - 1]]), None, (ih, iw), (H, W))
    assert sam_frame[0, 2] < iw - 2
    with pytest.raises(MedfmError, match="coords must be"):
        Segmenter(seg.model, "vit_b", coords="centre")


def test_embed_and_predict_from_embedding(seg, image):
    emb, input_size, original_size = seg.embed(image)
    assert emb.shape == (1, 256, 16, 16) and not emb.is_inference()
    assert input_size == (154, 256) and original_size == (H, W)
    direct = seg.predict(boxes=BOXES)
    cached = seg.predict_from_embedding(emb, input_size, original_size, boxes=BOXES)
    assert torch.equal(direct.logits, cached.logits)
    half = seg.predict_from_embedding(emb.half()[0], input_size, original_size, boxes=BOXES)
    torch.testing.assert_close(half.logits, direct.logits, atol=0.05, rtol=0.01)
    with pytest.raises(MedfmError, match=r"embedding has shape \(1, 256, 8, 8\)"):
        seg.predict_from_embedding(emb[..., :8, :8], input_size, original_size, boxes=BOXES)
    with pytest.raises(MedfmError, match="pass the sizes returned by embed"):
        seg.predict_from_embedding(emb, (256, 256), original_size, boxes=BOXES)


def test_grey_and_rgb_images_agree(seg, image):
    grey = seg.embed(image)[0]
    rgb = seg.embed(np.repeat(image[..., None], 3, axis=-1))[0]
    assert torch.equal(grey, rgb)


def test_empty_batch(seg):
    out = seg.predict(boxes=np.zeros((0, 4)))
    assert out.masks.shape == (0, H, W) and out.scores.shape == (0,)


def test_degenerate_box_is_a_prompt(seg):
    # the tight box of a one-pixel-wide structure has x0 == x1 (medfm.seg.prompts' convention)
    assert seg.predict(boxes=[[10, 5, 10, 20]]).masks.shape == (1, H, W)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"boxes": [[10, 5, 60, 20]]}, r"box 0 .* lies outside the 50 x 30 \(W x H\) image"),
        ({"boxes": [[-1, 5, 20, 20]]}, "lies outside"),
        ({"boxes": [[20, 5, 10, 20]]}, "has x1 < x0 or y1 < y0"),
        ({"boxes": [[1, 2, 3]]}, r"boxes must be \(N, 4\)"),
        ({"boxes": [[1, 2, np.nan, 4]]}, "NaN"),
        ({"boxes": "a"}, "array of numbers"),
        ({"points": [[22, 14]], "labels": [1]}, r"points must be \(N, P, 2\)"),
        ({"points": POINTS, "labels": LABELS[:2]}, r"points must be \(N, P, 2\)"),
        ({"points": POINTS}, "need labels"),
        ({"labels": LABELS}, "need labels"),
        ({"points": POINTS, "labels": LABELS * 2}, "labels must be 1"),
        ({"points": [[[50, 3]]], "labels": [[1]]}, "point .* lies outside"),
        ({"boxes": BOXES, "points": POINTS[:2], "labels": LABELS[:2]}, "3 boxes but 2 point"),
        ({}, "give boxes"),
        ({"boxes": BOXES, "mask_input": np.zeros((3, 1, 32, 32))}, r"mask_input must be"),
        ({"boxes": BOXES, "mask_input": np.zeros((2, 64, 64))}, "2 mask inputs for 3 prompts"),
    ],
)
def test_prompt_errors(seg, kwargs, match):
    with pytest.raises(MedfmError, match=match):
        seg.predict(**kwargs)


def test_padding_points_are_ignored(seg):
    a = seg.predict(points=[[[22, 14], [0, 0]]], labels=[[1, -1]])
    b = seg.predict(points=[[[22, 14], [999, -5]]], labels=[[1, -1]])
    assert torch.equal(a.logits, b.logits)


def test_predict_before_set_image():
    s = Segmenter(tiny_sam(TINY_SPEC), "vit_b")
    with pytest.raises(MedfmError, match="call set_image"):
        s.predict(boxes=BOXES)


def test_bad_images(seg):
    with pytest.raises(MedfmError, match="give an"):
        seg.embed(np.zeros((4, 5, 6), dtype=np.uint8))
    with pytest.raises(MedfmError, match="too thin"):
        seg.embed(np.zeros((1, 2000), dtype=np.uint8))


def test_from_pretrained(tmp_path, monkeypatch, image):
    model = randomize_(build_medfm_tiny(), seed=4)
    folder = save_pretrained(model, tmp_path / "run", name="medfm-tiny")
    s = Segmenter.from_pretrained(folder)
    assert s.name == "medfm-tiny"
    s.set_image(image)
    out = s.predict(boxes=BOXES, multimask=True)
    assert out.masks.shape == (3, H, W) and out.logits.shape == (3, 256, 256)
    refined = s.predict(boxes=BOXES[:1], mask_input=out.logits[:1])
    assert refined.masks.shape == (1, H, W)
    # the registry name with the bundled weights (here: the folder above)
    monkeypatch.setattr(models, "BUNDLED_DIR", folder)
    bundled = Segmenter.from_pretrained("medfm-tiny")
    bundled.set_image(image)
    again = bundled.predict(boxes=BOXES[:1], multimask=True)
    torch.testing.assert_close(again.logits, out.logits[:1], atol=1e-5, rtol=0)
    assert s.multimask_clicks and bundled.multimask_clicks  # SAM's three masks for a click
    assert s.coords == bundled.coords == "pixel"  # medfm's own models: pixel-exact prompts
    with pytest.raises(MedfmError, match="drop the checkpoint"):
        Segmenter.from_pretrained(folder, checkpoint=folder / "model.safetensors")
    with pytest.raises(MedfmError, match="neither a model name"):
        Segmenter.from_pretrained(tmp_path / "nothing")


@pytest.mark.gpu
def test_cuda_matches_cpu(seg, image):
    gpu = Segmenter(tiny_sam(TINY_SPEC, seed=5), "vit_b", device="cuda")
    gpu.set_image(image)
    out = gpu.predict(boxes=BOXES, multimask=True)
    assert out.masks.device.type == "cpu"
    torch.testing.assert_close(
        out.logits, seg.predict(boxes=BOXES, multimask=True).logits, atol=1e-3, rtol=1e-3
    )


def test_a_model_trained_with_one_output_for_clicks_keeps_it(tmp_path, monkeypatch):
    """train_config.prompt.multimask = False in config.json: single clicks get the single output
    in evaluation and volume prompting (the three outputs were not trained for them)."""
    from medfm.seg.propagate import segment_slice
    from medfm.seg.types import click_multimask

    train_config = {"prompt": {"multimask": False}}
    folder = save_pretrained(
        randomize_(build_medfm_tiny(), seed=4), tmp_path / "m", name="medfm-tiny",
        extra={"train_config": train_config},
    )  # fmt: skip
    for s in (
        Segmenter.from_pretrained(folder),
        Segmenter.from_pretrained("medfm-tiny", folder),
    ):
        assert s.multimask_clicks is False and click_multimask(s) is False
    monkeypatch.setattr(models, "BUNDLED_DIR", folder)
    s = Segmenter.from_pretrained("medfm-tiny")
    assert not s.multimask_clicks
    asked = []
    predict = s.predict
    monkeypatch.setattr(s, "predict", lambda **kw: asked.append(kw["multimask"]) or predict(**kw))
    img = np.zeros((32, 40), np.uint8)
    segment_slice(s, img, points=[[5.0, 6.0]], labels=[1])
    s.multimask_clicks = True
    segment_slice(s, img, points=[[5.0, 6.0]], labels=[1])
    segment_slice(s, img, points=[[5.0, 6.0], [9.0, 9.0]], labels=[1, 0])
    assert asked == [False, True, False]


def _flip_prompts(boxes, points):
    """Boxes and points on the image -> the same on the image flipped left-right."""
    b = boxes.copy()
    b[:, 0], b[:, 2] = W - 1 - boxes[:, 2], W - 1 - boxes[:, 0]
    p = points.copy()
    p[..., 0] = W - 1 - points[..., 0]
    return b, p


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_mirroring_averages_both_orientations_and_is_flip_equivariant(image, prompt):
    model = tiny_sam(TINY_SPEC, seed=5)
    plain, mirrored = Segmenter(model, "vit_b"), Segmenter(model, "vit_b", mirror=True)
    flipped = np.ascontiguousarray(image[:, ::-1])
    m_boxes, m_points = _flip_prompts(BOXES, POINTS)

    def ask(seg, img, mirror_prompts=False):
        seg.set_image(img)
        boxes, points = (m_boxes, m_points) if mirror_prompts else (BOXES, POINTS)
        if prompt == "box":
            return seg.predict(boxes=boxes)
        return seg.predict(points=points, labels=LABELS, multimask=True)

    out = ask(mirrored, image)
    # the value: mean of the two orientations' probabilities at the image size, flipped back
    probs = []
    for img, flip in ((image, False), (flipped, True)):
        plain.set_image(img)
        b, p = (m_boxes, m_points) if flip else (BOXES, POINTS)
        given = (b, None, None) if prompt == "box" else (None, p, LABELS)
        logits = plain.predict_logits(*given, multimask=prompt == "point")  # at the image size
        probs.append(torch.sigmoid(logits.flip(-1) if flip else logits))
    want = (probs[0] + probs[1]) / 2 > 0.5
    assert 0 < want.sum() < want.numel()
    assert torch.equal(out.masks, want)
    one_way = ask(plain, image)
    assert not torch.equal(out.masks, one_way.masks)  # random weights: not symmetric
    torch.testing.assert_close(out.logits, one_way.logits)  # the unflipped image's logits
    # equivariance: the flipped image with flipped prompts gives the flipped masks, exactly
    back = ask(mirrored, flipped, mirror_prompts=True)
    assert torch.equal(back.masks, out.masks.flip(-1))
    torch.testing.assert_close(back.scores, out.scores, atol=1e-6, rtol=0)


def test_mirroring_refuses_mask_input_and_baselines(image):
    from medfm.seg.evaluate import load_predictor

    seg = Segmenter(tiny_sam(TINY_SPEC, seed=5), "vit_b", mirror=True)
    seg.set_image(image)
    with pytest.raises(MedfmError, match="mirroring"):
        seg.predict(boxes=BOXES, mask_input=torch.zeros(3, 64, 64))
    with pytest.raises(MedfmError, match="box-ellipse baseline has no test-time mirroring"):
        load_predictor("box-ellipse", mirror=True)


def test_a_model_folders_weights_file_brings_the_folders_settings(tmp_path, image):
    model = randomize_(build_medfm_tiny(), seed=4)
    extra = {"mask_thresholds": {"box": -2.0}, "box_crop": True}
    folder = save_pretrained(model, tmp_path / "m", name="medfm-tiny", extra=extra)
    by_folder = Segmenter.from_pretrained("medfm-tiny", folder)
    by_file = Segmenter.from_pretrained("medfm-tiny", folder / "model.safetensors")
    for s in (by_folder, by_file):
        assert s.coords == "pixel" and s.box_crop and s.mask_thresholds["box"] == -2.0
        s.set_image(image)
    assert torch.equal(by_file.predict(boxes=BOXES).masks, by_folder.predict(boxes=BOXES).masks)


def test_box_is_another_name_for_boxes(seg):
    one = seg.predict(box=BOXES[0])
    torch.testing.assert_close(one.logits, seg.predict(boxes=BOXES[:1]).logits)
    with pytest.raises(MedfmError, match="not both"):
        seg.predict(box=BOXES[0], boxes=BOXES)


def test_segment_anything_keywords_are_one_prompt(seg, sam_predictor):
    """SamPredictor.predict's keywords: clicks (P, 2) + labels (P,) and a box (4,) are one
    prompt, the same mask as the batched call; the Prediction unpacks as SamPredictor's tuple."""
    for multimask in (False, True):
        batched = seg.predict(points=POINTS[:1], labels=LABELS[:1], multimask=multimask)
        masks, scores, logits = seg.predict(
            point_coords=POINTS[0], point_labels=LABELS[0], multimask_output=multimask
        )
        assert masks.shape == (1, H, W) and scores.shape == (1,)
        assert torch.equal(masks, batched.masks) and torch.equal(logits, batched.logits)
        sam_masks, sam_scores, _ = sam_predictor.predict(
            point_coords=POINTS[0], point_labels=LABELS[0], multimask_output=multimask
        )
        np.testing.assert_array_equal(masks[0].numpy(), sam_masks[int(np.argmax(sam_scores))])
    masks, _, _ = seg.predict(box=BOXES[1], multimask_output=False)
    assert torch.equal(masks, seg.predict(boxes=BOXES[1:2]).masks)
    both = seg.predict(
        point_coords=POINTS[0, :1], point_labels=LABELS[0, :1], box=BOXES[0], multimask_output=False
    )
    want = seg.predict(boxes=BOXES[:1], points=POINTS[:1, :1], labels=LABELS[:1, :1])
    assert torch.equal(both.masks, want.masks)
    with pytest.raises(MedfmError, match="not both"):
        seg.predict(point_coords=POINTS[0], point_labels=LABELS[0], points=POINTS[:1])
    with pytest.raises(MedfmError, match=r"point_coords \(P, 2\) need point_labels"):
        seg.predict(point_coords=POINTS[0])
    with pytest.raises(MedfmError, match=r"point_coords must be \(P, 2\)"):
        seg.predict(point_coords=POINTS[:1], point_labels=LABELS[:1])
