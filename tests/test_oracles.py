"""Oracles: each rule checked through the model's (or the sampler's) own entry point against a value computed
here by plain loops from the paper's or the original's formula, never by the code under test.

The encoders themselves (ViT, BERT) are not the rule under test: where a rule consumes their outputs, the test
reads those outputs from the model and computes the rule on them by hand."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.batch import as_batch
from models.objectives.hitc import hidden_itc
from models.objectives.itc import momentum_itc
from conftest import tiny_config, tiny_text
from models import MODELS


def ce_by_hand(logits_row, target_row):
    """-sum_j target_j * log softmax(logits)_j, in float64 by plain loops."""
    z = max(logits_row)
    lse = z + math.log(sum(math.exp(x - z) for x in logits_row))
    return -sum(t * (x - lse) for x, t in zip(logits_row, target_row))


def images_and_text(b=4, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), tiny_text(b, n, seed=seed, pad_first=False)


# ------------------------------------------------------------------ MLM masking through the model
def test_the_pretraining_model_masks_at_the_configured_rate():
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(mlm_probability=0.3, queue_size=64)).eval()
    seen = {}
    real = model.text_encoder.forward

    def spy(ids, **kw):
        seen["ids"], seen["labels"] = ids, kw["labels"]
        return real(ids, **kw)
    model.text_encoder.forward = spy
    image, text = images_and_text(64, 40)
    model(as_batch(image, text), alpha=0.4)
    labels, ids = seen["labels"], text["input_ids"]
    eligible = ids != 101   # [CLS] never masked; no padding in this batch
    rate = (labels[eligible] != -100).float().mean().item()
    # 64 x 39 tokens: the binomial's standard deviation is 0.009
    assert abs(rate - 0.3) < 0.04, rate
    assert (labels[~eligible] == -100).all()
    assert torch.equal(labels[labels != -100], ids[labels != -100])   # labels are the original tokens
    masked = seen["ids"][labels != -100]
    assert abs((masked == 103).float().mean().item() - 0.8) < 0.06   # 80% [MASK]


# ------------------------------------------------------------------ temperature clamp
@pytest.mark.parametrize("kind", ["pretrain", "retrieval"])
@pytest.mark.parametrize("start,clamped", [(2.0, 0.5), (1e-5, 0.001)])
def test_the_temperature_is_clamped_to_albefs_range_before_the_step(kind, start, clamped):
    torch.manual_seed(0)
    model = MODELS[kind](tiny_config())
    with torch.no_grad():
        model.temp.fill_(start)
    image, text = images_and_text(4)
    kw = {"idx": torch.arange(4)} if kind == "retrieval" else {}
    model(as_batch(image, text, **kw), alpha=0.4)
    assert model.temp.item() == pytest.approx(clamped)


# ------------------------------------------------------------------ momentum update before the momentum features
def test_the_momentum_update_runs_before_the_momentum_features_are_computed():
    """ALBEF: ``_momentum_update()`` first, then the momentum encoders, then the enqueue of their features."""
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(momentum=0.5, queue_size=16)).eval()
    with torch.no_grad():   # online and momentum weights apart, so the update moves the features
        for p in model.visual_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in model.vision_proj.parameters():
            p.add_(0.2 * torch.randn_like(p))
    before = copy.deepcopy(model)
    image, text = images_and_text(4)
    model(as_batch(image, text), alpha=0.4)
    with torch.no_grad():   # the EMA by its formula, on the copy taken before the step
        online = dict(before.named_parameters())
        for name, p in before.named_parameters():
            head = name.split(".")[0]
            if head.endswith("_m"):
                src = online[head[:-2] + name[len(head):]]
                p.copy_(0.5 * p + 0.5 * src)
        _, feat_m = before.encode_image(image, momentum=True)
    assert torch.allclose(model.image_queue[:, :4].t(), feat_m, atol=1e-6)
    assert model.queue_ptr.item() == 4


# ------------------------------------------------------------------ ITM negatives: uniform, and a batch of one
def test_uniform_itm_negatives_ignore_the_similarities_and_never_pick_a_positive(monkeypatch):
    from models.objectives import itm as itm_module
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(use_momentum=False, distill=False, itm_negative_selection="uniform"))
    picked = []
    monkeypatch.setattr(itm_module, "itm_pairs",
                        lambda m, te, ta, ie, neg_img, neg_txt, *a, **k: picked.append((neg_img, neg_txt)) or (0, {}))
    bs = 4
    sim = torch.zeros(bs, bs)
    sim[:, 3] = 50.0   # one column far more similar: a weighted draw would take it almost always
    pos = torch.eye(bs, dtype=torch.bool)
    for _ in range(400):
        itm_module.itm(model, torch.zeros(bs, 5, 32), torch.ones(bs, 5), torch.zeros(bs, 2, 32), sim, sim, pos)
    counts = torch.zeros(bs, bs)
    for neg_img, neg_txt in picked:
        counts[torch.arange(bs), neg_img] += 1
        counts[torch.arange(bs), neg_txt] += 1
    assert (counts.diagonal() == 0).all()
    share = counts / counts.sum(1, keepdim=True)
    off = share[~pos]
    assert (off - 1 / 3).abs().max() < 0.1, share   # 800 draws per row over 3 negatives: 1/3 each


def test_a_batch_of_one_trains_itm_on_its_positive_pair_alone():
    """No negative exists: the (image, text) pair keeps its label 1, the two negative pairs weigh nothing."""
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config()).eval()
    image, text = images_and_text(1)
    out = model(as_batch(image, text), alpha=0.4)
    with torch.no_grad():
        img_embeds, _ = model.encode_image(image)
        txt_embeds, _ = model.encode_text(text["input_ids"], text["attention_mask"])
        logits = model.itm_head(model.fuse(txt_embeds, text["attention_mask"], img_embeds))[0].tolist()
    expected = ce_by_hand(logits, [0.0, 1.0])
    assert out["loss_itm"].item() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------ MAFA: S-ITC through the forward pass
def test_mafa_s_itc_of_the_forward_pass_follows_the_ecm_connections():
    from test_ecm import FixedFilter
    torch.manual_seed(0)
    cfg = tiny_config(use_momentum=False, distill=False, itc_label_smoothing=0.5, smoothing_start_epoch=1)
    model = MODELS["pretrain"](cfg).eval()
    filt = FixedFilter(MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)),
                       p_t2i=torch.tensor([0.9, 0.1, 0.6, 0.8]), p_i2t=torch.tensor([0.2, 0.85, 0.5, 0.49]))
    model.set_discriminator(filt)
    image, text = images_and_text(4, seed=3)
    model.set_epoch(1)
    out = model(as_batch(image, text))
    with torch.no_grad():
        _, img_f = model.encode_image(image)
        _, txt_f = model.encode_text(text["input_ids"], text["attention_mask"])
    t = model.temp.item()
    bs = 4
    sim = [[float(img_f[i] @ txt_f[j]) for j in range(bs)] for i in range(bs)]

    def hardest(row, k):   # the hardest negative of row k: the largest entry off the diagonal
        return max((j for j in range(bs) if j != k), key=lambda j: row[j])
    n1 = [hardest(sim[k], k) for k in range(bs)]                                  # image k -> text
    m1 = [hardest([sim[i][k] for i in range(bs)], k) for k in range(bs)]          # text k -> image
    # i2t decisions [neg, conn, ambiguous, neg]: image 1 is connected to text n1[1];
    # t2i decisions [conn, neg, ambiguous, conn]: texts 0 and 3 to images m1[0], m1[3]
    conn_i2t, conn_t2i = {1}, {0, 3}

    def targets(conn, partner):
        rows = []
        for k in range(bs):
            y = [1.0 if j == k else 0.0 for j in range(bs)]
            if k in conn:
                y[partner[k]] += 1.0
            y = [v / sum(y) for v in y]
            rows.append([0.5 * v + 0.5 / bs for v in y])   # MAFA's smoothing from epoch 1
        return rows

    def loss(p_i2t, p_t2i):
        y_i2t, y_t2i = targets(conn_i2t, p_i2t), targets(conn_t2i, p_t2i)
        i2t = sum(ce_by_hand([sim[k][j] / t for j in range(bs)], y_i2t[k]) for k in range(bs)) / bs
        t2i = sum(ce_by_hand([sim[j][k] / t for j in range(bs)], y_t2i[k]) for k in range(bs)) / bs
        return (i2t + t2i) / 2
    expected = loss(n1, m1)
    assert out["loss_ita"].item() == pytest.approx(expected, abs=1e-5)
    assert abs(loss(m1, n1) - expected) > 1e-3   # the partners matter: swapping them would be seen


# ------------------------------------------------------------------ H-ITC's temperature and levels
def test_hidden_itc_levels_by_hand_with_the_models_temperature():
    torch.manual_seed(0)
    cfg = tiny_config(return_hidden_state=True, num_hidden_align=1, ita_hidden_weight=0.7, temp=0.2)
    model = MODELS["pretrain"](cfg)
    bs, n_img, n_txt = 3, 5, 4
    vis = [torch.randn(bs, n_img, 32) for _ in range(3)]   # ViT blocks' states (the last is not aligned)
    txt = [torch.randn(bs, n_txt, 32) for _ in range(3)]   # text layers' states
    got = hidden_itc(model, vis, txt).item()
    with torch.no_grad():   # level 0 pairs the block and the layer before the last ones
        v = F.normalize(model.vision_proj_hidden[0](vis[-2][:, 0]), dim=-1)
        w = F.normalize(model.text_proj_hidden[0](txt[-2][:, 0]), dim=-1)
    t = 0.2
    sim = [[float(v[i] @ w[j]) / t for j in range(bs)] for i in range(bs)]
    i2t = sum(ce_by_hand(sim[i], [1.0 * (j == i) for j in range(bs)]) for i in range(bs)) / bs
    t2i = sum(ce_by_hand([sim[j][i] for j in range(bs)], [1.0 * (j == i) for j in range(bs)])
              for i in range(bs)) / bs
    assert got == pytest.approx(0.7 * (i2t + t2i) / 2, abs=1e-5)


# ------------------------------------------------------------------ VQA loss
def test_vqa_loss_is_the_weighted_answer_likelihood_summed_per_question_over_the_questions():
    torch.manual_seed(0)
    model = MODELS["vqa"](tiny_config(distill=False)).eval()
    image = torch.randn(2, 3, 32, 32)
    q = tiny_text(2, 6, seed=1, pad_first=False)
    a = tiny_text(3, 4, seed=2, pad_first=False)   # answer 2 padded after 3 tokens below
    a["input_ids"][2, 3:] = 0
    a["attention_mask"][2, 3:] = 0
    k, w = [2, 1], torch.tensor([0.7, 0.3, 1.0])
    out = model({"image": image, "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
                 "answer_ids": a["input_ids"], "answer_mask": a["attention_mask"], "k": k, "weights": w}, alpha=0.4)   # distill: false, so alpha must change nothing
    with torch.no_grad():
        states = model.encode_question(image, q["input_ids"], q["attention_mask"])
        question_of = [0, 0, 1]
        total = 0.0
        for r, qi in enumerate(question_of):
            logits = model.text_decoder(a["input_ids"][r:r + 1], attention_mask=a["attention_mask"][r:r + 1],
                                        encoder_hidden_states=states[qi:qi + 1],
                                        encoder_attention_mask=q["attention_mask"][qi:qi + 1],
                                        return_logits=True)[0]
            nll = 0.0
            for pos in range(a["input_ids"].shape[1] - 1):   # token pos + 1 predicted at pos; padding skipped
                target = int(a["input_ids"][r, pos + 1])
                if target != 0:
                    nll += ce_by_hand(logits[pos].tolist(), [1.0 * (v == target) for v in range(logits.shape[1])])
            total += float(w[r]) * nll
    assert out["loss_vqa"].item() == pytest.approx(total / 2, rel=1e-5)   # over the 2 questions, not 3 answers


# ------------------------------------------------------------------ GRIT: the order the collector emits
def walk_by_hand(sim, start):
    """GRIT's walk (spec grit_mafa.md §1.3): image -> most similar unvisited text -> most similar unvisited
    image ...; every pair visited once."""
    m = len(sim)
    out, used, c = [start], {start}, start
    for j in range(1, m):
        row = [sim[c][x] for x in range(m)] if j % 2 else [sim[x][c] for x in range(m)]
        c = max((x for x in range(m) if x not in used), key=lambda x: row[x])
        out.append(c)
        used.add(c)
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_grit_emits_each_search_space_in_its_walks_order(precision):
    from dataset.grit import GritCollector
    torch.manual_seed(0)
    n, size, space, dim, batch = 48, 24, 12, 8, 4   # two full queues
    col = GritCollector(size, space, dim, batch, seed=5, device="cpu", precision=precision)
    img = F.normalize(torch.randn(n, dim), dim=1)
    txt = F.normalize(img + 0.5 * torch.randn(n, dim), dim=1)
    idx = torch.arange(1000, 1000 + n)
    probe = GritCollector(size, space, dim, batch, seed=5, device="cpu")
    gens = []
    for flush in (0, 1):   # each flush's shuffle and starts (GRIT's own stream)
        probe.flushes = flush
        gens.append(probe._generator())
    for s in range(0, n, 5):   # pushes of 5: one crosses the end of the first queue
        col.push(img[s:s + 5], txt[s:s + 5], idx[s:s + 5])
    order, _ = col.finish()
    dtype = torch.float32 if precision == "fp32" else torch.float16
    expected = []
    for flush, g in enumerate(gens):
        q = slice(flush * size, (flush + 1) * size)
        perm = torch.randperm(size, generator=g)
        qi, qt, qx = img[q].to(dtype).float()[perm], txt[q].to(dtype).float()[perm], idx[q][perm]
        for s in range(0, size, space):
            start = int(torch.randint(space, (1,), generator=g))
            sim = [[float(qi[s + a] @ qt[s + b]) for b in range(space)] for a in range(space)]
            expected += [int(qx[s + p]) for p in walk_by_hand(sim, start)]
    assert order.tolist() == expected


@pytest.mark.parametrize("decoder_distill", [True, False])
def test_vqa_loss_distils_from_the_momentum_decoder_with_alpha(decoder_distill):
    """ALBEF's decoder loss: (1 - alpha) * answer NLL + alpha * soft CE against the momentum decoder's
    distribution. With momentum copies equal to the online weights, the soft targets are the model's own.
    ``decoder_distill: false`` is the released vqa.pth's code: the decoder gets no alpha (plain NLL)."""
    torch.manual_seed(0)
    model = MODELS["vqa"](tiny_config(decoder_distill=decoder_distill)).eval()   # distill on (ALBEF's VQA)
    image = torch.randn(1, 3, 32, 32)
    q = tiny_text(1, 6, seed=1, pad_first=False)
    a = tiny_text(1, 4, seed=2, pad_first=False)
    out = model({"image": image, "question_ids": q["input_ids"], "question_mask": q["attention_mask"],
                 "answer_ids": a["input_ids"], "answer_mask": a["attention_mask"], "k": [1],
                 "weights": torch.tensor([1.0])}, alpha=0.3)
    with torch.no_grad():
        states = model.encode_question(image, q["input_ids"], q["attention_mask"])
        logits = model.text_decoder(a["input_ids"], attention_mask=a["attention_mask"], encoder_hidden_states=states,
                                    encoder_attention_mask=q["attention_mask"], return_logits=True)[0]
    total = 0.0
    for pos in range(3):
        row = logits[pos].tolist()
        target = int(a["input_ids"][0, pos + 1])
        z = max(row)
        p = [math.exp(x - z) for x in row]
        p = [x / sum(p) for x in p]
        nll = ce_by_hand(row, [1.0 * (v == target) for v in range(len(row))])
        total += 0.7 * nll + 0.3 * ce_by_hand(row, p) if decoder_distill else nll
    assert out["loss_vqa"].item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("distill", [True, False])
