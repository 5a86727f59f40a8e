"""ALBEF's image encoder: timm's VisionTransformer (same parameter names), full token sequence out."""
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import VisionTransformer as _TimmViT
from torch import nn

from schema import value


class VisionTransformer(_TimmViT):
    """Pre-LN ViT returning ``[B, 1 + N, D]`` (CLS first, final norm applied, no pooling or head).

    ``forward(x, register_blk=i)`` runs block ``i`` with eager attention and keeps its probabilities
    (``blocks[i].attn.attention_map``) and their gradient (``attn_gradients``) for Grad-CAM.
    ``extra_tokens`` [B, L, D] are appended after the positional embedding (ViCHA's visual concepts);
    ``extra_mask`` [B, L] (1 = keep) hides their padding from every block's attention.
    """

    def __init__(self, img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, grad_checkpointing=False):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=0, global_pool="",
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.grad_checkpointing = grad_checkpointing
        # ALBEF's init (timm starts cls_token at std 1e-6); matters only when training from scratch
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for blk in self.blocks:
            blk.attn.attention_map = None
            blk.attn.attn_gradients = None

    @property
    def num_patches(self):
        return self.patch_embed.num_patches

    def _eager_block(self, blk, x, mask=None, keep=True):
        """Same math as the block, with a boolean key mask [B, 1, 1, N] (True = attend), and with ``keep`` the explicit
        attention probabilities kept for Grad-CAM (timm's own Block takes no mask before timm 1.0.16)."""
        attn = blk.attn
        b, n, c = x.shape
        h = blk.norm1(x)
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if keep:
            scores = (q * attn.scale) @ k.transpose(-2, -1)
            probs = (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(dim=-1)
            attn.attention_map = probs
            if probs.requires_grad:
                probs.register_hook(lambda g: setattr(attn, "attn_gradients", g))
            y = attn.attn_drop(probs) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=attn.attn_drop.p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, n, c)
        y = attn.proj_drop(attn.proj(attn.norm(y)))
        x = x + blk.drop_path1(blk.ls1(y))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def forward(self, x, register_blk=-1, return_hidden=False, extra_tokens=None, extra_mask=None):
        if x.dtype == torch.uint8:
            raise TypeError("the ViT got uint8 images: the training datasets give uint8 with config key "
                            "'uint8_images' (the engine normalises them on the device); outside the engine call "
                            "dataset.transforms.normalize_uint8 first")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(self.pos_drop(x + self.pos_embed[:, :x.shape[1]]))
        mask = None
        if extra_tokens is not None:   # no positional embedding: ViCHA's concepts are a set
            n_img = x.shape[1]
            x = torch.cat([x, extra_tokens.to(x.dtype)], dim=1)
            if extra_mask is not None:
                keep = torch.cat([extra_mask.new_ones(x.shape[0], n_img), extra_mask], dim=1).bool()
                mask = keep[:, None, None, :]
        hidden = []
        for i, blk in enumerate(self.blocks):
            if i == register_blk or mask is not None:
                fn = lambda t, b=blk, k=(i == register_blk): self._eager_block(b, t, mask, keep=k)   # noqa: E731
            else:
                fn = blk
            if self.grad_checkpointing and self.training and i != register_blk:
                x = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
            else:
                x = fn(x)
            if return_hidden:
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden else x


def build_vit(config, image_res=None):
    """ViT from an ALBEF-style config dict (size keys default to ViT-B/16)."""
    return VisionTransformer(
        img_size=image_res or value(config, "image_res"),
        patch_size=value(config, "patch_size"),
        embed_dim=value(config, "vision_width"),
        depth=value(config, "vision_depth"),
        num_heads=value(config, "vision_heads"),
        mlp_ratio=value(config, "mlp_ratio"),
        grad_checkpointing=bool(value(config, "grad_checkpointing")),
    )


def interpolate_pos_embed(pos_embed_checkpoint, visual_encoder):
    """Resize a checkpoint's ``pos_embed`` to the encoder's grid (bicubic, CLS row untouched)."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return pos_embed_checkpoint
    if orig_size * orig_size != pos_embed_checkpoint.shape[-2] - num_extra:
        raise ValueError(f"pos_embed of length {pos_embed_checkpoint.shape[-2]} is not a square grid plus "
                         f"{num_extra} extra token(s)")
    extra = pos_embed_checkpoint[:, :num_extra]
    grid = pos_embed_checkpoint[:, num_extra:].reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    dtype = grid.dtype
    grid = F.interpolate(grid.float(), size=(new_size, new_size), mode="bicubic", align_corners=False).to(dtype)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, grid), dim=1)
