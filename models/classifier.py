"""Shared parts of the classification models (VE, NLVR): cls head and the distilled cross-entropy."""
import torch
import torch.nn.functional as F
from torch import nn

from models.batch import concepts_of


def cls_head(hidden, num_classes):
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def distilled_ce(prediction, targets, prediction_m=None, alpha=0.0):
    """(1 - alpha) * CE + alpha * soft CE against the momentum prediction (ALBEF's VE / NLVR loss)."""
    ce = F.cross_entropy(prediction.float(), targets)
    if prediction_m is None:
        return ce
    soft = -(F.softmax(prediction_m.float(), dim=1) * F.log_softmax(prediction.float(), dim=1)).sum(1).mean()
    return (1 - alpha) * ce + alpha * soft


class DistilledClassifier:
    """``forward(batch, alpha)`` -> ``{'loss_cls'}`` of a model with ``predict(image, ids, mask, momentum,
    concepts)``: the distilled CE against its momentum copy (updated first), or the plain CE."""

    def forward(self, batch, alpha=0.0):
        image, input_ids, attention_mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        concepts = concepts_of(batch)
        prediction = self.predict(image, input_ids, attention_mask, concepts=concepts)
        prediction_m = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                prediction_m = self.predict(image, input_ids, attention_mask, momentum=True, concepts=concepts)
        return {"loss_cls": distilled_ce(prediction, batch["label"], prediction_m, alpha)}
