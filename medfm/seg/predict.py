"""Prediction with any model of the zoo: `Segmenter`, SAM's interactive predictor, batched.

Like segment-anything's ``SamPredictor``, the image embedding is computed once by `set_image`
(resize of the longest side to the encoder's input with ``ResizeLongestSide``, then
``Sam.preprocess``: normalise and pad) and reused by every `predict`; unlike it, one call takes a
batch of N prompts (boxes and/or points) and returns N masks. With the same weights and prompts
its masks and low-resolution logits are those of ``SamPredictor`` (tests check it).

The ``medsam`` baseline runs MedSAM's own pipeline instead (``coords="medsam"``, as
``MedSAM_Inference.py`` of bowang-lab/MedSAM): the image stretched to 1024 x 1024 (bicubic,
anti-aliased), min-max normalised to [0, 1] with no padding, prompts scaled per axis, and the
mask the sigmoid of the low-resolution logits upsampled straight to the image.

`embed` and `predict_from_embedding` split the two halves for callers that cache embeddings
(training and evaluation). Everything runs under ``torch.inference_mode()``; the returned tensors
are ordinary (non-inference) CPU tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from medfm.devices import parse_device
from medfm.errors import MedfmError
from medfm.io.weights import CONFIG_NAME, WEIGHTS_NAME
from medfm.seg.boxes import box_region, check_boxes
from medfm.seg.decoder import decode_rows
from medfm.seg.models import (
    SEG_MODELS,
    build_model,
    load_pretrained,
    read_model_config,
    run_model_dir,
    weights_for,
)
from medfm.seg.prompts import resize_boxes, resize_points
from medfm.seg.types import Prediction, to_rgb_uint8

__all__ = ["Segmenter", "medsam_input"]

_CHUNK = 64  # prompts per decoder call: each holds a copy of the 256x64x64 embedding


def _float_array(x: object, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise MedfmError(f"{what} must be an array of numbers, got {type(x).__name__}") from None


def _mirror_prompts(boxes: object, points: object, width: int) -> tuple[object, object]:
    """Boxes (N, 4) x0, y0, x1, y1 and points (N, P, 2) x, y on an image of ``width`` columns ->
    the same prompts on the image flipped left-right (column c -> width - 1 - c; a box's x0 and
    x1 swap, kept inside 0..width). None stays None; the checks come after."""
    if boxes is not None:
        b = _float_array(boxes, "boxes").copy()
        if b.ndim >= 1 and b.shape[-1] == 4:
            x0, x1 = b[..., 0].copy(), b[..., 2].copy()
            b[..., 0] = np.clip(width - 1 - x1, 0, width)
            b[..., 2] = np.clip(width - 1 - x0, 0, width)
        boxes = b
    if points is not None:
        p = _float_array(points, "points").copy()
        if p.ndim >= 1 and p.shape[-1] == 2:
            p[..., 0] = width - 1 - p[..., 0]
        points = p
    return boxes, points


def medsam_input(rgb: np.ndarray, size: int = 1024) -> np.ndarray:
    """(H, W, 3) uint8 -> MedSAM's encoder input (3, size, size) float32: the image stretched
    to size x size (scikit-image's cubic resize with anti-aliasing, back to uint8) and min-max
    normalised to [0, 1], as bowang-lab/MedSAM's ``MedSAM_Inference.py``. Its uint8 cast is
    made safe by clipping the cubic overshoot to 0..255 first."""
    from skimage.transform import resize

    img = resize(rgb, (size, size), order=3, preserve_range=True, anti_aliasing=True)
    img = np.clip(img, 0, 255).astype(np.uint8).astype(np.float64)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


class Segmenter:
    """A SAM-style predictor (`medfm.seg.types.Predictor`) around a segment-anything ``Sam``.

    Arguments:
        model: any model of `medfm.seg.models` (put in eval mode, moved to ``device``).
        name: the name reported by evaluation (e.g. "medfm-tiny", "vit_b").
        device: where the model runs; results are returned on the CPU.
        multimask_clicks: whether a single click should get SAM's three masks (the best-scoring
            kept; SAM's own models) or the single output (a medfm model trained so; read from
            its config.json by `from_pretrained`). Used by evaluation and volume prompting
            through `medfm.seg.types.click_multimask`; ``predict`` does what it is asked.
        mirror: test-time mirroring, as nnU-Net predicts by default: `set_image` also embeds
            the image flipped left-right, `predict` prompts both with the same (mirrored)
            prompts and averages the two probability maps (sigmoid of the logits at the image
            size, flipped back) before thresholding at 0.5. Twice the encoder and decoder work.
        coords: how prompts in image pixels reach the model's input frame. ``"sam"`` (the
            default; official SAM and MedSAM checkpoints): segment-anything's
            ``ResizeLongestSide`` (x' = x s), the same prompts as ``SamPredictor``. ``"pixel"``
            (medfm's models, trained on tight boxes of the objects at the input size, and what
            `from_pretrained` gives a medfm model folder): boxes by
            `medfm.seg.prompts.resize_boxes`, points by `medfm.seg.prompts.resize_points`, so a
            5x-enlarged slice's box still holds the whole object. The two agree when the image
            is already at the input size. ``"medsam"`` (what `from_pretrained` gives the
            ``medsam`` name): MedSAM's whole pipeline, not only its prompts (module docstring):
            stretched square input in [0, 1], x' = x S / W and y' = y S / H, probabilities
            upsampled to the image (logits are their logit).
        mask_thresholds: the logit above which a pixel is in the mask, per prompt kind:
            ``{"box": t, "point": t}`` ("box" for any prompt with a box, "point" for clicks
            alone); a kind left out gets the model's ``mask_threshold`` (0, SAM's). A medfm
            model folder's config.json may hold thresholds chosen on synthetic data by
            `medfm.seg.calibrate`, which `from_pretrained` reads.
        box_crop: keep a box-prompted mask inside its box (`box_region`): a box prompt is the
            box around its object, so the model's pixels outside it are dropped. Off in SAM (and
            for official checkpoints, so that masks stay ``SamPredictor``'s); a medfm model
            folder's config.json may turn it on (``box_crop``, chosen by `medfm.seg.calibrate`
            on synthetic data). ``predict(..., box_crop=...)`` overrides it per call (MedSAM's
            3D propagation does, see `medfm.seg.propagate.propagate_box3d`). The low-resolution
            logits of a `Prediction` (fed back as ``mask_input``) are never cropped.
    """

    prompt_types = ("box", "point")

    def __init__(
        self,
        model: Sam,
        name: str,
        device: str | torch.device = "cpu",
        *,
        multimask_clicks: bool = True,
        mirror: bool = False,
        coords: Literal["pixel", "sam", "medsam"] = "sam",
        mask_thresholds: Mapping[str, float] | None = None,
        box_crop: bool = False,
    ) -> None:
        if coords not in ("pixel", "sam", "medsam"):
            raise MedfmError(f"coords must be 'pixel', 'sam' or 'medsam', got {coords!r}")
        unknown = sorted(set(mask_thresholds or {}) - set(self.prompt_types))
        if unknown:
            raise MedfmError(
                f"mask_thresholds has keys {unknown}; the prompt kinds are {self.prompt_types}"
            )
        default = float(model.mask_threshold)
        self.mask_thresholds = {k: default for k in self.prompt_types}
        self.mask_thresholds.update({k: float(v) for k, v in (mask_thresholds or {}).items()})
        self.coords = coords
        self.device = parse_device(device)
        self.model = model.to(self.device).eval()
        self.name = name
        self.multimask_clicks = multimask_clicks
        self.mirror = bool(mirror)
        self.box_crop = bool(box_crop)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.reset_image()

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike = "medfm-tiny",
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        *,
        mirror: bool = False,
    ) -> Segmenter:
        """The bundled medfm-tiny by default; else a name of ``SEG_MODELS`` (weights from
        ``checkpoint``, see `build_model`), a medfm model folder (config.json +
        model.safetensors), or a training run's folder (its ``model/``). ``mirror``: test-time
        mirroring (see the class). A medfm model folder (the bundled medfm-tiny, a training
        run) maps prompts with ``coords="pixel"``, an official ``.pth`` (or random weights)
        with segment-anything's ``"sam"``, and the ``medsam`` name runs MedSAM's own pipeline
        (``"medsam"``)."""
        parse_device(device)  # before any weights are read
        key = str(name_or_dir)
        if key in SEG_MODELS:
            weights = weights_for(key, checkpoint)
            if weights is not None and Path(weights).name == WEIGHTS_NAME:
                if (Path(weights).parent / CONFIG_NAME).is_file():  # a medfm model folder's
                    weights = Path(weights).parent  # weights: with the folder's settings
            clicks, coords, crop = True, "medsam" if key == "medsam" else "sam", False
            thresholds: dict[str, float] = {}
            if weights is not None and (Path(weights) / CONFIG_NAME).is_file():
                config = read_model_config(weights)
                clicks, coords, crop = config.click_multimask(), "pixel", bool(config.box_crop)
                thresholds = config.thresholds()
            model = build_model(key, weights)
            return cls(
                model, key, device, multimask_clicks=clicks, mirror=mirror, coords=coords,
                mask_thresholds=thresholds, box_crop=crop,
            )  # fmt: skip
        folder = run_model_dir(name_or_dir)
        if folder.is_dir() and (folder / CONFIG_NAME).is_file():
            if checkpoint is not None:
                raise MedfmError(
                    f"{folder} is a model folder with its own weights; drop the checkpoint "
                    f"{checkpoint} or pass a model name ({', '.join(SEG_MODELS)})"
                )
            model, config = load_pretrained(folder)
            return cls(
                model, config.model, device, multimask_clicks=config.click_multimask(),
                mirror=mirror, coords="pixel", mask_thresholds=config.thresholds(),
                box_crop=bool(config.box_crop),
            )  # fmt: skip
        raise MedfmError(
            f"{key!r} is neither a model name ({', '.join(SEG_MODELS)}) nor a medfm model folder "
            "(config.json + model.safetensors)"
        )

    # ---------------------------------------------------------------------------------------
    # the image

    def reset_image(self) -> None:
        """Forget the image set by `set_image`."""
        self._embedding: torch.Tensor | None = None
        self._mirrored: torch.Tensor | None = None  # the flipped image's, with mirror
        self._input_size: tuple[int, int] | None = None
        self._original_size: tuple[int, int] | None = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def embed(
        self, image: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """image (H, W) or (H, W, 3), uint8 (other dtypes via `to_rgb_uint8`) ->
        (embedding 1xCxhxw float32 on the model's device (C=256, h=w=64 for every model of the
        zoo), input_size (h, w) after resizing the longest side (with ``coords="medsam"``
        the square input's), original_size (H, W))."""
        try:
            rgb = to_rgb_uint8(image)
        except ValueError as e:
            raise MedfmError(f"{self.name}: {e}; give an (H, W) or (H, W, 3) image") from None
        h, w = rgb.shape[:2]
        size = self.transform.target_length
        if self.coords == "medsam":  # MedSAM's stretched square input, in [0, 1]
            input_size = (size, size)
            x = torch.as_tensor(medsam_input(rgb, size), device=self.device)[None]
        else:
            input_size = self.transform.get_preprocess_shape(h, w, size)
            if min(input_size) < 1:
                raise MedfmError(
                    f"{self.name}: an image of {h} x {w} pixels is too thin to resize to {size}"
                )
            resized = self.transform.apply_image(rgb)
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
            x = self.model.preprocess(x)  # SAM's normalisation and padding
        with torch.inference_mode():
            embedding = self.model.image_encoder(x)
        return embedding.clone(), (int(input_size[0]), int(input_size[1])), (int(h), int(w))

    def set_image(self, image: np.ndarray | torch.Tensor) -> None:
        """image (H, W) or (H, W, 3) uint8: compute its embedding once for `predict` (with
        ``mirror``, the flipped image's too)."""
        self._embedding, self._input_size, self._original_size = self.embed(image)
        self._mirrored = None
        if self.mirror:
            rgb = to_rgb_uint8(image)
            self._mirrored = self.embed(np.ascontiguousarray(rgb[:, ::-1]))[0]

    # ---------------------------------------------------------------------------------------
    # prompts

    def predict(
        self,
        boxes: np.ndarray | torch.Tensor | None = None,
        points: np.ndarray | torch.Tensor | None = None,
        labels: np.ndarray | torch.Tensor | None = None,
        *,
        multimask: bool = False,
        mask_input: np.ndarray | torch.Tensor | None = None,
        box_crop: bool | None = None,
        box: np.ndarray | torch.Tensor | None = None,
        point_coords: np.ndarray | torch.Tensor | None = None,
        point_labels: np.ndarray | torch.Tensor | None = None,
        multimask_output: bool | None = None,
    ) -> Prediction:
        """N prompts on the image of `set_image` -> N masks.

        Arguments:
            boxes: (N, 4) x0, y0, x1, y1 in pixels of the image (a single (4,) box is N = 1).
            points: (N, P, 2) x, y in pixels, with labels (N, P): 1 positive, 0 negative,
                -1 padding (ignored), so prompts with fewer points can share a batch.
            multimask: ask for SAM's three masks and keep the best-scoring one per prompt.
            mask_input: (N, 1, 256, 256) or (N, 256, 256) low-resolution logits of an earlier
                prediction (``Prediction.logits``), fed back for refinement clicks.
            box_crop: keep each box-prompted mask inside its box; None: the segmenter's
                ``box_crop``.
            box: another name for ``boxes`` (``predict(box=[x0, y0, x1, y1])``).
            point_coords, point_labels, multimask_output: segment-anything's
                ``SamPredictor.predict`` keywords: clicks (P, 2) x, y with labels (P,) as ONE
                prompt (the same as ``points=point_coords[None], labels=point_labels[None]``),
                and ``multimask`` under its other name. With ``box`` (4,) they make code
                written for ``SamPredictor`` run unchanged: ``masks, scores, logits =
                predict(...)`` unpacks the `Prediction`. Unlike ``SamPredictor``, a multimask
                prompt returns the best-scoring mask only, and the outputs are torch tensors.

        Returns:
            Prediction(masks (N, H, W) bool, scores (N,) predicted IoU, logits (N, 256, 256)).
            With ``mirror``: the masks of the averaged probabilities, the mean of the two
            scores, and the logits of the unflipped image.
        """
        if box is not None:
            if boxes is not None:
                raise MedfmError(f"{self.name}: give box or boxes, not both")
            boxes = box
        if point_coords is not None or point_labels is not None:
            points, labels = self._one_prompt(point_coords, point_labels, points, labels)
        if multimask_output is not None:
            multimask = bool(multimask_output)
        if self._embedding is None:
            raise MedfmError(f"{self.name}: call set_image(image) before predict")
        if self._mirrored is None:
            return self.predict_from_embedding(
                self._embedding,
                self._input_size,
                self._original_size,
                boxes,
                points,
                labels,
                multimask=multimask,
                mask_input=mask_input,
                box_crop=box_crop,
            )
        if mask_input is not None:
            raise MedfmError(
                f"{self.name}: mask_input (refinement) is not supported with test-time mirroring"
            )
        prob, scores, low_res = self._mirrored_probs(
            boxes, points, labels, multimask, self._crop(box_crop)
        )
        masks = prob > torch.sigmoid(torch.tensor(self.threshold_for(boxes)))
        return Prediction(masks=masks, scores=scores, logits=low_res)

    def _one_prompt(
        self, point_coords: object, point_labels: object, points: object, labels: object
    ) -> tuple[np.ndarray, np.ndarray]:
        """SamPredictor's clicks (P, 2) and labels (P,) -> one prompt (1, P, 2), (1, P)."""
        if points is not None or labels is not None:
            raise MedfmError(
                f"{self.name}: give point_coords / point_labels or points / labels, not both"
            )
        if point_coords is None or point_labels is None:
            raise MedfmError(f"{self.name}: point_coords (P, 2) need point_labels (P,)")
        p = _float_array(point_coords, "point_coords")
        lab = _float_array(point_labels, "point_labels")
        if p.ndim != 2 or p.shape[1] != 2 or lab.shape != p.shape[:1]:
            raise MedfmError(
                f"{self.name}: point_coords must be (P, 2) x, y with point_labels (P,), got "
                f"{p.shape} and {lab.shape}"
            )
        return p[None], lab[None]

    def predict_logits(
        self,
        boxes: np.ndarray | torch.Tensor | None = None,
        points: np.ndarray | torch.Tensor | None = None,
        labels: np.ndarray | torch.Tensor | None = None,
        *,
        multimask: bool = False,
        box_crop: bool | None = None,
    ) -> torch.Tensor:
        """`predict`'s masks before thresholding: (N, H, W) float logits at the image size
        (``predict``'s masks are these ``> threshold_for(boxes)``; -inf outside the box with
        ``box_crop``). With ``mirror``: the logit of the two images' averaged probability (+-inf
        where it saturates)."""
        if self._embedding is None:
            raise MedfmError(f"{self.name}: call set_image(image) before predict")
        crop = self._crop(box_crop)
        if self._mirrored is not None:
            return torch.logit(self._mirrored_probs(boxes, points, labels, multimask, crop)[0])
        sizes = (self._input_size, self._original_size)
        return self._predict(
            self._embedding, *sizes, boxes, points, labels, multimask, None, threshold=None,
            crop=crop,
        )[0]  # fmt: skip

    def _crop(self, box_crop: bool | None) -> bool:
        return self.box_crop if box_crop is None else bool(box_crop)

    def threshold_for(self, boxes: object) -> float:
        """The logit threshold of a prompt: ``mask_thresholds["box"]`` when it has boxes, else
        ``mask_thresholds["point"]`` (a kind missing from it: the model's ``mask_threshold``)."""
        kind = "box" if boxes is not None else "point"
        return float(self.mask_thresholds.get(kind, self.model.mask_threshold))

    def _mirrored_probs(
        self, boxes: object, points: object, labels: object, multimask: bool, crop: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With ``mirror``: (the two orientations' averaged probabilities (N, H, W), mean scores
        (N,), the unflipped image's low-resolution logits)."""
        sizes = (self._input_size, self._original_size)
        logits, scores, low_res = self._predict(
            self._embedding, *sizes, boxes, points, labels, multimask, None, threshold=None,
            crop=crop,
        )  # fmt: skip
        m_boxes, m_points = _mirror_prompts(boxes, points, self._original_size[1])
        m_logits, m_scores, _ = self._predict(
            self._mirrored, *sizes, m_boxes, m_points, labels, multimask, None, threshold=None,
            crop=crop,
        )  # fmt: skip
        prob = (torch.sigmoid(logits) + torch.sigmoid(m_logits.flip(-1))) / 2
        return prob, (scores + m_scores) / 2, low_res

    def predict_from_embedding(
        self,
        embedding: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        boxes: np.ndarray | torch.Tensor | None = None,
        points: np.ndarray | torch.Tensor | None = None,
        labels: np.ndarray | torch.Tensor | None = None,
        *,
        multimask: bool = False,
        mask_input: np.ndarray | torch.Tensor | None = None,
        box_crop: bool | None = None,
    ) -> Prediction:
        """`predict` on an embedding from `embed` (1xCxhxw or Cxhxw, any float dtype and device,
        e.g. fp16 from a cache) with its input_size and original_size (H, W)."""
        masks, scores, low_res = self._predict(
            embedding, input_size, original_size, boxes, points, labels, multimask, mask_input,
            threshold=self.threshold_for(boxes), crop=self._crop(box_crop),
        )  # fmt: skip
        return Prediction(masks=masks, scores=scores, logits=low_res)

    def _predict(
        self,
        embedding: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        boxes: np.ndarray | torch.Tensor | None,
        points: np.ndarray | torch.Tensor | None,
        labels: np.ndarray | torch.Tensor | None,
        multimask: bool,
        mask_input: np.ndarray | torch.Tensor | None,
        *,
        threshold: float | None,
        crop: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`predict_from_embedding`'s work -> (masks (N, H, W) bool, the logits at the image
        size ``> threshold``, or with ``threshold=None`` those float logits, with ``crop`` kept
        inside each box (-inf outside); scores (N,); low-resolution logits (N, h, w)),
        ordinary CPU tensors."""
        emb = self._check_embedding(embedding)
        input_size, original_size = self._check_sizes(input_size, original_size)
        height, width = original_size
        box_t = self._check_boxes(boxes, height, width) if boxes is not None else None
        pts_t, lab_t = (None, None)
        if points is not None or labels is not None:
            pts_t, lab_t = self._check_points(points, labels, height, width)
        n_sizes = {len(t) for t in (box_t, pts_t) if t is not None}
        if len(n_sizes) > 1:
            raise MedfmError(
                f"{self.name}: {len(box_t)} boxes but {len(pts_t)} point prompts; "
                "give one box per point prompt (N matching)"
            )
        mask_t = None
        if mask_input is not None:
            mask_t = self._check_mask_input(mask_input, n_sizes)
            n_sizes.add(len(mask_t))
        if not n_sizes:
            raise MedfmError(f"{self.name}: give boxes (N, 4) or points (N, P, 2) with labels")
        n = n_sizes.pop()
        if n == 0:
            return (
                torch.zeros(
                    (0, height, width), dtype=torch.float if threshold is None else torch.bool
                ),
                torch.zeros(0),
                torch.zeros((0, *self.model.prompt_encoder.mask_input_size)),
            )
        region = box_region(box_t, height, width) if crop and box_t is not None else None
        box_t, pts_t = self._to_input_frame(box_t, pts_t, input_size, original_size)
        masks, scores, logits = [], [], []
        for start in range(0, n, _CHUNK):
            part = slice(start, start + _CHUNK)
            out = self._decode(
                emb,
                input_size,
                original_size,
                None if box_t is None else box_t[part],
                None if pts_t is None else (pts_t[part], lab_t[part]),
                None if mask_t is None else mask_t[part],
                multimask,
                threshold,
            )
            for acc, t in zip((masks, scores, logits), out, strict=True):
                acc.append(t)
        # torch.cat outside inference mode: ordinary tensors the caller may modify
        out_masks = torch.cat(masks)
        if region is not None:
            out_masks = (
                out_masks & region
                if threshold is not None
                else out_masks.masked_fill(~region, float("-inf"))
            )
        return out_masks.clone(), torch.cat(scores).clone(), torch.cat(logits).clone()

    def _to_input_frame(
        self,
        boxes: np.ndarray | None,
        points: np.ndarray | None,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Checked prompts in image pixels -> the model's input frame (see ``coords``)."""
        if self.coords == "medsam":  # MedSAM: box / [W, H, W, H] * 1024
            (ih, iw), (oh, ow) = input_size, original_size
            if boxes is not None:
                boxes = boxes * np.array([iw / ow, ih / oh, iw / ow, ih / oh])
            if points is not None:
                points = points * np.array([iw / ow, ih / oh])
            return boxes, points
        if self.coords == "sam":
            if boxes is not None:
                boxes = self.transform.apply_boxes(boxes, original_size)
            if points is not None:
                points = self.transform.apply_coords(points, original_size)
            return boxes, points
        (ih, iw), (oh, ow) = input_size, original_size
        sx, sy = iw / ow, ih / oh
        if boxes is not None:  # a box to the image's right / bottom edge stays on the image
            boxes = resize_boxes(boxes, sx, sy)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, iw - 1)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, ih - 1)
        if points is not None:
            points = resize_points(points, sx, sy)
        return boxes, points

    @torch.inference_mode()
    def _decode(
        self,
        embedding: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        boxes: np.ndarray | None,
        points: tuple[np.ndarray, np.ndarray] | None,
        mask_input: torch.Tensor | None,
        multimask: bool,
        threshold: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts already in the input frame -> masks (n, H, W) bool (the logits at the image
        size ``> threshold``, on the device; with ``threshold=None`` those float logits),
        scores (n,), low-resolution logits (n, h, w), on the CPU."""
        model, device = self.model, self.device
        box_t = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float, device=device)
        pts = None
        if points is not None:
            pts = (
                torch.as_tensor(points[0], dtype=torch.float, device=device),
                torch.as_tensor(points[1], dtype=torch.int, device=device),
            )
        if mask_input is not None:
            mask_input = mask_input.to(device, torch.float)
        sparse, dense = model.prompt_encoder(points=pts, boxes=box_t, masks=mask_input)
        out = slice(1, None) if multimask else slice(0, 1)  # as MaskDecoder.forward picks
        low_res, iou = decode_rows(
            model.mask_decoder, embedding + dense, model.prompt_encoder.get_dense_pe(), sparse, out
        )  # (n, 1 or 3, h, w), (n, 1 or 3)
        best = iou.argmax(dim=1)
        rows = torch.arange(len(iou), device=iou.device)
        low_res, iou = low_res[rows, best][:, None], iou[rows, best]
        if self.coords == "medsam":  # the probabilities upsampled straight to the image
            prob = F.interpolate(
                torch.sigmoid(low_res.float()), original_size, mode="bilinear", align_corners=False
            )[:, 0]
            up = torch.logit(prob) if threshold is None else prob > torch.sigmoid(
                torch.tensor(float(threshold))
            )  # fmt: skip
            return up.cpu(), iou.float().cpu(), low_res[:, 0].cpu()
        up = model.postprocess_masks(low_res, input_size, original_size)
        up = up[:, 0].float() if threshold is None else up[:, 0] > threshold
        return up.cpu(), iou.float().cpu(), low_res[:, 0].cpu()

    # ---------------------------------------------------------------------------------------
    # checks

    def _check_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        want = (pe.embed_dim, *pe.image_embedding_size)
        emb = torch.as_tensor(embedding)
        if emb.ndim == 3:
            emb = emb[None]
        if emb.ndim != 4 or emb.shape[0] != 1 or tuple(emb.shape[1:]) != want:
            raise MedfmError(
                f"{self.name}: the embedding has shape {tuple(emb.shape)}, expected "
                f"(1, {', '.join(map(str, want))}); was it computed by this model?"
            )
        return emb.to(self.device, torch.float32)

    def _check_sizes(
        self, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            ih, iw = (int(v) for v in input_size)
            oh, ow = (int(v) for v in original_size)
        except (TypeError, ValueError):
            raise MedfmError(
                f"{self.name}: input_size and original_size must be (H, W) pairs, got "
                f"{input_size!r} and {original_size!r}"
            ) from None
        size = self.transform.target_length
        want = (size, size) if self.coords == "medsam" else None
        if (want or self.transform.get_preprocess_shape(oh, ow, size)) != (ih, iw):
            raise MedfmError(
                f"{self.name}: input_size {(ih, iw)} is not original_size {(oh, ow)} resized to "
                f"{size}; pass the sizes returned by embed()"
            )
        return (ih, iw), (oh, ow)

    def _check_boxes(self, boxes: object, height: int, width: int) -> np.ndarray:
        return check_boxes(_float_array(boxes, "boxes"), height, width, who=self.name)

    def _check_points(
        self, points: object, labels: object, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if points is None or labels is None:
            raise MedfmError(f"{self.name}: points (N, P, 2) need labels (N, P), and vice versa")
        p = _float_array(points, "points")
        lab = _float_array(labels, "labels")
        if p.ndim != 3 or p.shape[2] != 2 or lab.shape != p.shape[:2]:
            raise MedfmError(
                f"{self.name}: points must be (N, P, 2) x, y with labels (N, P), got "
                f"{p.shape} and {lab.shape}"
            )
        if not np.isin(lab, (-1, 0, 1)).all():
            raise MedfmError(
                f"{self.name}: point labels must be 1 (positive), 0 (negative) or -1 (padding)"
            )
        real = lab != -1
        xy = p[real]
        if not np.isfinite(xy).all():
            raise MedfmError(f"{self.name}: points contain NaN or inf")
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
        if not inside.all():
            bad = xy[np.flatnonzero(~inside)[0]].tolist()
            raise MedfmError(
                f"{self.name}: point {bad} lies outside the {width} x {height} (W x H) image; "
                f"points are x, y pixels with 0 <= x < {width} and 0 <= y < {height}"
            )
        p = np.where(real[..., None], p, 0.0)  # padding points: coordinates ignored
        return p, lab.astype(np.int64)

    def _check_mask_input(self, mask_input: object, n_sizes: set[int]) -> torch.Tensor:
        if isinstance(mask_input, torch.Tensor):
            m = mask_input.detach().float()
        else:
            m = torch.as_tensor(_float_array(mask_input, "mask_input"), dtype=torch.float)
        want = tuple(self.model.prompt_encoder.mask_input_size)
        if m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[2:]) != want:
            raise MedfmError(
                f"{self.name}: mask_input must be (N, 1, {want[0]}, {want[1]}) low-resolution "
                f"logits (Prediction.logits), got {tuple(m.shape)}"
            )
        if n_sizes and len(m) not in n_sizes:
            raise MedfmError(
                f"{self.name}: {len(m)} mask inputs for {n_sizes.pop()} prompts; give one each"
            )
        return m
