"""ALBEF's VQA data: ``vqa_train.json`` / ``vqa_val.json`` / ``vg_qa.json`` / ``vqa_test.json`` unchanged.

Entries: ``{"dataset": "vqa"|"vg", "image", "question", "answer": [str, ...] | str, "question_id"}``. Image
paths join ``vqa_root`` for VQA entries and ``vg_root`` for Visual Genome ones. Training weights are ALBEF's:
each distinct answer of a VQA question weighs its share of the answers (0.1 per annotator of 10), a VG answer
weighs 0.5 (ALBEF's vqa_dataset); every answer gets ``eos`` appended. Bad images are replaced and counted as
in pretraining.
"""
import json
import os
from collections import Counter


from dataset.caption_dataset import AnnotationError, ImageTextDataset, as_list
from dataset.utils import pre_question


class vqa_dataset(ImageTextDataset):
    """``split='train'``: (image, question, answers, weights, index, bad); ``'test'``: (image, question,
    question_id, index, bad), one item per question in file order (unreadable images become blank ones and
    are counted: every question is answered exactly once)."""

    def __init__(self, ann_file, transform, vqa_root, vg_root, eos="[SEP]", split="train", max_ques_words=30,
                 seed=0, config_key="train_file", concepts=None, truncated_ok=True, image_res=384):
        super().__init__(transform, None, seed, concepts, truncated_ok)
        self.vqa_root, self.vg_root, self.eos, self.split = vqa_root, vg_root, eos, split
        self.max_ques_words, self.image_res = max_ques_words, image_res
        required = {"image": str, "question": str}
        if split == "train":
            required["answer"] = (str, list)
        else:
            required["question_id"] = (int, str)
        self.ann = self._load(ann_file, required, config_key)
        for i, a in enumerate(self.ann):
            if a.get("dataset", "vqa") not in ("vqa", "vg"):
                raise AnnotationError(f"{config_key} {self.source_of(i)}: field 'dataset' must be 'vqa' or 'vg', got "
                                      f"{a.get('dataset')!r}")
            if split == "train" and isinstance(a["answer"], list) and not a["answer"]:
                raise AnnotationError(f"{config_key} {self.source_of(i)}: field 'answer' is an empty list")
        root = {"vqa": vqa_root, "vg": vg_root}
        for name in {a.get("dataset", "vqa") for a in self.ann}:
            if not root[name]:
                raise AnnotationError(f"{config_key} has '{name}' entries but config key '{name}_root' is not set")

    def __len__(self):
        return len(self.ann)

    def image_path(self, index):
        a = self.ann[index]
        root = self.vg_root if a.get("dataset", "vqa") == "vg" else self.vqa_root
        return a["image"] if os.path.isabs(a["image"]) else os.path.join(root, a["image"])

    def answers(self, index):
        """(distinct answers with ``eos``, ALBEF's weights)."""
        a = self.ann[index]
        if a.get("dataset", "vqa") == "vg":
            return [a["answer"] + self.eos if isinstance(a["answer"], str) else a["answer"][0] + self.eos], [0.5]
        counts = Counter(as_list(a["answer"]))
        n = sum(counts.values())
        return [ans + self.eos for ans in counts], [c / n for c in counts.values()]

    def __getitem__(self, index):
        if self.split == "train":
            image, i, bad = self.read(index)
            answers, weights = self.answers(i)
            sample = {"image": image, "question": pre_question(self.ann[i]["question"], self.max_ques_words),
                      "answers": answers, "weights": weights, "idx": i, "bad": bad}
            return self.with_concepts(sample, self.ann[i], i)
        (image,), bad = self.read_for_eval(index, self.image_res)   # answered anyway, counted
        return {"image": image, "bad": bad, **self.fields(index)}

    def fields(self, index):
        """An evaluation question without its image (tasks/image_groups.py reads each image once)."""
        a = self.ann[index]
        sample = {"question": pre_question(a["question"], self.max_ques_words), "question_id": a["question_id"],
                  "idx": index}
        return self.with_concepts(sample, a, index)


def read_answer_list(path):
    """``answer_list.json``: the candidate answers (a JSON list of strings)."""
    if not path or not os.path.isfile(path):
        raise AnnotationError(f"answer_list: file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list) or not data or not all(isinstance(x, str) for x in data):
        raise AnnotationError(f"answer_list: {path!r} must hold a non-empty JSON list of strings")
    return data
