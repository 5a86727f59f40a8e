"""Evaluation by distinct image: a split's examples grouped by their image(s), each image read and encoded once.

SNLI-VE has about 18 hypotheses per image, RefCOCO+ about 8 expressions, VQA 3 to 5 questions. Every task's
evaluation (VE, NLVR2, VQA, grounding; retrieval encodes its images once already) iterates batches of whole
groups: ``image`` holds each distinct image once (NLVR2: the pairs, first images then second images), the
example fields are collated as usual, and ``rows`` gives each example's image. The model encodes the images
once and reads them through ``SharedImageKV``, so each fusion layer projects an image's keys and values once
for all its examples. Groups, not examples, are split over ranks (an image is encoded on one rank); every
example is still predicted exactly once, and ``restore_order`` puts merged results back in the split's order.
"""
import torch
from torch.utils.data import DataLoader, Dataset

from utils import shard


def group_by_image(dataset, indices=None):
    """[(image key, [example indices])] in first-seen order, over ``indices`` (default: every example); a key is
    the tuple of an example's image paths."""
    first, groups = {}, []
    for i in range(len(dataset)) if indices is None else indices:
        key = tuple(dataset.image_paths(i))
        if key not in first:
            first[key] = len(groups)
            groups.append((key, []))
        groups[first[key]][1].append(i)
    return groups


class ImageGroups(Dataset):
    """Item g: (the first example with its image(s) read once, the group's other examples without them)."""

    def __init__(self, dataset, groups):
        self.dataset, self.groups = dataset, groups

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, g):
        idx = self.groups[g][1]
        return self.dataset[idx[0]], [self.dataset.fields(i) for i in idx[1:]]


class GroupCollate:
    """Batches of groups -> the examples' batch (``collate`` as for one example per image) with ``image`` [U]
    (NLVR2: [2U], by position), the images' concepts, ``rows`` [N] and ``n_images``."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, groups):
        examples, rows, heads = [], [], []
        for u, (first, rest) in enumerate(groups):
            heads.append(first)
            for s in [first] + rest:
                examples.append({k: v for k, v in s.items() if k not in ("image", "bad", "concepts")})
                rows.append(u)
        out = self.collate(examples)
        per_image = self.collate([{k: h[k] for k in ("image", "bad", "concepts") if k in h} for h in heads])
        out.update(image=per_image["image"], bad=per_image["bad"], rows=torch.tensor(rows, dtype=torch.long),
                   n_images=len(heads))
        for k in ("kw_input_ids", "kw_attention_mask"):
            if k in per_image:
                out[k] = per_image[k]
        return out


def batches(groups, batch_size):
    """Consecutive groups packed into batches of about ``batch_size`` examples (a large group alone)."""
    out, cur, n = [], [], 0
    for g, (_, idx) in enumerate(groups):
        if cur and n + len(idx) > batch_size:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += len(idx)
    return out + ([cur] if cur else [])


def group_loader(dataset, collate, batch_size, num_workers=0, indices=None):
    """This rank's share of the image groups of an evaluation split (or of its examples ``indices``), in
    batches of whole groups."""
    groups = group_by_image(dataset, indices)
    mine = [groups[i] for i in shard(len(groups))]
    return DataLoader(ImageGroups(dataset, mine), batch_sampler=batches(mine, batch_size), num_workers=num_workers,
                      collate_fn=GroupCollate(collate))


def restore_order(rows, dataset, key, field):
    """Merged per-example rows back in the split's order (``field`` of each row is the dataset's ``key``)."""
    position = {a[key]: i for i, a in enumerate(dataset.ann)}
    return sorted(rows, key=lambda r: position[r[field]])
