"""Every model class against ALBEF's state-dict layout (spec §3), and the objectives' equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.batch import as_batch
from models.objectives.itc import in_batch_itc, in_batch_sims, momentum_itc
from models.objectives.itm import itm
from conftest import tiny_config, tiny_text
from models import MODELS
from models.objectives import functional as objectives
from models.momentum import dequeue_and_enqueue


# ------------------------------------------------------------------ ALBEF's key lists, written from the spec
def vit_keys(p, d, depth, n_tokens, patch=8):
    k = {f"{p}cls_token": (1, 1, d), f"{p}pos_embed": (1, n_tokens, d), f"{p}patch_embed.proj.weight": (d, 3, patch, patch),
         f"{p}patch_embed.proj.bias": (d,), f"{p}norm.weight": (d,), f"{p}norm.bias": (d,)}
    for i in range(depth):
        b = f"{p}blocks.{i}."
        k.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                  b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                  b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (4 * d, d),
                  b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    return k


def bert_keys(p, h, layers, fusion, inter, vocab, maxpos, enc_w):
    k = {f"{p}embeddings.position_ids": (1, maxpos), f"{p}embeddings.word_embeddings.weight": (vocab, h),
         f"{p}embeddings.position_embeddings.weight": (maxpos, h), f"{p}embeddings.token_type_embeddings.weight": (2, h),
         f"{p}embeddings.LayerNorm.weight": (h,), f"{p}embeddings.LayerNorm.bias": (h,)}
    for n in range(layers):
        b = f"{p}encoder.layer.{n}."
        subs = ["attention"] + (["crossattention"] if n >= fusion else [])
        for s in subs:
            kw = enc_w if s == "crossattention" else h
            k.update({b + f"{s}.self.query.weight": (h, h), b + f"{s}.self.query.bias": (h,),
                      b + f"{s}.self.key.weight": (h, kw), b + f"{s}.self.key.bias": (h,),
                      b + f"{s}.self.value.weight": (h, kw), b + f"{s}.self.value.bias": (h,),
                      b + f"{s}.output.dense.weight": (h, h), b + f"{s}.output.dense.bias": (h,),
                      b + f"{s}.output.LayerNorm.weight": (h,), b + f"{s}.output.LayerNorm.bias": (h,)})
        k.update({b + "intermediate.dense.weight": (inter, h), b + "intermediate.dense.bias": (inter,),
                  b + "output.dense.weight": (h, inter), b + "output.dense.bias": (h,),
                  b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,)})
    return k


def mlm_keys(p, h, vocab):
    return {f"{p}predictions.bias": (vocab,), f"{p}predictions.transform.dense.weight": (h, h),
            f"{p}predictions.transform.dense.bias": (h,), f"{p}predictions.transform.LayerNorm.weight": (h,),
            f"{p}predictions.transform.LayerNorm.bias": (h,), f"{p}predictions.decoder.weight": (vocab, h),
            f"{p}predictions.decoder.bias": (vocab,)}


def albef_layout(kind, d=32, depth=2, n_tokens=17, h=32, L=4, f=2, inter=64, vocab=120, maxpos=40, ed=16, q=16,
                 patch=8):
    def body(prefix, layers=L, fusion=f):
        return bert_keys(prefix, h, layers, fusion, inter, vocab, maxpos, d)

    def both(fn):
        out = {}
        for m in ("", "_m"):
            out.update(fn(m))
        return out

    vit = lambda m: vit_keys(f"visual_encoder{m}.", d, depth, n_tokens, patch)   # noqa: E731
    proj = lambda m: {f"vision_proj{m}.weight": (ed, d), f"vision_proj{m}.bias": (ed,),   # noqa: E731
                      f"text_proj{m}.weight": (ed, h), f"text_proj{m}.bias": (ed,)}
    heads = {"temp": (), "itm_head.weight": (2, h), "itm_head.bias": (2,), "image_queue": (ed, q),
             "text_queue": (ed, q), "queue_ptr": (1,)}
    cls = lambda m, n: {f"cls_head{m}.0.weight": (h, h), f"cls_head{m}.0.bias": (h,),   # noqa: E731
                        f"cls_head{m}.2.weight": (n, h), f"cls_head{m}.2.bias": (n,)}
    if kind == "pretrain":
        return {**heads, **both(lambda m: {**vit(m), **body(f"text_encoder{m}.bert."),
                                             **mlm_keys(f"text_encoder{m}.cls.", h, vocab), **proj(m)})}
    if kind == "retrieval":
        return {**heads, "idx_queue": (1, q), **both(lambda m: {**vit(m), **body(f"text_encoder{m}."), **proj(m)})}
    if kind == "vqa":
        return both(lambda m: {**vit(m), **body(f"text_encoder{m}."), **body(f"text_decoder{m}.bert.", L - f, 0),
                               **mlm_keys(f"text_decoder{m}.cls.", h, vocab)})
    if kind == "nlvr":
        return both(lambda m: {**vit(m), **body(f"text_encoder{m}.", f + 2 * (L - f)), **cls(m, 2)})
    if kind == "ve":
        return both(lambda m: {**vit(m), **body(f"text_encoder{m}."), **cls(m, 3)})
    if kind == "pretrain_nlvr":
        return {**vit(""), **body("text_encoder.", f + 2 * (L - f)), **proj(""), "temp": (),
                "ta_head.weight": (3, h), "ta_head.bias": (3,)}
    raise KeyError(kind)


@pytest.mark.parametrize("kind", list(MODELS))
def test_state_dict_is_exactly_albefs_layout_and_loads_strictly(kind):
    model = MODELS[kind](tiny_config())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = albef_layout(kind)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    sd = {k: torch.randn(s) if k != "queue_ptr" and "position_ids" not in k and "idx_queue" not in k
          else model.state_dict()[k] for k, s in want.items()}
    model.load_state_dict(sd, strict=True)


def full_size(kind, image_res):
    """(model on meta, ALBEF's key/shape list) for ViT-B/16 + BERT-base at ``image_res``."""
    cfg = dict(image_res=image_res, vision_width=768, embed_dim=256, temp=0.07, queue_size=65536, momentum=0.995,
               alpha=0.4, bert_config="configs/config_bert.json")
    with torch.device("meta"):
        model = MODELS[kind](cfg)
    want = albef_layout(kind, d=768, depth=12, n_tokens=(image_res // 16) ** 2 + 1, h=768, L=12, f=6, inter=3072,
                        vocab=30522, maxpos=512, ed=256, q=65536, patch=16)
    return model, want


def test_full_size_albef_4m_key_list_loads_strictly_on_meta():
    model, want = full_size("pretrain", 256)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    # per side: ViT 6 + 12 * 12, BERT 6 + 12 * 16 + 6 * 10 cross-attention, MLM head 7, projections 4
    assert len(want) == 2 * ((6 + 12 * 12) + (6 + 12 * 16 + 6 * 10) + 7 + 4) + 6
    sd = {k: torch.empty(s, device="meta") for k, s in want.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def test_full_size_retrieval_at_384_takes_the_pretraining_checkpoint_on_meta():
    """ViT-B/16 at 384 px (577 tokens): the ALBEF_4M key list, with bert. stripped, loads by name."""
    from models.checkpoint import strip_bert
    model, want = full_size("retrieval", 384)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    mapped = strip_bert(full_size("pretrain", 256)[1])
    assert set(want) - set(mapped) == {"idx_queue"}                       # ALBEF: stays -100
    assert {k for k in set(mapped) - set(want)} == {k for k in mapped if k.startswith(("text_encoder.cls.",
                                                                                        "text_encoder_m.cls."))}
    assert mapped["visual_encoder.pos_embed"] == (1, 257, 768) and want["visual_encoder.pos_embed"] == (1, 577, 768)


def test_nlvr_shares_cross_attention_keys_and_values_per_layer_pair():
    m = MODELS["nlvr"](tiny_config())
    for enc in (m.text_encoder, m.text_encoder_m):
        layers = enc.encoder.layer
        assert len(layers) == 6
        for a, b in ((2, 3), (4, 5)):
            sa, sb = layers[a].crossattention.self, layers[b].crossattention.self
            assert sa.key.weight is sb.key.weight and sa.value.bias is sb.value.bias
            assert sa.query.weight is not sb.query.weight
        assert layers[3].crossattention.self.key.weight is not layers[4].crossattention.self.key.weight


# ------------------------------------------------------------------ objectives
def test_itc_loss_matches_hand_computation_with_queue_and_distillation():
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config())
    bs, q = 3, m.image_queue.shape[1]
    img, txt = F.normalize(torch.randn(bs, 16), dim=1), F.normalize(torch.randn(bs, 16), dim=1)
    img_m, txt_m = F.normalize(torch.randn(bs, 16), dim=1), F.normalize(torch.randn(bs, 16), dim=1)
    pos = torch.zeros(bs, bs + q, dtype=torch.bool)
    pos[:, :bs] = torch.eye(bs, dtype=torch.bool)
    alpha, t = 0.4, m.temp.item()
    loss, _, _ = momentum_itc(m, img, txt, img_m, txt_m, pos, alpha)
    all_t = torch.cat([txt_m, m.text_queue.t()])
    all_i = torch.cat([img_m, m.image_queue.t()])
    total = 0.0
    for feats, feats_m, others in ((img, img_m, all_t), (txt, txt_m, all_i)):
        for i in range(bs):
            logits = [float(feats[i] @ others[j]) / t for j in range(bs + q)]
            logits_m = [float(feats_m[i] @ others[j]) / t for j in range(bs + q)]
            zm = sum(math.exp(x) for x in logits_m)
            z = sum(math.exp(x) for x in logits)
            for j in range(bs + q):
                target = alpha * math.exp(logits_m[j]) / zm + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * (logits[j] - math.log(z)) / bs
    assert abs(loss.item() - total / 2) < 1e-4


def test_grit_in_batch_itc_with_consistency_matches_formula_and_detaches_keys():
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config(use_momentum=False, distill=False, itc_consistency_weight=0.2))
    bs, t = 4, m.temp.item()
    img = F.normalize(torch.randn(bs, 16), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(bs, 16), dim=1).requires_grad_()
    loss, sim_i2t, sim_t2i = in_batch_itc(m, img, txt, torch.eye(bs, dtype=torch.bool))
    s_i2t = (img @ txt.t() / t).detach()
    s_t2i = s_i2t.t()

    def ce(target, logits):   # mean over rows of -sum target * log_softmax
        return -(target * logits.log_softmax(1)).sum(1).mean()

    eye = torch.eye(bs)
    expect = (ce(eye, s_i2t) + ce(eye, s_t2i)) / 2 + 0.2 * (ce(s_t2i.softmax(1), s_i2t) + ce(s_i2t.softmax(1), s_t2i)) / 2
    assert abs(loss.item() - expect.item()) < 1e-5
    # GRIT: the i2t direction trains only the image side (keys detached), the t2i direction only the text side
    (g_txt,) = torch.autograd.grad(sim_i2t.sum(), txt, retain_graph=True, allow_unused=True)
    assert g_txt is None or g_txt.abs().max() == 0
    (g_img,) = torch.autograd.grad(sim_t2i.sum(), img, allow_unused=True)
    assert g_img is None or g_img.abs().max() == 0


def test_without_momentum_the_model_has_no_momentum_modules_or_queues_and_trains():
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config(use_momentum=False, distill=False, itm_negative_selection="argmax"))
    names = [n for n, _ in m.named_parameters()] + [n for n, _ in m.named_buffers()]
    assert not any("_m." in n or "queue" in n for n in names)
    out = m(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4)), alpha=0.4)
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    assert m.visual_encoder.cls_token.grad.abs().sum() > 0 and m.text_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="distill"):
        MODELS["pretrain"](tiny_config(use_momentum=False, distill=True))
    with pytest.raises(ValueError, match="itm_negative_selection"):
        MODELS["pretrain"](tiny_config(itm_negative_selection="top1"))
    out = MODELS["pretrain"](tiny_config(itm_negative_selection="uniform"))(as_batch(torch.randn(4, 3, 32, 32), tiny_text(4)))
    assert torch.isfinite(out["loss_itm"])