@pytest.mark.parametrize("kind,n_cls,n_img", [("ve", 3, 1), ("nlvr", 2, 2)])
def test_classification_logits_and_distilled_loss_by_hand(kind, n_cls, n_img, distill):
    """The head is Linear-ReLU-Linear on the fused [CLS]; the loss is (1 - alpha) * CE + alpha * soft CE
    against the momentum model (equal to the online one here, so the soft targets are its own softmax);
    with ``distill: false`` the plain CE whatever alpha is."""
    torch.manual_seed(0)
    model = MODELS[kind](tiny_config(distill=distill)).eval()
    b = 3
    image, text = torch.randn(b * n_img, 3, 32, 32), tiny_text(b, seed=4, pad_first=False)
    logits = model.predict(image, text["input_ids"], text["attention_mask"])
    with torch.no_grad():
        embeds = model.visual_encoder(image)
        enc = embeds if n_img == 1 else list(embeds.split(b))
        atts = torch.ones(embeds.shape[:2], dtype=torch.long)
        atts = atts if n_img == 1 else list(atts.split(b))
        cls = model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                 encoder_hidden_states=enc, encoder_attention_mask=atts).last_hidden_state[:, 0]
        w1, b1, w2, b2 = (model.cls_head[0].weight, model.cls_head[0].bias, model.cls_head[2].weight,
                          model.cls_head[2].bias)
        for i in range(b):
            hidden = [max(0.0, float(w1[r] @ cls[i] + b1[r])) for r in range(w1.shape[0])]
            for c in range(n_cls):
                assert float(logits[i, c]) == pytest.approx(sum(float(w2[c, r]) * h for r, h in enumerate(hidden))
                                                            + float(b2[c]), abs=1e-4)
    targets = torch.tensor([0, n_cls - 1, 1])
    loss = model(as_batch(image, text, targets=targets), alpha=0.4)["loss_cls"]
    expected = 0.0
    for i in range(b):
        row = logits[i].tolist()
        z = max(row)
        p = [math.exp(x - z) for x in row]
        p = [x / sum(p) for x in p]
        ce = ce_by_hand(row, [1.0 * (c == int(targets[i])) for c in range(n_cls)])
        expected += 0.6 * ce + 0.4 * ce_by_hand(row, p) if distill else ce
    assert loss.item() == pytest.approx(expected / b, rel=1e-5)


