"""ALBEF's image-text contrastive loss (softmax over similarities / temp).

With ``use_momentum`` the keys are the momentum features of the batch and the queue, and the targets are
distilled from the momentum similarities (ALBEF); without it the keys are the batch's own features, detached
(GRIT-VLP), with GRIT's optional consistency term. Positives are the diagonal (pretraining) or every caption
of the same image, in the batch or the queue (retrieval, by ``idx``).
"""
import torch

from models.momentum import dequeue_and_enqueue
from models.objectives.step import Objective
from models.objectives import functional as fn


def with_columns(logits, targets, extra):
    """(logits, targets) with ``extra`` logit columns appended at target 0 (the consistency term and ITM
    read the original columns only)."""
    if extra is None:
        return logits, targets
    return torch.cat([logits, extra.to(logits.dtype)], 1), torch.cat([targets, targets.new_zeros(extra.shape)], 1)


def momentum_itc(model, image_feat, text_feat, image_feat_m, text_feat_m, positives, alpha, extra_i2t=None):
    """ITC against momentum features + queue. ``positives`` is [bs, bs + Q] bool. Returns (loss, sims)."""
    with fn.fp32(image_feat.device):
        image_feat_all = torch.cat([image_feat_m.t(), model.image_queue.clone().detach()], dim=1).float()
        text_feat_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach()], dim=1).float()
        temp = model.temp.float()
        sim_i2t = image_feat.float() @ text_feat_all / temp
        sim_t2i = text_feat.float() @ image_feat_all / temp
        with torch.no_grad():
            pos = positives.float()
            if torch.is_tensor(alpha) or alpha > 0:   # a tensor alpha (compiled steps) takes this branch
                t_i2t = fn.itc_targets(image_feat_m.float() @ text_feat_all / temp, pos, alpha)
                t_t2i = fn.itc_targets(text_feat_m.float() @ image_feat_all / temp, pos, alpha)
            else:
                t_i2t = t_t2i = fn.itc_targets(None, pos, 0)
        loss = (fn.soft_target_ce(*with_columns(sim_i2t, t_i2t, extra_i2t)) +
                fn.soft_target_ce(sim_t2i, t_t2i)) / 2
    return loss, sim_i2t, sim_t2i


def in_batch_sims(model, image_feat, text_feat):
    """(sim_i2t, sim_t2i) over the batch only (GRIT-VLP): the keys are the other modality's features,
    detached as in GRIT (each direction trains one tower, as with ALBEF's momentum keys)."""
    with fn.fp32(image_feat.device):
        temp = model.temp.float()
        image_feat, text_feat = image_feat.float(), text_feat.float()
        return image_feat @ text_feat.detach().t() / temp, text_feat @ image_feat.detach().t() / temp


def in_batch_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i, consistency=0.0, extra_i2t=None):
    """Soft-target ITC over in-batch similarities; with ``consistency`` > 0 each direction is also pulled
    toward the other's detached distribution (GRIT's consistency term)."""
    with fn.fp32(sim_i2t.device):
        loss = (fn.soft_target_ce(*with_columns(sim_i2t, targets_i2t, extra_i2t)) +
                fn.soft_target_ce(sim_t2i, targets_t2i)) / 2
        if consistency > 0:
            with torch.no_grad():
                p_i2t, p_t2i = sim_i2t.float().softmax(1), sim_t2i.float().softmax(1)
            loss = loss + consistency * (fn.soft_target_ce(sim_i2t, p_t2i) + fn.soft_target_ce(sim_t2i, p_i2t)) / 2
    return loss


def in_batch_itc(model, image_feat, text_feat, positives, extra_i2t=None):
    """GRIT's ITC: in-batch similarities, targets spread over ``positives``. Returns (loss, sims)."""
    sim_i2t, sim_t2i = in_batch_sims(model, image_feat, text_feat)
    targets = fn.itc_targets(None, positives.float(), 0)
    return in_batch_loss(sim_i2t, sim_t2i, targets, targets.t(), model.itc_consistency, extra_i2t), sim_i2t, sim_t2i


def batch_positives(s, by_index):
    """[B, B] bool: the diagonal, or every pair of the same image (``idx``)."""
    if by_index:
        idx = s.batch["idx"].view(-1, 1)
        return idx == idx.t()
    return torch.eye(s.bs, dtype=torch.bool, device=s.image.device)


class ITC(Objective):
    uses_temp = True

    def __init__(self, positives="diagonal"):
        self.by_index = positives == "index"

    def __call__(self, model, s):
        if not model.use_momentum:
            if s.itc_targets is not None:   # set by an objective before this one (MAFA's S-ITC)
                loss = in_batch_loss(s.sim_i2t, s.sim_t2i, *s.itc_targets, model.itc_consistency, s.extra_i2t)
            else:
                s.itm_positives = batch_positives(s, self.by_index)
                loss, s.sim_i2t, s.sim_t2i = in_batch_itc(model, s.image_feat, s.text_feat, s.itm_positives,
                                                          s.extra_i2t)
            return {"loss_ita": loss}
        bs, dev = s.bs, s.image.device
        idx = None
        if self.by_index:
            idx = s.batch["idx"].view(-1, 1)
            positives = idx == torch.cat([idx.t(), model.idx_queue.clone().detach()], dim=1)
        else:
            # one comparison, not an eye written into zeros: inductor's CPU code for that padded bool mask fails
            # to build (torch 2.14)
            positives = (torch.arange(bs + model.image_queue.shape[1], device=dev)[None, :] ==
                         torch.arange(bs, device=dev)[:, None])
        loss, s.sim_i2t, s.sim_t2i = momentum_itc(model, s.image_feat, s.text_feat, s.image_feat_m, s.text_feat_m,
                                                  positives, s.alpha if model.distill else 0.0, s.extra_i2t)
        dequeue_and_enqueue(model, s.image_feat_m, s.text_feat_m, idx)
        s.itm_positives = positives[:, :bs]
        return {"loss_ita": loss}
