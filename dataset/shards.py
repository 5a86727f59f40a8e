"""img2dataset's webdataset shards: written, indexed for random access, and streamed.

A shard is a plain tar of samples ``{key}.jpg`` + ``{key}.txt`` (the caption) + ``{key}.json`` (img2dataset's
metadata; ours may add ``kwords``, ``hard_negatives``, ``hn_valid`` and a caption list), with
``{shard}.parquet`` and ``{shard}_stats.json`` beside it.

- **Indexed** (GRIT, exact mid-epoch resume, mixing with JSON folders): ``python -m dataset.store --ann
  'shards/{00000..00331}.tar' --out cc3m.arrow`` lists every shard once with ``tarfile`` and writes each
  sample's caption and fields with the image member's byte offset and size into the memory-mapped store; a
  read is then one ``os.pread`` into the tar. (``wids`` rebuilds a shard's member index whenever the shard
  enters its LRU of open shards, a header scan of ~30,000 members; under a shuffled or GRIT-grouped order
  across thousands of shards nearly every read would pay it.) An entry ``{"image": "x.tar#key.jpg"}`` in a
  JSON list reads the member the same way, the shard's member list built once per process.
- **Streamed** (``train_file`` names ``.tar`` shards, brace patterns allowed): ``webdataset`` reads them in
  order; see ``ShardStream``.
"""
import argparse
import io
import itertools
import json
import os
import random
import zlib

import torch

from dataset.caption_dataset import AnnotationError, ImageTextDataset, caption_sample, load_image, resolve, seeded

from dataset.tar import FIELDS, IMAGE_EXTS, expand, shard_sizes


# ------------------------------------------------------------------ writing (demo world, tests, benchmarks)
def write_shards(entries, image_root, out_dir, shard_size=10000, log=print):
    """Write ALBEF entries as img2dataset's webdataset layout; returns the shard paths.

    Keys are img2dataset's (shard number and position, 9 digits); the ``.json`` keeps every field the entry
    has besides ``image`` (so a caption list and ViCHA's / CE-CLIP's fields survive)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from webdataset import TarWriter
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(entries), shard_size)):
        name = os.path.join(out_dir, f"{s:05d}")
        keys, caps = [], []
        tmp = f"{name}.tar.tmp.{os.getpid()}"
        with TarWriter(tmp) as w:
            for j, e in enumerate(entries[start:start + shard_size]):
                key = f"{s:05d}{j:04d}"
                path = resolve(e["image"], image_root)
                ext = os.path.splitext(path)[1].lstrip(".").lower() or "jpg"
                with open(path, "rb") as f:
                    data = f.read()
                cap = e["caption"]
                meta = {"key": key, "status": "success", **{k: v for k, v in e.items() if k != "image"}}
                w.write({"__key__": key, ext: data, "txt": cap if isinstance(cap, str) else cap[0],
                         "json": json.dumps(meta).encode()})
                keys.append(key)
                caps.append(cap if isinstance(cap, str) else cap[0])
        os.replace(tmp, f"{name}.tar")
        pq.write_table(pa.table({"key": keys, "caption": caps, "status": ["success"] * len(keys)}),
                       f"{name}.parquet")
        with open(f"{name}_stats.json", "w") as f:
            json.dump({"count": len(keys), "successes": len(keys), "failed_to_download": 0}, f)
        paths.append(f"{name}.tar")
    log(f"{out_dir}: {len(entries)} samples in {len(paths)} shards")
    return paths


# ------------------------------------------------------------------ streaming
class StreamBatch(list):
    """One worker's batch of samples, with the worker's role, its position in its stream after it, and the
    shards it found cut short since its previous batch."""
    role, pos, cut = 0, 0, ()


class StreamCollate:
    """Collates a ``StreamBatch`` with the task's collate function and passes its stream position on; the
    images dropped before each sample as unreadable count as read (``n``)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        out = self.collate_fn(list(batch))
        out["stream_pos"] = (batch.role, batch.pos)
        out["shards_cut"] = list(batch.cut)
        out["n"] = out.get("n", len(batch)) + len(out.get("bad", []))
        return out


