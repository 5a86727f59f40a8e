"""ViCHA's masked image modelling: patch order, masking, decoder shapes and the loss on hand-made patches."""
import pytest
import torch

from models.batch import as_batch
from conftest import tiny_config, tiny_text
from models import MODELS
from models.objectives.mim import mim_loss, mim_loss_from, patchify, random_masking, sincos_pos_embed


def test_patchify_orders_row_column_channel():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 = rows 0-1, columns 2-3; element order (row, column, channel)
    expect = [img[0, c, r, 2 + q].item() for r in range(2) for q in range(2) for c in range(3)]
    assert p[0, 1].tolist() == expect


def test_masking_keeps_a_quarter_and_restores_the_order():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 16, dtype=torch.float).view(2, 16, 1).expand(2, 16, 3).contiguous()
    kept, mask, ids_restore = random_masking(x, 0.75, generator=g)
    assert kept.shape == (2, 4, 3) and mask.sum(1).tolist() == [12, 12]
    for b in range(2):   # the kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].long().tolist()) == sorted((torch.nonzero(mask[b] == 0).flatten() + 16 * b).tolist())
    full = torch.cat([kept, torch.full((2, 12, 3), -1.0)], dim=1)
    restored = torch.gather(full, 1, ids_restore[:, :, None].expand(-1, -1, 3))
    assert torch.equal(restored[mask == 0], x[mask == 0])


def test_loss_on_hand_made_patches_counts_only_masked_ones():
    img = torch.zeros(1, 3, 4, 4)
    img[0, :, :2, :2] = torch.arange(12.0).view(3, 2, 2)   # patch 0 non-constant, the others flat
    target = patchify(img, 2)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert mim_loss_from(norm, img, mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    zeros = torch.zeros_like(norm)
    expect = ((norm[0, 0] ** 2).mean() + (norm[0, 3] ** 2).mean()) / 2
    assert mim_loss_from(zeros, img, mask, 2).item() == pytest.approx(expect.item(), rel=1e-5)
    # unbiased variance, as in MAE / ViCHA: a normalised non-flat patch has mean square (n - 1) / n
    assert (norm[0, 0] ** 2).mean().item() == pytest.approx(11 / 12, rel=1e-4)


def test_decoder_shapes_positions_and_training():
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config(mae=True, mim_decoder_heads=4, mask_ratio=0.75))
    grid = 32 // 8
    assert m.decoder_pos_embed.shape == (1, 1 + grid * grid, 32) and not m.decoder_pos_embed.requires_grad
    assert m.decoder_pos_embed[0, 0].abs().sum() == 0 and torch.equal(m.mask_token, torch.zeros(1, 1, 32))
    assert torch.allclose(m.decoder_pos_embed[0], sincos_pos_embed(32, grid))
    assert m.mae_proj.out_features == 8 * 8 * 3
    # ViCHA's decoder: 2 ViT blocks with qkv bias (its checkpoints' decoder_blocks.{0,1}.attn.qkv.bias)
    assert len(m.decoder_blocks) == 2 and m.decoder_blocks[1].attn.qkv.bias is not None
    seen = []
    hook = m.visual_encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    loss = mim_loss(m, torch.randn(2, 3, 32, 32))
    hook.remove()
    # the encoder sees ViCHA's raw CLS token (no position embedding) and the 16 * 0.25 = 4 kept patches
    assert seen[0].shape == (2, 1 + 4, 32) and torch.equal(seen[0][:, 0], m.visual_encoder.cls_token[0].expand(2, -1))
    loss.backward()
    import models.objectives.mim as mim_module
    parts = []
    real = mim_module.mim_loss_from
    mim_module.mim_loss_from = lambda *a: parts.append(real(*a)) or parts[-1]
    try:
        m.mae_lambda = 0.25   # ViCHA's mae_lambda scales the reconstruction loss
        scaled = mim_loss(m, torch.randn(2, 3, 32, 32))
    finally:
        mim_module.mim_loss_from = real
        m.mae_lambda = 1.0
    assert scaled.item() == pytest.approx(0.25 * parts[0].item(), rel=1e-6)
    assert torch.isfinite(loss) and m.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    out = m(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4)), alpha=0.4)
    assert torch.isfinite(out["loss_mae"])
    with pytest.raises(ValueError, match="unimodal_mae"):
        MODELS["pretrain"](tiny_config(mae=True, unimodal_mae=False, mim_decoder_heads=4))
    assert not hasattr(MODELS["pretrain"](tiny_config()), "decoder_embed")   # off by default
