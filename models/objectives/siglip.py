"""The sigmoid pairwise loss (SigLIP, Zhai et al. 2023) in place of ALBEF's softmax ITC: ``itc_loss: sigmoid``.

Every (image, text) pair of the global batch is a binary problem with logit ``exp(t) * cos + b`` (``logit_scale``
t, init log 10, and ``logit_bias`` b, init -10): -sum log sigmoid(+-logit) over the pairs, divided by the
batch. Each rank scores its own images against every rank's texts, gathered with their gradient (a [B, embed_dim]
exchange per step), so DDP's average of the ranks' losses is the loss of the global batch. Positives are the
diagonal, every caption of the same image (retrieval), and the connections MAFA's ECM found. The momentum
model, when on, still teaches MLM; the ITC queue is not used. ITM draws its negatives from the local block
of these logits.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.objectives.step import Objective
from models.objectives import functional as fn
from schema import value
from utils import all_gather_with_grad, concat_all_gather, get_rank


def sigmoid_loss(image_feat, text_feat_all, scale, bias, positives):
    """-sum over pairs of log sigmoid(z * (scale * cos + bias)) / rows; ``positives`` [B, N] bool gives z = +1."""
    logits = scale * image_feat @ text_feat_all.t() + bias
    z = positives.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / image_feat.shape[0], logits


class SigLIP(Objective):
    def __init__(self, positives="diagonal"):
        self.by_index = positives == "index"

    def attach(self, model, config):
        if value(config, "hn_itc"):
            raise ValueError("config key 'hn_itc' adds softmax columns: it needs itc_loss: softmax")
        model.logit_scale = nn.Parameter(torch.tensor(math.log(float(value(config, "siglip_init_scale")))))
        model.logit_bias = nn.Parameter(torch.tensor(float(value(config, "siglip_init_bias"))))

    def __call__(self, model, s):
        bs, dev = s.bs, s.image.device
        with fn.fp32(dev):
            text_all = all_gather_with_grad(s.text_feat.float())
            first = get_rank() * bs   # this rank's texts start here
            if self.by_index:
                positives = s.batch["idx"].view(-1, 1) == concat_all_gather(s.batch["idx"]).view(1, -1)
            else:
                positives = torch.zeros(bs, text_all.shape[0], dtype=torch.bool, device=dev)
                positives[:, first:first + bs] = torch.eye(bs, dtype=torch.bool, device=dev)
            if s.extra_positives is not None:
                positives[:, first:first + bs] |= s.extra_positives
            loss, logits = sigmoid_loss(s.image_feat.float(), text_all, model.logit_scale.exp().float(),
                                        model.logit_bias.float(), positives)
        local = logits[:, first:first + bs].detach()
        if s.itm_pairs is None:
            s.sim_i2t, s.sim_t2i, s.itm_positives = local, local.t(), positives[:, first:first + bs]
        return {"loss_ita": loss}
