"""The fast retrieval evaluation against ALBEF's per-query procedure, and itm_eval against hand ranks."""
import numpy as np
import pytest
import torch

from conftest import tiny_config
from tasks.retrieval import FILL, itm_eval, reference_scores, score_matrices
from models import MODELS


def encoded(model, ni=9, nt=23, seed=0):
    """Image states / text states of a tiny model on random inputs with captions of varied length."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ni, 3, 32, 32, generator=g)
    ids = torch.randint(104, 120, (nt, 12), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(2, 13, (nt,), generator=g)
    att = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = ids * att
    with torch.no_grad():
        image_states, image_feats = model.encode_image(images)
        text_states, text_feats = model.encode_text(ids, att)
    return image_states, image_feats, text_states, text_feats, att


@pytest.mark.parametrize("fusion_layer,k,attn,kv_budget", [(2, 5, "sdpa", 2 ** 29), (2, 50, "sdpa", 2 ** 29),
                                                            (3, 4, "eager", 1), (1, 7, "sdpa", 30_000)])
def test_fast_scores_equal_the_per_query_reference(fusion_layer, k, attn, kv_budget):
    torch.manual_seed(0)
    cfg = tiny_config(attn_implementation=attn)
    cfg["bert_config"]["fusion_layer"] = fusion_layer
    model = MODELS["retrieval"](cfg).eval()
    img_s, img_f, txt_s, txt_f, att = encoded(model)
    sims = img_f @ txt_f.t()
    ref_i2t, ref_t2i = reference_scores(model, sims, img_s, txt_s, att, k)
    i2t, t2i = score_matrices(model, sims, img_s, txt_s, att, k, pair_batch=16, kv_budget=kv_budget)
    torch.testing.assert_close(i2t, ref_i2t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t2i, ref_t2i, rtol=1e-5, atol=1e-5)
    # exactly min(k, N) scored entries per row, the rest filled
    assert ((i2t != FILL).sum(1) == min(k, sims.shape[1])).all()
    assert ((t2i != FILL).sum(1) == min(k, sims.shape[0])).all()
    txt2img = {j: j % sims.shape[0] for j in range(sims.shape[1])}
    img2txt = {i: [j for j in range(sims.shape[1]) if j % sims.shape[0] == i] for i in range(sims.shape[0])}
    assert itm_eval(i2t.numpy(), t2i.numpy(), txt2img, img2txt) == \
        itm_eval(ref_i2t.numpy(), ref_t2i.numpy(), txt2img, img2txt)


def test_itm_eval_against_hand_ranks_with_any_of_five_captions():
    # 3 images, 2 captions each: image 0 -> texts 0,1; image 1 -> 2,3; image 2 -> 4,5
    img2txt = {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    txt2img = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    i2t = np.full((3, 6), FILL)
    i2t[0] = [0.1, 0.9, 0.5, 0.3, 0.2, 0.0]       # its second caption ranks first: rank 0
    i2t[1] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]       # best own caption (text 2) at rank 2
    i2t[2] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]       # own captions at ranks 4 and 5 -> 4
    t2i = np.full((6, 3), FILL)
    t2i[:, :] = [[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1], [0, 1, 0.5], [1, 0.5, 0], [0.1, 0.2, 0.3]]
    m = itm_eval(i2t, t2i, txt2img, img2txt)
    assert m["txt_r1"] == pytest.approx(100 / 3)           # only image 0 at rank 0
    assert m["txt_r5"] == pytest.approx(100.0)             # ranks 0, 2, 4 are all < 5
    assert m["txt_r10"] == pytest.approx(100.0)
    t2i[2] = [0.0, 0.1, 0.2]                              # text 2 -> image 1 at position 1
    m = itm_eval(i2t, t2i, txt2img, img2txt)
    # text ranks: 0:0, 1:2, 2:1, 3:0, 4:2, 5:0 -> r1 = 3/6, r5 = 6/6
    assert m["img_r1"] == pytest.approx(50.0)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["img_r_mean"] == pytest.approx((50 + 100 + 100) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    i2t[2, 5] = 1.0                                        # one of image 2's captions moves to the top
    assert itm_eval(i2t, t2i, txt2img, img2txt)["txt_r1"] == pytest.approx(200 / 3)
