"""Every config key: type, default, allowed range and one line of documentation, grouped by method.

The defaults live only here. ``value(config, key)`` reads a key with its default (models, datasets and the
engine use it, also on raw dicts built in tests); ``check(config, task)`` validates a launcher's config at
start-up (types, ranges, choices, required keys, each error naming the key), coerces numeric strings and
fills in the task's defaults. ALBEF's, GRIT-VLP's, MAFA's and ViCHA's own YAML files load unchanged:
``translate`` gives their keys the meaning they have in their repository.
"""
import difflib
from dataclasses import dataclass

REQUIRED = object()


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    type: str            # int, float, bool, str, path (str), list, dict, files (str or list of str), any
    default: object = None
    doc: str = ""
    lo: float = None     # inclusive bounds for numbers
    hi: float = None
    choices: tuple = None
    open_lo: bool = False   # lo itself not allowed


def K(type, default=None, doc="", lo=None, hi=None, choices=None, open_lo=False):
    return Key(type, default, doc, lo, hi, tuple(choices) if choices else None, open_lo)


GROUPS = {
    "model (ALBEF)": {
        "bert_config": K("any", REQUIRED, "BERT config: a JSON path (cwd or repo relative) or its keys inline"),
        "image_res": K("int", REQUIRED, "input image side in pixels", lo=8),
        "patch_size": K("int", 16, "ViT patch size", lo=1),
        "vision_width": K("int", 768, "ViT width (must equal bert_config.encoder_width)", lo=1),
        "vision_depth": K("int", 12, "ViT blocks", lo=1),
        "vision_heads": K("int", 12, "ViT attention heads", lo=1),
        "mlp_ratio": K("float", 4.0, "ViT MLP ratio", lo=0, open_lo=True),
        "embed_dim": K("int", 256, "ITC projection size", lo=1),
        "temp": K("float", 0.07, "initial ITC temperature (learned, clamped to [0.001, 0.5])", lo=0, hi=1,
                  open_lo=True),
        "queue_size": K("int", 65536, "ITC momentum queue length (a multiple of the global batch)", lo=1),
        "momentum": K("float", 0.995, "momentum-encoder EMA coefficient", lo=0, hi=1),
        "alpha": K("float", 0.4, "distillation weight of the momentum targets", lo=0, hi=1),
        "distill": K("bool", None, "momentum distillation (default: on with momentum encoders)"),
        "mlm_probability": K("float", 0.15, "share of text tokens masked for MLM", lo=0, hi=1),
        "k_test": K("int", 256, "ITC candidates re-ranked by ITM at evaluation", lo=1),
        "text_encoder": K("path", None, "local BERT directory for the text encoder's initial weights"),
        "text_decoder": K("path", None, "local BERT directory for the answer decoder (VQA)"),
        "tokenizer": K("path", None, "local tokenizer directory (default: text_encoder)"),
        "vision_init": K("path", None, "local DeiT/timm weights for the ViT"),
        "attn_implementation": K("str", None, "attention kernel (default: sdpa)", choices=("sdpa", "eager")),
        "grad_checkpointing": K("bool", False, "activation checkpointing in the ViT and BERT"),
        "mlm_distill_seq_axis_bug": K("bool", False, "ALBEF's released checkpoints' log-softmax axis (spec 1.9)"),
        "decoder_distill": K("bool", True, "VQA: distil the answer decoder from its momentum copy"),
        "rank_answer_double_count": K("bool", True, "VQA: ALBEF's answer ranking counts the first token twice"),
        "dual_metrics": K("bool", False, "ViCHA: also report ITC-only retrieval metrics"),
    },
    "GRIT-VLP / MAFA objective": {
        "use_momentum": K("bool", True, "momentum encoders and queue (false: GRIT's in-batch ITC)"),
        "itc_loss": K("str", "softmax", "ITC's form: ALBEF's softmax over similarities / temp, or SigLIP's sigmoid "
                      "over every pair (logit_scale, logit_bias)", choices=("softmax", "sigmoid")),
        "siglip_init_scale": K("float", 10.0, "SigLIP: initial exp(logit_scale)", lo=0, open_lo=True),
        "siglip_init_bias": K("float", -10.0, "SigLIP: initial logit_bias (the paper's -10 is about -log of its "
                              "batch of 32k; about -log(global batch - 1) in general)"),
        "itc_consistency_weight": K("float", 0.0, "GRIT's ITC consistency term (GRIT: 0.2)", lo=0),
        "itm_negative_selection": K("str", "multinomial", "ITM negatives: ALBEF's draw, GRIT's top-1, or uniform",
                                    choices=("multinomial", "argmax", "uniform")),
        "itc_label_smoothing": K("float", 0.0, "MAFA's S-ITC smoothing (MAFA: 0.5)", lo=0, hi=1),
        "smoothing_start_epoch": K("int", 1, "first epoch with S-ITC smoothing", lo=0),
        "search_space": K("int", None, "GRIT's own top-level key (read as grit.search_space)", lo=1),
    },
    "ViCHA": {
        "return_hidden_state": K("bool", False, "H-ITC: align intermediate layers"),
        "num_hidden_align": K("int", 5, "H-ITC levels", lo=0),
        "ita_hidden_weight": K("float", 1.0, "H-ITC total weight", lo=0),
        "ita_hidden_weights": K("list", None, "H-ITC per-level weights (default: ones)"),
        "mae": K("bool", False, "unimodal masked image modelling"),
        "mask_ratio": K("float", 0.75, "MIM masked patch share", lo=0, hi=1),
        "unimodal_mae": K("bool", True, "MIM on the image alone (the only mode supported)"),
        "mae_lambda": K("float", 1.0, "MIM loss weight", lo=0),
        "mim_decoder_heads": K("int", 16, "MIM decoder heads", lo=1),
        "kw_img_model": K("bool", False, "visual concepts appended to the ViT sequence"),
        "kw_img_dataset": K("bool", False, "the annotations carry 'kwords' (implied by kw_img_model)"),
        "num_hidden_layers_kw": K("int", 2, "layers of the concept encoder", lo=1),
        "vc_mask_padding": K("bool", True, "mask the concept padding (ViCHA attends to it: false)"),
        "randkw_p": K("float", None, "share of concepts drawn per training sample (null: all)", lo=0, hi=1,
                      open_lo=True),
        "sep_token": K("bool", False, "join concepts with [SEP]"),
        "vc_max_tokens": K("int", 55, "concept string token limit", lo=1),
        "vc_sample_replacement": K("bool", False, "ViCHA's concept draw with duplicates"),
        "num_kws": K("int", None, "concepts kept per image", lo=1),
    },
    "hard negatives (CE-CLIP)": {
        "hn_itc": K("bool", False, "ITC with each sample's generated negative captions as extra i2t columns "
                    "(target 0); reads 'hard_negatives' / 'hn_valid' from the annotations"),
        "hn_scope": K("str", "global", "ITC-hn columns: every rank's negatives (CE-CLIP) or the sample's own",
                      choices=("global", "own")),
        "cmr_weight": K("float", 0.0, "CE-CLIP's cross-modal rank loss weight (CE-CLIP: 0.2; 0: off)", lo=0),
        "cmr_threshold": K("str", "mean", "CMR margins: adaptive mean gap, max gap / 5, or fixed",
                           choices=("mean", "max", "fixed")),
        "cmr_fixed_threshold": K("float", 0.02, "CMR margin with cmr_threshold fixed (cosine units)", lo=0),
        "cmr_upper_bound_cos": K("float", 0.1, "CMR margin clamp (cosine units: CE-CLIP's 10 at logit scale 100)",
                                 lo=0),
        "cmr_reset_each_epoch": K("bool", False, "margins back to 0 each epoch (CE-CLIP's behaviour)"),
        "imc_weight": K("float", 0.0, "CE-CLIP's intra-modal contrastive loss weight (CE-CLIP: 0.3; 0: off)",
                        lo=0),
        "imc_negatives": K("str", "global", "IMC negatives: every rank's or the sample's own",
                           choices=("global", "own")),
        "clip_model": K("str", None, "CLIP_finetune.py: the open_clip model name (CE-CLIP: ViT-B-32)"),
        "clip_model_config": K("path", None, "CLIP_finetune.py: a JSON model config registered with open_clip"),
        "clip_checkpoint": K("path", None, "CLIP_finetune.py: local open_clip weights (nothing is downloaded)"),
    },
    "data": {
        "train_file": K("files", None, "training data: ALBEF's JSON lists, .arrow stores (python -m dataset.store), "
                        "or webdataset .tar shards (brace patterns, '::' lists) streamed"),
        "train_weights": K("list", None, "per train_file source: OpenCLIP's upsampling factors (1: each item once "
                           "an epoch, 2: twice, 0.5: a random half)"),
        "train_num_samples": K("int", None, "streamed shards: samples per epoch (default: from img2dataset's "
                               "_stats.json)", lo=1),
        "shuffle_buffer": K("int", 1000, "streamed shards: samples each loader worker shuffles among", lo=1),
        "val_file": K("files", None, "validation annotation file(s)"),
        "test_file": K("files", None, "test annotation file(s)"),
        "image_root": K("path", None, "prefix of relative image paths"),
        "vqa_root": K("path", None, "VQA: COCO image folder"),
        "vg_root": K("path", None, "VQA: Visual Genome image folder"),
        "answer_list": K("path", None, "VQA: candidate answers (answer_list.json)"),
        "eos": K("str", "[SEP]", "VQA: end token appended to every answer"),
        "vqa_always_normalize": K("bool", False, "VQA accuracy: normalise answers even when the humans agree "
                                  "(the official script does so only when they disagree)"),
        "refcoco_data": K("path", None, "Grounding: RefCOCO+ folder"),
        "det_file": K("path", None, "Grounding: detections"),
        "refs_file": K("path", None, "Grounding: refs as one JSON (python -m dataset.grounding_dataset); "
                       "read instead of refcoco_data's pickle"),
        "grounding_pictures": K("int", 8, "Grounding: PNGs of the first N expressions of each evaluation", lo=0),
        "coco_file": K("path", None, "Grounding: COCO annotations"),
        "max_words": K("int", 30, "words kept per caption", lo=1),
        "max_tokens": K("int", None, "token limit of training captions (pretraining: 25; retrieval: no "
                        "truncation, as ALBEF)", lo=1),
        "eval_max_tokens": K("int", 30, "token limit of evaluation captions", lo=1),
        "train_crop_scale": K("list", [0.2, 1.0], "RandomResizedCrop scale (retrieval: [0.5, 1.0])"),
        "randaugment": K("bool", True, "ALBEF's RandomAugment in training"),
        "num_workers": K("int", 4, "data loader workers per rank (training and evaluation)", lo=0),
        "prefetch_factor": K("int", 4, "training batches each loader worker prepares ahead", lo=1),
        "pin_memory": K("bool", None, "page-locked training batches (default: on with CUDA)"),
        "persistent_workers": K("bool", True, "keep the training loader's workers across epochs"),
        "uint8_images": K("bool", True, "training images leave the workers as uint8 and are normalised on the "
                          "device (exact; a quarter of the bytes to copy and pin)"),
        "max_bad_image_fraction": K("float", 0.05, "stop when more of the images read are unreadable", lo=0, hi=1),
        "load_truncated_images": K("bool", True, "decode truncated JPEGs as ALBEF does (false: count them bad)"),
    },
    "training": {
        "batch_size": K("int", None, "per-rank batch (pretraining)", lo=1),
        "batch_size_train": K("int", None, "per-rank batch (finetuning)", lo=1),
        "batch_size_test": K("int", 64, "per-rank evaluation batch", lo=1),
        "alpha_warm_up": K("bool", True, "ramp the distillation weight alpha up over epoch 0 (ALBEF's warm_up; "
                           "the learning-rate warm-up is schedular.warmup_epochs)"),
        "eval_ema": K("bool", False, "unused (kept for old configs)"),
        "precision": K("str", "auto", "auto (bf16 on CUDA), fp32 or bf16", choices=("auto", "fp32", "bf16")),
        "compile": K("bool", False, "torch.compile the model"),
        "compile_backend": K("str", "inductor", "torch.compile backend (aot_eager: no code generation)"),
        "grad_accum_steps": K("int", 1, "micro-batches per optimizer step", lo=1),
        "clip_grad": K("float", None, "gradient norm clip", lo=0, open_lo=True),
        "loss_weights": K("dict", {}, "weights of named losses (loss_ita: 1.0, ...); 1 by default"),
        "print_freq": K("int", 50, "steps between log lines (and bad-image checks)", lo=1),
        "ckpt_every_steps": K("int", 0, "mid-epoch checkpoint interval (0: epoch ends only)", lo=0),
        "keep_epoch_checkpoints": K("int", 0, "keep only the last N epoch checkpoints (0: every epoch's, ALBEF's "
                                    "convention); checkpoint_best.pth is always kept", lo=0),
        "ckpt_keep_last": K("int", 2, "mid-epoch checkpoints kept", lo=0),
        "empty_splits": K("str", "error", "an evaluation split with no examples: stop at start-up naming its file, "
                          "or skip it with a warning (no metric written)", choices=("error", "skip")),
        "model_selection": K("str", "val", "finetuning: test checkpoint_best.pth selected on the val split, or the "
                             "last epoch's weights (needed without a val split)", choices=("val", "last")),
        "eval_every": K("int", None, "epochs between evaluations (retrieval: 1); the last epoch always", lo=1),
        "eval_pair_batch": K("int", 1024, "(image, text) pairs per ITM pass at evaluation", lo=1),
        "tensorboard": K("bool", True, "TensorBoard scalars"),
        "max_steps": K("int", None, "stop after this many optimizer steps", lo=1),
        "train_epochs": K("int", None, "epochs trained (GRIT: 20 of a 30-epoch schedule)", lo=1),
    },
}

