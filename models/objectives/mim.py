"""ViCHA's unimodal masked image modelling (spec vicha_finegrained.md §1.6): an MAE branch on the online ViT.

The modules sit on the model itself under ViCHA's key names (``decoder_embed``, ``decoder_pos_embed``,
``decoder_blocks``, ``decoder_norm``, ``mae_proj``, ``mask_token``) so its checkpoints load by name.
"""
from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from models.objectives.step import Objective
from schema import value


def sincos_pos_embed(dim, grid, cls_token=True):
    """Fixed 2D sine-cosine positions [1 + grid*grid, dim] (MAE's), the CLS row zero."""
    if dim % 4:
        raise ValueError(f"vision_width {dim} must be a multiple of 4 for the sin-cos decoder positions")
    # patch k = row * grid + col; MAE's table encodes the column in the first half, the row in the second
    col, row = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="xy")

    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(col, dim // 2), one_axis(row, dim // 2)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def enabled(config):
    return bool(value(config, "mae"))


def build_mim(model, config):
    """Add the decoder to ``model`` (ViCHA's unimodal MIM, ``mae: true``)."""
    if not value(config, "unimodal_mae"):
        raise ValueError("config key 'unimodal_mae': only ViCHA's unimodal MIM (the path its configs use) is built")
    vit = model.visual_encoder
    dim, patch = vit.pos_embed.shape[-1], vit.patch_embed.patch_size[0]
    heads = int(value(config, "mim_decoder_heads"))
    if dim % heads:
        raise ValueError(f"config key 'mim_decoder_heads' ({heads}) must divide vision_width ({dim})")
    grid = int(vit.patch_embed.num_patches ** 0.5)
    model.mask_ratio = float(value(config, "mask_ratio"))
    model.mae_lambda = float(value(config, "mae_lambda"))
    model.decoder_embed = nn.Linear(dim, dim)
    model.mask_token = nn.Parameter(torch.zeros(1, 1, dim))   # ViCHA's final init: zeros
    model.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dim, grid)[None], requires_grad=False)
    model.decoder_blocks = nn.ModuleList(
        Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for _ in range(2))
    model.decoder_norm = nn.LayerNorm(dim)
    model.mae_proj = nn.Linear(dim, patch * patch * 3)


def patchify(images, patch):
    """[B, 3, H, W] -> [B, N, patch*patch*3], each patch ordered (row in patch, column in patch, channel)."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, patch * patch * c)


def random_masking(x, ratio, generator=None):
    """MAE's per-sample masking of [B, N, D] tokens: (kept tokens, mask with 1 = removed, ids_restore)."""
    b, n, d = x.shape
    keep = int(n * (1 - ratio))
    noise = torch.rand(b, n, device=x.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def mim_loss_from(pred, images, mask, patch):
    """Per-patch-normalised pixel MSE over the removed patches."""
    target = patchify(images.float(), patch)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


def mim_loss(model, images, generator=None):
    vit = model.visual_encoder
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x, mask, ids_restore = random_masking(x, model.mask_ratio, generator)
    # ViCHA prepends the raw CLS token, without its position embedding
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    for blk in vit.blocks:
        x = blk(x)
    x = model.decoder_embed(vit.norm(x))
    n = ids_restore.shape[1]
    masked = model.mask_token.expand(x.shape[0], n + 1 - x.shape[1], -1)
    y = torch.cat([x[:, 1:], masked], dim=1)
    y = torch.gather(y, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2]))
    y = torch.cat([x[:, :1], y], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        y = blk(y)
    pred = model.mae_proj(model.decoder_norm(y))[:, 1:]
    return model.mae_lambda * mim_loss_from(pred, images, mask, vit.patch_embed.patch_size[0])


class MIM(Objective):
    """``loss_mae``: a second pass of the online ViT over a masked copy of the image, without concepts."""

    def attach(self, model, config):
        build_mim(model, config)

    def __call__(self, model, s):
        return {"loss_mae": mim_loss(model, s.image)}