def test_argmax_selection_picks_the_hardest_negatives_in_itm():
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config(use_momentum=False, distill=False, itm_negative_selection="argmax"))
    sim = torch.tensor([[5.0, 1.0, 4.0], [2.0, 5.0, 0.0], [3.0, 2.5, 5.0]])
    embeds = m.visual_encoder(torch.randn(3, 3, 32, 32))
    text = tiny_text(3, pad_first=False)
    states = m.text_bert(input_ids=text["input_ids"], attention_mask=text["attention_mask"], mode="text").last_hidden_state
    _, extra = itm(m, states, text["attention_mask"], embeds, sim, sim.t(), torch.eye(3, dtype=torch.bool))
    assert extra["neg_text_idx"].tolist() == [2, 0, 0]    # image k's hardest text: argmax of row k off the diagonal
    assert extra["neg_image_idx"].tolist() == [2, 2, 0]   # text k's hardest image: argmax of column k


def test_retrieval_positives_include_same_image_in_queue(monkeypatch):
    from models.objectives import itc as itc_module
    m = MODELS["retrieval"](tiny_config())
    m.idx_queue[0, :4] = torch.tensor([7, 3, 7, 9])
    seen = {}
    itc = itc_module.momentum_itc

    def spy(*args):
        seen["positives"] = args[5].clone()
        return itc(*args)

    monkeypatch.setattr(itc_module, "momentum_itc", spy)
    out = m(as_batch(torch.randn(2, 3, 32, 32), tiny_text(2), idx=torch.tensor([7, 5])), alpha=0.0)
    assert torch.isfinite(out["loss_ita"])
    pos = seen["positives"]   # columns: 2 batch items, then the queue
    assert pos[0, :6].tolist() == [True, False, True, False, True, False]
    assert pos[1, :6].tolist() == [False, True, False, False, False, False]


