"""Momentum ("_m") encoders and feature queues shared by every ALBEF model class."""
import copy

import torch
from torch import nn

from utils import concat_all_gather


class MomentumMixin:
    """Subclasses set ``self.model_pairs`` = [(online, momentum), ...] and ``self.momentum``."""

    def make_momentum(self, *names):
        """Create ``<name>_m`` deep copies of the named modules and register the pairs."""
        for name in names:
            setattr(self, name + "_m", copy.deepcopy(getattr(self, name)))
        self.momentum_names = list(names)
        self.model_pairs = [(getattr(self, n), getattr(self, n + "_m")) for n in names]
        self.copy_params()

    @torch.no_grad()
    def copy_params(self, names=None):
        """``<name>_m`` = ``<name>`` (all pairs, or the named ones): at construction, and after loading a
        checkpoint that has no momentum weights (GRIT / MAFA, text-assignment pretraining)."""
        for n, (online, mom) in zip(getattr(self, "momentum_names", []), self.model_pairs):
            if names is not None and n not in names:
                continue
            for p, p_m in zip(online.parameters(), mom.parameters()):
                p_m.data.copy_(p.data)
                p_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self):
        m = self.momentum
        online, mom = [], []
        for a, b in self.model_pairs:
            online += [p.data for p in a.parameters()]
            mom += [p.data for p in b.parameters()]
        # p_m = m * p_m + (1 - m) * p, as one multi-tensor op instead of a Python loop over tensors
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, online, alpha=1 - m)


def init_queues(model, embed_dim, queue_size, with_idx=False):
    model.register_buffer("image_queue", nn.functional.normalize(torch.randn(embed_dim, queue_size), dim=0))
    model.register_buffer("text_queue", nn.functional.normalize(torch.randn(embed_dim, queue_size), dim=0))
    if with_idx:
        model.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
    model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


@torch.no_grad()
def dequeue_and_enqueue(model, image_feat, text_feat, idx=None):
    """Write the features gathered from every rank into the queues (columns [ptr, ptr + global batch))."""
    image_feats = concat_all_gather(image_feat)
    text_feats = concat_all_gather(text_feat)
    bs = image_feats.shape[0]
    q = model.image_queue.shape[1]
    if q % bs:
        raise ValueError(f"queue_size {q} must be a multiple of the global batch {bs} "
                         "(batch_size x GPUs x ...); change queue_size or batch_size in the config")
    ptr = model.queue_ptr   # kept on device: no host sync
    cols = (ptr + torch.arange(bs, device=ptr.device)) % q
    model.image_queue.index_copy_(1, cols, image_feats.T.to(model.image_queue.dtype))
    model.text_queue.index_copy_(1, cols, text_feats.T.to(model.text_queue.dtype))
    if idx is not None:
        idxs = concat_all_gather(idx.view(-1, 1).to(model.idx_queue.dtype))
        model.idx_queue.index_copy_(1, cols, idxs.T)
    model.queue_ptr.copy_((ptr + bs) % q)
