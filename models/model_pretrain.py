"""ALBEF pretraining model: the encoders, projections and momentum copies; its objectives (ITC, ITM, MLM
and the switched-on extras of GRIT-VLP, MAFA, ViCHA and CE-CLIP) are ``models.objectives``."""
from models import objectives
from models.base import ALBEFBase, BertForMaskedLM
from models.momentum import init_queues
from models.objectives.ecm import ECM
from models.xbert import BertConfig
from schema import value

# ALBEF / BERT special ids; a tokenizer passed to the model overrides them
DEFAULT_IDS = {"pad": 0, "cls": 101, "mask": 103}


class ALBEF(ALBEFBase):
    """``forward(batch, alpha)`` returns the objectives' named outputs (``loss_ita``, ``loss_itm``, ``loss_mlm``,
    ...) and ``feats``: the detached normalised (image, text) ITC features, for GRIT grouping.

    ALBEF trains on their plain sum; the engine applies ``loss_weights`` from the config if given.
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
        # MAFA's S-ITC smoothing, used once a filter is attached
        self.itc_smoothing = float(value(config, "itc_label_smoothing"))
        self.smoothing_start_epoch = int(value(config, "smoothing_start_epoch"))
        self.objectives = objectives.build(self, config, "pretrain")

    def set_discriminator(self, discriminator):
        """Attach MAFA's ConnectionDiscriminator: ECM runs first (only with in-batch ITC)."""
        if self.use_momentum:
            raise ValueError("ECM needs in-batch ITC: set 'use_momentum: false' (MAFA trains without momentum)")
        self.objectives = [o for o in self.objectives if not isinstance(o, ECM)]
        self.objectives.insert(0, ECM(discriminator, self.itc_smoothing, self.smoothing_start_epoch))

    def forward(self, batch, alpha=0.0):
        out, s = self.run_objectives(batch, alpha)
        out["feats"] = (s.image_feat.detach(), s.text_feat.detach())
        return out


__all__ = ["ALBEF", "BertConfig"]
