"""ALBEF visual-entailment model: 12-layer fusion encoder + 3-way head (entailment 2, neutral 1, contradiction 0)."""
from models.base import ALBEFBase, BertModel
from models.classifier import DistilledClassifier, cls_head
from models.xbert import SharedImageKV
from schema import value


class ALBEF(DistilledClassifier, ALBEFBase):
    """``forward(batch, alpha)``: ``{'loss_cls'}``; ``predict(image, input_ids, attention_mask)``: the logits [B, 3]."""

    num_classes = 3

    def __init__(self, config, tokenizer=None):
        super().__init__()
        self.build_encoders(config, text_cls=BertModel)
        self.cls_head = cls_head(self.bert_config.hidden_size, self.num_classes)
        self.distill = value(config, "distill") is not False
        if self.distill:
            self.make_momentum("visual_encoder", "text_encoder", "cls_head")

    def predict_grouped(self, image, rows, input_ids, attention_mask, concepts=None):
        """``predict`` for examples that share images: ``image`` holds each distinct image once and ``rows``
        [B] each example's; the image tokens and each fusion layer's keys and values are computed once."""
        embeds = self.image_tokens(image, concepts)
        atts = self.image_atts(embeds, concepts)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=SharedImageKV(embeds)[rows], encoder_attention_mask=atts[rows])
        return self.cls_head(out.last_hidden_state[:, 0])

    def predict(self, image, input_ids, attention_mask, momentum=False, concepts=None):
        bert, head = (self.text_encoder_m, self.cls_head_m) if momentum else (self.text_encoder, self.cls_head)
        image_embeds = self.image_tokens(image, concepts, momentum)
        out = bert(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                   encoder_attention_mask=self.image_atts(image_embeds, concepts))
        return head(out.last_hidden_state[:, 0])
