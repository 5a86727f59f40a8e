"""ALBEF retrieval model (also the grounding model and MAFA's filter): ITC with the ``idx`` queue + ITM."""
from models import objectives
from models.base import ALBEFBase, BertModel
from models.momentum import init_queues
from schema import value


class ALBEF(ALBEFBase):
    """``forward(batch, alpha)`` returns ``{'loss_ita', 'loss_itm'}``.

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
        self.objectives = objectives.build(self, config, "retrieval")

    def forward(self, batch, alpha=0.0):
        # ALBEF clamps only in pretraining; harmless here and keeps temp sane
        return self.run_objectives(batch, alpha)[0]