NESTED = {
    "optimizer": {
        "opt": K("str", "adamW", "timm optimizer name"),
        "lr": K("float", REQUIRED, "learning rate", lo=0),
        "weight_decay": K("float", 0.0, "weight decay", lo=0),
        "betas": K("list", None, "Adam betas"),
        "eps": K("float", None, "Adam epsilon (CE-CLIP: 1e-6)", lo=0, open_lo=True),
        "decay_0d": K("bool", True, "decay 0-d parameters (temp), as ALBEF does"),
        "fused": K("bool", True, "fused AdamW on CUDA"),
        "momentum": K("float", None, "SGD momentum", lo=0, hi=1),
    },
    "schedular": {
        "sched": K("str", "cosine", "timm scheduler name"),
        "lr": K("float", REQUIRED, "peak learning rate", lo=0),
        "epochs": K("int", REQUIRED, "schedule length in epochs", lo=1),
        "min_lr": K("float", 0.0, "final learning rate", lo=0),
        "decay_rate": K("float", 1.0, "step decay rate", lo=0),
        "warmup_lr": K("float", None, "warm-up start (default: lr)", lo=0),
        "warmup_epochs": K("int", 0, "warm-up blocks of warmup_block iterations in epoch 0", lo=0),
        "cooldown_epochs": K("int", 0, "cool-down epochs", lo=0),
        "warmup_block": K("int", 100, "iterations per warm-up block (ALBEF: 100)", lo=1),
    },
    "grit": {
        "collect_size": K("int", 48000, "per-rank collection queue L (GRIT's own YAML calls it queue_size, a name "
                          "that here means ALBEF's ITC queue)", lo=1),
        "search_space": K("int", 1920, "search space M (a multiple of the batch)", lo=1),
        "queue_precision": K("str", "fp32", "the collection queue's dtype (fp16: this project's earlier default; "
                             "its rounding reorders near-ties of the walk)", choices=("fp32", "fp16")),
    },
    "ecm": {
        "filter_config": K("path", REQUIRED, "the filter's retrieval config"),
        "filter_checkpoint": K("path", REQUIRED, "the filter's finetuned weights"),
        "low_threshold": K("float", 0.5, "below: a true negative", lo=0, hi=1),
        "high_threshold": K("float", 0.8, "at or above: a connection (false negative)", lo=0, hi=1),
        "filter_precision": K("str", "fp32", "the filter's dtype (auto: bf16 on CUDA; in bf16 0.68% of the demo "
                              "filter's decisions differ from fp32)", choices=("auto", "bf16", "fp32")),
    },
}
NESTED_DOC = {"optimizer": "optimizer (ALBEF)", "schedular": "learning-rate schedule (ALBEF's spelling)",
              "grit": "GRIT-VLP grouped mini-batch sampling", "ecm": "MAFA false-negative mining"}