class ShardStream(torch.utils.data.IterableDataset):
    """Pretraining samples streamed from webdataset shards, a fixed number of batches per epoch on every rank.

    Per epoch the shard list (each source's shards repeated or subsampled by its weight) is shuffled with
    ``(seed, epoch)``, dealt to the ranks and then to the loader workers (``shards[rank::world][role::W]``);
    each worker reads its shards with webdataset, shuffles samples in a buffer seeded by (seed, epoch, rank,
    role), decodes them (an unreadable image is dropped and counted) and yields exactly its share of the
    epoch's ``num_batches`` (``len(range(role, num_batches, W))``), starting a new pass over its shards if they
    run dry. Batch k of a rank comes from role ``k % W``, as the loader takes workers in turn.

    Resume: each batch carries (role, raw samples its worker has taken from its buffer); the trainer keeps the
    newest per role in the checkpoint. A run resumed at batch s gives worker w the role ``(w + s) % W``, so the
    loader's turn order continues, and each role skips its taken samples without decoding them: the rest of
    the epoch is the same batches in the same order as the uninterrupted run (same ``num_workers``; with a
    different count the epoch restarts its stream, and samples may repeat or be missed until its end).
    """

    def __init__(self, files, transform, max_words, batch_size, world=1, rank=0, seed=0, weights=None,
                 num_samples=None, shuffle_buffer=1000, concepts=None, hard_negatives=False, truncated_ok=True,
                 workers=0, config_key="train_file"):
        self.workers = max(1, int(workers))   # the loader's (0: the main process, one role)
        self.transform, self.max_words, self.batch_size = transform, max_words, batch_size
        self.world, self.rank, self.seed = world, rank, seed
        self.concepts, self.hard_negatives, self.truncated_ok = concepts, hard_negatives, truncated_ok
        self.shuffle_buffer = int(shuffle_buffer)
        sources = [expand(f) for f in ([files] if isinstance(files, str) else files)]
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise AnnotationError(f"config key 'train_weights' has {len(weights)} values for {len(sources)} "
                                  f"{config_key} sources")
        self.shards, self.source_of, self.weights = [], [], weights
        for s, paths in enumerate(sources):
            for p in paths:
                if not os.path.isfile(p):
                    raise AnnotationError(f"{config_key}: shard not found: {p!r}")
            self.shards += paths
            self.source_of += [s] * len(paths)
        sizes = shard_sizes(self.shards)
        if num_samples is None and sizes is None:
            raise AnnotationError(f"{config_key}: shards without img2dataset's _stats.json; give the samples per "
                                  "epoch as config key 'train_num_samples'")
        self.sizes = sizes
        # a sample's idx is its place in the shard list (shards as one corpus, as the store numbers it), so
        # it seeds the same caption draw and augmentation; without sizes, shard number << 24 + place
        self.offsets = None if sizes is None else [0, *itertools.accumulate(sizes)][:-1]
        if num_samples is None:
            num_samples = sum(round(w * sum(n for n, src in zip(sizes, self.source_of) if src == s))
                              for s, w in enumerate(weights))
        self.num_samples = int(num_samples)
        self.num_batches = self.num_samples // (batch_size * world)
        if self.num_batches == 0:
            raise ValueError(f"{self.num_samples} samples per epoch are fewer than one global batch "
                             f"({batch_size} x {world} ranks)")
        per_epoch = len(self.epoch_shards(0))
        if per_epoch < world * self.workers:
            raise AnnotationError(f"{config_key}: {per_epoch} shards per epoch cannot feed {world} ranks x "
                                  f"{self.workers} loader workers (each reads its own shards): lower config key "
                                  "'num_workers' or write smaller shards")
        self.epoch, self.start_batch, self.positions = 0, 0, {}
        self.cut = []   # (shard, samples read, samples expected, error) of shards cut short, not yet reported

    # the trainer's sampler protocol
    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.num_batches - self.start_batch

    def epoch_shards(self, epoch):
        """The epoch's shard order (the same on every rank): each source's shards ``floor(w)`` times plus a
        random ``w - floor(w)`` share of them, shuffled."""
        rng = random.Random(zlib.crc32(f"shards:{self.seed}:{epoch}".encode()))
        order = []
        for s, w in enumerate(self.weights):
            mine = [i for i, src in enumerate(self.source_of) if src == s]
            whole, frac = divmod(w, 1.0)
            order += mine * int(whole) + rng.sample(mine, round(frac * len(mine)))
        rng.shuffle(order)
        return order

    def _raw(self, shard_ids, role):
        """This worker's undecoded samples, pass after pass over its shards, each with its ``idx``."""
        import webdataset as wds
        from webdataset.filters import _shuffle
        for p in range(1 << 30):
            tag = f"{self.seed}:{self.epoch}:{self.rank}:{role}:{p}"
            ids = list(shard_ids)
            if p:
                random.Random(zlib.crc32(f"pass:{tag}".encode())).shuffle(ids)
            found = [0]

            def numbered():
                for sid in ids:
                    errors = []
                    src = iter(wds.tariterators.tarfile_samples([{"url": self.shards[sid]}],
                                                                handler=lambda e: errors.append(e) or True))
                    j = -1
                    for j, sample in enumerate(src):
                        # one image, one idx (ITC's positives), repeated shards too
                        sample["__idx__"] = (sid << 24) + j if self.offsets is None else self.offsets[sid] + j
                        found[0] += 1
                        yield sample
                    if errors:   # reported with the next batch; the trainer warns once per shard and run
                        self.cut.append((self.shards[sid], j + 1, None if self.sizes is None else self.sizes[sid],
                                         f"{type(errors[0]).__name__}: {errors[0]}"[:200]))
            yield from _shuffle(numbered(), self.shuffle_buffer, min(self.shuffle_buffer, 100),
                                rng=random.Random(zlib.crc32(f"buffer:{tag}".encode())))
            if not found[0]:
                raise RuntimeError(f"shards {[self.shards[i] for i in ids[:3]]}... hold no readable samples")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        if workers != self.workers:
            raise RuntimeError(f"ShardStream was built for {self.workers} loader workers, read by {workers}")
        role = (wid + self.start_batch) % workers
        quota = len(range(role, self.num_batches, workers)) - len(range(role, self.start_batch, workers))
        per_rank = [sid for k, sid in enumerate(self.epoch_shards(self.epoch)) if k % self.world == self.rank]
        mine = per_rank[role::workers]
        if not mine:
            raise RuntimeError(f"rank {self.rank} worker {role}: no shard to read ({len(per_rank)} shards for "
                               f"{workers} workers on this rank): use fewer num_workers or more shards")
        pos = int(self.positions.get(role, 0)) if self.start_batch else 0
        batch, bad = StreamBatch(), []
        for sample in itertools.islice(self._raw(mine, role), pos, None):
            pos += 1
            item = self._decode(sample, bad)
            if item is None:
                continue
            batch.append(item)
            bad = []
            if len(batch) == self.batch_size:
                batch.role, batch.pos = role, pos
                batch.cut, self.cut = self.cut, []
                yield batch
                batch, quota = StreamBatch(), quota - 1
                if quota <= 0:
                    return

    sample_seed = ImageTextDataset.sample_seed   # (seed, epoch, idx): as the map-style datasets
    concept_string = ImageTextDataset.concept_string

    def _decode(self, sample, bad):
        key = f"{sample.get('__url__')}#{sample.get('__key__')}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            entry = {k: v for k, v in meta.items() if k in FIELDS}
            if "caption" not in entry:
                entry["caption"] = sample["txt"].decode("utf-8")
            if ext is None:
                raise KeyError("no image member")
            img = load_image(io.BytesIO(sample[ext]), self.truncated_ok)
        except Exception as e:   # noqa: BLE001 - an unreadable sample is dropped and counted, never a crash
            bad.append(f"{key}.{ext or '?'} ({type(e).__name__})")
            return None
        i = sample["__idx__"]
        with seeded(self.sample_seed(i)):
            image = self.transform(img)
        return caption_sample(self, image, entry, i, list(bad))


def main(argv=None):
    p = argparse.ArgumentParser(description="Write ALBEF JSON lists as img2dataset webdataset shards.")
    p.add_argument("--ann", nargs="+", required=True, help="ALBEF JSON lists")
    p.add_argument("--image_root", default="", help="prefix of relative image paths")
    p.add_argument("--out", required=True, help="output folder (00000.tar, 00000.parquet, 00000_stats.json, ...)")
    p.add_argument("--shard_size", type=int, default=10000, help="samples per shard (img2dataset: 10000)")
    a = p.parse_args(argv)
    entries = []
    for f in a.ann:
        with open(f) as fh:
            entries += json.load(fh)
    write_shards(entries, a.image_root, a.out, a.shard_size)


if __name__ == "__main__":
    main()
