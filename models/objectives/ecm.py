"""MAFA's false-negative handling (spec grit_mafa.md §2): ECM mining with a frozen filter, and the
FN-aware ITM labels, MLM pairs and S-ITC targets.

For each text the hardest in-batch negative image (and each image's hardest negative text) comes from the
training model's ITC similarities; a frozen filter (a retrieval model) scores that pair with its ITM head.
Threshold policy, with the bounds deliberately assigned (the original compares strictly on both sides
and silently drops a score equal to a threshold):

* score >= high_threshold: a connection (false negative): the pair becomes a positive;
* score <  low_threshold:  a true hard negative: kept as the ITM negative;
* otherwise (low <= score < high): ambiguous: the second-hardest candidate is the ITM negative instead.
"""
import torch
import torch.nn.functional as F

from models.objectives.step import Objective

CONNECTION, NEGATIVE, AMBIGUOUS = 0, 1, 2


def hardest_two(sim, positives):
    """Indices of the hardest and second-hardest negatives per row (positives excluded).

    Returns (first, second, has_second); a row with a single negative repeats it as its second.
    """
    masked = sim.float().masked_fill(positives, float("-inf"))
    k = min(2, sim.shape[1])
    top = masked.topk(k, dim=1)
    first = top.indices[:, 0]
    if k < 2:
        return first, first, torch.zeros_like(first, dtype=torch.bool)
    has_second = torch.isfinite(top.values[:, 1])
    second = torch.where(has_second, top.indices[:, 1], first)
    return first, second, has_second


def decide(scores, low, high):
    """Filter match probabilities -> CONNECTION / NEGATIVE / AMBIGUOUS per anchor (see module docstring)."""
    ambiguous = torch.full_like(scores, AMBIGUOUS, dtype=torch.long)
    out = torch.where(scores >= high, torch.full_like(ambiguous, CONNECTION), ambiguous)
    return torch.where(scores < low, torch.full_like(ambiguous, NEGATIVE), out)   # torch.where: no host sync


def itm_negatives(first, second, decision):
    """The ITM partner of each anchor and its label: the hardest one (label 1 for a connection, 0 for a
    true negative) or, for an ambiguous anchor, the second-hardest with label 0."""
    partner = torch.where(decision == AMBIGUOUS, second, first)
    label = (decision == CONNECTION).long()
    return partner, label


def s_itc_targets(bs, conn_i2t, n, conn_t2i, m, smoothing=0.0, device=None):
    """MAFA's ITC targets: row k is e_k plus the connected partner (image k -> text n_k; text k -> image m_k),
    normalised, then mixed with the uniform distribution: (1 - smoothing) * Y + smoothing / bs.

    Returns (targets_i2t, targets_t2i), each [bs, bs]; rows sum to 1.
    """
    eye = torch.eye(bs, device=device)

    def build(conn, partner):
        y = eye.clone()
        rows = torch.arange(bs, device=device)
        y[rows, partner] += conn.float()
        y = y / y.sum(1, keepdim=True)
        return (1 - smoothing) * y + smoothing / bs

    return build(conn_i2t, n), build(conn_t2i, m)


FILTER_PRECISIONS = ("auto", "bf16", "fp32")


