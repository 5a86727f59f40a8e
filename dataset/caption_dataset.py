"""ALBEF's JSON caption datasets, with validated annotations and bad images skipped and counted.

A bad image (missing, undecodable; truncated too with ``load_truncated_images: false``) is replaced by a
readable item drawn at random with the sample's seed, so the batch keeps its size (the ITC queue needs fixed
global batches) and a block of missing files in a large corpus costs nothing but its share. Only the image of
the requested index travels with the sample as bad (not the replacements tried), so each unreadable image is
counted once per epoch; the sample's index is the replacement's, the item actually trained. Random augmentation of item ``i`` in epoch ``e`` is seeded from ``(seed, e, i)``, which
makes a run resumed mid-epoch see exactly the same samples.
"""
import io
import json
import os
import random
import re
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from dataset.utils import AnnotationError, pre_caption, sample_concepts  # noqa: F401 - AnnotationError re-exported

Image.MAX_IMAGE_PIXELS = None   # large web images are fine (ALBEF too)


def read_json_list(path, required, config_key):
    """Load one annotation file (a JSON list of dicts) and check each entry has the ``required`` fields."""
    if not os.path.isfile(path):
        raise AnnotationError(f"{config_key}: annotation file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{config_key}: {path!r} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{config_key}: {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise AnnotationError(f"{config_key}: {path!r} must hold a JSON list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise AnnotationError(f"{path!r}, entry {i}: expected an object, got {type(entry).__name__}")
        for name, types in required.items():
            if name not in entry:
                raise AnnotationError(f"{path!r}, entry {i}: missing field {name!r} (entry: {str(entry)[:200]})")
            if not isinstance(entry[name], types):
                raise AnnotationError(f"{path!r}, entry {i}: field {name!r} has type {type(entry[name]).__name__}")
        cap = entry.get("caption")
        if isinstance(cap, list) and (not cap or not all(isinstance(c, str) for c in cap)):
            raise AnnotationError(f"{path!r}, entry {i}: 'caption' must be a string or a non-empty list of strings")
    return data


def as_list(files):
    return [files] if isinstance(files, str) else list(files)


def resolve(path, image_root):
    return path if (os.path.isabs(path) or not image_root) else os.path.join(image_root, path)


def image_source(entry, image_root):
    """Where an entry's image is: a path, or a member of a webdataset shard (``x.tar#key.jpg``, located by
    ``tar_offset`` / ``tar_size`` when the store has them)."""
    path = resolve(entry["image"], image_root)
    if ".tar#" in path:
        from dataset.tar import TarMember
        return TarMember(path, entry.get("tar_offset"), entry.get("tar_size"))
    return path


def load_image(path, truncated_ok=True):
    """Open and fully decode as 8-bit RGB; raises on missing or undecodable files (and truncated ones unless
    ``truncated_ok``, ALBEF's ``LOAD_TRUNCATED_IMAGES``). 16-bit and 32-bit modes are rescaled, not clipped.
    ``path`` may be a shard member (``x.tar#key.jpg``) or a file object (a streamed member's bytes)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = bool(truncated_ok)   # per process (workers too); cheap to set
    if isinstance(path, str) and ".tar#" in path:
        from dataset.tar import read_member
        path = io.BytesIO(read_member(path))
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img):
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):   # 16-bit PNG/TIFF grey (Pillow reads some as I)
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@contextmanager
def seeded(seed):
    """Seed python, numpy and torch for one sample, then restore the caller's RNG streams."""
    py, npst = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


def require_kwords(ann, path):
    """Every entry needs ViCHA's ``kwords`` (a list of strings) when visual concepts are on."""
    for i, a in enumerate(ann):
        kw = a.get("kwords")
        if not isinstance(kw, list) or not all(isinstance(w, str) for w in kw):
            what = "missing field 'kwords'" if kw is None else "field 'kwords' must be a list of strings"
            raise AnnotationError(f"{path!r}, entry {i}: {what} (config key 'kw_img_model' is true; "
                                  "tools/visual_concepts.py writes it)")


INVALID_HN = "###"   # CE-CLIP's mark of a negative that could not be generated
N_HN = 4             # relation swap, attribute, object, action


def require_hard_negatives(ann, files):
    """Every entry needs ``hard_negatives`` (4 strings) and ``hn_valid`` (4 flags), per caption (parallel
    lists) when ``caption`` is a list, as tools/hard_negatives.py writes them."""
    where = ", ".join(as_list(files))

    def four(x, kind):
        return isinstance(x, list) and len(x) == N_HN and all(isinstance(v, kind) for v in x)
    for i, a in enumerate(ann):
        negs, valid = a.get("hard_negatives"), a.get("hn_valid")
        caps = a["caption"] if isinstance(a["caption"], list) else None
        ok = negs is not None and valid is not None
        if ok and caps is None:
            ok = four(negs, (str, type(None))) and four(valid, (int, bool))
        elif ok:
            ok = (isinstance(negs, list) and isinstance(valid, list) and len(negs) == len(valid) == len(caps)
                  and all(four(n, (str, type(None))) and four(v, (int, bool)) for n, v in zip(negs, valid)))
        if not ok:
            raise AnnotationError(f"{where!r}, entry {i}: fields 'hard_negatives' (4 strings) and 'hn_valid' (4 flags)"
                                  f"{', one list per caption,' if caps else ''} missing or malformed (a hard-negative "
                                  "loss is on: hn_itc / cmr_weight / imc_weight; tools/hard_negatives.py writes them)")


class ConcatAnnotations:
    """Several sources (JSON lists, stores) as one sequence, without copying a store's entries."""

    def __init__(self, parts):
        import bisect
        self.parts, self._bisect = parts, bisect.bisect_right
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = self._bisect(self.starts, i) - 1
        return self.parts[k][i - self.starts[k]]


class ImageTextDataset(Dataset):
    """Base: robust image reading and per-sample seeding. Subclasses define ``entries`` and ``make``.

    ``concepts`` (a dict of ``sample_concepts`` options, or None) adds ViCHA's visual-concept string to
    every sample, drawn from the entry's ``kwords`` with the sample's seed (so a resumed run draws the same).
    """

    max_replacement_tries = 50

    def __init__(self, transform, image_root=None, seed=0, concepts=None, truncated_ok=True):
        self.transform = transform
        self.truncated_ok = truncated_ok
        self.image_root = image_root
        self.seed = seed
        self.epoch = 0
        self.concepts = concepts

    def _load(self, files, required, config_key):
        """The entries of every file in order: JSON lists and memory-mapped stores (``.arrow``) may be mixed.
        ``self.source_sizes`` keeps each file's count (``train_weights`` weighs them)."""
        files = as_list(files)
        tars = [f for f in files if re.search(r"\.tar(::|$)", str(f))]
        if tars:
            raise AnnotationError(f"{config_key}: webdataset shards ({tars[:2]}) "
                                  "are read as a stream only when every source is shards (and GRIT is off); to mix "
                                  "them with JSON lists or read them by index, convert them once: python -m "
                                  "dataset.store --ann 'shards/{00000..00099}.tar' --out shards.arrow")
        parts = []
        for f in files:
            if str(f).endswith(".arrow"):
                part = self._load_store(f, required, config_key)
            else:
                part = read_json_list(f, required, config_key)
                if self.concepts is not None:
                    require_kwords(part, f)
            parts.append(part)
        self.source_files, self.source_sizes = files, [len(p) for p in parts]
        if all(isinstance(p, list) for p in parts):
            return [a for p in parts for a in p]
        return parts[0] if len(parts) == 1 else ConcatAnnotations(parts)

    def source_of(self, i):
        """Where entry ``i`` is read from, for messages: ``'file.json', entry j`` (numbered within its file)."""
        for f, n in zip(self.source_files, self.source_sizes):
            if i < n:
                return f"{f!r}, entry {i}"
            i -= n
        return f"entry {i}"

    def _load_store(self, path, required, config_key):
        """A memory-mapped store (dataset/store.py) instead of a JSON list: no per-entry Python objects."""
        from dataset.store import ArrowAnnotations
        if not os.path.isfile(path):
            raise AnnotationError(f"{config_key}: annotation store not found: {path!r}")
        ann = ArrowAnnotations(path, config_key)
        if set(required) - {"image", "caption"}:
            raise AnnotationError(f"{config_key}: a .arrow store serves pretraining entries ({{image, caption}}); "
                                  f"this dataset needs {sorted(required)}")
        if self.concepts is not None and not ann.has("kwords"):
            raise AnnotationError(f"{path!r}: entries without 'kwords' (config key 'kw_img_model' is true; "
                                  "tools/visual_concepts.py writes them)")
        return ann

    def concept_string(self, entry, i):
        rng = random.Random(self.sample_seed(i) ^ 0x5bd1e995)
        return sample_concepts(entry["kwords"], rng=rng, **self.concepts)

    def with_concepts(self, sample, entry, i):
        if self.concepts is not None:
            sample["concepts"] = self.concept_string(entry, i)
        return sample

    def set_epoch(self, epoch):
        self.epoch = epoch

    def image_path(self, index):
        raise NotImplementedError

    def image_paths(self, index):
        """Every image of one item (NLVR2 has two); the default is the one ``image_path``."""
        return [self.image_path(index)]

    def sample_seed(self, index):
        return zlib.crc32(f"{self.seed}:{self.epoch}:{index}".encode())

    def read(self, index):
        """(image tensor, index actually used, [this index's path if its image was unreadable])."""
        images, i, bad = self.read_images(index)
        return images[0], i, bad

    def read_images(self, index):
        """(the item's image tensors, index actually used, [the first unreadable path of this index]). An item
        with any unreadable image is replaced as a whole, so a two-image example never mixes two items."""
        bad = []
        n = len(self)
        rng = random.Random(self.sample_seed(index) ^ 0x2545F491)
        i = index
        for _ in range(self.max_replacement_tries + 1):
            try:
                imgs = []
                for path in self.image_paths(i):
                    imgs.append(load_image(path, self.truncated_ok))
            except Exception as e:   # noqa: BLE001 - any unreadable file is skipped, never a worker crash
                if not bad:
                    bad.append(f"{path} ({type(e).__name__})")
                i = rng.randrange(n)
                continue
            with seeded(self.sample_seed(i)):
                return [self.transform(img) for img in imgs], i, bad
        raise RuntimeError(f"item {index} and {self.max_replacement_tries} random replacements are all unreadable "
                           f"(first: {bad[0]}). Check image_root and the annotation paths.")

    def read_for_eval(self, index, image_res):
        """Evaluation: every item exactly once, so an unreadable image becomes a blank one and is counted."""
        images, bad = [], []
        for path in self.image_paths(index):
            try:
                images.append(self.transform(load_image(path, self.truncated_ok)))
            except Exception as e:   # noqa: BLE001
                images.append(torch.zeros(3, image_res, image_res))
                bad.append(f"{path} ({type(e).__name__})")
        return images, bad


class pretrain_dataset(ImageTextDataset):
    """Items ``{'image': path, 'caption': str | [str, ...]}``; samples ``{image, caption, idx, bad}`` (and
    ``concepts``, ``hard_negatives`` / ``hn_valid`` when asked for)."""

    def __init__(self, ann_file, transform, max_words=30, image_root=None, seed=0, config_key="train_file",
                 concepts=None, truncated_ok=True, hard_negatives=False):
        super().__init__(transform, image_root, seed, concepts, truncated_ok)
        self.ann = self._load(ann_file, {"image": str, "caption": (str, list)}, config_key)
        self.max_words = max_words
        self.hard_negatives = hard_negatives
        if hard_negatives:
            parts = self.ann.parts if isinstance(self.ann, ConcatAnnotations) else [self.ann]
            for part in parts:
                if hasattr(part, "has"):   # a store: checked per column, its converter validated the entries
                    if not (part.has("hard_negatives") and part.has("hn_valid")):
                        raise AnnotationError(f"{part.path!r}: entries without 'hard_negatives' / 'hn_valid' (a "
                                              "hard-negative loss is on; tools/hard_negatives.py writes them)")
                else:
                    require_hard_negatives(part, ann_file)

    def __len__(self):
        return len(self.ann)

    def image_path(self, index):
        return image_source(self.ann[index], self.image_root)

    def __getitem__(self, index):
        image, i, bad = self.read(index)
        return caption_sample(self, image, self.ann[i], i, bad)


def caption_sample(ds, image, a, i, bad):
    """A pretraining sample of entry ``a`` at index ``i``: the caption drawn from a list with the sample's
    seed, the same draw picking its negatives."""
    cap, j = a["caption"], None
    if isinstance(cap, list):   # the same draw as random.choice(cap), keeping the index for its negatives
        j = random.Random(ds.sample_seed(i)).choice(range(len(cap)))
        cap = cap[j]
    sample = {"image": image, "caption": pre_caption(cap, ds.max_words), "idx": i, "bad": bad}
    if ds.concepts is not None:
        sample["concepts"] = ds.concept_string(a, i)
    if ds.hard_negatives:
        negs, valid = a["hard_negatives"], a["hn_valid"]
        if j is not None:
            negs, valid = negs[j], valid[j]
        valid = [bool(v) and isinstance(t, str) and t.strip() not in ("", INVALID_HN) for t, v in zip(negs, valid)]
        negs = [pre_caption(t, ds.max_words) if ok else "" for t, ok in zip(negs, valid)]
        sample.update(hard_negatives=negs, hn_valid=valid)
    return sample


class re_train_dataset(ImageTextDataset):
    """Items ``{'image', 'caption': str, 'image_id'}``; samples ``{image, caption, idx: the image's number, bad}``."""

    def __init__(self, ann_file, transform, image_root, max_words=30, seed=0, config_key="train_file",
                 concepts=None, truncated_ok=True):
        super().__init__(transform, image_root, seed, concepts, truncated_ok)
        self.ann = self._load(ann_file, {"image": str, "caption": str, "image_id": (str, int)}, config_key)
        self.max_words = max_words
        self.img_ids = {}
        for a in self.ann:
            self.img_ids.setdefault(a["image_id"], len(self.img_ids))

    def __len__(self):
        return len(self.ann)

    def image_path(self, index):
        return image_source(self.ann[index], self.image_root)

    def __getitem__(self, index):
        image, i, bad = self.read(index)
        a = self.ann[i]
        return self.with_concepts({"image": image, "caption": pre_caption(a["caption"], self.max_words),
                                   "idx": self.img_ids[a["image_id"]], "bad": bad}, a, i)


class re_eval_dataset(ImageTextDataset):
    """Items ``{'image', 'caption': [str, ...]}``; one item per image, texts flattened in order.

    An unreadable image becomes a blank one (skipping would change the metric's denominator) and is counted.
    With ``concepts``, ``concept_text[i]`` is image i's concept string (evaluation draws nothing at random:
    give ``p: None`` to use all, as ViCHA's downstream configs do).
    """

    def __init__(self, ann_file, transform, image_root, max_words=30, config_key="test_file", image_res=256,
                 concepts=None, truncated_ok=True):
        super().__init__(transform, image_root, concepts=concepts, truncated_ok=truncated_ok)
        self.image_res = image_res
        self.ann = self._load(ann_file, {"image": str, "caption": (list, str)}, config_key)
        self.concept_text = [self.concept_string(a, i) for i, a in enumerate(self.ann)] if concepts else None
        self.text, self.image, self.txt2img, self.img2txt = [], [], {}, {}
        for img_id, a in enumerate(self.ann):
            self.image.append(a["image"])
            self.img2txt[img_id] = []
            for cap in as_list(a["caption"]):
                self.txt2img[len(self.text)] = img_id
                self.img2txt[img_id].append(len(self.text))
                self.text.append(pre_caption(cap, max_words))

    def __len__(self):
        return len(self.ann)

    def image_path(self, index):
        return image_source(self.ann[index], self.image_root)

    def __getitem__(self, index):
        images, bad = self.read_for_eval(index, self.image_res)
        return {"image": images[0], "idx": index, "bad": bad}
