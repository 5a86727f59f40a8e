"""ALBEF's ``optimizer: {opt, lr, weight_decay}`` -> a timm optimizer with ALBEF's two parameter groups."""
import torch
from timm.optim import create_optimizer_v2


def param_groups(model, weight_decay, decay_0d=False):
    """[no decay: biases, norms (1-d), 0-d scalars such as temp; decay: the rest]. Frozen params excluded.

    ``decay_0d=True`` decays 0-d parameters (``temp``) as ALBEF does.
    """
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
    opt = str(cfg.get("opt", "adamW")).lower()
    wd = float(cfg.get("weight_decay", 0.0))
    groups = param_groups(model, wd, bool(cfg.get("decay_0d", False)))
    kw = {}
    if opt in ("adamw", "adam") and any(p.is_cuda for g in groups for p in g["params"]):
        kw["fused"] = bool(cfg.get("fused", True))
    return create_optimizer_v2(groups, opt=opt, lr=float(cfg["lr"]), weight_decay=wd,
                               **({"betas": tuple(cfg["betas"])} if "betas" in cfg else {}), **kw)


__all__ = ["create_optimizer", "param_groups", "torch"]