KEYS = {k: spec for group in GROUPS.values() for k, spec in group.items()}
KEYS.update({k: K("dict", None, NESTED_DOC[k]) for k in NESTED})

# defaults that differ by launcher (ALBEF's per-script values)
TASK_DEFAULTS = {
    "pretrain": {"max_tokens": 25},
    "retrieval": {"train_crop_scale": [0.5, 1.0], "eval_every": 1},
    "vqa": {"train_crop_scale": [0.5, 1.0], "max_tokens": 25, "k_test": 128, "batch_size_test": 16},
    "pretrain_nlvr": {"max_tokens": 25},
    "nlvr": {"train_crop_scale": [0.5, 1.0], "eval_every": 1},
    "ve": {"train_crop_scale": [0.5, 1.0], "alpha_warm_up": False, "eval_every": 1},
    "grounding": {"eval_every": 1},
    # CE-CLIP's recipe (spec §2.5): OpenCLIP's crop, no RandAugment, CLIP's 77 tokens
    "clip": {"train_crop_scale": [0.9, 1.0], "randaugment": False, "alpha_warm_up": False, "max_tokens": 77},
}
TASK_EXEMPT = {"clip": ("bert_config",)}   # required elsewhere, meaningless here
TASK_REQUIRED = {
    "pretrain": ("train_file", "batch_size", "optimizer", "schedular"),
    "retrieval": ("batch_size_train", "optimizer", "schedular"),
    "vqa": ("batch_size_train", "optimizer", "schedular", "answer_list", "test_file"),
    "pretrain_nlvr": ("train_file", "batch_size", "optimizer", "schedular"),
    "nlvr": ("optimizer", "schedular"),
    "ve": ("optimizer", "schedular"),
    "grounding": ("optimizer", "schedular", "test_file", "det_file"),
    "clip": ("train_file", "batch_size", "optimizer", "schedular", "clip_model"),
}