def test_itc_targets_share_a_rows_mass_among_its_positives():
    """Retrieval's ITC: every caption of the same image is a positive; the hard targets split 1 over them."""
    torch.manual_seed(0)
    m = MODELS["retrieval"](tiny_config())
    bs, q = 3, m.image_queue.shape[1]
    img, txt = F.normalize(torch.randn(bs, 16), dim=1), F.normalize(torch.randn(bs, 16), dim=1)
    pos = torch.zeros(bs, bs + q, dtype=torch.bool)
    pos[:, :bs] = torch.eye(bs, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True          # samples 0 and 1 show the same image
    pos[2, bs + 4] = pos[2, bs + 9] = True   # sample 2's image is twice in the queue
    loss, _, _ = momentum_itc(m, img, txt, img, txt, pos, 0.0)
    t = m.temp.item()
    all_t, all_i = torch.cat([txt, m.text_queue.t()]), torch.cat([img, m.image_queue.t()])
    total = 0.0
    for feats, others in ((img, all_t), (txt, all_i)):
        for i in range(bs):
            row = [float(feats[i] @ others[j]) / t for j in range(bs + q)]
            n = int(pos[i].sum())
            total += ce_by_hand(row, [1.0 / n if pos[i, j] else 0.0 for j in range(bs + q)]) / bs
    assert loss.item() == pytest.approx(total / 2, abs=1e-4)


def softmax_by_hand(row):
    z = max(row)
    e = [math.exp(x - z) for x in row]
    return [x / sum(e) for x in e]


# ------------------------------------------------------------------ in-batch ITC through the forward pass
def test_in_batch_itc_of_the_forward_pass_from_the_encoders_cls_states():
    """GRIT's ITC (no momentum, no consistency term): each feature is the L2-normalised projection of its
    encoder's first ([CLS]) state; targets are the diagonal."""
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(use_momentum=False, distill=False)).eval()
    image, text = images_and_text(4, seed=5)
    out = model(as_batch(image, text))
    with torch.no_grad():
        vit = model.visual_encoder(image)[:, 0]
        bert = model.text_bert(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                               mode="text").last_hidden_state[:, 0]

    def feature(proj, x):
        v = [float(proj.weight[r] @ x) + float(proj.bias[r]) for r in range(proj.weight.shape[0])]
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]
    with torch.no_grad():
        img = [feature(model.vision_proj, vit[i]) for i in range(4)]
        txt = [feature(model.text_proj, bert[i]) for i in range(4)]
    t = model.temp.item()
    sim = [[sum(a * b for a, b in zip(img[i], txt[j])) / t for j in range(4)] for i in range(4)]
    i2t = sum(ce_by_hand(sim[i], [1.0 * (j == i) for j in range(4)]) for i in range(4)) / 4
    t2i = sum(ce_by_hand([sim[j][i] for j in range(4)], [1.0 * (j == i) for j in range(4)]) for i in range(4)) / 4
    assert out["loss_ita"].item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)