def test_momentum_copies_do_not_share_storage_with_online_weights():
    m = MODELS["pretrain"](tiny_config())
    online = {p.data_ptr() for n, p in m.named_parameters() if "_m." not in n}
    momentum = [p for n, p in m.named_parameters() if "_m." in n]
    assert momentum and not any(p.data_ptr() in online for p in momentum)


def test_hard_negatives_never_pick_positives_and_follow_softmax():
    torch.manual_seed(0)
    sim = torch.tensor([[5.0, 1.0, 0.0, 2.0], [1.0, 5.0, 3.0, 3.0], [0.0, 0.0, 9.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    pos = torch.eye(4, dtype=torch.bool)
    pos[3] = True   # row 3: every sample shares the image -> no valid negative
    w, valid = objectives.itm_negative_weights(sim, pos)
    assert valid.tolist() == [True, True, True, False]
    assert torch.allclose(w[0], torch.softmax(torch.tensor([-math.inf, 1.0, 0.0, 2.0]), 0))
    draws = torch.stack([objectives.sample_itm_negatives(sim, pos)[0] for _ in range(3000)])
    assert not (draws[:, :3] == torch.arange(3)).any()
    freq = (draws[:, 1:2] == torch.tensor([0, 2, 3])).float().mean(0)
    expect = torch.softmax(torch.tensor([1.0, 3.0, 3.0]), 0)
    assert torch.allclose(freq, expect, atol=0.04)
    idx, _ = objectives.hardest_itm_negatives(sim, pos)
    assert idx[:3].tolist() == [3, 2, 0]
    nan = objectives.sample_itm_negatives(torch.full((2, 2), float("nan")), torch.eye(2, dtype=torch.bool))[0]
    assert nan.tolist() == [1, 0]


def test_uniform_negatives_never_pick_positives_and_ignore_similarity():
    torch.manual_seed(0)
    pos = torch.eye(3, dtype=torch.bool)
    pos[2] = True   # no valid negative
    draws = torch.stack([objectives.uniform_itm_negatives(pos)[0] for _ in range(3000)])
    assert not (draws[:, :2] == torch.arange(2)).any()
    freq = (draws[:, 0:1] == torch.tensor([1, 2])).float().mean(0)
    assert torch.allclose(freq, torch.tensor([0.5, 0.5]), atol=0.04)
    assert objectives.uniform_itm_negatives(pos)[1].tolist() == [True, True, False]


def test_itm_loss_drops_pairs_without_negative():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, -3.0]])
    labels = torch.tensor([1, 0, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.isclose(objectives.itm_loss(logits, labels, torch.tensor([1.0, 1.0, 0.0])), ce[:2].mean())
    assert torch.isclose(objectives.itm_loss(logits, labels, torch.ones(3)), ce.mean())


def test_pretrain_forward_with_batch_of_one_does_not_crash():
    m = MODELS["pretrain"](tiny_config())
    out = m(as_batch(torch.randn(1, 3, 32, 32), tiny_text(1, pad_first=False)), alpha=0.4)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss"))


def test_mlm_masking_rates_and_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 50), generator=g)
    ids[:, 0] = 101
    ids[:, 40:] = 0
    masked, labels = objectives.mask_tokens(ids, 1000, 0.15, 103, 0, 101, generator=g)
    sel = labels != -100
    assert not sel[:, 0].any() and not sel[:, 40:].any()
    rate = sel[:, 1:40].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert torch.equal(labels[sel], ids[sel])
    to_mask = (masked[sel] == 103).float().mean().item()
    kept = (masked[sel] == ids[sel]).float().mean().item()
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    assert torch.equal(masked[~sel], ids[~sel])


