"""ALBEF NLVR2 model: two images, each fusion layer doubled, cross-attention keys/values shared per pair."""
from models.base import ALBEFBase, BertModel
from models.classifier import DistilledClassifier, cls_head
from models.xbert import SharedImageKV
from schema import value


def nlvr_num_layers(bc):
    """fusion_layer + 2 * (num_hidden_layers - fusion_layer): 18 for BERT-base."""
    return bc.fusion_layer + 2 * (bc.num_hidden_layers - bc.fusion_layer)


def share_cross_attention(encoder, fusion_layer):
    """Layers f+2i and f+2i+1 (one per image) use the same cross-attention key and value projections."""
    layers = encoder.layer
    for i in range((len(layers) - fusion_layer) // 2):
        a, b = layers[fusion_layer + 2 * i].crossattention.self, layers[fusion_layer + 2 * i + 1].crossattention.self
        a.key, a.value = b.key, b.value


class ALBEF(DistilledClassifier, ALBEFBase):
    """``forward(batch, alpha)``: ``{'loss_cls'}``; ``predict``: the logits. ``image`` = cat([first images,
    second images])."""

    def __init__(self, config, tokenizer=None):
        super().__init__()
        from models.base import bert_config_from
        base = bert_config_from(config)
        self.build_encoders(config, text_cls=BertModel, bert_overrides={"num_hidden_layers": nlvr_num_layers(base)})
        share_cross_attention(self.text_encoder.encoder, self.bert_config.fusion_layer)
        self.cls_head = cls_head(self.bert_config.hidden_size, 2)
        self.distill = value(config, "distill") is not False
        if self.distill:   # deepcopy keeps the K/V sharing inside the momentum copy
            self.make_momentum("visual_encoder", "text_encoder", "cls_head")

    def predict_grouped(self, image, rows, input_ids, attention_mask, concepts=None):
        """``predict`` for examples that share image pairs: ``image`` = cat([the U first images, the U second
        images]) of the distinct pairs, ``rows`` [B] each example's pair; each image and its keys and values
        are computed once."""
        embeds = self.image_tokens(image, concepts)
        atts = self.image_atts(embeds, concepts)
        u = embeds.shape[0] // 2
        img0, img1 = SharedImageKV(embeds[:u])[rows], SharedImageKV(embeds[u:])[rows]
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=[img0, img1],
                                encoder_attention_mask=[atts[:u][rows], atts[u:][rows]])
        return self.cls_head(out.last_hidden_state[:, 0])

    def predict(self, image, input_ids, attention_mask, momentum=False, concepts=None):
        """``concepts``: ViCHA's per-image concepts, ordered as ``image`` (kwords1 rows, then kwords2 rows)."""
        bert, head = (self.text_encoder_m, self.cls_head_m) if momentum else (self.text_encoder, self.cls_head)
        embeds = self.image_tokens(image, concepts, momentum)   # ViCHA used the online ViT here: fixed
        img0, img1 = embeds.split(input_ids.shape[0])
        atts0, atts1 = self.image_atts(embeds, concepts).split(input_ids.shape[0])
        out = bert(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=[img0, img1],
                   encoder_attention_mask=[atts0, atts1])
        return head(out.last_hidden_state[:, 0])