def value(config, key, task=None):
    """``config[key]`` or the default (the ``task``'s where it has its own); ``"group.key"`` for a nested one."""
    if "." in key:
        group, sub = key.split(".", 1)
        node = config.get(group) or {}
        return node[sub] if node.get(sub) is not None else _default(NESTED[group][sub], key)
    if config.get(key) is not None:
        return config[key]
    if key in TASK_DEFAULTS.get(task, {}):
        return TASK_DEFAULTS[task][key]
    return _default(KEYS[key], key)


def _default(spec, key):
    if spec.default is REQUIRED:
        raise ConfigError(f"missing required config key {key!r} ({spec.doc})")
    return list(spec.default) if isinstance(spec.default, list) else spec.default


def suggest(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(name, spec, v):
    """The value with numeric strings converted; ConfigError naming ``name`` for a wrong type or range."""
    if v is None:
        return v
    t = spec.type
    if t == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ConfigError(f"config key {name!r} must be true or false, got {v!r}")
    if t in ("int", "float"):
        if isinstance(v, bool):
            raise ConfigError(f"config key {name!r} must be a number, got {v!r}")
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ConfigError(f"config key {name!r} must be {'an integer' if t == 'int' else 'a number'}, "
                                  f"got {v!r}") from None
        if not isinstance(v, (int, float)):
            raise ConfigError(f"config key {name!r} must be a number, got {type(v).__name__} {v!r}")
        if t == "int":
            if float(v) != int(v):
                raise ConfigError(f"config key {name!r} must be an integer, got {v!r}")
            v = int(v)
        if spec.lo is not None and (v < spec.lo or (spec.open_lo and v == spec.lo)):
            raise ConfigError(f"config key {name!r} must be {'>' if spec.open_lo else '>='} {spec.lo}, got {v!r}")
        if spec.hi is not None and v > spec.hi:
            raise ConfigError(f"config key {name!r} must be <= {spec.hi}, got {v!r}")
        return v
    if t in ("str", "path") and not isinstance(v, str):
        raise ConfigError(f"config key {name!r} must be a string, got {type(v).__name__} {v!r}")
    if t == "list" and not isinstance(v, (list, tuple)):
        raise ConfigError(f"config key {name!r} must be a list, got {type(v).__name__} {v!r}")
    if t == "dict" and not isinstance(v, dict):
        raise ConfigError(f"config key {name!r} must be a mapping, got {type(v).__name__} {v!r}")
    if t == "files" and not (isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))):
        raise ConfigError(f"config key {name!r} must be a file path or a list of paths, got {v!r}")
    if spec.choices and v not in spec.choices:
        raise ConfigError(f"config key {name!r} must be one of {list(spec.choices)}, got {v!r}")
    return v


