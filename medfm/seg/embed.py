"""A SAM model's image encoder as the embedding cache uses it: the id that keys its entries
(`encoder_id`) and the batch encoder (`encode_images`), for ``medfm seg embed`` and training
alike, so that both write the same entries."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from segment_anything.modeling import Sam

__all__ = ["embedding_shape", "encode_images", "encoder_id", "preprocess_images"]


def encoder_id(model: Sam, name: str) -> str:
    """The cache's model id of ``model`` called ``name``: ``NAME:INPUT_SIZE:HASH``, HASH a
    sha256 of what makes its embeddings (the image encoder's weights, SAM's pixel mean and
    std), so that new weights at the same path never reuse old embeddings, while a change of
    the prompt encoder or mask decoder keeps them."""
    h = hashlib.sha256()
    encoder = model.image_encoder.state_dict()
    norm = {"pixel_mean": model.pixel_mean, "pixel_std": model.pixel_std}
    for key, t in [*sorted(encoder.items()), *norm.items()]:
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{name}:{int(model.image_encoder.img_size)}:{h.hexdigest()[:16]}"


def embedding_shape(model: Sam) -> tuple[int, int, int]:
    """(C, h, w) of one image's embedding by ``model``'s encoder (SAM's 256 x 64 x 64)."""
    pe = model.prompt_encoder
    return (int(pe.embed_dim), *(int(v) for v in pe.image_embedding_size))


def preprocess_images(model: Sam, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """B uint8 images (H, W, 3) -> (B, 3, S, S) float on ``device``, S the encoder's input size:
    SAM's resize (longest side to S), normalisation and padding. An image whose longest side
    is already S is not resized (PIL's resize to the same size is a copy); images of one shape
    go to the device together."""
    from segment_anything.utils.transforms import ResizeLongestSide

    size = int(model.image_encoder.img_size)
    t = ResizeLongestSide(size)
    resized = [im if max(im.shape[:2]) == size else t.apply_image(im) for im in images]
    if len({im.shape for im in resized}) == 1:
        x = torch.from_numpy(np.stack(resized)).to(device).permute(0, 3, 1, 2)
        return model.preprocess(x.float())
    batch = []
    for im in resized:
        x = torch.as_tensor(im, device=device).permute(2, 0, 1).float()
        batch.append(model.preprocess(x[None])[0])
    return torch.stack(batch)


def encode_images(model: Sam, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """B uint8 images (H, W, 3) -> their embeddings (B, C, h, w) by ``model``'s image encoder
    (``model`` on ``device``)."""
    return model.image_encoder(preprocess_images(model, images, device))
