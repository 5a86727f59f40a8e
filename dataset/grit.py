"""GRIT-VLP grouped mini-batch sampling (spec grit_mafa.md §1.3), as a component of any pretraining recipe.

During an epoch every rank pushes the detached, normalised ITC features and dataset indices of each step
into a collection queue of ``queue_size``. Each time the queue fills (and once more at the end of the epoch
for what is left) it is shuffled, cut into search spaces of ``search_space`` pairs, and each search space
is ordered by GRIT's greedy walk: image -> most similar unvisited text -> most similar unvisited image ...
so any ``batch_size`` consecutive entries are mutually hard negatives. At the end of the epoch the grouped
orders of all ranks are cut into mini-batches, shuffled at mini-batch level across ranks, and become the
next epoch's order.

Fixed with respect to the original: exact permutations (visited pairs are excluded with -inf on the
logits, checked), int64 indices, empty leftovers skipped, mini-batches redistributed across ranks every
epoch, the examples the previous epoch dropped rotate back in, and the whole state (next order, queue,
groups so far) goes into the training checkpoint. The walk runs on the host over one similarity matrix
per search space: no device sync per step.
"""
import numpy as np
import torch

from dataset.sampler import ResumableDistributedSampler
from utils import all_gather_object, concat_all_gather


def greedy_walk(img, txt, start):
    """GRIT's alternating walk over one search space. ``img``/``txt``: [M, d] features of the M pairs.

    Returns positions 0..M-1: ``start``, then the unvisited text most similar to that image, then the
    unvisited image most similar to that text, and so on. Softmax and temperature are monotone, so the
    argmax walk over raw similarities is GRIT's walk over its probability matrices.
    """
    return walk_similarities(img.float() @ txt.float().t(), start)


def walk_similarities(sim, start):
    """The walk of ``greedy_walk`` over a given [image, text] similarity matrix."""
    sim = sim.float().cpu()
    sim, sim_t = sim.numpy(), sim.t().contiguous().numpy()   # rows: [image, text] and [text, image]
    m = len(sim)
    out = np.empty(m, dtype=np.int64)
    visited = np.zeros(m, dtype=np.float32)
    c = int(start)
    out[0], visited[c] = c, -np.inf
    for j in range(1, m):
        c = int(np.argmax((sim if j % 2 else sim_t)[c] + visited))
        out[j], visited[c] = c, -np.inf
    return out


def reference_walk(img, txt, start, temp=0.07):
    """The original's procedure (softmax matrices, zeroed rows/columns, top-1 per step, one host copy per
    step). For tests and the benchmark only."""
    p_i2t = (img.float() @ txt.float().t() / temp).softmax(1)
    p_t2i = (txt.float() @ img.float().t() / temp).softmax(1)
    p_i2t.fill_diagonal_(0)
    p_t2i.fill_diagonal_(0)
    m = len(img)
    out, c = [int(start)], int(start)
    for _ in range((m - 1) // 2):
        t = int(p_i2t[c].topk(1).indices.cpu())
        for p in (p_i2t, p_t2i):
            p[c, :], p[:, c] = 0, 0
        nxt = int(p_t2i[t].topk(1).indices.cpu())
        for p in (p_i2t, p_t2i):
            p[t, :], p[:, t] = 0, 0
        out += [t, nxt]
        c = nxt
    if m % 2 == 0:
        out.append(int(p_i2t[c].topk(1).indices.cpu()))
    return np.array(out, dtype=np.int64)


def batch_hardness(img, txt, batch, temp=0.07, itc=True):
    """In-batch hardness of consecutive batches, as a tensor (no host sync) of means over anchor images:

    0. the similarity of the hardest in-batch negative text;
    1. the mean similarity of all in-batch negative texts: a few "hub" texts near every image cannot
       dominate it the way they dominate the hardest one;
    2. (with ``itc``) the in-batch image->text ITC loss at a fixed ``temp``: how hard the batch is for the
       objective itself.
    """
    n = len(img) // batch * batch
    if n == 0 or batch < 2:
        return torch.full((3 if itc else 2,), float("nan"))
    i = img[:n].float().view(-1, batch, img.shape[1])
    t = txt[:n].float().view(-1, batch, txt.shape[1])
    sim = i @ t.transpose(1, 2)
    eye = torch.eye(batch, device=sim.device)
    hardest = (sim - 4 * eye).max(dim=2).values.mean()   # cosine >= -1: the diagonal never wins
    mean_neg = ((sim * (1 - eye)).sum(2) / (batch - 1)).mean()
    if not itc:
        return torch.stack([hardest, mean_neg])
    loss = torch.nn.functional.cross_entropy((sim / temp).flatten(0, 1),
                                             torch.arange(batch, device=sim.device).repeat(len(sim)))
    return torch.stack([hardest, mean_neg, loss])


def neighbours(sim, k=5):
    """Each image's ``k`` most similar texts of a square [image, text] similarity matrix, its own excluded."""
    return (sim - 4 * torch.eye(len(sim), device=sim.device)).topk(k, dim=1).indices


def neighbour_recall(nbrs, order, batch):
    """Share of each image's neighbours (``neighbours``, computed once in the original layout) that share its
    consecutive batch once the rows are laid out in ``order``: random order gives about
    (batch - 1) / (rows - 1). Unlike the hardest negative's similarity, a few "hub" texts near every image
    cannot dominate it."""
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order), device=order.device)
    group = pos.to(nbrs.device) // batch
    return (group[nbrs] == group[:, None]).float().mean()


