"""RefCOCO+ for weakly supervised grounding, in ALBEF's formats, without the REFER toolkit.

* ``refcoco+_{train,val,test}.json`` (ALBEF's): ``{"image", "text", "ref_id"}``; training treats every
  expression of one image file as a positive of the others (``img_index`` by file name, as ALBEF).
* REFER's ``<refcoco_data>/refcoco+/refs(unc).p`` (a pickle of plain lists and dicts: it is read with an
  unpickler that refuses every class, so it cannot run code) and ``instances.json`` (COCO images and boxes)
  give each ``ref_id`` its split (val / testA / testB), its gold box and its image size.
* ``det_file`` (``dets.json``): proposals ``{str(image_id): [[x, y, w, h, ...], ...]}``.

``python -m dataset.grounding_dataset --refcoco_data data --out data/refcoco+_refs.json`` converts the
pickle and the COCO file once into a plain JSON (config key ``refs_file``), so later runs read no pickle.
"""
import argparse
import io
import json
import os
import pickle

from dataset.caption_dataset import AnnotationError, ImageTextDataset, resolve
from dataset.utils import pre_caption

SAFE_BUILTINS = {"set", "frozenset"}   # REFER's pickles hold only dicts, lists, strings and numbers


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "builtins" and name in SAFE_BUILTINS:
            return {"set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the refs file may hold only plain data")


def load_plain_pickle(path, config_key="refcoco_data"):
    if not os.path.isfile(path):
        raise AnnotationError(f"{config_key}: file not found: {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise AnnotationError(f"{config_key}: {path!r}: {e}") from None


def refs_from_refer(refcoco_data, dataset="refcoco+", split_by="unc"):
    """``{ref_id: {"image_id", "split", "box": [x, y, w, h], "height", "width"}}`` from REFER's files."""
    root = os.path.join(refcoco_data, dataset)
    refs = load_plain_pickle(os.path.join(root, f"refs({split_by}).p"))
    inst_path = os.path.join(root, "instances.json")
    if not os.path.isfile(inst_path):
        raise AnnotationError(f"refcoco_data: file not found: {inst_path!r}")
    with open(inst_path, encoding="utf-8") as f:
        inst = json.load(f)
    boxes = {a["id"]: a["bbox"] for a in inst["annotations"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
    out = {}
    for r in refs:
        if r["ann_id"] not in boxes or r["image_id"] not in sizes:
            raise AnnotationError(f"refcoco_data: ref {r['ref_id']} names ann {r['ann_id']} / image "
                                  f"{r['image_id']}, not in {inst_path!r}")
        h, w = sizes[r["image_id"]]
        out[int(r["ref_id"])] = {"image_id": r["image_id"], "split": r["split"], "box": list(boxes[r["ann_id"]]),
                                 "height": h, "width": w}
    return out


def load_refs(config):
    """The refs of ``refs_file`` (converted JSON) or of REFER's files under ``refcoco_data``."""
    from schema import value
    path = value(config, "refs_file")
    if path:
        if not os.path.isfile(path):
            raise AnnotationError(f"refs_file: file not found: {path!r}")
        with open(path, encoding="utf-8") as f:
            return {int(k): v for k, v in json.load(f).items()}
    root = value(config, "refcoco_data")
    if not root:
        raise AnnotationError("grounding evaluation needs config key 'refs_file' or 'refcoco_data'")
    return refs_from_refer(root)


def load_dets(config):
    from schema import value
    path = value(config, "det_file")
    if not path or not os.path.isfile(path):
        raise AnnotationError(f"det_file: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        dets = json.load(f)
    return {str(k): [list(map(float, d[:4])) for d in v] for k, v in dets.items()}


class grounding_dataset(ImageTextDataset):
    """``mode='train'``: (image, expression, img_index, bad); ``'test'``: (image, expression, ref_id, index, bad),
    every expression once (an unreadable image read as a blank one and counted)."""

    def __init__(self, ann_file, transform, image_root, max_words=30, mode="train", seed=0, config_key="train_file",
                 truncated_ok=True, image_res=384, concepts=None):
        super().__init__(transform, image_root, seed, concepts, truncated_ok)
        self.mode, self.max_words, self.image_res = mode, max_words, image_res
        required = {"image": str, "text": str}
        if mode != "train":
            required["ref_id"] = (int, str)
        self.ann = self._load(ann_file, required, config_key)   # with concepts: 'kwords' required (ViCHA)
        self.img_ids = {}
        for a in self.ann:
            self.img_ids.setdefault(a["image"].split("/")[-1], len(self.img_ids))

    def __len__(self):
        return len(self.ann)

    def image_path(self, index):
        return resolve(self.ann[index]["image"], self.image_root)

    def __getitem__(self, index):
        if self.mode == "train":
            image, i, bad = self.read(index)
            a = self.ann[i]
            sample = {"image": image, "caption": pre_caption(a["text"], self.max_words),
                      "idx": self.img_ids[a["image"].split("/")[-1]], "bad": bad}
            return self.with_concepts(sample, a, i)
        (image,), bad = self.read_for_eval(index, self.image_res)
        return {"image": image, "bad": bad, **self.fields(index)}

    def fields(self, index):
        """A test expression without its image (tasks/image_groups.py reads each image once)."""
        a = self.ann[index]
        return self.with_concepts({"caption": pre_caption(a["text"], self.max_words), "ref_id": int(a["ref_id"]),
                                   "idx": index}, a, index)


def main(argv=None):
    p = argparse.ArgumentParser(description="REFER's refs(unc).p + instances.json -> one plain JSON (refs_file)")
    p.add_argument("--refcoco_data", required=True, help="the folder holding refcoco+/refs(unc).p")
    p.add_argument("--dataset", default="refcoco+")
    p.add_argument("--split_by", default="unc")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    refs = refs_from_refer(a.refcoco_data, a.dataset, a.split_by)
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({str(k): v for k, v in refs.items()}, f)
    os.replace(tmp, a.out)
    print(f"{len(refs)} refs -> {a.out}")


if __name__ == "__main__":
    main()