def test_hidden_itc_joins_the_itc_loss_of_the_forward_pass(monkeypatch):
    from models.objectives import hitc
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(use_momentum=False, distill=False, return_hidden_state=True,
                                           num_hidden_align=1, vision_depth=3)).eval()
    seen = []
    real = hitc.hidden_itc
    monkeypatch.setattr(hitc, "hidden_itc", lambda *a: seen.append(real(*a)) or seen[-1])
    image, text = images_and_text(4, seed=5)
    out = model(as_batch(image, text))
    with torch.no_grad():
        img = F.normalize(model.vision_proj(model.visual_encoder(image)[:, 0]), dim=-1)
        txt = F.normalize(model.text_proj(model.text_bert(input_ids=text["input_ids"],
                                                          attention_mask=text["attention_mask"],
                                                          mode="text").last_hidden_state[:, 0]), dim=-1)
    t = model.temp.item()
    sim = [[float(img[i] @ txt[j]) / t for j in range(4)] for i in range(4)]
    i2t = sum(ce_by_hand(sim[i], [1.0 * (j == i) for j in range(4)]) for i in range(4)) / 4
    t2i = sum(ce_by_hand([sim[j][i] for j in range(4)], [1.0 * (j == i) for j in range(4)]) for i in range(4)) / 4
    assert len(seen) == 1 and seen[0].item() > 0
    assert out["loss_ita"].item() == pytest.approx((i2t + t2i) / 2 + seen[0].item(), abs=1e-5)


