"""ALBEF retrieval model (also the grounding model and MAFA's filter): ITC with the ``idx`` queue + ITM."""
import torch

from models.base import ALBEFBase, BertModel, text_inputs
from models.momentum import dequeue_and_enqueue, init_queues
from schema import value


class ALBEF(ALBEFBase):
    """``forward(image, text, alpha, idx)`` returns ``{'loss_ita', 'loss_itm'}``.

    Captions of the same image (equal ``idx``), in the batch or in the queue, are all ITC positives and are
    never drawn as ITM negatives.
    """

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.build_encoders(config, text_cls=BertModel)
        self.build_contrastive_heads(config)
        self.distill = self.use_momentum if value(config, "distill") is None else value(config, "distill")
        if self.use_momentum:
            self.make_momentum("visual_encoder", "vision_proj", "text_encoder", "text_proj")
            init_queues(self, value(config, "embed_dim"), value(config, "queue_size"), with_idx=True)
        elif self.distill:
            raise ValueError("config key 'distill' needs momentum encoders: set 'distill: false' "
                             "with 'use_momentum: false'")

    def forward(self, image, text, alpha=0.0, idx=None, concepts=None):
        input_ids, attention_mask = text_inputs(text)
        self.clamp_temp()   # ALBEF clamps only in pretraining; harmless here and keeps temp sane
        image_embeds, image_feat = self.encode_image(image, concepts=concepts)
        image_atts = self.image_atts(image_embeds, concepts)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        idx = idx.view(-1, 1)
        bs = image.shape[0]
        if not self.use_momentum:   # GRIT's retrieval option: in-batch ITC, same-image captions positive
            positives = idx == idx.t()
            loss_ita, sim_i2t, sim_t2i = self.itc_in_batch(image_feat, text_feat, positives)
            loss_itm, _ = self.itm(text_embeds, attention_mask, image_embeds, sim_i2t, sim_t2i, positives,
                                   image_atts=image_atts)
            return {"loss_ita": loss_ita, "loss_itm": loss_itm}
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
        positives = idx == idx_all
        with torch.no_grad():
            self._momentum_update()
            _, image_feat_m = self.encode_image(image, momentum=True, concepts=concepts)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
        loss_ita, sim_i2t, sim_t2i = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, positives,
                                              alpha if self.distill else 0.0)
        dequeue_and_enqueue(self, image_feat_m, text_feat_m, idx)
        loss_itm, _ = self.itm(text_embeds, attention_mask, image_embeds, sim_i2t, sim_t2i, positives[:, :bs],
                               image_atts=image_atts)
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}
