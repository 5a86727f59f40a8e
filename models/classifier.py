"""Shared parts of the classification models (VE, NLVR): cls head and the distilled cross-entropy."""
import torch.nn.functional as F
from torch import nn


def cls_head(hidden, num_classes):
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def distilled_ce(prediction, targets, prediction_m=None, alpha=0.0):
    """(1 - alpha) * CE + alpha * soft CE against the momentum prediction (ALBEF's VE / NLVR loss)."""
    ce = F.cross_entropy(prediction.float(), targets)
    if prediction_m is None:
        return ce
    soft = -(F.softmax(prediction_m.float(), dim=1) * F.log_softmax(prediction.float(), dim=1)).sum(1).mean()
    return (1 - alpha) * ce + alpha * soft
