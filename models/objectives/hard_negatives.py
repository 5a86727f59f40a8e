"""CE-CLIP's hard-negative losses on ALBEF's ITC (spec: vicha_finegrained.md §2.4, §2.6).

Every sample brings four generated negative captions, in CE-CLIP's type order (relation swap, attribute,
object, action), each with a validity flag. Their texts go through the online unimodal text encoder (6 BERT
layers + ``text_proj``), never through the fusion layers, the queue or MLM.

* ITC-hn (``hn_itc``): the image->text logits get the negatives as extra columns, with target exactly 0
  (the momentum teacher gives them no mass); ``hn_scope: global`` uses every rank's negatives (CE-CLIP),
  ``own`` only the sample's four.
* CMR (``cmr_weight``): mean over valid (i, j) of relu(theta_j + cos(v_i, h_ij) - cos(v_i, t_i)) / temp,
  with one adaptive margin theta_j per type, kept in cosine units (ALBEF's 1/temp differs from CLIP's logit
  scale of 100, so CE-CLIP's bound 10 is 0.1 here).
* IMC (``imc_weight``): CE over [v_i . t_i, t_i . h_k for every negative k] / temp, target 0 (CE-CLIP's
  Jan/Feb-2024 form, §2.4.4; the other versions pull captions towards one arbitrary negative).

Fixed against CE-CLIP (§3.2): invalid negatives are masked everywhere (not easy negatives, not in the CMR
denominator), a type with no valid negative in the global batch keeps its margin (CE-CLIP: NaN), margins
are a checkpointed buffer, equal on every rank, not reset each epoch unless ``cmr_reset_each_epoch``.
"""
import torch
import torch.nn.functional as F

from models.objectives.step import Objective
from models.objectives import functional as objectives
from schema import hard_negative_losses_on, value
from utils import all_gather_with_grad, all_reduce_sum, concat_all_gather

HN_TYPES = ("relation", "attribute", "object", "action")
MASKED = -1e4   # the logit of an invalid negative: exp() is 0 and 0 * log_softmax stays finite


def gather_valid(valid):
    """Every rank's [B, 4] flags, flattened rank-major then sample-major (the order of ``all_gather_with_grad``
    on [4B, d] features); sent as uint8 (gloo has no bool collectives)."""
    return concat_all_gather(valid.reshape(-1).to(torch.uint8)).bool()


def enabled(config):
    return hard_negative_losses_on(config)


