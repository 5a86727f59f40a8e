"""Datasets, transforms and collate functions by task name."""
import torch

from dataset.caption_dataset import pretrain_dataset, re_eval_dataset, re_train_dataset
from dataset.transforms import test_transform, train_transform


def create_dataset(name, config, seed=0):
    res = config["image_res"]
    root = config.get("image_root")
    if name == "pretrain":
        tf = train_transform(res, config.get("train_crop_scale", (0.2, 1.0)), config.get("randaugment", True))
        return pretrain_dataset(config["train_file"], tf, config.get("max_words", 30), image_root=root, seed=seed)
    if name == "re_train":
        tf = train_transform(res, config.get("train_crop_scale", (0.5, 1.0)), config.get("randaugment", True))
        return re_train_dataset(config["train_file"], tf, root, config.get("max_words", 30), seed=seed)
    if name in ("re_val", "re_test"):
        key = "val_file" if name == "re_val" else "test_file"
        return re_eval_dataset(config[key], test_transform(res), root, config.get("max_words", 30),
                               config_key=key, image_res=res)
    raise ValueError(f"unknown dataset {name!r}")


class TextCollate:
    """Stack images, tokenize captions in the worker (ALBEF's per-script settings), pass bad paths on."""

    def __init__(self, tokenizer, max_length=25, padding="longest", truncation=True):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.padding, self.truncation = padding, truncation

    def __call__(self, batch):
        images, captions, idx, bad = zip(*batch)
        text = self.tokenizer(list(captions), padding=self.padding, truncation=self.truncation,
                              max_length=self.max_length)
        return {"image": torch.stack(images), "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"], "idx": torch.tensor(idx, dtype=torch.long),
                "bad": [p for b in bad for p in b], "n": len(images)}


def eval_collate(batch):
    images, idx, bad = zip(*batch)
    return {"image": torch.stack(images), "idx": torch.tensor(idx), "bad": [p for b in bad for p in b]}
