import torch
import torch.nn.functional as F

from models.vit import VisionTransformer, interpolate_pos_embed


def vit(res=32, **kw):
    torch.manual_seed(0)
    return VisionTransformer(img_size=res, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw).eval()


def test_output_is_full_token_sequence_with_cls_first():
    v = vit()
    out = v(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 32)
    assert set(v.state_dict()) >= {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.bias",
                                   "blocks.1.mlp.fc2.weight", "norm.weight"}
    assert not any(k.startswith("head") for k in v.state_dict())


def test_matches_timm_forward_features():
    v = vit()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(v(x), v.forward_features(x), atol=1e-6)


def test_interpolate_pos_embed_keeps_cls_and_resizes_bicubic():
    small, big = vit(32), vit(48)   # 4x4 -> 6x6 grid
    pe = small.pos_embed.detach()
    same = interpolate_pos_embed(pe, small)
    assert same is pe
    new = interpolate_pos_embed(pe, big)
    assert new.shape == big.pos_embed.shape
    assert torch.equal(new[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    assert torch.allclose(new[:, 1:], ref)


def test_register_block_returns_attention_with_same_output_and_gradient():
    v = vit()
    x = torch.randn(2, 3, 32, 32)
    plain = v(x)
    out = v(x, register_blk=1)
    assert torch.allclose(plain, out, atol=1e-5)
    attn = v.blocks[1].attn
    assert attn.attention_map.shape == (2, 2, 17, 17)
    assert torch.allclose(attn.attention_map.sum(-1), torch.ones(2, 2, 17), atol=1e-6)
    out[:, 0].sum().backward()
    assert attn.attn_gradients.shape == attn.attention_map.shape


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    a, b = vit(), vit(grad_checkpointing=True)
    a.train(), b.train()
    x = torch.randn(2, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5)