class HardNegativeLosses(torch.nn.Module):
    """The three losses and the CMR margins (buffer ``theta``, cosine units, one per type)."""

    def __init__(self, config):
        super().__init__()
        self.itc = bool(value(config, "hn_itc"))
        self.scope = value(config, "hn_scope")
        self.cmr_weight = float(value(config, "cmr_weight"))
        self.imc_weight = float(value(config, "imc_weight"))
        self.imc_scope = value(config, "imc_negatives")
        self.threshold = value(config, "cmr_threshold")
        self.fixed = float(value(config, "cmr_fixed_threshold"))
        self.upper = float(value(config, "cmr_upper_bound_cos"))
        self.reset_each_epoch = bool(value(config, "cmr_reset_each_epoch"))
        start = self.fixed if self.threshold == "fixed" else 0.0
        self.register_buffer("theta", torch.full((len(HN_TYPES),), start))
        self.register_buffer("epoch_seen", torch.tensor(-1))   # a resume into the same epoch resets nothing

    def on_epoch(self, epoch):
        if self.reset_each_epoch and self.threshold != "fixed" and epoch > int(self.epoch_seen):
            self.theta.zero_()
        self.epoch_seen.fill_(max(epoch, int(self.epoch_seen)))

    def itc_columns(self, image_feat, hn_feat, valid):
        """[B, K] logit columns for the image->text ITC (K = 4 x global batch, or 4), times 1 (the caller
        divides by temp); invalid negatives at MASKED."""
        b = image_feat.shape[0]
        if self.scope == "own":
            logits = torch.einsum("bd,bkd->bk", image_feat, hn_feat.view(b, -1, hn_feat.shape[-1]))
            return logits, valid
        hn_all = all_gather_with_grad(hn_feat)
        valid_all = gather_valid(valid)
        return image_feat @ hn_all.t(), valid_all[None, :].expand(b, -1)

    def extra_i2t(self, image_feat, hn_feat, valid, temp):
        """ITC-hn's columns (already / temp and masked), or None when ``hn_itc`` is off."""
        if not self.itc:
            return None
        with objectives.fp32(image_feat.device):
            logits, mask = self.itc_columns(image_feat.float(), hn_feat.float(), valid)
            return (logits / temp.float()).masked_fill(~mask, MASKED)

    def forward(self, image_feat, text_feat, hn_feat, valid, temp):
        """{'loss_cmr', 'loss_imc'} (weighted) for the switched-on losses; updates the margins."""
        out = {}
        b, k = valid.shape
        with objectives.fp32(image_feat.device):
            v, t, h = image_feat.float(), text_feat.float(), hn_feat.float().view(b, k, -1)
            temp = temp.float()
            pos = (v * t).sum(-1)                       # [B] cos(v_i, t_i), online-online
            neg = torch.einsum("bd,bkd->bk", v, h)      # [B, 4] cos(v_i, h_ij)
            if self.cmr_weight > 0:
                hinge = F.relu((self.theta[None, :] + neg - pos[:, None]) / temp) * valid
                out["loss_cmr"] = self.cmr_weight * hinge.sum() / valid.sum().clamp(min=1)
                self.update_theta(pos.detach(), neg.detach(), valid)
            if self.imc_weight > 0:
                if self.imc_scope == "own":
                    tn, mask = torch.einsum("bd,bkd->bk", t, h), valid
                else:
                    tn = t @ all_gather_with_grad(hn_feat.float()).t()
                    mask = gather_valid(valid)[None, :].expand(b, -1)
                logits = torch.cat([pos[:, None], tn.masked_fill(~mask, MASKED * temp)], 1) / temp
                target = torch.zeros(b, dtype=torch.long, device=logits.device)
                out["loss_imc"] = self.imc_weight * F.cross_entropy(logits, target)
        return out

    @torch.no_grad()
    def update_theta(self, pos, neg, valid):
        """The margins for the next step, from the whole global batch (every rank computes the same)."""
        if self.threshold == "fixed":
            return
        vf = valid.float()
        if self.threshold == "mean":
            # theta_j = mean_i cos(v_i, t_i) - mean over valid i of cos(v_i, h_ij)
            stats = torch.cat([pos.sum()[None], pos.new_tensor([pos.numel()]), (neg * vf).sum(0), vf.sum(0)])
            stats = all_reduce_sum(stats)
            count = stats[2 + len(HN_TYPES):]
            new = stats[0] / stats[1] - stats[2:2 + len(HN_TYPES)] / count.clamp(min=1)
        else:   # max: max over valid i of (cos(v_i, t_i) - cos(v_i, h_ij)) / 5
            gap = (pos[:, None] - neg).masked_fill(~valid, float("-inf")).amax(0)
            gap = concat_all_gather(gap[None]).amax(0)
            count = all_reduce_sum(vf.sum(0))
            new = gap / 5
        new = new.clamp(0.0, self.upper)
        self.theta.copy_(torch.where(count > 0, new, self.theta))   # an empty type keeps its margin


class HardNegatives(Objective):
    """The three losses in a contrastive model's step; their module is ``model.hn`` (the margins' buffer
    keeps its checkpoint name ``hn.theta``). The batch brings ``hn_input_ids`` / ``hn_attention_mask``
    ([4B, L], sample-major) and ``hn_valid`` ([B, 4])."""
    uses_temp = True

    def attach(self, model, config):
        model.hn = HardNegativeLosses(config)

    def on_epoch(self, model, epoch):
        model.hn.on_epoch(epoch)

    def prepare(self, model, s):
        if "hn_input_ids" not in s.batch:
            raise ValueError("a hard-negative loss is on (hn_itc / cmr_weight / imc_weight) but the batch has no "
                             "hard negatives")
        b = s.batch
        # unimodal: never fused, queued or masked
        s.notes["hn_feat"] = model.encode_text(b["hn_input_ids"], b["hn_attention_mask"])[1]
        s.extra_i2t = model.hn.extra_i2t(s.image_feat, s.notes["hn_feat"], b["hn_valid"], model.temp)

    def __call__(self, model, s):
        return model.hn(s.image_feat, s.text_feat, s.notes["hn_feat"], s.batch["hn_valid"], model.temp)
