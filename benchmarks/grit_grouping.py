"""GRIT grouping cost: our walk against the original's sequential procedure, at the paper's sizes.

    python benchmarks/grit_grouping.py                     # M 1920, d 256, L 48000, B 128
    python benchmarks/grit_grouping.py --device cuda       # features and similarities on the GPU

Prints the time to group one search space with both procedures (same features, same start: the walks
must be identical) and their ratio, then the cost of a full collection queue (shuffle, 25 search spaces,
the hardness statistics) per training sample, and the training throughput per rank below which that cost
stays under 1% of an epoch.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.grit import GritCollector, greedy_walk, reference_walk   # noqa: E402


def features(n, d, g, device):
    """Clustered pairs: text = image + noise, images around 64 centres (like captions of similar scenes)."""
    centres = torch.randn(64, d, generator=g)
    img = centres[torch.randint(64, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g)
    txt = img + 0.7 * torch.randn(n, d, generator=g)
    return F.normalize(img, dim=1).to(device), F.normalize(txt, dim=1).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--search_space", type=int, default=1920)
    ap.add_argument("--queue_size", type=int, default=48000)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    img, txt = features(a.search_space, a.dim, g, dev)
    print(f"search space {a.search_space}, dim {a.dim}, {dev}, {torch.get_num_threads()} threads")

    greedy_walk(img, txt, 0)   # warm-up
    sync(dev)
    t = time.perf_counter()
    for r in range(a.repeats):
        ours = greedy_walk(img, txt, r)
    sync(dev)
    t_ours = (time.perf_counter() - t) / a.repeats
    t = time.perf_counter()
    ref = reference_walk(img, txt, a.repeats - 1)
    sync(dev)
    t_ref = time.perf_counter() - t
    assert ours.tolist() == ref.tolist(), "walks differ"
    print(f"original procedure {t_ref * 1e3:9.1f} ms per search space")
    print(f"ours               {t_ours * 1e3:9.1f} ms per search space   ({t_ref / t_ours:.1f}x faster, same walk)")

    col = GritCollector(a.queue_size, a.search_space, a.dim, a.batch_size, seed=0, device=dev)
    qi, qt = features(a.queue_size, a.dim, g, dev)
    idx = torch.arange(a.queue_size, device=dev)
    sync(dev)
    t = time.perf_counter()
    for s in range(0, a.queue_size, a.batch_size):
        col.push(qi[s:s + a.batch_size], qt[s:s + a.batch_size], idx[s:s + a.batch_size])
    sync(dev)
    t_queue = time.perf_counter() - t
    per_sample = t_queue / a.queue_size
    _, stats = col.finish()
    print(f"full queue of {a.queue_size} ({a.queue_size // a.search_space} search spaces): {t_queue:.2f} s, "
          f"{per_sample * 1e6:.1f} us per training sample")
    print(f"in-batch hardness on these features: random batches {stats['hardness_random']:.3f}, "
          f"grouped {stats['hardness_grouped']:.3f}")
    print(f"GRIT stays under 1% of an epoch while training runs below {0.01 / per_sample:,.0f} samples/s per rank")


if __name__ == "__main__":
    main()