# logged per epoch as grit_<name>_random / grit_<name>_grouped, over the same features
STATS = ("hardness", "mean_neg_sim", "itc_loss", "nn_recall")


def order_stats(img, txt, sim, walk, batch, k=5):
    """``STATS`` of one search space in its given (random) order and in the walk's order, as
    ``{"<stat>_random": x, "<stat>_grouped": y}``; ``sim`` is the walk's [image, text] matrix."""
    m = len(img)
    nbrs = neighbours(sim, k) if m > k else None
    out = {}
    for name, order in (("random", torch.arange(m, device=img.device)),
                        ("grouped", torch.as_tensor(walk, device=img.device))):
        values = batch_hardness(img[order], txt[order], batch).tolist()
        values.append(float(neighbour_recall(nbrs, order, batch)) if nbrs is not None else float("nan"))
        out.update({f"{stat}_{name}": v for stat, v in zip(STATS, values)})
    return out


class GritCollector:
    """Per-rank collection queue and grouping for one epoch (phases 1-3 of GRIT)."""

    def __init__(self, queue_size, search_space, dim, batch_size, seed, device, precision="fp32"):
        if queue_size % search_space or search_space % batch_size:
            raise ValueError(f"grit: collect_size ({queue_size}) must be a multiple of search_space ({search_space}) "
                             f"and search_space a multiple of the batch size ({batch_size})")
        self.size, self.space, self.batch = queue_size, search_space, batch_size
        self.seed = seed
        # fp32: fp16 rounding flips near-ties of the greedy walk (at GRIT's sizes 916 of 5,120 places differ
        # from the original's order); fp16 halves a queue that is small anyway (48,000 x 256: 49 MB in fp32)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"config key 'grit.queue_precision' must be fp32 or fp16, got {precision!r}")
        dtype = torch.float32 if precision == "fp32" else torch.float16
        self.img = torch.zeros(queue_size, dim, dtype=dtype, device=device)
        self.txt = torch.zeros(queue_size, dim, dtype=dtype, device=device)
        self.idx = torch.zeros(queue_size, dtype=torch.long, device=device)
        self.start_epoch(0)

    def start_epoch(self, epoch):
        self.epoch, self.ptr, self.flushes, self.groups = epoch, 0, 0, []
        self.stats = {f"{m}_{o}": [] for m in STATS for o in ("random", "grouped")}

    def push(self, img_feat, txt_feat, idx):
        """Phase 1: this step's detached features and dataset indices (any device, no sync)."""
        b, done = len(idx), 0
        while done < b:
            n = min(b - done, self.size - self.ptr)
            sl = slice(self.ptr, self.ptr + n)
            self.img[sl] = img_feat[done:done + n].detach().to(self.img)
            self.txt[sl] = txt_feat[done:done + n].detach().to(self.txt)
            self.idx[sl] = idx[done:done + n].to(self.idx)
            self.ptr, done = self.ptr + n, done + n
            if self.ptr == self.size:
                self._group(self.size)

    def _generator(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + self.flushes)
        return g

    def _group(self, n):
        """Phases 2-3 on the first ``n`` queue entries: example-level shuffle, then walk each search space."""
        g = self._generator()
        self.flushes += 1
        perm = torch.randperm(n, generator=g).to(self.idx.device)
        img, txt, idx = self.img[perm], self.txt[perm], self.idx[perm].cpu().numpy()
        for s in range(0, n, self.space):
            e = min(n, s + self.space)
            if e - s == 0:
                continue
            start = int(torch.randint(e - s, (1,), generator=g))
            sim = img[s:e].float() @ txt[s:e].float().t()   # one matrix for the walk and the stats
            walk = walk_similarities(sim, start)
            if not np.array_equal(np.sort(walk), np.arange(e - s)):
                raise RuntimeError("GRIT walk is not a permutation of its search space")
            self.groups.append(idx[s:e][walk])
            if e - s >= self.batch:
                for key, v in order_stats(img[s:e], txt[s:e], sim, walk, self.batch).items():
                    self.stats[key].append(v)
        self.ptr = 0

    def finish(self):
        """Group what is left; returns this rank's grouped order (int64) and the hardness stats."""
        if self.ptr:
            self._group(self.ptr)
        order = np.concatenate(self.groups) if self.groups else np.zeros(0, dtype=np.int64)
        return order, {k: float(np.nanmean(v)) if v else float("nan") for k, v in self.stats.items()}

    def state_dict(self):
        return {"epoch": self.epoch, "ptr": self.ptr, "flushes": self.flushes,
                "groups": [torch.from_numpy(g) for g in self.groups],   # tensors: loads with weights_only
                "img": self.img[:self.ptr].cpu(), "txt": self.txt[:self.ptr].cpu(), "idx": self.idx[:self.ptr].cpu(),
                "stats": self.stats}

    def load_state_dict(self, s):
        self.epoch, self.ptr, self.flushes = int(s["epoch"]), int(s["ptr"]), int(s["flushes"])
        self.groups = [torch.as_tensor(g).numpy().astype(np.int64) for g in s["groups"]]
        self.img[:self.ptr], self.txt[:self.ptr] = s["img"].to(self.img), s["txt"].to(self.txt)
        self.idx[:self.ptr] = s["idx"].to(self.idx)
        self.stats = {k: list(s["stats"].get(k, [])) for k in self.stats}   # keys of this version


