"""Training objectives of the contrastive models, one module per idea.

A model encodes a step once into a ``Step`` and runs its objectives over it, in list order:

1. the online encoders (the model): image and text states and ITC features, per-layer states when an
   objective ``needs_hidden``;
2. every objective's ``prepare``: inputs only it needs (CE-CLIP's negative captions), encoded before the
   momentum teacher so the dropout draws keep ALBEF's order;
3. the momentum teacher (the model, with ``use_momentum``);
4. every objective's ``__call__``: named outputs. ``loss_*`` are summed by the engine (``loss_weights``),
   ``count_*`` totalled per epoch; a name already given is added to (ViCHA's H-ITC joins ``loss_ita``). What
   later objectives need goes into the ``Step``: similarities for ITM's negatives, ECM's targets and pairs.

Parameters an objective adds live on the model under their checkpoint names (``attach``), so objectives are
plain objects: never saved, never wrapped by DDP. Adding one: a module here with an ``Objective`` subclass,
its config keys in ``schema.py``, and a line in ``build``.
"""
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


def build(model, config, task="pretrain"):
    """The objectives of a contrastive model, in running order, from the config. ``task``: ``pretrain``
    (ITC, ITM, MLM and the switched-on extras) or ``retrieval`` (ITC with same-image positives, ITM)."""
    from models.objectives import hard_negatives, hitc, itc, itm, mim, mlm, siglip
    from schema import value
    kind = value(config, "itc_loss")
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"config key 'itc_loss' must be 'softmax' or 'sigmoid', not {kind!r}")
    positives = "index" if task == "retrieval" else "diagonal"
    contrastive = itc.ITC(positives) if kind == "softmax" else siglip.SigLIP(positives)
    objs = [contrastive, itm.ITM()]
    if task == "pretrain":
        objs.append(mlm.MLM())
        if hard_negatives.enabled(config):
            objs.append(hard_negatives.HardNegatives())
        if hitc.enabled(config):
            objs.append(hitc.HiddenITC())
        if mim.enabled(config):
            objs.append(mim.MIM())
    for o in objs:
        o.attach(model, config)
    if not any(o.uses_temp for o in objs):
        model.temp.requires_grad_(False)
    return objs
