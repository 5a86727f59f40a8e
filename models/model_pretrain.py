"""ALBEF pretraining model: ITC (momentum encoders, queues, distillation), ITM (hard negatives), MLM."""
import torch
import torch.nn.functional as F

from models import ecm as ecm_lib
from models import hard_negatives
from models import mim
from models import objectives
from models.base import ALBEFBase, BertForMaskedLM, text_inputs
from models.momentum import dequeue_and_enqueue, init_queues
from models.xbert import BertConfig
from schema import value

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
        self.mlm_probability = value(config, "mlm_probability")
        self.distill = self.use_momentum if value(config, "distill") is None else value(config, "distill")
        # ALBEF's released checkpoints predate the fix of the log-softmax axis (spec §1.9)
        self.distill_dim = 1 if value(config, "mlm_distill_seq_axis_bug") else -1
        ids = dict(DEFAULT_IDS)
        if tokenizer is not None:
            ids = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "mask": tokenizer.mask_token_id}
            if len(tokenizer) > self.bert_config.vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens but bert_config.vocab_size is "
                                 f"{self.bert_config.vocab_size}")
        self.special_ids = ids
        if self.use_momentum:
            self.make_momentum("visual_encoder", "vision_proj", "text_encoder", "text_proj")
            init_queues(self, value(config, "embed_dim"), value(config, "queue_size"))
        elif self.distill:
            raise ValueError("config key 'distill' needs momentum encoders: set 'distill: false' "
                             "with 'use_momentum: false'")
        # MAFA: S-ITC smoothing (from smoothing_start_epoch) and ECM once a filter is attached
        self.itc_smoothing = float(value(config, "itc_label_smoothing"))
        self.smoothing_start_epoch = int(value(config, "smoothing_start_epoch"))
        self.epoch = 0
        self._discriminator = []   # a list, so the frozen filter is no submodule: never saved or optimised
        mim.build_mim(self, config)   # ViCHA's masked image modelling (mae: true)
        self.hn = hard_negatives.HardNegativeLosses(config) if hard_negatives.enabled(config) else None

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.hn is not None:
            self.hn.on_epoch(epoch)

    def set_discriminator(self, discriminator):
        """Attach MAFA's ConnectionDiscriminator (ECM); only with in-batch ITC (``use_momentum: false``)."""
        if self.use_momentum:
            raise ValueError("ECM needs in-batch ITC: set 'use_momentum: false' (MAFA trains without momentum)")
        self._discriminator = [discriminator]

    def forward(self, image, text, alpha=0.0, idx=None, concepts=None, hard_negatives=None):
        """``concepts`` = (input_ids, attention_mask) of ViCHA's visual concepts when ``kw_img_model``;
        ``hard_negatives`` = (input_ids [4B, L], attention_mask, valid [B, 4] bool) of CE-CLIP's generated
        negative captions, sample-major, when a hard-negative loss is on."""
        input_ids, attention_mask = text_inputs(text)
        self.clamp_temp()
        hidden = bool(self.num_hidden_align)   # ViCHA's H-ITC joins the ITC loss
        img = self.encode_image(image, hidden=hidden, concepts=concepts)
        txt = self.encode_text(input_ids, attention_mask, hidden=hidden)
        image_embeds, image_feat, text_embeds, text_feat = img[0], img[1], txt[0], txt[1]
        hn_feat = extra = None
        if self.hn is not None:
            if hard_negatives is None:
                raise ValueError("a hard-negative loss is on (hn_itc / cmr_weight / imc_weight) but the batch has "
                                 "no hard negatives")
            hn_ids, hn_mask, hn_valid = hard_negatives
            hn_feat = self.encode_text(hn_ids, hn_mask)[1]   # unimodal: never fused, queued or masked
            extra = self.hn.extra_i2t(image_feat, hn_feat, hn_valid, self.temp)
        out = self._objectives(image, input_ids, attention_mask, alpha, image_embeds, image_feat, text_embeds,
                               text_feat, concepts, extra_i2t=extra)
        if self.hn is not None:
            out.update(self.hn(image_feat, text_feat, hn_feat, hn_valid, self.temp))
        if hidden:
            out["loss_ita"] = out["loss_ita"] + self.hidden_itc(img[2], txt[2])
        if self.mim:   # ViCHA's unimodal MAE: a second ViT pass without concepts
            out["loss_mae"] = mim.mim_loss(self, image)
        return out

    def _objectives(self, image, input_ids, attention_mask, alpha, image_embeds, image_feat, text_embeds, text_feat,
                    concepts=None, extra_i2t=None):
        bs = image.shape[0]
        image_atts = self.image_atts(image_embeds, concepts)
        image_embeds = self.shared_kv(image_embeds)   # one K/V projection per fusion layer for ITM and MLM
        if not self.use_momentum and self._discriminator:
            return self.forward_mafa(image, input_ids, attention_mask, image_embeds, image_feat, text_embeds,
                                     text_feat, image_atts, extra_i2t)
        if not self.use_momentum:
            positives = torch.eye(bs, dtype=torch.bool, device=image.device)
            loss_ita, sim_i2t, sim_t2i = self.itc_in_batch(image_feat, text_feat, positives, extra_i2t)
            loss_itm, _ = self.itm(text_embeds, attention_mask, image_embeds, sim_i2t, sim_t2i, positives,
                                   image_atts=image_atts)
            loss_mlm = self.mlm(input_ids, attention_mask, image_embeds, None, 0.0, image_atts)
            return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm,
                    "feats": (image_feat.detach(), text_feat.detach())}
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m, image_feat_m = self.encode_image(image, momentum=True, concepts=concepts)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
        # one comparison, not an eye written into zeros: inductor's CPU code for that padded bool mask fails to
        # build (torch 2.14)
        positives = (torch.arange(bs + self.image_queue.shape[1], device=image.device)[None, :] ==
                     torch.arange(bs, device=image.device)[:, None])
        loss_ita, sim_i2t, sim_t2i = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, positives,
                                              alpha if self.distill else 0.0, extra_i2t)
        dequeue_and_enqueue(self, image_feat_m, text_feat_m)
        loss_itm, _ = self.itm(text_embeds, attention_mask, image_embeds, sim_i2t, sim_t2i, positives[:, :bs],
                               image_atts=image_atts)
        loss_mlm = self.mlm(input_ids, attention_mask, image_embeds, image_embeds_m, alpha, image_atts)
        return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm,
                "feats": (image_feat.detach(), text_feat.detach())}

    def forward_mafa(self, image, input_ids, attention_mask, image_embeds, image_feat, text_embeds, text_feat,
                     image_atts, extra_i2t=None):
        """MAFA: ECM on the in-batch hardest negatives, then S-ITC, corrected ITM and MLM on new positives."""
        bs, dev = image.shape[0], image.device
        sim_i2t, sim_t2i = self.in_batch_sims(image_feat, text_feat)
        positives = torch.eye(bs, dtype=torch.bool, device=dev)
        with torch.no_grad():
            ecm = self._discriminator[0].mine(sim_i2t.detach(), sim_t2i.detach(), positives, image, input_ids,
                                              attention_mask)
        conn_i2t, conn_t2i = ecm["i2t"] == ecm_lib.CONNECTION, ecm["t2i"] == ecm_lib.CONNECTION
        smoothing = self.itc_smoothing if self.epoch >= self.smoothing_start_epoch else 0.0
        t_i2t, t_t2i = ecm_lib.s_itc_targets(bs, conn_i2t, ecm["n1"], conn_t2i, ecm["m1"], smoothing, dev)
        loss_ita = self.in_batch_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, extra_i2t)
        neg_img, lab_t2i = ecm_lib.itm_negatives(ecm["m1"], ecm["m2"], ecm["t2i"])
        neg_txt, lab_i2t = ecm_lib.itm_negatives(ecm["n1"], ecm["n2"], ecm["i2t"])
        loss_itm, _ = self.itm_pairs(text_embeds, attention_mask, image_embeds, neg_img, neg_txt,
                                     torch.cat([lab_t2i, lab_i2t]), torch.ones(2 * bs, device=dev), image_atts)
        # MLM also on the new positive pairs, each with its own masking (their number sets the MLM batch:
        # the step's one host sync, as in MAFA)
        rows = torch.arange(bs, device=dev)
        extra_txt = torch.cat([ecm["n1"][conn_i2t], rows[conn_t2i]])
        extra_img = torch.cat([rows[conn_i2t], ecm["m1"][conn_t2i]])
        loss_mlm = self.mlm(torch.cat([input_ids, input_ids[extra_txt]]),
                            torch.cat([attention_mask, attention_mask[extra_txt]]),
                            image_embeds[torch.cat([rows, extra_img])], None, 0.0,
                            torch.cat([image_atts, image_atts[extra_img]]))
        counts = {"count_" + k: v for k, v in ecm_lib.ecm_counts(ecm).items()}
        return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm,
                "feats": (image_feat.detach(), text_feat.detach()), **counts}

    def mlm(self, input_ids, attention_mask, image_embeds, image_embeds_m, alpha, image_atts=None):
        ids, labels = objectives.mask_tokens(input_ids, self.bert_config.vocab_size, self.mlm_probability,
                                             self.special_ids["mask"], self.special_ids["pad"],
                                             self.special_ids["cls"])
        # the MLM heads run at the masked positions only (the released checkpoints' sequence-axis distillation
        # needs them all); finding the positions is the step's one host sync, before the MLM passes start
        full = self.distill_dim == 1 or not self.exact_savings
        positions = None if full else (labels != -100).nonzero(as_tuple=True)
        soft = None
        if self.distill and (torch.is_tensor(alpha) or alpha > 0):   # tensor alpha: no branch on its value
            with torch.no_grad():
                logits_m = self.text_encoder_m(ids, attention_mask=attention_mask,
                                               encoder_hidden_states=image_embeds_m,
                                               encoder_attention_mask=image_atts, return_logits=True,
                                               positions=positions)
                soft = F.softmax(logits_m.float(), dim=-1)
        out = self.text_encoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, labels=labels, soft_labels=soft, alpha=alpha,
                                distill_dim=self.distill_dim, positions=positions, full_head=full)
        return out.loss


__all__ = ["ALBEF", "BertConfig"]
