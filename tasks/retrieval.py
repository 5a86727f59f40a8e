"""ALBEF's retrieval evaluation (spec §7.1), exact but fast.

ALBEF ranks candidates by ITC similarity, then re-scores each image's and each text's top ``k_test`` with
the ITM head, one query at a time (``reference_evaluation`` below does exactly that, for tests and the
benchmark). ``evaluation`` gives the same score matrices (to float rounding) and skips only work whose
result is never used:

* a pair in both an image's and a text's top-k is scored once;
* the cross-attention keys and values of an image are projected once (images in blocks of up to
  ``kv_budget`` bytes of keys and values) instead of once per pair;
* pairs are batched by image, so cross-attention is one large product against that image's keys, and
  captions are packed without padding (padding is masked out in ALBEF, so it changes nothing);
* the first fusion layer's self-attention and cross-attention query see only the text: once per caption;
* the last fusion layer computes only the [CLS] row, the only one the ITM head reads, and folds its key
  and value projections into the [CLS] query instead of projecting every token.

Scores are the ITM match logit inside a row's top-k and -100 elsewhere. Unique pairs are split across
ranks and the scores summed, so every rank ends with the full matrices.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset.collate import Collate, tokenize_concepts
from engine import logger
from models.xbert import PairScorer
from schema import value
from utils import all_reduce_sum, get_rank, get_world_size

FILL = -100.0


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, max_length=30, chunk=256):
    """(attention masks, last hidden states [Nt, L, D], normalised ITC features [Nt, E])."""
    atts, states, feats = [], [], []
    for s in range(0, len(texts), chunk):
        t = tokenizer(texts[s:s + chunk], padding="max_length", truncation=True, max_length=max_length)
        i, a = t["input_ids"].to(device), t["attention_mask"].to(device)
        h, f = model.encode_text(i, a)
        atts.append(a), states.append(h), feats.append(f)
    return torch.cat(atts), torch.cat(states), torch.cat(feats)


@torch.no_grad()
def encode_images(model, dataset, device, batch_size=64, num_workers=2, tokenizer=None, vc_max_tokens=55):
    """(image token states [Ni, T, D], their attention masks [Ni, T], normalised ITC features [Ni, E],
    unreadable image paths).

    With visual concepts, each batch's concepts are padded to that batch's longest, as in training; the
    states are then zero-padded to the longest batch, padding masked (a prefix of ones per image).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=Collate())
    concept_text = getattr(dataset, "concept_text", None)
    if getattr(model, "use_concepts", False) and (concept_text is None or tokenizer is None):
        raise ValueError("kw_img_model: evaluation needs the dataset's concepts ('kwords') and the tokenizer")
    states, atts, feats, bad = [], [], [], []
    for batch in loader:
        concepts = None
        if getattr(model, "use_concepts", False):
            ids, mask = tokenize_concepts(tokenizer, [concept_text[i] for i in batch["idx"].tolist()], vc_max_tokens)
            concepts = (ids.to(device), mask.to(device))
        h, f = model.encode_image(batch["image"].to(device), concepts=concepts)
        states.append(h), atts.append(model.image_atts(h, concepts)), feats.append(f), bad.extend(batch["bad"])
    t = max(h.shape[1] for h in states)
    states = torch.cat([F.pad(h, (0, 0, 0, t - h.shape[1])) for h in states])
    atts = torch.cat([F.pad(a, (0, t - a.shape[1])) for a in atts])
    return states, atts, torch.cat(feats), bad


def topk_pairs(sims, k):
    """Candidate pairs as flat ids ``image * Nt + text``: each image's and each text's top-k by ITC."""
    ni, nt = sims.shape
    ki, kt = min(k, nt), min(k, ni)
    top_t = sims.topk(ki, dim=1).indices                       # [Ni, ki] texts per image
    top_i = sims.t().topk(kt, dim=1).indices                   # [Nt, kt] images per text
    i2t = torch.arange(ni, device=sims.device)[:, None] * nt + top_t
    t2i = top_i * nt + torch.arange(nt, device=sims.device)[:, None]
    return i2t, t2i