def hard_negative_losses_on(config):
    """Any of CE-CLIP's losses switched on: the data must then bring each caption's negatives."""
    return bool(value(config, "hn_itc")) or float(value(config, "cmr_weight")) > 0 or \
        float(value(config, "imc_weight")) > 0


def translate(cfg):
    """The forks' own spellings, with the meaning they have in their repository (returns notes to print).

    GRIT-VLP and MAFA: a top-level ``search_space`` marks GRIT's Pretrain.yaml, whose ``queue_size`` is GRIT's
    collection queue (not ALBEF's ITC queue) and whose model is GRIT's (no momentum encoders, in-batch ITC with
    the 0.2 consistency term, top-1 ITM negatives). MAFA (an ``ecm`` group) adds S-ITC smoothing 0.5 and drops
    the consistency term, as MAFA hard-codes."""
    notes = []
    if "warm_up" in cfg:   # ALBEF's name for the alpha ramp
        cfg.setdefault("alpha_warm_up", cfg.pop("warm_up"))
    if isinstance(cfg.get("grit"), dict) and "queue_size" in cfg["grit"]:   # this project's earlier name
        cfg["grit"].setdefault("collect_size", cfg["grit"].pop("queue_size"))
    if cfg.get("search_space") is not None and "grit" not in cfg:
        cfg["grit"] = {"search_space": cfg.pop("search_space")}
        if cfg.get("queue_size") is not None:
            cfg["grit"]["collect_size"] = cfg.pop("queue_size")
        mafa = bool(cfg.get("ecm"))
        recipe = {"use_momentum": False, "distill": False, "itm_negative_selection": "argmax",
                  "itc_consistency_weight": 0.0 if mafa else 0.2}
        if mafa:
            recipe["itc_label_smoothing"] = 0.5
        for k, v in recipe.items():
            cfg.setdefault(k, v)
        notes.append(f"config: GRIT-VLP's top-level queue_size/search_space read as grit: {cfg['grit']}, "
                     f"with {'MAFA' if mafa else 'GRIT'}'s objective ({', '.join(f'{k}={cfg[k]}' for k in recipe)})")
    elif cfg.get("ecm") and "itc_label_smoothing" not in cfg:
        cfg["itc_label_smoothing"] = 0.5   # MAFA's hard-coded S-ITC weight
    if cfg.get("kw_img_model"):
        cfg.setdefault("kw_img_dataset", True)
    return notes


