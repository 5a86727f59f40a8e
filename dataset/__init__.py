"""Datasets and transforms by task name (the collate functions: ``dataset/collate.py``)."""
from schema import hard_negative_losses_on, value

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


def _pretrain(config, key, tf, train, seed, common):
    from dataset.tar import is_shards
    if is_shards(config[key]):
        return shard_stream(config, tf, seed, common, hard_negative_losses_on(config))
    return pretrain_dataset(config[key], tf, value(config, "max_words"), image_root=value(config, "image_root"),
                            seed=seed, hard_negatives=hard_negative_losses_on(config), **common)


def _re_train(config, key, tf, train, seed, common):
    return re_train_dataset(config[key], tf, value(config, "image_root"), value(config, "max_words"), seed=seed,
                            **common)


def _re_eval(config, key, tf, train, seed, common):
    return re_eval_dataset(config[key], tf, value(config, "image_root"), value(config, "max_words"), config_key=key,
                           image_res=value(config, "image_res"), **common)


def _vqa(config, key, tf, train, seed, common):
    from dataset.vqa_dataset import vqa_dataset
    # ALBEF: training questions keep 30 words, evaluation questions 50
    return vqa_dataset(config[key], tf, value(config, "vqa_root"), value(config, "vg_root"), value(config, "eos"),
                       split="train" if train else "test", max_ques_words=30 if train else 50, seed=seed,
                       config_key=key, image_res=value(config, "image_res"), **common)


def _classification(task):
    def build(config, key, tf, train, seed, common):
        from dataset.cls_dataset import cls_dataset
        return cls_dataset(config[key], tf, value(config, "image_root"), task, value(config, "max_words"),
                           train=train, seed=seed, config_key=key, image_res=value(config, "image_res"), **common)
    return build


def _grounding(config, key, tf, train, seed, common):
    from dataset.grounding_dataset import grounding_dataset
    return grounding_dataset(config[key], tf, value(config, "image_root"), value(config, "max_words"),
                             mode="train" if train else "test", seed=seed, config_key=key,
                             image_res=value(config, "image_res"), **common)


SPLIT_KEYS = {"train": "train_file", "val": "val_file", "test": "test_file"}
# name: (builder, split, the task whose train_crop_scale a training split uses; None: the full image)
DATASETS = {
    "pretrain": (_pretrain, "train", "pretrain"),
    "re_train": (_re_train, "train", "retrieval"), "re_val": (_re_eval, "val", None), "re_test": (_re_eval, "test", None),
    "vqa_train": (_vqa, "train", "vqa"), "vqa_val": (_vqa, "val", None), "vqa_test": (_vqa, "test", None),
    **{f"{t}_{s}": (_classification(t), s, t) for t in ("nlvr", "ve") for s in SPLIT_KEYS},
    "grounding_train": (_grounding, "train", None), "grounding_test": (_grounding, "test", None),
}


def create_dataset(name, config, seed=0):
    """The dataset ``name`` (a key of ``DATASETS``) from the config: its split's file, transform and options."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; one of {sorted(DATASETS)}")
    build, split, crop = DATASETS[name]
    key, train, res = SPLIT_KEYS[split], split == "train", value(config, "image_res")
    if config.get(key) is None:
        raise ValueError(f"missing required config key {key!r}")
    tf = _train_tf(config, res, value(config, "train_crop_scale", crop) if crop else None) if train \
        else test_transform(res)
    common = {"concepts": concept_options(config, train=train), "truncated_ok": value(config, "load_truncated_images")}
    return build(config, key, tf, train, seed, common)


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


def eval_batch_size(config):
    """The evaluation batch: ``batch_size_test``, else ALBEF NLVR's / grounding's one ``batch_size``."""
    return int(config.get("batch_size_test") or config.get("batch_size") or value(config, "batch_size_test"))


def shard_loader(dataset, config, collate_fn, indices=None):
    """This rank's contiguous share of an evaluation set, or of its items ``indices`` (``utils.shard``: every
    item once over the ranks, no padding), in order."""
    from torch.utils.data import DataLoader, Subset
    from utils import shard
    indices = range(len(dataset)) if indices is None else indices
    mine = [indices[j] for j in shard(len(indices))]
    return DataLoader(Subset(dataset, mine), batch_size=eval_batch_size(config), shuffle=False,
                      num_workers=int(value(config, "num_workers")), collate_fn=collate_fn)
