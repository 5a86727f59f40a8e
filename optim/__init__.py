"""ALBEF's ``optimizer: {opt, lr, weight_decay}`` -> a timm optimizer with ALBEF's two parameter groups."""
import torch
from timm.optim import create_optimizer_v2

from schema import value


def param_groups(model, weight_decay, decay_0d=True):
    """[no decay: biases, norms (1-d); decay: the rest, with the 0-d ``temp`` as ALBEF does]. Frozen params
    excluded. ``decay_0d=False`` (``optimizer.decay_0d``) exempts 0-d scalars from decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or (p.ndim == 0 and not decay_0d):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def create_optimizer(cfg, model):
    c = {"optimizer": cfg}
    opt = str(value(c, "optimizer.opt")).lower()
    wd = float(value(c, "optimizer.weight_decay"))
    groups = param_groups(model, wd, bool(value(c, "optimizer.decay_0d")))
    kw = {}
    if opt in ("adamw", "adam") and any(p.is_cuda for g in groups for p in g["params"]):
        kw["fused"] = bool(value(c, "optimizer.fused"))
    if value(c, "optimizer.betas") is not None:
        kw["betas"] = tuple(value(c, "optimizer.betas"))
    if value(c, "optimizer.eps") is not None:
        kw["eps"] = float(value(c, "optimizer.eps"))
    if value(c, "optimizer.momentum") is not None:
        kw["momentum"] = float(value(c, "optimizer.momentum"))
    return create_optimizer_v2(groups, opt=opt, lr=float(value(c, "optimizer.lr")), weight_decay=wd, **kw)


__all__ = ["create_optimizer", "param_groups", "torch"]