def _kv_bytes(scorer, image_states):
    """Bytes of one image's cross-attention keys and values over all fusion layers."""
    return 2 * len(scorer.layers) * image_states.shape[1] * scorer.bert.config.hidden_size * image_states.element_size()


@torch.no_grad()
def score_matrices(model, sims, image_states, text_states, text_atts, k, pair_batch=1024, kv_budget=2 ** 29,
                   image_atts=None):
    """(i2t [Ni, Nt], t2i [Nt, Ni]) score matrices of ALBEF's procedure (see the module docstring).
    ``image_atts`` [Ni, T] masks image tokens (a prefix of ones per image: concepts and their padding)."""
    ni, nt = sims.shape
    i2t_ids, t2i_ids = topk_pairs(sims, k)
    pairs = torch.unique(torch.cat([i2t_ids.reshape(-1), t2i_ids.reshape(-1)]))   # sorted: grouped by image
    rank, world = get_rank(), get_world_size()
    step = math.ceil(len(pairs) / world)
    scorer = PairScorer(model, image_states, text_states, text_atts)
    # One copy of this rank's share to the host: the batching is planned there, and the indices of every
    # batch go back in one copy, so the scoring loop never waits on the device.
    mine = pairs[rank * step:(rank + 1) * step].cpu().numpy()
    img, txt = mine // nt, mine % nt
    bounds = np.flatnonzero(np.diff(img)) + 1
    groups = np.split(np.arange(len(mine)), bounds) if len(mine) else []
    # Plan every batch (one image, captions of similar length) and move all their indices in one copy each.
    batches = []
    for g in groups:
        g = g[np.argsort(scorer.lengths_np[txt[g]], kind="stable")]
        batches += [(int(img[g[0]]), g[s:s + pair_batch]) for s in range(0, len(g), pair_batch)]
    packs = [scorer.pack(txt[sel]) for _, sel in batches]
    dev = sims.device
    cat = lambda j: torch.from_numpy(np.concatenate([p[j] for p in packs]) if packs else np.zeros(0, int)).to(dev)  # noqa: E731
    src_all, starts_all, slot_all, lengths_all = cat(0), cat(1), cat(2), cat(3)
    # masked image tokens sit at the end of each image's states: attending to a prefix is exact
    n_img = (image_atts.sum(1).cpu().numpy() if image_atts is not None
             else np.full(ni, image_states.shape[1]))
    # Images in blocks whose cross-attention keys/values are projected once.
    block = max(1, int(kv_budget // max(1, _kv_bytes(scorer, image_states))))
    out, kv, kv_first, tok, row = [], None, -1, 0, 0
    for (i, sel), (src, _, _, lengths, n) in zip(batches, packs):
        if kv is None or not kv_first <= i < kv_first + block:
            kv_first = i
            kv = scorer.image_kv(torch.arange(i, min(ni, i + block), device=dev))
        m = int(n_img[i])
        kv_i = [(k_[i - kv_first][:, :m], v_[i - kv_first][:, :m]) for k_, v_ in kv]
        t, p = len(src), len(sel)
        out.append(scorer(kv_i, src_all[tok:tok + t], starts_all[row:row + p], slot_all[tok:tok + t],
                          lengths_all[row:row + p], n))
        tok, row = tok + t, row + p
    scores = torch.zeros(len(pairs), device=dev)
    if out:
        sel = torch.from_numpy(np.concatenate([b[1] for b in batches]) + rank * step).to(dev)
        scores[sel] = torch.cat(out)
    scores = all_reduce_sum(scores)
    flat = torch.full((ni * nt,), FILL, device=sims.device)
    flat[pairs] = scores
    full = flat.view(ni, nt)
    i2t = torch.full((ni, nt), FILL, device=sims.device)
    i2t.view(-1)[i2t_ids.reshape(-1)] = full.view(-1)[i2t_ids.reshape(-1)]
    t2i = torch.full((ni, nt), FILL, device=sims.device)    # built image-major, returned transposed
    t2i.view(-1)[t2i_ids.reshape(-1)] = full.view(-1)[t2i_ids.reshape(-1)]
    return i2t, t2i.t().contiguous()


@torch.no_grad()
def evaluation(model, dataset, tokenizer, device, k_test=256, max_length=30, pair_batch=1024, batch_size=64,
               num_workers=2, autocast=None, vc_max_tokens=55):
    """Returns (i2t scores, t2i scores, ITC similarities) as numpy arrays and the unreadable image paths."""
    model.eval()
    ctx = autocast() if autocast else torch.autocast(device.type, enabled=False)
    with ctx:
        text_atts, text_states, text_feats = encode_texts(model, tokenizer, dataset.text, device, max_length)
        image_states, image_atts, image_feats, bad = encode_images(model, dataset, device, batch_size, num_workers,
                                                                   tokenizer, vc_max_tokens)
        sims = image_feats.float() @ text_feats.float().t()
        i2t, t2i = score_matrices(model, sims, image_states, text_states, text_atts, k_test, pair_batch,
                                  image_atts=image_atts)
    return i2t.cpu().numpy(), t2i.cpu().numpy(), sims.cpu().numpy(), bad


# ---------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_scores(model, sims, image_states, text_states, text_atts, k, image_rows=None, text_rows=None,
                     image_atts=None):
    """ALBEF's loop: one fusion pass of k pairs per image and per text (slow; for tests and benchmarks).

    ``image_rows`` / ``text_rows`` restrict it to some queries (the other rows stay at -100).
    """
    ni, nt = sims.shape
    if image_atts is None:
        image_atts = torch.ones(image_states.shape[:2], dtype=torch.long, device=image_states.device)
    i2t = torch.full((ni, nt), FILL, device=sims.device)
    for i in range(ni) if image_rows is None else image_rows:
        top = sims[i].topk(min(k, nt))
        enc = image_states[i].repeat(len(top.indices), 1, 1)
        cls = model.fuse(text_states[top.indices], text_atts[top.indices], enc,
                         image_atts[i].repeat(len(top.indices), 1))
        i2t[i, top.indices] = model.itm_head(cls)[:, 1].float()
    t2i = torch.full((nt, ni), FILL, device=sims.device)
    for j in range(nt) if text_rows is None else text_rows:
        top = sims[:, j].topk(min(k, ni))
        n = len(top.indices)
        cls = model.fuse(text_states[j].repeat(n, 1, 1), text_atts[j].repeat(n, 1), image_states[top.indices],
                         image_atts[top.indices])
        t2i[j, top.indices] = model.itm_head(cls)[:, 1].float()
    return i2t, t2i


# ---------------------------------------------------------------------------------------------- metrics
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


# ---------------------------------------------------------------------------------------------- launcher glue
def evaluate_split(model, dataset, tokenizer, config, device, autocast=None):
    """``itm_eval`` metrics of ``model`` on one ``re_eval_dataset``, with the config's evaluation keys."""
    i2t, t2i, _, bad = evaluation(model, dataset, tokenizer, device, k_test=value(config, "k_test"),
                                  max_length=value(config, "eval_max_tokens"),
                                  pair_batch=value(config, "eval_pair_batch"),
                                  batch_size=value(config, "batch_size_test"),
                                  num_workers=value(config, "num_workers"), autocast=autocast,
                                  vc_max_tokens=value(config, "vc_max_tokens"))
    metrics = itm_eval(i2t, t2i, dataset.txt2img, dataset.img2txt)
    if bad:
        metrics["bad_images"] = len(bad)
        print(f"{len(bad)} unreadable evaluation images scored as blank; first: {bad[:3]}")
    return metrics


class Results(logger.Results):
    COLUMNS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
