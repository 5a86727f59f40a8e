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
from models.objectives.step import Objective, Step  # noqa: F401 - the protocol, importable from here


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
