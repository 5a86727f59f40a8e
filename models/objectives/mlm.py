"""ALBEF's masked language modelling conditioned on the image, distilled from the momentum model (alpha)."""
import torch
import torch.nn.functional as F

from models.objectives.step import Objective
from models.objectives import functional as fn


def mlm(model, input_ids, attention_mask, image_embeds, image_embeds_m, alpha, image_atts=None):
    ids, labels = fn.mask_tokens(input_ids, model.bert_config.vocab_size, model.mlm_probability,
                                 model.special_ids["mask"], model.special_ids["pad"], model.special_ids["cls"])
    # the MLM heads run at the masked positions only (the released checkpoints' sequence-axis distillation
    # needs them all); finding the positions is the step's one host sync, before the MLM passes start
    full = model.distill_dim == 1 or not model.exact_savings
    positions = None if full else (labels != -100).nonzero(as_tuple=True)
    soft = None
    if model.distill and (torch.is_tensor(alpha) or alpha > 0):   # tensor alpha: no branch on its value
        with torch.no_grad():
            logits_m = model.text_encoder_m(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds_m,
                                            encoder_attention_mask=image_atts, return_logits=True,
                                            positions=positions)
            soft = F.softmax(logits_m.float(), dim=-1)
    out = model.text_encoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                             encoder_attention_mask=image_atts, labels=labels, soft_labels=soft, alpha=alpha,
                             distill_dim=model.distill_dim, positions=positions, full_head=full)
    return out.loss


class MLM(Objective):
    def __call__(self, model, s):
        if s.mlm_pairs is None:
            alpha = s.alpha if model.use_momentum else 0.0
            return {"loss_mlm": mlm(model, s.input_ids, s.attention_mask, s.image_embeds, s.image_embeds_m, alpha,
                                    s.image_atts)}
        # more (text, image) pairs, each with its own masking (MAFA's new positives)
        txt, img = s.mlm_pairs
        rows = torch.arange(s.bs, device=s.image.device)
        return {"loss_mlm": mlm(model, torch.cat([s.input_ids, s.input_ids[txt]]),
                                torch.cat([s.attention_mask, s.attention_mask[txt]]),
                                s.image_embeds[torch.cat([rows, img])], None, 0.0,
                                torch.cat([s.image_atts, s.image_atts[img]]))}
