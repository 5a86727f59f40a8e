"""A distributed sampler whose epoch order is a pure function of (seed, epoch) and can start mid-epoch."""
import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler):
    """Like DistributedSampler(drop_last=True), plus ``set_epoch(epoch, start_batch)`` to skip consumed batches.

    Each rank gets ``num_batches * batch_size`` indices, so every rank runs the same number of steps.
    ``sources`` (``[(size, weight), ...]``, consecutive index ranges) mixes sources as OpenCLIP's upsampling
    factors: each epoch holds every item of a source ``floor(weight)`` times plus a random
    ``weight - floor(weight)`` share of them (drawn with the epoch's seed).
    """

    def __init__(self, dataset_len, batch_size, num_replicas=1, rank=0, shuffle=True, seed=0, sources=None):
        self.n = dataset_len
        self.batch_size = batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.sources = None
        if sources is not None:
            if sum(n for n, _ in sources) != dataset_len:
                raise ValueError(f"sources hold {sum(n for n, _ in sources)} items, the dataset {dataset_len}")
            self.sources = [(int(n), float(w)) for n, w in sources]
        self.epoch_len = self.n if self.sources is None else sum(
            int(n * (w // 1)) + round((w % 1) * n) for n, w in self.sources)
        self.num_batches = self.epoch_len // (batch_size * num_replicas)
        if self.num_batches == 0:
            raise ValueError(f"dataset of {self.epoch_len} items per epoch is smaller than one global batch "
                             f"({batch_size} x {num_replicas} ranks)")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def _pool(self, epoch):
        """The epoch's items before shuffling: every index, or the weighted sources' repeats and shares."""
        if self.sources is None:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch + 1)
        parts, start = [], 0
        for n, w in self.sources:
            idx = torch.arange(start, start + n)
            parts += [idx] * int(w // 1) + [idx[torch.randperm(n, generator=g)[:round((w % 1) * n)]]]
            start += n
        return torch.cat(parts)

    def epoch_indices(self, epoch=None, rank=None):
        """The whole epoch's indices of ``rank`` (this sampler's epoch and rank by default)."""
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        pool = self._pool(epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = pool[torch.randperm(len(pool), generator=g)]   # without sources: randperm(n) itself
        else:
            order = pool
        per_rank = self.num_batches * self.batch_size
        return order[:per_rank * self.num_replicas][rank::self.num_replicas]

    def __iter__(self):
        idx = self.epoch_indices()[self.start_batch * self.batch_size:]
        return iter(idx.tolist())

    def __len__(self):
        return (self.num_batches - self.start_batch) * self.batch_size


class EpochTagged(Sampler):
    """Yields ``(epoch, index)`` from ``sampler``: a persistent loader worker's copy of the dataset never sees
    ``set_epoch``, so the epoch (which seeds every sample's augmentation) travels with the index."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


class EpochTaggedDataset(torch.utils.data.Dataset):
    """Reads ``EpochTagged``'s items: sets the dataset's epoch (where it has one), then reads the index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]
