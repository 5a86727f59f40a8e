"""ALBEF pretraining model: ITC (momentum encoders, queues, distillation), ITM (hard negatives), MLM."""
import torch
import torch.nn.functional as F

from models import objectives
from models.base import ALBEFBase, BertForMaskedLM, text_inputs
from models.momentum import dequeue_and_enqueue, init_queues
from models.xbert import BertConfig

# ALBEF / BERT special ids; a tokenizer passed to the model overrides them
DEFAULT_IDS = {"pad": 0, "cls": 101, "mask": 103}


class ALBEF(ALBEFBase):
    """``forward(image, text, alpha)`` returns ``{'loss_mlm', 'loss_ita', 'loss_itm', 'feats'}``; ``feats`` are
    the detached normalised (image, text) ITC features, for GRIT grouping.

    ALBEF trains on their plain sum; the engine applies ``loss_weights`` from the config if given.
    ``text`` is a tokenizer output with ``input_ids`` and ``attention_mask``.
    """

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.build_encoders(config, text_cls=BertForMaskedLM)
        self.build_contrastive_heads(config)
        self.mlm_probability = config.get("mlm_probability", 0.15)
        self.distill = config.get("distill", self.use_momentum)
        # ALBEF's released checkpoints predate the fix of the log-softmax axis (spec §1.9)
        self.distill_dim = 1 if config.get("mlm_distill_seq_axis_bug", False) else -1
        ids = dict(DEFAULT_IDS)
        if tokenizer is not None:
            ids = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "mask": tokenizer.mask_token_id}
            if len(tokenizer) > self.bert_config.vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens but bert_config.vocab_size is "
                                 f"{self.bert_config.vocab_size}")
        self.special_ids = ids
        if self.use_momentum:
            self.make_momentum("visual_encoder", "vision_proj", "text_encoder", "text_proj")
            init_queues(self, config["embed_dim"], config["queue_size"])
        elif self.distill:
            raise ValueError("config key 'distill' needs momentum encoders: set 'distill: false' "
                             "with 'use_momentum: false'")

    def forward(self, image, text, alpha=0.0, idx=None):
        input_ids, attention_mask = text_inputs(text)
        self.clamp_temp()
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        bs = image.shape[0]
        if not self.use_momentum:
            positives = torch.eye(bs, dtype=torch.bool, device=image.device)
            loss_ita, sim_i2t, sim_t2i = self.itc_in_batch(image_feat, text_feat, positives)
            loss_itm, _ = self.itm(text_embeds, attention_mask, image_embeds, sim_i2t, sim_t2i, positives)
            loss_mlm = self.mlm(input_ids, attention_mask, image_embeds, None, 0.0)
            return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm,
                    "feats": (image_feat.detach(), text_feat.detach())}
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m, image_feat_m = self.encode_image(image, momentum=True)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
        positives = torch.zeros(bs, bs + self.image_queue.shape[1], dtype=torch.bool, device=image.device)
        positives[:, :bs] = torch.eye(bs, dtype=torch.bool, device=image.device)
        loss_ita, sim_i2t, sim_t2i = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, positives,
                                              alpha if self.distill else 0.0)
        dequeue_and_enqueue(self, image_feat_m, text_feat_m)
        loss_itm, _ = self.itm(text_embeds, attention_mask, image_embeds, sim_i2t, sim_t2i, positives[:, :bs])
        loss_mlm = self.mlm(input_ids, attention_mask, image_embeds, image_embeds_m, alpha)
        return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm,
                "feats": (image_feat.detach(), text_feat.detach())}

    def mlm(self, input_ids, attention_mask, image_embeds, image_embeds_m, alpha):
        ids, labels = objectives.mask_tokens(input_ids, self.bert_config.vocab_size, self.mlm_probability,
                                             self.special_ids["mask"], self.special_ids["pad"],
                                             self.special_ids["cls"])
        soft = None
        if self.distill and alpha > 0:
            with torch.no_grad():
                logits_m = self.text_encoder_m(ids, attention_mask=attention_mask,
                                               encoder_hidden_states=image_embeds_m, return_logits=True)
                soft = F.softmax(logits_m.float(), dim=-1)
        out = self.text_encoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                labels=labels, soft_labels=soft, alpha=alpha, distill_dim=self.distill_dim)
        return out.loss


__all__ = ["ALBEF", "BertConfig"]