def check(cfg, task=None, where="config"):
    """Validate ``cfg`` in place (unknown keys, types, ranges, choices, required keys) and fill in the
    task's defaults. Every error names the key."""
    if "scheduler" in cfg and "schedular" not in cfg:   # ALBEF spells it 'schedular'; accept both
        cfg["schedular"] = cfg.pop("scheduler")
    for key in list(cfg):
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(key, KEYS)}")
        if key in NESTED:
            node = cfg[key]
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key!r} must be a mapping with keys {sorted(NESTED[key])}")
            for sub in list(node):
                if sub not in NESTED[key]:
                    raise ConfigError(f"{where}: unknown key '{key}.{sub}'{suggest(sub, NESTED[key])}")
                node[sub] = _coerce(f"{key}.{sub}", NESTED[key][sub], node[sub])
            for sub, spec in NESTED[key].items():
                if spec.default is REQUIRED and node.get(sub) is None:
                    raise ConfigError(f"{where}: missing required key '{key}.{sub}' ({spec.doc})")
        elif key != "loss_weights":
            cfg[key] = _coerce(key, KEYS[key], cfg[key])
    for k, v in (cfg.get("loss_weights") or {}).items():
        _coerce(f"loss_weights.{k}", K("float", lo=0), v)
    for key, spec in KEYS.items():
        if spec.default is REQUIRED and cfg.get(key) is None and key not in TASK_EXEMPT.get(task, ()):
            raise ConfigError(f"{where}: missing required key {key!r} ({spec.doc})")
    for key in TASK_REQUIRED.get(task, ()):
        if cfg.get(key) is None:
            raise ConfigError(f"{where}: missing required key {key!r} ({KEYS[key].doc})")
    for key, v in TASK_DEFAULTS.get(task, {}).items():
        if cfg.get(key) is None:
            cfg[key] = v
    ecm = cfg.get("ecm")
    if ecm and value(cfg, "ecm.low_threshold") > value(cfg, "ecm.high_threshold"):
        raise ConfigError(f"{where}: 'ecm.low_threshold' ({ecm.get('low_threshold')}) must not exceed "
                          f"'ecm.high_threshold' ({ecm.get('high_threshold')})")
    return cfg


def describe():
    """The schema as Markdown (``python -m engine.config --keys``)."""
    lines = []
    for title, keys in list(GROUPS.items()) + [(NESTED_DOC[g], {f"{g}.{k}": s for k, s in NESTED[g].items()})
                                               for g in NESTED]:
        lines += [f"### {title}", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for k, s in keys.items():
            rng = (f"{'(' if s.open_lo else '['}{s.lo}, {s.hi if s.hi is not None else '∞'}]" if s.lo is not None
                   else (" / ".join(s.choices) if s.choices else ""))
            default = "required" if s.default is REQUIRED else repr(s.default)
            lines.append(f"| `{k}` | {s.type} | {default} | {rng} | {s.doc} |")
        lines.append("")
    return "\n".join(lines)
