"""The medsam baseline runs MedSAM's own pipeline (bowang-lab/MedSAM, MedSAM_Inference.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import transform

from medfm.seg.predict import Segmenter, medsam_input

from .conftest import TINY_SPEC, tiny_sam
from .test_predict import H, W
from .test_predict import image as grey  # noqa: F401  (a fixture)

BOXES = np.array([[10, 5, 38, 24], [0, 0, 49, 29], [20.5, 10, 21, 12.5]])


@pytest.fixture(scope="module")
def image(grey) -> np.ndarray:  # noqa: F811  (the fixture, as an argument)
    """test_predict's 30 x 50 image (a bright ellipse on a ramp), as RGB."""
    return np.repeat(grey[:, :, None], 3, axis=2)


@torch.no_grad()
def medsam_reference(model, img_3c: np.ndarray, box_np: np.ndarray) -> torch.Tensor:
    """MedSAM_Inference.py's steps, with its 1024 as the model's input size S: -> the
    upsampled probabilities (N, H, W)."""
    size = model.image_encoder.img_size
    h, w, _ = img_3c.shape
    img = transform.resize(img_3c, (size, size), order=3, preserve_range=True, anti_aliasing=True)
    img = np.clip(img, 0, 255).astype(np.uint8)
    img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
    x = torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0)
    embedding = model.image_encoder(x)
    box = torch.as_tensor(box_np / np.array([w, h, w, h]) * size, dtype=torch.float)[:, None, :]
    sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    low_res, _ = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    prob = torch.sigmoid(low_res)
    return F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


@pytest.fixture(scope="module")
def model():
    return tiny_sam(TINY_SPEC, seed=7)


def test_input_is_the_stretched_image_in_0_1(image):
    x = medsam_input(image, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    # stretched, not padded: the bright ellipse (rows 6..22 of 30) spans the same fraction
    rows = np.flatnonzero(x[0].mean(1) > 0.55)
    assert 6 / 30 * 64 - 3 <= rows[0] and rows[-1] <= 22 / 30 * 64 + 3
    flat = medsam_input(np.full((5, 7, 3), 9, np.uint8), 16)  # constant: no division by zero
    assert np.all(flat == 0)


def test_boxes_give_medsam_masks_and_probabilities(model, image):
    seg = Segmenter(model, "medsam", coords="medsam")
    seg.set_image(image)
    want = medsam_reference(model, image, BOXES)
    out = seg.predict(boxes=BOXES)
    assert out.masks.shape == (3, H, W)
    assert torch.equal(out.masks, want > 0.5)
    assert 0 < int(out.masks.sum()) < out.masks.numel()  # a real test: both classes occur
    got = torch.sigmoid(seg.predict_logits(boxes=BOXES))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the embedding's sizes are the square input's
    embedding, input_size, original_size = seg.embed(image)
    assert input_size == (256, 256) and original_size == (H, W)
    again = seg.predict_from_embedding(embedding, input_size, original_size, boxes=BOXES)
    assert torch.equal(again.masks, out.masks)


def test_clicks_scale_per_axis(model, image):
    seg = Segmenter(model, "medsam", coords="medsam")
    seg.set_image(image)
    pts = np.array([[[22.0, 14.0]]])
    out = seg.predict_logits(points=pts, labels=np.ones((1, 1)))
    # the same click given in the square input's frame to the decoder directly
    emb, _, _ = seg.embed(image)
    sparse, dense = model.prompt_encoder(
        points=(torch.tensor([[[22.0 * 256 / W, 14.0 * 256 / H]]]), torch.ones(1, 1, dtype=int)),
        boxes=None,
        masks=None,
    )
    with torch.no_grad():
        low, iou = model.mask_decoder(
            emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False
        )
    prob = F.interpolate(torch.sigmoid(low), (H, W), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(torch.sigmoid(out), prob, atol=1e-5, rtol=0)


def test_from_pretrained_picks_the_frame():
    assert Segmenter.from_pretrained("medsam").coords == "medsam"
    assert Segmenter.from_pretrained("vit_b").coords == "sam"