# ------------------------------------------------------------------ MAFA's filter: P(match)
def test_the_filters_match_probability_is_the_itm_heads_positive_class():
    from models.objectives.ecm import ConnectionDiscriminator
    torch.manual_seed(0)
    filt = ConnectionDiscriminator(MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)))
    image, text = images_and_text(3, seed=6)
    text_idx, image_idx = torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0])
    p = filt.match_prob(image, text["input_ids"], text["attention_mask"], text_idx, image_idx)
    m = filt.model
    with torch.no_grad():
        for j in range(3):
            ti, ii = int(text_idx[j]), int(image_idx[j])
            states = m.text_bert(input_ids=text["input_ids"][ti:ti + 1],
                                 attention_mask=text["attention_mask"][ti:ti + 1], mode="text").last_hidden_state
            cls = m.fuse(states, text["attention_mask"][ti:ti + 1], m.visual_encoder(image[ii:ii + 1]))[0]
            logits = [float(m.itm_head.weight[c] @ cls) + float(m.itm_head.bias[c]) for c in range(2)]
            assert float(p[j]) == pytest.approx(softmax_by_hand(logits)[1], abs=1e-5)   # class 1: a match


# ------------------------------------------------------------------ classification: the momentum teacher
@pytest.mark.parametrize("kind,n_img", [("ve", 1), ("nlvr", 2)])
def test_classification_distils_from_the_momentum_model_after_its_update(kind, n_img):
    torch.manual_seed(0)
    model = MODELS[kind](tiny_config(momentum=0.5)).eval()
    with torch.no_grad():   # the student moves away from its teacher
        for p in model.cls_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        online = dict(teacher.named_parameters())
        for name, p in teacher.named_parameters():
            head = name.split(".")[0]
            if head.endswith("_m"):
                p.copy_(0.5 * p + 0.5 * online[head[:-2] + name[len(head):]])
    b = 3
    image, text = torch.randn(b * n_img, 3, 32, 32), tiny_text(b, seed=4, pad_first=False)
    targets = torch.tensor([1, 0, 1])
    loss = model(as_batch(image, text, targets=targets), alpha=0.4)["loss_cls"]
    with torch.no_grad():
        student = model.predict(image, text["input_ids"], text["attention_mask"])
        soft = teacher.predict(image, text["input_ids"], text["attention_mask"], momentum=True)
    expected = sum(0.6 * ce_by_hand(student[i].tolist(), [1.0 * (c == int(targets[i])) for c in range(soft.shape[1])])
                   + 0.4 * ce_by_hand(student[i].tolist(), softmax_by_hand(soft[i].tolist())) for i in range(b)) / b
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ GRIT: statistics and the next epoch's order
def test_grit_statistics_of_a_search_space_of_one_batch():
    from dataset.grit import GritCollector
    torch.manual_seed(1)
    col = GritCollector(8, 4, 6, 4, seed=0, device="cpu")   # search space = batch: one batch per space
    img, txt = F.normalize(torch.randn(8, 6), dim=1), F.normalize(torch.randn(8, 6), dim=1)
    g = col._generator()
    col.push(img, txt, torch.arange(8))
    _, stats = col.finish()
    perm = torch.randperm(8, generator=g)
    hardest = []
    for s in (0, 4):   # each space is one batch in any order: its hardest negatives, whatever the walk
        rows = perm[s:s + 4]
        for a in rows:
            hardest.append(max(float(img[a] @ txt[c]) for c in rows if c != a))
    assert stats["hardness_grouped"] == pytest.approx(sum(hardest) / 8, abs=1e-5)