def test_queue_gets_features_in_order_and_pointer_wraps():
    m = MODELS["pretrain"](tiny_config(queue_size=8))
    for step in range(3):
        img = torch.full((4, 16), float(step))
        dequeue_and_enqueue(m, img, -img)
    assert m.queue_ptr.item() == 4
    assert torch.equal(m.image_queue[:, :4], torch.full((16, 4), 2.0))
    assert torch.equal(m.image_queue[:, 4:], torch.full((16, 4), 1.0))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        dequeue_and_enqueue(m, torch.zeros(3, 16), torch.zeros(3, 16))


def test_momentum_update_is_ema_of_online_weights():
    m = MODELS["retrieval"](tiny_config(momentum=0.9))
    before = m.vision_proj_m.weight.clone()
    with torch.no_grad():
        m.vision_proj.weight.add_(1.0)
    m._momentum_update()
    assert torch.allclose(m.vision_proj_m.weight, 0.9 * before + 0.1 * m.vision_proj.weight)
    assert not m.vision_proj_m.weight.requires_grad


def test_sdpa_and_eager_models_give_same_losses():
    torch.manual_seed(0)
    a = MODELS["pretrain"](tiny_config()).eval()
    b = MODELS["pretrain"](tiny_config(attn_implementation="eager")).eval()
    b.load_state_dict(a.state_dict())
    img, text = torch.randn(4, 3, 32, 32), tiny_text()
    torch.manual_seed(1)
    la = a(as_batch(img, text), alpha=0.4)
    torch.manual_seed(1)
    lb = b(as_batch(img, text), alpha=0.4)
    for k in (k for k in la if k.startswith("loss")):
        assert torch.allclose(la[k], lb[k], atol=1e-5), k


