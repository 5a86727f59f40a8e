"""ViCHA's hierarchical alignment (H-ITC): levels, the rank-offset targets over 2 gloo ranks, config errors."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.batch import as_batch
from models.objectives.hitc import hidden_itc
from conftest import tiny_config, tiny_text
from models import MODELS
from models.objectives import functional as objectives


def _rank_loss(rank, world, init_file, v, t, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = v.shape[0] // world
        loss = objectives.hidden_itc_loss(v[rank * b:(rank + 1) * b], t[rank * b:(rank + 1) * b], torch.tensor(0.07))
        out[rank] = loss.item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process_over_the_gathered_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    t = F.normalize(v + 0.3 * torch.randn(6, 8, generator=g), dim=1)
    out = mp.Manager().dict()
    mp.spawn(_rank_loss, args=(2, str(tmp_path / "init"), v, t, out), nprocs=2, join=True)
    single = objectives.hidden_itc_loss(v, t, torch.tensor(0.07))   # 1 process: all 6 rows, positives on the diagonal
    assert abs((out[0] + out[1]) / 2 - single.item()) < 1e-5
    # ViCHA's targets (column i on every rank) give a different, wrong loss on rank 1
    wrong = (F.cross_entropy(v[3:] @ t.t() / 0.07, torch.arange(3)) + F.cross_entropy(t[3:] @ v.t() / 0.07, torch.arange(3))) / 2
    assert abs(out[1] - wrong.item()) > 1e-2


def infonce_by_hand(v, t, temp):
    """Symmetric InfoNCE with the diagonal as positives, by plain loops."""
    import math
    b = len(v)

    def ce(row, k):
        z = max(row)
        return -(row[k] - z - math.log(sum(math.exp(x - z) for x in row)))
    sim = [[float(v[i] @ t[j]) / temp for j in range(b)] for i in range(b)]
    i2t = sum(ce(sim[i], i) for i in range(b)) / b
    t2i = sum(ce([sim[j][i] for j in range(b)], i) for i in range(b)) / b
    return (i2t + t2i) / 2


def test_levels_pair_the_blocks_and_layers_before_the_last():
    torch.manual_seed(0)
    cfg = tiny_config(vision_depth=4, return_hidden_state=True, num_hidden_align=2, ita_hidden_weight=0.1,
                      ita_hidden_weights=[1.0, 0.5])
    cfg["bert_config"].update(num_hidden_layers=5, fusion_layer=3)
    m = MODELS["pretrain"](cfg).eval()
    image, text = torch.randn(3, 3, 32, 32), tiny_text(3, pad_first=False)
    with torch.no_grad():
        _, _, vis = m.encode_image(image, hidden=True)
        _, _, txt = m.encode_text(text["input_ids"], text["attention_mask"], hidden=True)
        assert len(vis) == 4 and len(txt) == 3   # every ViT block; the 3 text-mode layers
        got = hidden_itc(m, vis, txt)
        expect = 0.0
        for level, (vb, tl, w) in enumerate(((1, 0, 1.0), (2, 1, 0.5))):   # blocks 2-3 with text layers 1-2 (1-based)
            v = F.normalize(m.vision_proj_hidden[level](vis[vb][:, 0]), dim=-1)
            t = F.normalize(m.text_proj_hidden[level](txt[tl][:, 0]), dim=-1)
            expect += w * infonce_by_hand(v, t, m.temp.item())
        assert got.item() == pytest.approx(0.1 * expect, abs=1e-5)
        # the final block / layer is ordinary ITC: the hidden list ends with the encoders' outputs
        assert torch.allclose(vis[-1], m.visual_encoder(image), atol=1e-6)
    out = m(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4)), alpha=0.4)   # queue 16: batch 4
    assert torch.isfinite(out["loss_ita"])
    out["loss_ita"].backward()
    assert m.vision_proj_hidden[0].weight.grad.abs().sum() > 0 and m.text_proj_hidden[1].weight.grad.abs().sum() > 0


def test_hidden_alignment_config_errors():
    with pytest.raises(ValueError, match="num_hidden_align"):
        MODELS["pretrain"](tiny_config(return_hidden_state=True, num_hidden_align=2))   # depth 2, 2 text layers
    with pytest.raises(ValueError, match="num_hidden_align"):   # the shallower encoder bounds it: 4 blocks, 2 layers
        MODELS["pretrain"](tiny_config(return_hidden_state=True, num_hidden_align=2, vision_depth=4))
    with pytest.raises(ValueError, match="ita_hidden_weights"):
        MODELS["pretrain"](tiny_config(return_hidden_state=True, num_hidden_align=1, ita_hidden_weights=[1, 1]))
    names = {n for n, _ in MODELS["pretrain"](tiny_config()).named_parameters()}
    assert not any("proj_hidden" in n for n in names)   # off by default: ALBEF's layout
