"""ViCHA's hierarchical alignment (H-ITC): in-batch ITC between the last ViT blocks before the final one and
the last text layers before the final one, through their own projections (``vision_proj_hidden``,
``text_proj_hidden``, built with the model's other projections), weighted, added to ``loss_ita``."""
import torch.nn.functional as F

from models.objectives.step import Objective
from models.objectives import functional as fn
from schema import value


def enabled(config):
    return bool(value(config, "return_hidden_state")) and int(value(config, "num_hidden_align")) > 0


def hidden_itc(model, image_hidden, text_hidden):
    """Weighted sum of the H-ITC levels from the per-block / per-layer states of the online encoders."""
    n = model.num_hidden_align
    vis, txt = image_hidden[-1 - n:-1], text_hidden[-1 - n:-1]
    total = 0.0
    for level in range(n):
        v = F.normalize(model.vision_proj_hidden[level](vis[level][:, 0]).float(), dim=-1)
        t = F.normalize(model.text_proj_hidden[level](txt[level][:, 0]).float(), dim=-1)
        total = total + model.ita_hidden_weights[level] * fn.hidden_itc_loss(v, t, model.temp)
    return model.ita_hidden_weight * total


class HiddenITC(Objective):
    needs_hidden = True
    uses_temp = True

    def __call__(self, model, s):
        return {"loss_ita": hidden_itc(model, s.image_hidden, s.text_hidden)}
