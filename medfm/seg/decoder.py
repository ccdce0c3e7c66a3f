"""segment-anything's mask decoder run on many prompts at once, with less arithmetic.

Training (`medfm.seg.train.decode`) and prediction (`medfm.seg.predict.Segmenter`) both decode
through `decode_rows`: SAM's ``MaskDecoder.predict_masks`` with one image embedding per prompt,
its two-way transformer run by `two_way_transformer` and the mask outputs computed by
`upscaled_masks`, both from SAM's own weights. `sam_mask_decoder` builds the decoder itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer


def sam_mask_decoder(dim: int = 256) -> MaskDecoder:
    """segment-anything's mask decoder as ``_build_sam`` makes it (three multimask outputs, a
    two-layer two-way transformer), on ``dim``-channel embeddings; random weights."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def decode_rows(
    decoder,
    src: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    outputs: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``MaskDecoder.predict_masks`` with one image embedding per prompt.

    src (N, C, h, w) is each prompt's image embedding plus its dense prompt embedding (where
    ``predict_masks`` repeats one image's embedding N times); sparse (N, T, C). Returns the
    mask outputs ``outputs`` of SAM's 1 + num_multimask_outputs, (N, K, 4h, 4w), and their IoU
    predictions (N, K). The masks come from `upscaled_masks`.
    """
    n, c, h, w = src.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    # channels-last: the transformer's flatten(2).permute(0, 2, 1) then gives contiguous
    # (N, h*w, C) tokens, where the default layout made every projection copy them first
    src = src.contiguous(memory_format=torch.channels_last)
    pe = image_pe.contiguous(memory_format=torch.channels_last)
    hs, src = two_way_transformer(decoder.transformer, src, pe.expand(n, -1, -1, -1), tokens)
    index = range(decoder.num_mask_tokens)[outputs]
    mlps = decoder.output_hypernetworks_mlps
    hyper_in = torch.stack([mlps[i](hs[:, 1 + i, :]) for i in index], dim=1)
    masks = upscaled_masks(decoder.output_upscaling, src, hyper_in, (h, w))
    return masks, decoder.iou_prediction_head(hs[:, 0, :])[:, outputs]


def upscaled_masks(
    upscaling: torch.nn.Sequential,
    src: torch.Tensor,
    hyper_in: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """SAM's mask outputs ``hyper_in @ output_upscaling(src)``, (N, K, 4h, 4w), from the
    transformer's image tokens src (N, h*w, C) and the hypernetwork outputs hyper_in (N, K, C/8).

    SAM's ``output_upscaling`` (ConvTranspose2d k2 s2, LayerNorm2d, activation,
    ConvTranspose2d k2 s2, activation) maps each token to a 4x4 block of pixels on its own, so
    it is computed here token by token, in the tokens' channels-last layout: each transposed
    convolution is one matrix product to its four sub-pixels' channels, the LayerNorm2d a
    layer norm over the last axis, and the 4x4 blocks are laid out as an image only in the
    K-channel masks, not in the (N, C/8, 4h, 4w) features. Same values and gradients as the
    modules (float rounding; tested), and faster on the CPU, where the modules' channels-last
    GELU backward and large layout copies dominated the decoder (docs/benchmarks.md).
    """
    ct1, norm, act1, ct2, act2 = upscaling
    n, hw, c = src.shape
    h, w = size
    o1, o2 = ct1.out_channels, ct2.out_channels
    # (C, o, a, b) -> (4 * o, C): output channel o of sub-pixel (a, b) at row (a * 2 + b) * o + o
    w1 = ct1.weight.permute(2, 3, 1, 0).reshape(4 * o1, c)
    y = F.linear(src, w1, ct1.bias.repeat(4)).view(n, hw, 4, o1)
    y = act1(F.layer_norm(y, (o1,), norm.weight, norm.bias, norm.eps))
    w2 = ct2.weight.permute(2, 3, 1, 0).reshape(4 * o2, o1)
    y = act2(F.linear(y, w2, ct2.bias.repeat(4)))  # (N, hw, a1 b1, a2 b2 o2)
    m = torch.bmm(y.view(n, hw * 16, o2), hyper_in.transpose(1, 2))  # (N, hw * 16, K)
    # pixel (4 i + 2 a1 + a2, 4 j + 2 b1 + b2) of token (i, j)
    m = m.view(n, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return m.reshape(n, -1, 4 * h, 4 * w)


def two_way_transformer(
    transformer,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    point_embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``TwoWayTransformer.forward`` (same arguments and results), with its
    cross-attentions between the T prompt tokens and the N = h*w image tokens computed by
    `tokens_to_image` and `image_to_tokens`."""
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + point_embedding
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        k = keys + key_pe
        attn = tokens_to_image(layer.cross_attn_token_to_image, queries + point_embedding, k, keys)
        queries = layer.norm2(queries + attn)
        queries = layer.norm3(queries + layer.mlp(queries))
        attn = image_to_tokens(
            layer.cross_attn_image_to_token, k, queries + point_embedding, queries
        )
        keys = layer.norm4(keys + attn)
    q = queries + point_embedding
    attn = tokens_to_image(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn), keys


