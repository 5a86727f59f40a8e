"""Training images/s read from webdataset shards against the same photos as files, on the same machine.

    python benchmarks/shards.py [--root DIR] [--n 2000] [--workers 0 2] [--res 256]

The photos are ../shared/data/coco_mini's (or --root's; synthetic JPEGs without either), repeated to
``--n`` pairs. The baseline is ALBEF's reader: a JSON list, one file opened per sample. Against it, in the
same run and through the same pretraining dataset, transform (RandomResizedCrop + flip + RandAugment at
``--res``) and loader: the indexed shards (the store's byte ranges, one ``pread`` per image) and the
streamed shards (webdataset, a 1,000-sample buffer). Files and shards are both in the page cache here, so
this is the decode-bound rate; on network storage shards also turn ~n small random reads into sequential
ones, which this does not measure.
"""
import argparse
import glob
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.data_pipeline import DEFAULT_ROOT, _one_thread   # noqa: E402
from dataset import create_dataset   # noqa: E402
from dataset.shards import StreamCollate, write_shards   # noqa: E402
from dataset.store import convert   # noqa: E402

def photos(root, tmp):
    found = sorted(glob.glob(os.path.join(root, "**", "*.jpg"), recursive=True)) if os.path.isdir(root) else []
    if found:
        return found, f"{len(found)} photos of {root}"
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    out = []
    for i in range(64):
        p = os.path.join(tmp, f"synthetic_{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(p, quality=90)
        out.append(p)
    return out, "64 synthetic 640x480 JPEGs (no --root)"


def measure(dataset, workers, batch, stream):
    if stream:
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_one_thread,
                            collate_fn=StreamCollate(lambda b: {"n": len(b)}))
    else:
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, worker_init_fn=_one_thread,
                            collate_fn=lambda b: {"n": len(b)}, drop_last=True)
    t0, count = time.perf_counter(), 0
    for b in loader:
        count += b["n"]
    return count / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = a.dir or tempfile.mkdtemp(prefix="shard_bench_")
    os.makedirs(tmp, exist_ok=True)
    paths, what = photos(a.root, tmp)
    entries = [{"image": paths[i % len(paths)], "caption": f"photo number {i}"} for i in range(a.n)]
    ann = os.path.join(tmp, "files.json")
    with open(ann, "w") as f:
        json.dump(entries, f)
    shard_paths = write_shards(entries, "", os.path.join(tmp, "shards"), shard_size=500, log=lambda *_: None)
    store = os.path.join(tmp, "shards.arrow")
    t0 = time.perf_counter()
    convert(shard_paths, store, log=lambda *_: None)
    index_s = time.perf_counter() - t0
    print(f"{a.n} pairs from {what}; {len(shard_paths)} shards of 500; transform at {a.res} px with RandAugment")
    print(f"indexing the shards into the store: {a.n / index_s:,.0f} samples/s (one pass, once per corpus)")
    base = {"image_res": a.res, "randaugment": True, "batch_size": a.batch}
    spec = os.path.join(tmp, "shards", f"{{00000..{len(shard_paths) - 1:05d}}}.tar")
    for w in a.workers:
        cfg = {**base, "num_workers": w}
        files = measure(create_dataset("pretrain", {**cfg, "train_file": [ann]}), w, a.batch, False)
        indexed = measure(create_dataset("pretrain", {**cfg, "train_file": [store]}), w, a.batch, False)
        streamed = measure(create_dataset("pretrain", {**cfg, "train_file": spec}), w, a.batch, True)
        print(f"workers {w}: files {files:7.1f} images/s | indexed shards {indexed:7.1f} ({indexed / files:.2f}x) | "
              f"streamed shards {streamed:7.1f} ({streamed / files:.2f}x)")


if __name__ == "__main__":
    main()
