"""Datasets, transforms and collate functions by task name."""
import torch

from schema import value

from dataset.caption_dataset import pretrain_dataset, re_eval_dataset, re_train_dataset
from dataset.transforms import test_transform, train_transform


def concept_options(config, train=True):
    """``sample_concepts`` options from ViCHA's keys, or None without ``kw_img_model``. Evaluation uses every
    concept in order (ViCHA's downstream configs: no ``randkw_p``)."""
    if not value(config, "kw_img_model"):
        return None
    p = value(config, "randkw_p") if train else None
    if p is not None and not 0 < float(p) <= 1:
        raise ValueError(f"config key 'randkw_p' must be in (0, 1] or null, got {p!r}")
    return {"p": None if p is None else float(p), "replacement": bool(value(config, "vc_sample_replacement")),
            "sep_token": bool(value(config, "sep_token"))}


def _train_tf(config, res, scale):
    return train_transform(res, scale, value(config, "randaugment"), uint8=bool(value(config, "uint8_images")))


def create_dataset(name, config, seed=0):
    res = value(config, "image_res")
    root = value(config, "image_root")
    common = {"concepts": concept_options(config, train=name in ("pretrain", "re_train")),
              "truncated_ok": value(config, "load_truncated_images")}
    if name in ("pretrain", "re_train"):
        task = "pretrain" if name == "pretrain" else "retrieval"
        if value(config, "train_file") is None:
            raise ValueError("missing required config key 'train_file'")
        tf = _train_tf(config, res, value(config, "train_crop_scale", task))
        if name == "pretrain":
            from models.objectives.hard_negatives import enabled
            from dataset.shards import is_shards
            if is_shards(config["train_file"]):
                return shard_stream(config, tf, seed, common, enabled(config))
            return pretrain_dataset(config["train_file"], tf, value(config, "max_words"), image_root=root, seed=seed,
                                    hard_negatives=enabled(config), **common)
        return re_train_dataset(config["train_file"], tf, root, value(config, "max_words"), seed=seed, **common)
    if name in ("vqa_train", "vqa_val", "vqa_test"):
        from dataset.vqa_dataset import vqa_dataset
        key = {"vqa_train": "train_file", "vqa_val": "val_file", "vqa_test": "test_file"}[name]
        train = name == "vqa_train"
        tf = _train_tf(config, res, value(config, "train_crop_scale", "vqa")) if train \
            else test_transform(res)
        common["concepts"] = concept_options(config, train=train)
        # ALBEF: training questions keep 30 words, evaluation questions 50
        return vqa_dataset(config[key], tf, value(config, "vqa_root"), value(config, "vg_root"), value(config, "eos"),
                           split="train" if train else "test", max_ques_words=30 if train else 50, seed=seed,
                           config_key=key, image_res=res, **common)
    if name.startswith(("nlvr_", "ve_")):   # nlvr_train / nlvr_val / nlvr_test, ve_train / ...
        from dataset.cls_dataset import cls_dataset
        task, split = name.split("_", 1)
        key = {"train": "train_file", "val": "val_file", "test": "test_file"}[split]
        train = split == "train"
        tf = _train_tf(config, res, value(config, "train_crop_scale", task)) if train \
            else test_transform(res)
        common["concepts"] = concept_options(config, train=train)
        return cls_dataset(config[key], tf, root, task, value(config, "max_words"), train=train, seed=seed,
                           config_key=key, image_res=res, **common)
    if name in ("grounding_train", "grounding_test"):
        from dataset.grounding_dataset import grounding_dataset
        train = name == "grounding_train"
        key = "train_file" if train else "test_file"
        tf = _train_tf(config, res, None) if train else test_transform(res)
        return grounding_dataset(config[key], tf, root, value(config, "max_words"), mode="train" if train else "test",
                                 seed=seed, config_key=key, truncated_ok=common["truncated_ok"], image_res=res,
                                 concepts=concept_options(config, train=train))
    if name in ("re_val", "re_test"):
        key = "val_file" if name == "re_val" else "test_file"
        return re_eval_dataset(config[key], test_transform(res), root, value(config, "max_words"),
                               config_key=key, image_res=res, **common)
    raise ValueError(f"unknown dataset {name!r}")