def _heads(attn) -> tuple[int, int]:
    return attn.num_heads, attn.internal_dim // attn.num_heads


def tokens_to_image(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention`` (``attn``) of T tokens q (B, T, C) to N image tokens
    k, v (B, N, C), without projecting the N image tokens.

    Per head, q_h k_proj_h(k)^T = (q_h W_k,h) k^T + q_h b_k,h, and the last term is the same
    for every key, which the softmax ignores; and softmax(.) v_proj_h(v) = (softmax(.) v)
    W_v,h^T + b_v,h, as each row of the softmax sums to 1. So the image tokens meet the
    weights only in products with the H*T rows of the heads' queries: ~2 N C H T
    multiply-adds instead of the ~2 N C D of projecting them to the internal width D (C = 256,
    D = 128, H = 8 in SAM: fewer for T < 16, which holds for every prompt medfm draws or
    evaluates: 5 output tokens, a box's 2 corners or the clicks plus a padding point). For
    more tokens, the module itself. The key projection's bias is left out, so no gradient
    reaches it (in exact arithmetic the module gives it none either).
    """
    b, t, c = q.shape
    heads, ch = _heads(attn)
    if heads * t >= attn.internal_dim:
        return attn(q=q, k=k, v=v)
    qh = attn.q_proj(q).view(b, t, heads, ch).transpose(1, 2)  # (B, H, T, ch)
    a = (qh @ attn.k_proj.weight.view(heads, ch, c)) / math.sqrt(ch)  # (B, H, T, C)
    scores = a.reshape(b, heads * t, c) @ k.transpose(1, 2)  # (B, H T, N)
    pv = torch.softmax(scores, dim=-1) @ v  # (B, H T, C)
    out = pv.view(b, heads, t, c) @ attn.v_proj.weight.view(heads, ch, c).transpose(1, 2)
    out = out + attn.v_proj.bias.view(heads, 1, ch)  # (B, H, T, ch)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, heads * ch))


def image_to_tokens(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention`` (``attn``) of N image tokens q (B, N, C) to T tokens
    k, v (B, T, C), without projecting the N image tokens in or out.

    Per head, q_proj_h(q) k_h^T = q (W_q,h^T k_h^T) + b_q,h k_h^T, and out_proj of the heads'
    outputs is the sum over heads of softmax_h (v_h W_o,h^T) + b_o. So the image tokens take
    two products with H*T columns, as in `tokens_to_image` (else the module itself).
    """
    (b, n, c), t = q.shape, k.shape[1]
    heads, ch = _heads(attn)
    if heads * t >= attn.internal_dim:
        return attn(q=q, k=k, v=v)
    kh = attn.k_proj(k).view(b, t, heads, ch).transpose(1, 2)  # (B, H, T, ch)
    vh = attn.v_proj(v).view(b, t, heads, ch).transpose(1, 2)
    wq = attn.q_proj.weight.view(heads, ch, c)
    m = (wq.transpose(1, 2) @ kh.transpose(2, 3)) / math.sqrt(ch)  # (B, H, C, T)
    bias = (attn.q_proj.bias.view(heads, 1, ch) @ kh.transpose(2, 3)) / math.sqrt(ch)
    scores = q @ m.permute(0, 2, 1, 3).reshape(b, c, heads * t)  # (B, N, H T)
    scores = scores.view(b, n, heads, t) + bias.view(b, 1, heads, t)
    p = torch.softmax(scores, dim=-1).view(b, n, heads * t)
    wo = attn.out_proj.weight.view(c, heads, ch).permute(1, 2, 0)  # (H, ch, C)
    return torch.baddbmm(attn.out_proj.bias, p, (vh @ wo).reshape(b, heads * t, c))
