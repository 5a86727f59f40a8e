"""ALBEF's NLVR2 text-assignment pretraining: which of two images (or neither) a caption describes."""
import torch
import torch.nn.functional as F
from torch import nn

from models.base import ALBEFBase, BertModel, bert_config_from
from models.batch import concepts_of
from models.model_nlvr import nlvr_num_layers, share_cross_attention

TA_TEMP = 0.07   # ALBEF uses a constant here, not the learnable temp
IGNORE = -100    # a caption whose batch has no other image: no label, no loss


class ALBEF(ALBEFBase):
    """``forward(batch)`` returns ``{'loss_ta'}``; labels 0 = first image, 1 = second, 2 = neither.

    ``vision_proj`` (used only without gradient, to draw the partner images), ``text_proj`` and ``temp`` never
    reach the loss, so they are frozen: under DDP every trainable parameter then gets a gradient each step and
    no ``find_unused_parameters`` graph walk is needed (ALBEF's AdamW skipped them too: they have no grad).
    """

    def __init__(self, config, tokenizer=None):
        super().__init__()
        base = bert_config_from(config)
        self.build_encoders(config, text_cls=BertModel, bert_overrides={"num_hidden_layers": nlvr_num_layers(base)})
        share_cross_attention(self.text_encoder.encoder, self.bert_config.fusion_layer)
        self.build_contrastive_heads(config if "temp" in config else {**config, "temp": TA_TEMP})
        del self.itm_head
        self.ta_head = nn.Linear(self.bert_config.hidden_size, 3)
        for p in [*self.vision_proj.parameters(), *self.text_proj.parameters(), self.temp]:
            p.requires_grad_(False)

    @staticmethod
    @torch.no_grad()
    def assign(image_feat, generator=None):
        """(first image, second image, label) per caption, drawn as ALBEF does: partners from
        softmax(image-image similarity / 0.07) over the *other* images of the batch; with probability 2/3 the
        caption's own image and one partner in random order (label 0 or 1), else two distinct partners
        (label 2). A batch of two has no second partner (label 2 impossible), a batch of one no partner at
        all (label ``IGNORE``)."""
        bs, dev = image_feat.shape[0], image_feat.device
        own = torch.arange(bs, device=dev)
        if bs == 1:
            return own, own, torch.full((1,), IGNORE, device=dev)
        logits = (image_feat @ image_feat.t()).float() / TA_TEMP
        logits.fill_diagonal_(float("-inf"))   # softmax over the others: never underflows to an all-zero row
        first = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        second = first
        if bs > 2:
            second = torch.multinomial(F.softmax(logits.scatter(1, first[:, None], float("-inf")), dim=1), 1,
                                       generator=generator).squeeze(1)
        single = torch.rand(bs, device=dev, generator=generator) > 1 / 3
        if bs == 2:
            single = torch.ones_like(single)
        own_first = torch.rand(bs, device=dev, generator=generator) > 0.5
        img0 = torch.where(single, torch.where(own_first, own, first), first)
        img1 = torch.where(single, torch.where(own_first, first, own), second)
        label = torch.where(single, torch.where(own_first, 0, 1), 2)
        return img0, img1, label

    def forward(self, batch, alpha=0.0):
        image, input_ids, attention_mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        concepts = concepts_of(batch)
        image_embeds = self.image_tokens(image, concepts)
        atts = self.image_atts(image_embeds, concepts)
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        img0, img1, labels = self.assign(image_feat)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=[image_embeds[img0], image_embeds[img1]],
                                encoder_attention_mask=[atts[img0], atts[img1]])
        logits = self.ta_head(out.last_hidden_state[:, 0]).float()
        if (labels == IGNORE).all():   # nothing to learn from; keep the graph (DDP) with a zero loss
            return {"loss_ta": logits.sum() * 0.0}
        return {"loss_ta": F.cross_entropy(logits, labels, ignore_index=IGNORE)}