def test_grit_sets_the_next_epochs_order_from_the_walk():
    from dataset.grit import Grit, GroupedSampler
    torch.manual_seed(2)
    n, batch = 16, 4
    sampler = GroupedSampler(n, batch, 1, 0, shuffle=True, seed=3)
    grit = Grit({"collect_size": 8, "search_space": 8, "queue_precision": "fp32"}, sampler, 6, batch, 3, 0, 1,
                "cpu", n)
    grit.on_epoch_start(0)
    sampler.set_epoch(0)
    first = sampler.epoch_indices(0)
    feats = F.normalize(torch.randn(n, 6), dim=1)
    for s in range(0, n, batch):
        idx = first[s:s + batch]
        grit.on_step_end({"feats": (feats[idx], feats[idx])}, {"idx": idx}, s // batch)
    grit.on_epoch_end(0)
    nxt = sampler.epoch_indices(1).tolist()
    assert sorted(nxt) == list(range(n)) and list(sampler.orders) == [1]
    # identical image and text features: the walk pairs each item with itself, so every batch of the next
    # epoch is a run of the walk over one search space (8 items), cut into 2 batches of 4
    groups = [set(first[s:s + 8].tolist()) for s in (0, 8)]
    for s in range(0, n, batch):
        assert any(set(nxt[s:s + batch]) <= grp for grp in groups)


# ------------------------------------------------------------------ small rules with one value each
def test_mim_decoder_positions_are_maes_sine_cosine_table():
    from models.objectives.mim import sincos_pos_embed
    dim, grid = 8, 3
    emb = sincos_pos_embed(dim, grid)
    assert emb.shape == (1 + grid * grid, dim) and not emb[0].any()   # the CLS row is zero
    for k in range(grid * grid):   # patch k sits at row k // grid, column k % grid
        row, col = divmod(k, grid)
        expect = []
        for pos in (col, row):     # the first half encodes the column, the second the row
            freqs = [1.0 / 10000 ** (i / 2) for i in range(2)]   # dim / 4 = 2 frequencies per axis
            expect += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
        assert emb[1 + k].tolist() == pytest.approx(expect, abs=1e-6)


def test_ecm_thresholds_take_their_whole_closed_range():
    from models.objectives.ecm import ConnectionDiscriminator
    model = MODELS["retrieval"](tiny_config(use_momentum=False, distill=False))
    ConnectionDiscriminator(model, low=0.0, high=1.0)   # both ends allowed
    ConnectionDiscriminator(model, low=0.6, high=0.6)
    for low, high in ((-0.1, 0.5), (0.7, 0.6), (0.5, 1.1)):
        with pytest.raises(ValueError, match="0 <= low_threshold"):
            ConnectionDiscriminator(model, low=low, high=high)


def test_grad_cam_can_keep_the_first_vit_blocks_attention():
    torch.manual_seed(0)
    model = MODELS["retrieval"](tiny_config())
    model.image_tokens(torch.randn(2, 3, 32, 32), register_blk=0)
    probs = model.visual_encoder.blocks[0].attn.attention_map
    assert probs.shape == (2, 2, 17, 17) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 17))