def next_epoch_order(rank_orders, epoch_order, batch_size, num_batches, world, seed, epoch, dataset_len):
    """Phase 4 over all ranks: the global order of the next epoch (int64, world x num_batches x batch_size).

    ``rank_orders``: each rank's grouped order; an index grouped more than once (the replacement of an
    unreadable image) keeps its first place. Indices of this epoch's order that were not grouped (images
    that could not be read, a run stopped early) are appended to their rank's order, and the examples this
    epoch did not contain at all (the drop_last remainder) go at the end, so the remainder rotates instead
    of being frozen out. Whole mini-batches are shuffled, then cut to ``world x num_batches`` batches.
    """
    rank_orders = [np.asarray(o, dtype=np.int64) for o in rank_orders]
    # an unreadable image's replacement is trained (and collected) twice in the epoch: keep its first place
    flat_all = np.concatenate(rank_orders) if rank_orders else np.zeros(0, dtype=np.int64)
    keep = np.zeros(len(flat_all), dtype=bool)
    keep[np.unique(flat_all, return_index=True)[1]] = True
    bounds = np.cumsum([0] + [len(o) for o in rank_orders])
    rank_orders = [flat_all[s:e][keep[s:e]] for s, e in zip(bounds[:-1], bounds[1:])]
    seen = np.concatenate(rank_orders) if rank_orders else np.zeros(0, dtype=np.int64)
    missing = np.setdiff1d(np.asarray(epoch_order, dtype=np.int64), seen, assume_unique=False)
    chunks = []
    for o in rank_orders + [missing]:
        chunks += [o[s:s + batch_size] for s in range(0, len(o), batch_size)]
    g = np.random.default_rng([seed, epoch])
    full = [c for c in chunks if len(c) == batch_size]
    partial = np.concatenate([c for c in chunks if len(c) < batch_size] or [np.zeros(0, dtype=np.int64)])
    order = [full[i] for i in g.permutation(len(full))]
    rest = np.setdiff1d(np.arange(dataset_len), np.concatenate([seen, missing]))
    tail = np.concatenate([partial, g.permutation(rest)])
    flat = np.concatenate(order + [tail])[:world * num_batches * batch_size]
    return flat


