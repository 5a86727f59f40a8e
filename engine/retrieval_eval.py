"""ALBEF's retrieval evaluation: ITC top-k candidates re-scored by the ITM head, in large pair batches.

Scores are the ITM match logit inside each row's top ``k_test`` and -100 elsewhere (ALBEF's convention);
rows are split across ranks and summed, so every rank ends with the full matrices.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset import eval_collate
from engine.distributed import all_reduce_sum, get_rank, get_world_size

FILL = -100.0


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, max_length=30, chunk=256):
    atts, feats, embeds = [], [], []
    for s in range(0, len(texts), chunk):
        t = tokenizer(texts[s:s + chunk], padding="max_length", truncation=True, max_length=max_length)
        i, a = t["input_ids"].to(device), t["attention_mask"].to(device)
        f, e = model.encode_text(i, a)
        atts.append(a), feats.append(f), embeds.append(e)
    return torch.cat(atts), torch.cat(feats), torch.cat(embeds)


@torch.no_grad()
def encode_images(model, dataset, device, batch_size=64, num_workers=2):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=eval_collate)
    feats, embeds, bad = [], [], []
    for batch in loader:
        f, e = model.encode_image(batch["image"].to(device))
        feats.append(f), embeds.append(e), bad.extend(batch["bad"])
    return torch.cat(feats), torch.cat(embeds), bad


@torch.no_grad()
def rescore(model, sims, query_is_image, image_feats, text_feats, text_atts, k, pair_batch):
    """Score matrix [queries, candidates]: ITM logits on each query row's top-k, FILL elsewhere."""
    nq, nc = sims.shape
    k = min(k, nc)
    rank, world = get_rank(), get_world_size()
    step = -(-nq // world)
    rows = torch.arange(rank * step, min(nq, (rank + 1) * step), device=sims.device)
    out = torch.zeros(nq, nc, device=sims.device)
    if len(rows):
        topk = sims[rows].topk(k, dim=1).indices                 # [r, k]
        q = rows[:, None].expand_as(topk).reshape(-1)
        c = topk.reshape(-1)
        img_idx, txt_idx = (q, c) if query_is_image else (c, q)
        scores = torch.empty(len(q), device=sims.device)
        for s in range(0, len(q), pair_batch):
            ii, tt = img_idx[s:s + pair_batch], txt_idx[s:s + pair_batch]
            cls = model.fuse(text_feats[tt], text_atts[tt], image_feats[ii])
            scores[s:s + pair_batch] = model.itm_head(cls)[:, 1].float()
        block = torch.full((len(rows), nc), FILL, device=sims.device)
        block.scatter_(1, topk, scores.view(len(rows), k))
        out[rows] = block
    return all_reduce_sum(out)


@torch.no_grad()
def evaluation(model, dataset, tokenizer, device, k_test=256, max_length=30, pair_batch=1024, batch_size=64,
               num_workers=2, autocast=None):
    model.eval()
    ctx = autocast() if autocast else torch.autocast(device.type, enabled=False)
    with ctx:
        text_atts, text_feats, text_embeds = encode_texts(model, tokenizer, dataset.text, device, max_length)
        image_feats, image_embeds, bad = encode_images(model, dataset, device, batch_size, num_workers)
        sims = image_embeds.float() @ text_embeds.float().t()
        i2t = rescore(model, sims, True, image_feats, text_feats, text_atts, k_test, pair_batch)
        t2i = rescore(model, sims.t().contiguous(), False, image_feats, text_feats, text_atts, k_test, pair_batch)
    return i2t.cpu().numpy(), t2i.cpu().numpy(), sims.cpu().numpy(), bad


def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """ALBEF's recall metrics; an image counts as found if any of its captions ranks within K."""
    ranks = np.zeros(scores_i2t.shape[0])
    for i, row in enumerate(scores_i2t):
        order = np.argsort(row)[::-1]
        ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    tr1, tr5, tr10 = (100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10))
    ranks = np.zeros(scores_t2i.shape[0])
    for j, row in enumerate(scores_t2i):
        order = np.argsort(row)[::-1]
        ranks[j] = np.where(order == txt2img[j])[0][0]
    ir1, ir5, ir10 = (100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean, "img_r1": ir1, "img_r5": ir5,
            "img_r10": ir10, "img_r_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2}