def test_classifier_loss_is_distilled_cross_entropy():
    from models.classifier import distilled_ce
    p, pm, t = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    expect = 0.6 * F.cross_entropy(p, t) + 0.4 * (-(pm.softmax(1) * p.log_softmax(1)).sum(1).mean())
    assert torch.allclose(distilled_ce(p, t, pm, 0.4), expect)
    m = MODELS["ve"](tiny_config()).eval()
    text = tiny_text(2)
    logits = m.predict(torch.randn(2, 3, 32, 32), text["input_ids"], text["attention_mask"])
    assert logits.shape == (2, 3)
    n = MODELS["nlvr"](tiny_config()).eval()
    assert n.predict(torch.randn(4, 3, 32, 32), text["input_ids"], text["attention_mask"]).shape == (2, 2)


def test_vqa_rank_answer_matches_brute_force_likelihood():
    torch.manual_seed(0)
    m = MODELS["vqa"](tiny_config(distill=False)).eval()
    answers = torch.tensor([[101, 110, 102, 0], [101, 111, 112, 102], [101, 113, 102, 0], [101, 110, 114, 102]])
    atts = (answers != 0).long()
    q = tiny_text(2)
    states = m.encode_question(torch.randn(2, 3, 32, 32), q["input_ids"], q["attention_mask"])
    ids, probs = m.rank_answer(states, q["attention_mask"], answers, atts, k=4)
    for b in range(2):
        scores = []
        for a in range(4):
            logits = m.text_decoder(answers[a:a + 1], attention_mask=atts[a:a + 1],
                                    encoder_hidden_states=states[b:b + 1],
                                    encoder_attention_mask=q["attention_mask"][b:b + 1]).logits[0]
            logp = F.log_softmax(logits, -1)
            n = int(atts[a].sum())
            seq = sum(logp[t, answers[a, t + 1]] for t in range(n - 1))
            scores.append(seq + logp[0, answers[a, 1]])   # ALBEF counts the first token twice
        expect = torch.softmax(torch.stack(scores), 0)
        order = expect.argsort(descending=True)
        assert ids[b].tolist() == order.tolist()
        assert torch.allclose(probs[b], expect[order], atol=1e-4)
    # k_test above the number of candidates ranks them all (ALBEF's k_test 128 over a short answer list)
    wide = torch.cat([answers, torch.zeros(4, 3, dtype=torch.long)], 1)   # 7 token positions, 4 answers
    ids_all, _ = m.rank_answer(states, q["attention_mask"], wide, (wide != 0).long(), k=128)
    assert ids_all.shape == (2, 4) and ids_all.tolist() == ids.tolist()


