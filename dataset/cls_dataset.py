"""NLVR2 and SNLI-VE in ALBEF's formats: one dataset class and one collate for both.

* NLVR2 (``nlvr_*.json``): ``{"images": [left, right], "sentence", "label": "True" | "False"}``, paths under
  ``image_root``; label 1 for ``"True"``. ViCHA's files add ``kwords1`` / ``kwords2`` (one list per image).
* SNLI-VE (``ve_*.json``): ``{"image": <flickr30k id>, "sentence", "label"}``, the image read from
  ``image_root/<id>.jpg`` (ALBEF's convention; an id that already ends in an image extension is kept);
  labels entailment 2, neutral 1, contradiction 0. ViCHA adds ``kwords``.

Training replaces an item with any unreadable image as a whole (both images of a pair come from one item) and
counts it; evaluation answers every item once, an unreadable image read as a blank one and counted.
"""
import os
import random
from dataclasses import dataclass


from dataset.caption_dataset import AnnotationError, ImageTextDataset
from dataset.utils import pre_caption, sample_concepts


@dataclass(frozen=True)
class ClsTask:
    name: str
    classes: tuple          # class names by id
    labels: dict            # label value in the JSON -> class id
    images_field: str       # "images" (a list) or "image" (one id)
    n_images: int
    concept_fields: tuple   # ViCHA's concept field of each image


TASKS = {
    "nlvr": ClsTask("nlvr", ("False", "True"), {"True": 1, "False": 0, True: 1, False: 0}, "images",
                    2, ("kwords1", "kwords2")),
    "ve": ClsTask("ve", ("contradiction", "neutral", "entailment"), {"entailment": 2, "neutral": 1,
                                                                     "contradiction": 0}, "image", 1, ("kwords",)),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class cls_dataset(ImageTextDataset):
    """Returns (images: list of tensors, sentence, class id, index, bad[, concept strings: one per image])."""

    def __init__(self, ann_file, transform, image_root, task, max_words=30, train=True, seed=0,
                 config_key="train_file", concepts=None, truncated_ok=True, image_res=384):
        super().__init__(transform, image_root, seed, None, truncated_ok)
        self.task = TASKS[task]
        self.train, self.max_words, self.image_res = train, max_words, image_res
        t = self.task
        self.ann = self._load(ann_file, {t.images_field: list if t.n_images > 1 else str, "sentence": str,
                                         "label": (str, bool)}, config_key)
        self.targets = []
        for i, a in enumerate(self.ann):
            where = f"{config_key} {self.source_of(i)}"
            if t.n_images > 1 and (len(a["images"]) != t.n_images or not all(isinstance(p, str) for p in a["images"])):
                raise AnnotationError(f"{where}: field 'images' must hold {t.n_images} paths, got {a['images']!r}")
            if a["label"] not in t.labels:
                raise AnnotationError(f"{where}: field 'label' must be one of "
                                      f"{sorted({str(k) for k in t.labels})}, got {a['label']!r}")
            if concepts is not None:
                for f in t.concept_fields:
                    kw = a.get(f)
                    if not isinstance(kw, list) or not all(isinstance(w, str) for w in kw):
                        raise AnnotationError(f"{where}: missing or malformed field {f!r} (config key 'kw_img_model' "
                                              "is true; tools/visual_concepts.py writes it)")
            self.targets.append(t.labels[a["label"]])
        self.concepts = concepts

    def __len__(self):
        return len(self.ann)

    def image_paths(self, index):
        a = self.ann[index]
        if self.task.n_images > 1:
            names = a["images"]
        else:
            name = a["image"]
            names = [name if name.lower().endswith(IMAGE_EXTENSIONS) else name + ".jpg"]
        return [p if (os.path.isabs(p) or not self.image_root) else os.path.join(self.image_root, p) for p in names]

    def image_path(self, index):
        return self.image_paths(index)[0]

    def concept_strings(self, entry, i):
        out = []
        for k, f in enumerate(self.task.concept_fields):
            rng = random.Random((self.sample_seed(i) ^ 0x5bd1e995) + k)
            out.append(sample_concepts(entry[f], rng=rng, **self.concepts))
        return out

    def __getitem__(self, index):
        if self.train:
            images, i, bad = self.read_images(index)
        else:
            (images, bad), i = self.read_for_eval(index, self.image_res), index
        return {"image": images, "bad": bad, **self.fields(i)}

    def fields(self, i):
        """Item ``i`` without its images (evaluation reads each distinct image once: tasks/image_groups.py)."""
        a = self.ann[i]
        sample = {"caption": pre_caption(a["sentence"], self.max_words), "label": self.targets[i], "idx": i}
        if self.concepts is not None:
            sample["concepts"] = self.concept_strings(a, i)
        return sample