# ------------------------------------------------------------------ MLM with and without distillation
@pytest.mark.parametrize("distill", [True, False])
def test_mlm_loss_mixes_the_label_ce_with_the_teachers_soft_targets_by_alpha(distill):
    """ALBEF's MLM: mean over masked tokens of (1 - alpha) * CE(label) + alpha * soft CE against the momentum
    teacher's softmax at the same corrupted input; without distillation the plain CE whatever alpha is."""
    torch.manual_seed(0)
    model = MODELS["pretrain"](tiny_config(mlm_probability=0.4, distill=distill)).eval()
    with torch.no_grad():   # a teacher that differs from the student
        for p in model.text_encoder_m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = {}
    student, teacher = model.text_encoder.forward, model.text_encoder_m.forward

    def spy(name, real):
        def f(ids, **kw):
            calls[name] = (ids, kw)
            return real(ids, **kw)
        return f
    model.text_encoder.forward = spy("student", student)
    model.text_encoder_m.forward = spy("teacher", teacher)
    image, text = images_and_text(4, 12, seed=7)
    out = model(as_batch(image, text), alpha=0.3)
    ids, kw = calls["student"]
    labels = kw["labels"]
    assert ("teacher" in calls) is distill
    with torch.no_grad():
        logits = student(ids, attention_mask=kw["attention_mask"], encoder_hidden_states=kw["encoder_hidden_states"],
                         encoder_attention_mask=kw["encoder_attention_mask"], return_logits=True)
        if distill:
            t_ids, t_kw = calls["teacher"]
            assert torch.equal(t_ids, ids)   # the teacher sees the same corrupted text
            t_logits = teacher(t_ids, attention_mask=t_kw["attention_mask"],
                               encoder_hidden_states=t_kw["encoder_hidden_states"],
                               encoder_attention_mask=t_kw["encoder_attention_mask"], return_logits=True)
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for pos in range(ids.shape[1]):
            if labels[b, pos] == -100:
                continue
            row = logits[b, pos].tolist()
            ce = ce_by_hand(row, [1.0 * (v == int(labels[b, pos])) for v in range(len(row))])
            if distill:
                ce = 0.7 * ce + 0.3 * ce_by_hand(row, softmax_by_hand(t_logits[b, pos].tolist()))
            total, n = total + ce, n + 1
    assert n > 0 and out["loss_mlm"].item() == pytest.approx(total / n, rel=1e-5)


