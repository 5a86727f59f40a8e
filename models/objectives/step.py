"""The state of one training step that objectives read and write, and the objective protocol (see
``models/objectives/__init__.py``)."""
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Step:
    """What the encoders produced for one training step, and what objectives leave for later ones."""
    batch: dict
    alpha: Any
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image: torch.Tensor
    concepts: Optional[tuple] = None
    image_embeds: Any = None        # token states (a SharedImageKV once an objective fuses)
    image_feat: Optional[torch.Tensor] = None
    image_atts: Optional[torch.Tensor] = None
    text_embeds: Optional[torch.Tensor] = None
    text_feat: Optional[torch.Tensor] = None
    image_hidden: Any = None        # per-block states (needs_hidden)
    text_hidden: Any = None
    image_embeds_m: Optional[torch.Tensor] = None   # the momentum teacher's
    image_feat_m: Optional[torch.Tensor] = None
    text_feat_m: Optional[torch.Tensor] = None
    extra_i2t: Optional[torch.Tensor] = None        # more image->text logit columns, target 0
    sim_i2t: Optional[torch.Tensor] = None          # ITC similarities, [B, B (+ queue)]
    sim_t2i: Optional[torch.Tensor] = None
    itm_positives: Optional[torch.Tensor] = None    # [B, B] bool: pairs ITM must not draw as negatives
    itc_targets: Optional[tuple] = None             # (i2t, t2i) in-batch targets set before ITC (MAFA)
    extra_positives: Optional[torch.Tensor] = None  # [B, B] bool image->text pairs found to match (ECM)
    itm_pairs: Optional[tuple] = None               # (neg_img, neg_txt, labels, weights) chosen before ITM
    mlm_pairs: Optional[tuple] = None               # (text rows, image rows) MLM also trains on
    notes: dict = field(default_factory=dict)

    @property
    def bs(self):
        return self.image.shape[0]


class Objective:
    needs_hidden = False   # the encoders return per-layer states
    uses_temp = False      # reads the model's ITC ``temp`` (else it is frozen: no unused DDP parameter)

    def attach(self, model, config):
        """Add this objective's parameters to ``model`` under their checkpoint names."""

    def on_epoch(self, model, epoch):
        pass

    def prepare(self, model, s):
        pass

    def __call__(self, model, s):
        raise NotImplementedError
