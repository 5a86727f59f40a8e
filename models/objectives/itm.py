"""ALBEF's image-text matching: each positive pair, plus one negative image per text and one negative text
per image, drawn from the ITC similarities (``itm_negative_selection``: multinomial as ALBEF, argmax as
GRIT-VLP, uniform) or chosen before by another objective (MAFA's ECM)."""
import torch

from models.objectives.step import Objective
from models.objectives import functional as fn


def itm(model, text_embeds, text_atts, image_embeds, sim_i2t, sim_t2i, positives, hard=None, image_atts=None):
    """ITM on bs positives + bs (text, hard image) + bs (hard text, image) pairs. ``positives`` [bs, bs]
    bool marks pairs that must not be drawn as negatives. Returns (loss, extras)."""
    bs = text_embeds.shape[0]
    with torch.no_grad():
        hard = hard or model.itm_hard
        if hard == "uniform":
            pick = lambda sim, pos: fn.uniform_itm_negatives(pos)   # noqa: E731
        else:
            pick = fn.sample_itm_negatives if hard == "multinomial" else fn.hardest_itm_negatives
        neg_img, valid_t2i = pick(sim_t2i[:, :bs], positives)
        neg_txt, valid_i2t = pick(sim_i2t[:, :bs], positives)
    zeros = torch.zeros(2 * bs, dtype=torch.long, device=text_embeds.device)
    return itm_pairs(model, text_embeds, text_atts, image_embeds, neg_img, neg_txt, zeros,
                     torch.cat([valid_t2i, valid_i2t]).float(), image_atts)


def itm_pairs(model, text_embeds, text_atts, image_embeds, neg_img, neg_txt, neg_labels, neg_weights, image_atts=None):
    """ITM over the bs positives, (text k, image neg_img[k]) and (text neg_txt[k], image k), the last 2bs
    with labels ``neg_labels`` (MAFA turns connections into 1s) and weights ``neg_weights``."""
    bs = text_embeds.shape[0]
    if image_atts is None:
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    image_embeds = model.shared_kv(image_embeds)
    text_all = torch.cat([text_embeds, text_embeds[neg_txt]], dim=0)
    atts_all = torch.cat([text_atts, text_atts[neg_txt]], dim=0)
    image_all = image_embeds[torch.cat([neg_img, torch.arange(bs, device=neg_img.device)])]
    cls_pos = model.fuse(text_embeds, text_atts, image_embeds, image_atts)
    cls_neg = model.fuse(text_all, atts_all, image_all, torch.cat([image_atts[neg_img], image_atts], dim=0))
    logits = model.itm_head(torch.cat([cls_pos, cls_neg], dim=0))
    labels = torch.cat([torch.ones(bs, dtype=torch.long, device=logits.device), neg_labels.to(logits.device)])
    weights = torch.cat([torch.ones(bs, device=logits.device), neg_weights.to(logits.device)])
    loss = fn.itm_loss(logits, labels, weights)
    return loss, {"itm_logits": logits, "neg_image_idx": neg_img, "neg_text_idx": neg_txt}


class ITM(Objective):
    def __call__(self, model, s):
        if s.itm_pairs is not None:
            loss, _ = itm_pairs(model, s.text_embeds, s.attention_mask, s.image_embeds, *s.itm_pairs, s.image_atts)
        else:
            loss, _ = itm(model, s.text_embeds, s.attention_mask, s.image_embeds, s.sim_i2t, s.sim_t2i,
                          s.itm_positives, image_atts=s.image_atts)
        return {"loss_itm": loss}