class ConnectionDiscriminator:
    """A frozen retrieval model that scores (text, image) pairs with its ITM head. Not an nn.Module
    attribute of the training model, so it is never saved, optimised or wrapped by DDP."""

    def __init__(self, model, low=0.5, high=0.8, precision="fp32"):
        if not 0 <= low <= high <= 1:
            raise ValueError(f"ecm thresholds must satisfy 0 <= low_threshold ({low}) <= high_threshold ({high}) <= 1")
        if precision not in FILTER_PRECISIONS:
            raise ValueError(f"config key 'ecm.filter_precision' must be one of {FILTER_PRECISIONS}, got {precision!r}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.low, self.high, self.precision = low, high, precision
        self.dtype = torch.float32

    def to(self, device):
        """Moves the filter; with "auto" on CUDA (or "bf16") its weights become bf16: half the memory and the fast path
        for the extra forward per step. CPU stays fp32 unless ``precision`` is "bf16"."""
        device = torch.device(device)
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model.to(device=device, dtype=self.dtype)
        return self

    @torch.no_grad()
    def match_prob(self, image, input_ids, attention_mask, text_idx, image_idx):
        """P(match) of pairs (text text_idx[j], image image_idx[j]); every image and text encoded once."""
        m = self.model
        image_embeds = m.visual_encoder(image.to(self.dtype))
        text_embeds = m.text_bert(input_ids=input_ids, attention_mask=attention_mask, mode="text").last_hidden_state
        cls = m.fuse(text_embeds[text_idx], attention_mask[text_idx], image_embeds[image_idx])
        return F.softmax(m.itm_head(cls).float(), dim=1)[:, 1]

    def mine(self, sim_i2t, sim_t2i, positives, image, input_ids, attention_mask):
        """ECM for one batch. Returns a dict of index / decision tensors (no host sync)."""
        bs = sim_i2t.shape[0]
        n1, n2, _ = hardest_two(sim_i2t[:, :bs], positives)   # image k -> hardest texts
        m1, m2, _ = hardest_two(sim_t2i[:, :bs], positives)   # text k -> hardest images
        rows = torch.arange(bs, device=sim_i2t.device)
        # one filter pass over both directions: (text k, image m1_k) and (text n1_k, image k)
        p = self.match_prob(image, input_ids, attention_mask, torch.cat([rows, n1]), torch.cat([m1, rows]))
        p_t2i, p_i2t = p[:bs], p[bs:]
        return {"m1": m1, "m2": m2, "n1": n1, "n2": n2, "p_t2i": p_t2i, "p_i2t": p_i2t,
                "t2i": decide(p_t2i, self.low, self.high), "i2t": decide(p_i2t, self.low, self.high)}


def ecm_counts(ecm):
    """Per-step counts of connections, true negatives and ambiguous anchors over both directions."""
    both = torch.cat([ecm["t2i"], ecm["i2t"]])
    return {"ecm_connections": (both == CONNECTION).sum(), "ecm_negatives": (both == NEGATIVE).sum(),
            "ecm_ambiguous": (both == AMBIGUOUS).sum()}


class ECM(Objective):
    """MAFA: ECM on the in-batch hardest negatives, before ITC. It leaves S-ITC's targets, ITM's pairs
    (labels 1 for connections) and the new positive pairs for MLM in the step; only with in-batch ITC."""

    def __init__(self, discriminator, smoothing=0.0, start_epoch=0):
        self.discriminator, self.smoothing, self.start_epoch = discriminator, smoothing, start_epoch
        self.epoch = 0

    def on_epoch(self, model, epoch):
        self.epoch = epoch

    def __call__(self, model, s):
        from models.objectives.itc import in_batch_sims
        bs, dev = s.bs, s.image.device
        s.sim_i2t, s.sim_t2i = in_batch_sims(model, s.image_feat, s.text_feat)
        positives = torch.eye(bs, dtype=torch.bool, device=dev)
        with torch.no_grad():
            ecm = self.discriminator.mine(s.sim_i2t.detach(), s.sim_t2i.detach(), positives, s.image, s.input_ids,
                                          s.attention_mask)
        conn_i2t, conn_t2i = ecm["i2t"] == CONNECTION, ecm["t2i"] == CONNECTION
        smoothing = self.smoothing if self.epoch >= self.start_epoch else 0.0
        s.itc_targets = s_itc_targets(bs, conn_i2t, ecm["n1"], conn_t2i, ecm["m1"], smoothing, dev)
        s.extra_positives = positives.clone()
        s.extra_positives[torch.arange(bs, device=dev), ecm["n1"]] |= conn_i2t
        s.extra_positives[ecm["m1"], torch.arange(bs, device=dev)] |= conn_t2i
        neg_img, lab_t2i = itm_negatives(ecm["m1"], ecm["m2"], ecm["t2i"])
        neg_txt, lab_i2t = itm_negatives(ecm["n1"], ecm["n2"], ecm["i2t"])
        s.itm_pairs = (neg_img, neg_txt, torch.cat([lab_t2i, lab_i2t]), torch.ones(2 * bs, device=dev))
        # MLM also on the new positive pairs (their number sets the MLM batch: the step's one host sync, as MAFA)
        rows = torch.arange(bs, device=dev)
        extra_txt = torch.cat([ecm["n1"][conn_i2t], rows[conn_t2i]])
        extra_img = torch.cat([rows[conn_i2t], ecm["m1"][conn_t2i]])
        s.mlm_pairs = (extra_txt, extra_img)
        return {"count_" + k: v for k, v in ecm_counts(ecm).items()}
