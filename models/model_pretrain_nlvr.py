"""ALBEF's NLVR2 text-assignment pretraining: which of two images (or neither) a caption describes."""
import torch
import torch.nn.functional as F
from torch import nn

from models.base import ALBEFBase, BertModel, bert_config_from, text_inputs
from models.model_nlvr import nlvr_num_layers, share_cross_attention

TA_TEMP = 0.07   # ALBEF uses a constant here, not the learnable temp


class ALBEF(ALBEFBase):
    """``forward(image, text)`` returns ``{'loss_ta'}``; labels 0 = first image, 1 = second, 2 = neither."""

    def __init__(self, config, tokenizer=None):
        super().__init__()
        base = bert_config_from(config)
        self.build_encoders(config, text_cls=BertModel, bert_overrides={"num_hidden_layers": nlvr_num_layers(base)})
        share_cross_attention(self.text_encoder.encoder, self.bert_config.fusion_layer)
        self.build_contrastive_heads(config if "temp" in config else {**config, "temp": TA_TEMP})
        del self.itm_head
        self.ta_head = nn.Linear(self.bert_config.hidden_size, 3)

    @torch.no_grad()
    def assign(self, image_feat, generator=None):
        """Vectorised draw of (first image, second image, label) per caption."""
        bs = image_feat.shape[0]
        dev = image_feat.device
        sim = image_feat @ image_feat.t() / TA_TEMP
        w = F.softmax(sim.float(), dim=1)
        w.fill_diagonal_(0)
        w = w + 1e-12   # keeps two draws without replacement possible for tiny batches
        pair = torch.multinomial(w, 2, replacement=False, generator=generator)
        own = torch.arange(bs, device=dev)
        single = torch.rand(bs, device=dev, generator=generator) > 1 / 3
        first_is_own = torch.rand(bs, device=dev, generator=generator) > 0.5
        neg = pair[:, 0]
        img0 = torch.where(single, torch.where(first_is_own, own, neg), pair[:, 0])
        img1 = torch.where(single, torch.where(first_is_own, neg, own), pair[:, 1])
        label = torch.where(single, torch.where(first_is_own, 0, 1), 2)
        return img0, img1, label

    def forward(self, image, text, alpha=0.0, idx=None):
        input_ids, attention_mask = text_inputs(text)
        image_embeds = self.visual_encoder(image)
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        img0, img1, labels = self.assign(image_feat)
        atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=[image_embeds[img0], image_embeds[img1]],
                                encoder_attention_mask=[atts, atts])
        return {"loss_ta": F.cross_entropy(self.ta_head(out.last_hidden_state[:, 0]).float(), labels)}
