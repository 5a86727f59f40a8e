"""Images/s of one data worker on real photos (../shared/data/coco_mini, or --root) for each stage, a
loader's throughput with uint8 against float batches, and the workers a node needs to feed N GPUs.

    python benchmarks/data_pipeline.py [--root DIR] [--res 256] [--gpus 8] [--step_rate 200]

Baselines in the same run: JPEG decode alone, then ALBEF's evaluation transform (bicubic resize). The
training transform (RandomResizedCrop + flip + RandAugment(2, 7) + normalise) is printed as a ratio, with
its uint8 variant (``uint8_images``: normalised on the device instead). ``--step_rate`` is a GPU's training
samples/s (``benchmarks/pretrain_step.py`` prints it); without it a range of rates is shown.
"""
import argparse
import glob
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.caption_dataset import load_image   # noqa: E402
from dataset.transforms import test_transform, train_transform   # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "shared", "data", "coco_mini")


def rate(paths, fn, repeat):
    np.random.seed(0), random.seed(0), torch.manual_seed(0)   # the same augmentations for every variant
    t0 = time.perf_counter()
    for _ in range(repeat):
        for p in paths:
            fn(p)
    return repeat * len(paths) / (time.perf_counter() - t0)


class Photos(Dataset):
    def __init__(self, paths, transform, n):
        self.paths, self.transform, self.n = paths, transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(load_image(self.paths[i % len(self.paths)]))


def _one_thread(_):
    torch.set_num_threads(1)


def loader_rate(paths, transform, workers, n, batch=32):
    """Images/s through a DataLoader (collate included) with ``workers`` processes of one thread each."""
    loader = DataLoader(Photos(paths, transform, n), batch_size=batch, num_workers=workers,
                        worker_init_fn=_one_thread, prefetch_factor=4)
    it = iter(loader)
    next(it)   # workers started
    t0, count = time.perf_counter(), 0
    for b in it:
        count += b.shape[0]
    return count / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--step_rate", type=float, default=None, help="training samples/s of one GPU")
    ap.add_argument("--cores", type=int, default=None, help="a node's CPU cores (default: this machine's)")
    a = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(a.root, "**", "*.jpg"), recursive=True))
    if not paths:
        sys.exit(f"no JPEG files under {a.root}")
    torch.set_num_threads(1)   # one worker = one core
    train, test = train_transform(a.res), test_transform(a.res)
    train8 = train_transform(a.res, uint8=True)
    decode = rate(paths, load_image, a.repeat)
    ev = rate(paths, lambda p: test(load_image(p)), a.repeat)
    tr = rate(paths, lambda p: train(load_image(p)), a.repeat)
    tr8 = rate(paths, lambda p: train8(load_image(p)), a.repeat)
    print(f"{len(paths)} photos from {a.root}, {a.res} px, one worker (1 thread)")
    print(f"decode only (baseline)           {decode:7.1f} images/s  1.00x")
    print(f"evaluation transform             {ev:7.1f} images/s  {ev / decode:.2f}x")
    print(f"training transform (ALBEF)       {tr:7.1f} images/s  {tr / decode:.2f}x")
    print(f"training transform, uint8 out    {tr8:7.1f} images/s  {tr8 / decode:.2f}x  ({tr8 / tr:.2f}x the float one)")
    f32, u8 = 3 * a.res * a.res * 4, 3 * a.res * a.res
    print(f"bytes per image leaving a worker (shared memory, pinning, host->device): float32 {f32 / 1e6:.2f} MB, "
          f"uint8 {u8 / 1e6:.2f} MB (0.25x)")
    workers = max(1, min(os.cpu_count() or 1, 4))
    n = 32 * 8 * workers
    through = {}
    for name, tf in (("float32", train), ("uint8", train8)):
        through[name] = loader_rate(paths, tf, workers, n)
        print(f"DataLoader, {workers} workers, {name} batches of 32: {through[name]:7.1f} images/s "
              f"({through[name] / workers:.1f} per worker)  {through[name] / through['float32']:.2f}x")
    per_worker = through["uint8"] / workers   # decode + transform + collate + the batch's trip to the main process
    cores = a.cores or os.cpu_count()
    rates = [a.step_rate] if a.step_rate else [100, 200, 400, 800]
    print(f"\nto feed {a.gpus} GPUs at {per_worker:.1f} images/s per worker (the uint8 loader above) "
          f"(node: {cores} cores, {'given' if a.cores else 'this machine'}):")
    for s in rates:
        need = a.gpus * s / per_worker
        fits = "fits" if need <= cores else "more than the node has"
        print(f"  {s:6.0f} samples/s per GPU -> {a.gpus * s:7.0f} images/s: {need:6.1f} worker cores "
              f"({need / a.gpus:.1f} num_workers per rank; {fits})")


if __name__ == "__main__":
    main()