def test_itm_loss_of_a_batch_without_any_weighted_pair_is_zero():
    from models.objectives import functional as objectives
    logits, labels = torch.randn(3, 2), torch.tensor([1, 0, 0])
    assert objectives.itm_loss(logits, labels, torch.zeros(3)).item() == 0.0   # not 0 / 0
    w = torch.tensor([1.0, 0.0, 1.0])
    expect = (ce_by_hand(logits[0].tolist(), [0.0, 1.0]) + ce_by_hand(logits[2].tolist(), [1.0, 0.0])) / 2
    assert objectives.itm_loss(logits, labels, w).item() == pytest.approx(expect, abs=1e-6)


@pytest.mark.parametrize("precision,device,dtype", [("auto", "cuda", torch.bfloat16), ("auto", "cpu", torch.float32),
                                                    ("fp32", "cuda", torch.float32), ("bf16", "cpu", torch.bfloat16)])
def test_the_filters_precision_by_device(precision, device, dtype):
    """``auto``: bf16 on CUDA, fp32 elsewhere; ``fp32`` / ``bf16`` force one (no GPU needed: the move is recorded)."""
    from models.objectives.ecm import ConnectionDiscriminator
    filt = ConnectionDiscriminator(MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)),
                                   precision=precision)
    moved = {}
    filt.model.to = lambda **kw: moved.update(kw)
    filt.to(device)
    assert filt.dtype == dtype and moved == {"device": torch.device(device), "dtype": dtype}