class GroupedSampler(ResumableDistributedSampler):
    """ResumableDistributedSampler whose order, once GRIT has grouped an epoch, comes from that grouping.

    Rank r reads batches [r * num_batches, (r + 1) * num_batches) of the global order; the order was
    shuffled at mini-batch level over all ranks, so no rank is pinned to one data slice.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.orders = {}   # epoch -> global order (np.int64)

    def set_order(self, epoch, order):
        order = np.asarray(order, dtype=np.int64)
        need = self.num_batches * self.batch_size * self.num_replicas
        if len(order) != need:
            raise ValueError(f"GRIT order for epoch {epoch} has {len(order)} indices, expected {need}")
        self.orders = {epoch: order}

    def epoch_indices(self, epoch=None, rank=None):
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        order = self.orders.get(epoch)
        if order is None:
            return super().epoch_indices(epoch, rank)
        per_rank = self.num_batches * self.batch_size
        return torch.from_numpy(order[rank * per_rank:(rank + 1) * per_rank].copy())


class Grit:
    """Trainer component (the engine's on_epoch_start / on_step_end / on_epoch_end / state protocol): owns the
    collector and the grouped sampler's next orders. The orders are the same on every rank (saved once);
    each rank's collection queue is its own (saved in its own file, never gathered)."""

    def __init__(self, config, sampler, dim, batch_size, seed, rank, world, device, dataset_len):
        self.sampler, self.rank, self.world = sampler, rank, world
        self.batch, self.seed, self.n = batch_size, seed, dataset_len
        self.collector = GritCollector(int(config["collect_size"]), int(config["search_space"]),
                                       dim, batch_size, seed + rank, device, config["queue_precision"])

    def on_epoch_start(self, epoch, resumed_mid_epoch=False):
        if not resumed_mid_epoch:
            self.collector.start_epoch(epoch)

    def on_step_end(self, out, batch, step):
        """Features from before this step's update, as in GRIT; indices of the samples actually trained."""
        self.collector.push(out["feats"][0], out["feats"][1], batch["idx"])

    def on_epoch_end(self, epoch, stopped=False):
        """Collective: every rank calls it. Sets the sampler's order for ``epoch + 1``; returns stats."""
        if stopped:
            return {}
        order, stats = self.collector.finish()
        orders = gather_orders(order, self.collector.idx.device)
        gathered = all_gather_object(stats)   # a few floats per rank
        epoch_order = np.concatenate([self.sampler.epoch_indices(epoch, r).numpy() for r in range(self.world)])
        nxt = next_epoch_order(orders, epoch_order, self.batch, self.sampler.num_batches,
                               self.world, self.seed, epoch, self.n)
        self.sampler.set_order(epoch + 1, nxt)
        return {f"grit_{k}": float(np.nanmean([s.get(k, np.nan) for s in gathered])) for k in gathered[0]}

    def state_dict(self):
        return {"orders": {int(k): torch.from_numpy(v) for k, v in self.sampler.orders.items()}}

    def load_state_dict(self, s):
        self.sampler.orders = {int(k): torch.as_tensor(v).numpy().astype(np.int64) for k, v in s["orders"].items()}

    def rank_state_dict(self):
        return self.collector.state_dict()

    def load_rank_state_dict(self, s):
        if s is None:
            print("note: no GRIT collection state for this rank (another world size?): the features collected "
                  "so far this epoch are dropped")
            return
        self.collector.load_state_dict(s)


def gather_orders(order, device):
    """Every rank's grouped order (int64 arrays, lengths may differ) through one tensor all-gather."""
    lengths = [int(n) for n in concat_all_gather(torch.tensor([len(order)], device=device)).tolist()]
    if len(lengths) == 1:
        return [order]
    padded = torch.full((max(lengths),), -1, dtype=torch.long, device=device)
    padded[:len(order)] = torch.from_numpy(order).to(device)
    flat = concat_all_gather(padded).view(len(lengths), -1).cpu().numpy()
    return [flat[r, :n] for r, n in enumerate(lengths)]
