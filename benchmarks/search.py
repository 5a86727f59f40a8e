"""Query latency of ``tools.search`` over a memory-mapped index, and the recall of an index built with it.

    python benchmarks/search.py                       # 100,000 x 256 features: our query against NumPy baselines
    python benchmarks/search.py --index output/demo_index --captions data/demo/retrieval_test.json --rerank 16

Latency: one text feature against N stored unit features (float32, memory-mapped as ``tools.search`` reads
them), the top 10 found by one matrix product and a partial sort (``tools.search.top_k``), against a full sort
of the same product and against a per-row loop (a brute-force NumPy search); the median of ``--repeat`` runs
after a warm-up, ratios in the same run. Recall: for every caption of an ALBEF retrieval file, where its
image (matched by file name) ranks among the index's (ITC alone, and with ``--rerank`` ITM re-scoring of the top N).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.search import load_index, top_k   # noqa: E402


def median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def latency(n, dim, k, repeat):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    q = feats[123] + 0.1 * rng.standard_normal(dim, dtype=np.float32)
    q /= np.linalg.norm(q)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.npy")
        np.save(path, feats)
        mm = np.load(path, mmap_mode="r")
        ours = median_time(lambda: top_k(mm, q, k), repeat)
        full = median_time(lambda: np.argsort(-(mm @ q))[:k], repeat)
        loop = median_time(lambda: np.argsort(-np.array([float(np.dot(r, q)) for r in mm]))[:k], max(1, repeat // 5))
        same = list(top_k(mm, q, k)[0]) == list(np.argsort(-(mm @ q), kind="stable")[:k])
    print(f"query over {n:,} x {dim} memory-mapped features, top {k} (median of {repeat}):")
    print(f"  tools.search (product + partial sort): {1000 * ours:8.2f} ms")
    print(f"  product + full sort:                   {1000 * full:8.2f} ms  ({full / ours:.2f}x ours)")
    print(f"  per-row loop + full sort:              {1000 * loop:8.2f} ms  ({loop / ours:.1f}x ours)")
    print(f"  same top {k}: {same}")


def recall(index, captions, rerank, device):
    import torch
    from tasks.api import load_model
    feats, paths, meta = load_index(index)
    model = load_model(meta["config"], meta["checkpoint"], device)
    ann = json.load(open(captions))
    where = {os.path.basename(a["image"]): i for i, a in enumerate(ann)}   # matched by file name
    rows = {i: where.get(os.path.basename(p)) for i, p in enumerate(paths)}
    texts, gold = [], []
    for i, a in enumerate(ann):
        for c in (a["caption"] if isinstance(a["caption"], list) else [a["caption"]]):
            texts.append(c)
            gold.append(i)
    tf = model.encode_text(texts).cpu().numpy()
    ranks, ranks_itm = [], []
    for t, g in zip(tf, gold):
        idx, _ = top_k(feats, t, len(paths))
        order = [rows[i] for i in idx]
        ranks.append(order.index(g) if g in order else len(order))
    if rerank:
        for j, (t, g) in enumerate(zip(tf, gold)):
            idx, _ = top_k(feats, t, rerank)
            s = model.itm_scores([paths[i] for i in idx], [texts[j]] * len(idx)).cpu().numpy()
            order = [rows[idx[i]] for i in np.argsort(-s, kind="stable")]
            ranks_itm.append(order.index(g) if g in order else len(paths))
    n = len(paths)
    print(f"{len(texts)} captions of {captions} against {n} indexed images (chance R@1 {100 / n:.2f}):")
    for name, r in (("ITC", ranks), (f"ITC + ITM on the top {rerank}", ranks_itm)):
        if r:
            r = np.array(r)
            print(f"  {name}: R@1 {100 * (r < 1).mean():.2f}  R@5 {100 * (r < 5).mean():.2f}  "
                  f"R@10 {100 * (r < 10).mean():.2f}")
    del torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--index", default=None)
    p.add_argument("--captions", default=None)
    p.add_argument("--rerank", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.index:
        recall(a.index, a.captions, a.rerank, a.device)
    else:
        latency(a.n, a.dim, a.top, a.repeat)


if __name__ == "__main__":
    main()
