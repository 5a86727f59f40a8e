"""Losses and samplers of the ALBEF objectives, as functions of encoder outputs (no encoders run here)."""
import torch
import torch.nn.functional as F

from utils import concat_all_gather, get_rank


def fp32(device):
    """A region without autocast: ITC similarities (over a 65,536-entry queue), their softmaxes, distillation
    targets and ITM negative weights stay fp32 under bf16 autocast (bf16 keeps 8 bits of mantissa)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def soft_target_ce(logits, targets):
    """mean_i( -sum_j targets[i, j] * log_softmax(logits)[i, j] ) (ALBEF's ITC with soft targets)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_targets(sim_m, positives, alpha):
    """Momentum-distilled targets: alpha * softmax(sim_m) + (1 - alpha) * positives / row sum."""
    hard = positives / positives.sum(1, keepdim=True)
    if sim_m is None or (not torch.is_tensor(alpha) and alpha == 0):
        return hard
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def itm_negative_weights(sim, positives):
    """Sampling weights over the batch: softmax of the similarities with positives excluded.

    Returns (weights, valid). A row whose every entry is a positive (batch of one, or all captions of the
    same image) has no valid negative: it gets uniform weights and ``valid`` False, so the caller can drop
    that pair instead of crashing as ALBEF's multinomial does.
    """
    valid = (~positives).any(dim=1)
    with fp32(sim.device):
        sim = torch.nan_to_num(sim.float(), nan=0.0, posinf=1e4, neginf=-1e4)
        w = sim.masked_fill(positives, float("-inf")).softmax(dim=1)
    w = torch.where(valid[:, None], w, torch.ones_like(w))
    return w, valid


def sample_itm_negatives(sim, positives, generator=None):
    """One negative index per row, drawn with ALBEF's softmax weights; one multinomial call, no host sync."""
    w, valid = itm_negative_weights(sim, positives)
    idx = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return idx, valid


def uniform_itm_negatives(positives, generator=None):
    """One negative per row drawn uniformly from the non-positives (no hardness)."""
    valid = (~positives).any(dim=1)
    w = torch.where(valid[:, None], (~positives).float(), torch.ones_like(positives, dtype=torch.float))
    return torch.multinomial(w, 1, generator=generator).squeeze(1), valid


def hardest_itm_negatives(sim, positives):
    """The hardest negative per row (GRIT-VLP's top-1 choice)."""
    w, valid = itm_negative_weights(sim, positives)
    return w.argmax(dim=1), valid


def itm_loss(logits, labels, weights):
    """Cross-entropy averaged over the pairs with weight 1 (all of them in ALBEF)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * weights).sum() / weights.sum().clamp(min=1)


def mask_tokens(input_ids, vocab_size, mlm_probability, mask_token_id, pad_token_id, cls_token_id,
                generator=None):
    """ALBEF's 80/10/10 masking. Returns (masked ids, labels with -100 where not masked).

    PAD and CLS are never masked; random replacements are drawn from [0, vocab_size) as in ALBEF.
    Masks are built on the ids' device.
    """
    input_ids = input_ids.clone()
    labels = input_ids.clone()
    dev = input_ids.device

    def bern(p):
        return torch.bernoulli(torch.full(input_ids.shape, p, device=dev), generator=generator).bool()

    masked = bern(mlm_probability)
    masked &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels[~masked] = -100
    replaced = bern(0.8) & masked
    input_ids[replaced] = mask_token_id
    randomized = bern(0.5) & masked & ~replaced
    # = torch.randint(vocab_size, shape) (the same draws), written so that a compiled step traces it with a
    # dynamic text length and no graph break (Tensor.random_ breaks; randint_like takes no generator before 2.6)
    random_words = (torch.randint_like(input_ids, 0, vocab_size) if generator is None else
                    torch.empty_like(input_ids).random_(0, vocab_size, generator=generator))
    input_ids = torch.where(randomized, random_words, input_ids)
    return input_ids, labels


def hidden_itc_loss(image_feat, text_feat, temp):
    """One H-ITC level (ViCHA): in-batch InfoNCE against the features of every rank, gathered without
    gradient, hard targets. The positive of local sample i is column rank * B + i; ViCHA placed it at
    column i on every rank, which is wrong on all ranks but the first."""
    image_all = concat_all_gather(image_feat.detach())
    text_all = concat_all_gather(text_feat.detach())
    bs = image_feat.shape[0]
    labels = torch.arange(bs, device=image_feat.device) + get_rank() * bs
    with fp32(image_feat.device):
        temp = temp.float()
        loss_i2t = F.cross_entropy((image_feat.float() @ text_all.float().t()) / temp, labels)
        loss_t2i = F.cross_entropy((text_feat.float() @ image_all.float().t()) / temp, labels)
    return (loss_i2t + loss_t2i) / 2
