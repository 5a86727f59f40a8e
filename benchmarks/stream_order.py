"""Why a streamed run can differ from a JSON run of the same data: the samples, or only their order?

    python benchmarks/stream_order.py [--config configs/demo/Pretrain.yaml]
        [--shards 'data/demo/shards/{00000..00005}.tar'] [--epoch 3] [--check_batches 19]

Prints, for one epoch: how many streamed samples differ from the JSON dataset's item at the same index
(image tensor, caption), the spread of each batch's indices for the stream and for the JSON run's sampler
(a uniform draw from n items has a std of n / sqrt(12)), and, as a check of order structure in the data,
how often neighbouring entries share a colour word against random pairs (demo captions).
"""
import argparse
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import create_dataset   # noqa: E402
from dataset.sampler import ResumableDistributedSampler   # noqa: E402
from engine.config import load_config, validate   # noqa: E402

COLOURS = set("red green blue yellow orange purple white black pink brown gray cyan".split())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo/Pretrain.yaml")
    p.add_argument("--shards", default="data/demo/shards/{00000..00005}.tar")
    p.add_argument("--epoch", type=int, default=3)
    p.add_argument("--check_batches", type=int, default=19, help="streamed batches compared with the JSON items")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    cfg = load_config(a.config)
    validate(cfg, "pretrain")
    js = create_dataset("pretrain", cfg, seed=a.seed)
    st = create_dataset("pretrain", {**cfg, "num_workers": 0, "train_file": a.shards}, seed=a.seed)
    js.set_epoch(a.epoch)
    st.set_epoch(a.epoch)
    checked = differ = 0
    stream_batches = []
    for k, b in enumerate(st):
        stream_batches.append([s[2] for s in b])
        if k < a.check_batches:
            for s in b:
                j = js[s[2]]
                checked += 1
                differ += not (torch.equal(s[0], j[0]) and s[1:] == j[1:])
    print(f"epoch {a.epoch}: {checked} streamed samples compared with the JSON items at their indices, "
          f"{differ} differ")
    n, bs = len(js), int(cfg["batch_size"])
    sampler = ResumableDistributedSampler(n, bs, seed=a.seed)
    order = sampler.epoch_indices(a.epoch).tolist()
    json_batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    flat = [i for b in stream_batches for i in b]
    print(f"streamed epoch: {len(flat)} samples, {len(set(flat))} distinct, in {len(stream_batches)} batches")
    for name, batches in (("stream", stream_batches), ("JSON sampler", json_batches)):
        print(f"mean per-batch std of indices, {name}: {statistics.mean(statistics.pstdev(b) for b in batches):.0f}")
    print(f"uniform: {n / 12 ** 0.5:.0f}")
    colours = [COLOURS & set(" ".join(js.ann[i]["caption"] if isinstance(js.ann[i]["caption"], list)
                                      else [js.ann[i]["caption"]]).split()) for i in range(n)]
    rng = random.Random(0)
    near = sum(bool(colours[i] & colours[i + 1]) for i in range(n - 1)) / (n - 1)
    far = sum(bool(colours[rng.randrange(n)] & colours[rng.randrange(n)]) for _ in range(20000)) / 20000
    print(f"neighbouring entries share a colour word: {near:.3f}; random pairs: {far:.3f}")


if __name__ == "__main__":
    main()
