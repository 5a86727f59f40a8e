"""What the GRIT collection queue's precision does to the order it emits, at GRIT's sizes.

    python benchmarks/grit_precision.py            # batch 128, search space 1920, queue 3840, feature 256

Two collectors, one with the queue in fp32 (the default, as the original) and one in fp16
(``grit.queue_precision: fp16``), get the same features and draw the same shuffles and starts (the fp32 order
equals the original procedure's: tests/test_grit.py). Prints the positions of the emitted order that differ,
the mini-batches (``batch`` consecutive entries) whose members differ, and their mean overlap.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.grit_grouping import features   # noqa: E402
from dataset.grit import GritCollector   # noqa: E402


def emitted(img, txt, precision, a):
    col = GritCollector(a.queue_size, a.search_space, img.shape[1], a.batch_size, seed=a.seed, device="cpu",
                        precision=precision)
    idx = torch.arange(len(img))
    for s in range(0, len(img), a.batch_size):
        col.push(img[s:s + a.batch_size], txt[s:s + a.batch_size], idx[s:s + a.batch_size])
    order, _ = col.finish()
    return order


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--search_space", type=int, default=1920)
    ap.add_argument("--queue_size", type=int, default=3840)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--samples", type=int, default=5120, help="pairs collected (GRIT's issue figure: 5,120)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    img, txt = features(a.samples, a.dim, torch.Generator().manual_seed(a.seed), torch.device("cpu"))
    o32, o16 = emitted(img, txt, "fp32", a), emitted(img, txt, "fp16", a)
    assert sorted(o32.tolist()) == sorted(o16.tolist()) == list(range(a.samples))
    n_batches = a.samples // a.batch_size
    overlaps = [len(set(o32[b * a.batch_size:(b + 1) * a.batch_size]) & set(o16[b * a.batch_size:(b + 1) * a.batch_size]))
                / a.batch_size for b in range(n_batches)]
    out = {"samples": a.samples, "positions_differing": int((o32 != o16).sum()),
           "batches": n_batches, "batches_with_other_members": int(sum(o < 1 for o in overlaps)),
           "mean_batch_overlap": round(float(np.mean(overlaps)), 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