def shard_stream(config, transform, seed, common, hard_negatives):
    """Pretraining streamed from webdataset shards (every ``train_file`` source is ``.tar`` shards)."""
    from dataset.shards import ShardStream
    from utils import get_rank, get_world_size
    if config.get("grit"):
        raise ValueError("config key 'grit': GRIT regroups the previous epoch's samples, which needs random "
                         "access; convert the shards once (python -m dataset.store --ann 'shards/*.tar' --out "
                         "corpus.arrow) and give the .arrow as train_file")
    return ShardStream(config["train_file"], transform, value(config, "max_words"), int(value(config, "batch_size")),
                       get_world_size(), get_rank(), seed, weights=value(config, "train_weights"),
                       num_samples=value(config, "train_num_samples"), shuffle_buffer=value(config, "shuffle_buffer"),
                       concepts=common["concepts"], hard_negatives=hard_negatives,
                       truncated_ok=common["truncated_ok"], workers=int(value(config, "num_workers")))


class TextCollate:
    """Stack images, tokenize captions in the worker (ALBEF's per-script settings), pass bad paths on.

    Samples with a fifth item (ViCHA's concept string) also get ``kw_input_ids`` / ``kw_attention_mask``,
    padded to the batch's longest and truncated at ``vc_max_tokens`` (ViCHA: 55).
    """

    def __init__(self, tokenizer, max_length=25, padding="longest", truncation=True, vc_max_tokens=55):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.padding, self.truncation = padding, truncation
        self.vc_max_tokens = vc_max_tokens

    def __call__(self, batch):
        images, captions, idx, bad = list(zip(*batch))[:4]
        text = self.tokenizer(list(captions), padding=self.padding, truncation=self.truncation,
                              max_length=self.max_length)
        out = {"image": torch.stack(images), "input_ids": text["input_ids"],
               "attention_mask": text["attention_mask"], "idx": torch.tensor(idx, dtype=torch.long),
               "bad": [p for b in bad for p in b], "n": len(images)}
        extras = batch[0][4:]
        if any(isinstance(x, str) for x in extras):   # ViCHA's concept string
            kw = tokenize_concepts(self.tokenizer, [b[4] for b in batch], self.vc_max_tokens)
            out["kw_input_ids"], out["kw_attention_mask"] = kw
        if extras and isinstance(extras[-1], dict):   # CE-CLIP's negatives: 4B texts, sample-major
            hn = [b[-1] for b in batch]
            t = self.tokenizer([c for h in hn for c in h["hard_negatives"]], padding=self.padding,
                               truncation=self.truncation, max_length=self.max_length)
            out["hn_input_ids"], out["hn_attention_mask"] = t["input_ids"], t["attention_mask"]
            out["hn_valid"] = torch.tensor([h["hn_valid"] for h in hn], dtype=torch.bool)
        return out


def tokenize_concepts(tokenizer, strings, max_tokens=55):
    """(ids, mask) of concept strings: right-padded to the longest, at training and at evaluation alike."""
    t = tokenizer(list(strings), padding="longest", truncation=True, max_length=max_tokens)
    return t["input_ids"], t["attention_mask"]


def eval_batch_size(config):
    """The evaluation batch: ``batch_size_test``, else ALBEF NLVR's / grounding's one ``batch_size``."""
    return int(config.get("batch_size_test") or config.get("batch_size") or value(config, "batch_size_test"))


def shard_loader(dataset, config, collate_fn):
    """This rank's contiguous share of an evaluation set (``utils.shard``: every item once over the ranks, no
    padding), in order."""
    from torch.utils.data import DataLoader, Subset
    from utils import shard
    return DataLoader(Subset(dataset, list(shard(len(dataset)))), batch_size=eval_batch_size(config), shuffle=False,
                      num_workers=int(value(config, "num_workers")), collate_fn=collate_fn)


def eval_collate(batch):
    images, idx, bad = zip(*batch)
    return {"image": torch.stack(images), "idx": torch.tensor(idx), "bad": [p for b in bad for p in b]}