def test_text_assignment_labels_are_consistent():
    m = MODELS["pretrain_nlvr"](tiny_config())
    feats = F.normalize(torch.randn(16, 16), dim=1)
    img0, img1, labels = m.assign(feats)
    own = torch.arange(16)
    assert ((labels == 0) <= (img0 == own)).all() and ((labels == 1) <= (img1 == own)).all()
    two = labels == 2
    assert ((img0[two] != own[two]) & (img1[two] != own[two]) & (img0[two] != img1[two])).all()
    assert set(labels.tolist()) <= {0, 1, 2}


def test_itc_similarities_targets_and_itm_weights_stay_fp32_under_bf16_autocast():
    """bf16 keeps 8 mantissa bits: over a 65,536-entry queue the ITC logits, the softmax targets and the ITM
    negative weights would lose the differences that rank them."""
    from models.objectives import functional as objectives
    torch.manual_seed(0)
    m = MODELS["pretrain"](tiny_config())
    f = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    pos = torch.zeros(4, 4 + m.image_queue.shape[1], dtype=torch.bool)
    pos[:, :4] = torch.eye(4, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.randn(3, 3) @ torch.randn(3, 3)).dtype == torch.bfloat16   # autocast is on
        loss, sim_i2t, sim_t2i = momentum_itc(m, f, f, f, f, pos, alpha=0.4)
        ib_i2t, _ = in_batch_sims(m, f, f)
        w, _ = objectives.itm_negative_weights(sim_i2t[:, :4], pos[:, :4])
        h = objectives.hidden_itc_loss(f, f, m.temp)
    assert sim_i2t.dtype == sim_t2i.dtype == ib_i2t.dtype == w.dtype == torch.float32
    assert loss.dtype == h.dtype == torch.float32
    ref, ref_i2t, _ = momentum_itc(m, f, f, f, f, pos, alpha=0.4)
    assert torch.equal(ref_i2t, sim_i2t) and torch.equal(ref, loss)


def test_accumulation_micro_batches_skip_the_gradient_all_reduce():
    import contextlib
    from types import SimpleNamespace
    from engine.trainer import Trainer
    entered = []

    class FakeDDP:
        @contextlib.contextmanager
        def no_sync(self):
            entered.append(True)
            yield
    lin = torch.nn.Linear(2, 1)
    t = Trainer.__new__(Trainer)
    t.env = SimpleNamespace(device=torch.device("cpu"))
    t.scheduler = SimpleNamespace(step=lambda e, i: None)
    t.optimizer = torch.optim.SGD(lin.parameters(), lr=0.1)
    t.alpha, t.alpha_warm_up, t.n_iters, t.accum, t.clip, t.loss_weights = 0.0, False, 8, 4, None, {}
    t.model, t.ddp, t.global_step = lin, FakeDDP(), 0
    t.autocast = contextlib.nullcontext
    model = lambda batch, alpha: {"loss_x": lin(batch["x"]).sum()}   # noqa: E731
    boundaries = [t._step(model, {"x": torch.ones(1, 2)}, 0, i)[1] for i in range(8)]
    assert boundaries == [False, False, False, True] * 2 and len(entered) == 6 and t.global_step == 2
