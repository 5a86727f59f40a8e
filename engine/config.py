"""YAML configs (ruamel.yaml), ``--opts key=value`` overrides and validation of every key at start-up."""
import argparse
import difflib
import io
import os

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

# Every key an ALBEF-family YAML may hold, by group. Unknown keys are errors (typos are common and silent
# in the originals); nested groups list their own keys.
MODEL_KEYS = {
    "bert_config", "image_res", "patch_size", "vision_width", "vision_depth", "vision_heads", "mlp_ratio",
    "embed_dim", "temp", "queue_size", "momentum", "alpha", "distill", "mlm_probability", "k_test",
    "text_encoder", "text_decoder", "tokenizer", "vision_init", "attn_implementation", "grad_checkpointing",
    "mlm_distill_seq_axis_bug", "decoder_distill", "rank_answer_double_count",
    "use_momentum", "itc_consistency_weight", "itm_negative_selection", "itc_label_smoothing",
    "smoothing_start_epoch", "return_hidden_state", "num_hidden_align", "ita_hidden_weight", "ita_hidden_weights",
    "mae", "mask_ratio", "unimodal_mae", "mae_lambda", "mim_decoder_heads",
    "kw_img_model", "num_hidden_layers_kw", "vc_mask_padding",
}
DATA_KEYS = {
    "train_file", "val_file", "test_file", "image_root", "vqa_root", "vg_root", "answer_list", "eos",
    "refcoco_data", "det_file", "coco_file", "max_words", "max_tokens", "eval_max_tokens", "train_crop_scale",
    "randaugment", "num_workers", "max_bad_image_fraction",
    "kw_img_dataset", "randkw_p", "sep_token", "vc_max_tokens", "vc_sample_replacement", "num_kws",
}
TRAIN_KEYS = {
    "batch_size", "batch_size_train", "batch_size_test", "warm_up", "eval_ema", "precision", "compile",
    "grad_accum_steps", "clip_grad", "loss_weights", "print_freq", "ckpt_every_steps", "ckpt_keep_last",
    "eval_every", "eval_pair_batch", "tensorboard", "max_steps", "train_epochs",
}
NESTED = {
    "optimizer": {"opt", "lr", "weight_decay", "betas", "decay_0d", "fused", "momentum"},
    "schedular": {"sched", "lr", "epochs", "min_lr", "decay_rate", "warmup_lr", "warmup_epochs",
                  "cooldown_epochs", "warmup_block"},
    "grit": {"queue_size", "search_space"},
    "ecm": {"filter_config", "filter_checkpoint", "low_threshold", "high_threshold", "filter_precision"},
}
KNOWN_KEYS = MODEL_KEYS | DATA_KEYS | TRAIN_KEYS | set(NESTED)
FREE_FORM = {"loss_weights"}   # dicts whose keys are names chosen by the user


class ConfigError(ValueError):
    pass


def _yaml():
    y = YAML(typ="safe", pure=True)
    return y


def load_config(path):
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    try:
        with open(path) as f:
            cfg = _yaml().load(f)
    except YAMLError as e:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of keys, got {type(cfg).__name__}")
    if "scheduler" in cfg and "schedular" not in cfg:   # ALBEF spells it 'schedular'; accept both
        cfg["schedular"] = cfg.pop("scheduler")
    return cfg


def dump_config(cfg, path):
    buf = io.StringIO()
    y = YAML()
    y.default_flow_style = False
    y.dump(cfg, buf)
    with open(path, "w") as f:
        f.write(buf.getvalue())


def _suggest(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def validate(cfg, known=KNOWN_KEYS, nested=NESTED, where="config"):
    for key, value in cfg.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, known)}")
        if key in nested:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key!r} must be a mapping with keys {sorted(nested[key])}")
            for sub in value:
                if sub not in nested[key]:
                    raise ConfigError(f"{where}: unknown key '{key}.{sub}'{_suggest(sub, nested[key])}")
    return cfg


def parse_value(text):
    """YAML scalar parsing: 'true' -> True, '1e-4' -> 1e-4, '[a, b]' -> list; otherwise the string."""
    try:
        value = _yaml().load(text)
    except YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(cfg, opts):
    """``['a=1', 'optimizer.lr=1e-4']``: set (nested) keys; unknown keys are reported by ``validate``."""
    for item in opts or []:
        if "=" not in item:
            raise ConfigError(f"--opts: expected key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node:
                known = KNOWN_KEYS if node is cfg else set(node)
                raise ConfigError(f"--opts: unknown key {key!r}{_suggest(p, known)}")
            if not isinstance(node[p], dict):
                raise ConfigError(f"--opts: {p!r} is not a mapping, cannot set {key!r}")
            node = node[p]
        node[parts[-1]] = parse_value(text)
    return cfg


def str2bool(v):
    """argparse type for booleans: 'False', 'false', '0', 'no' are False (ALBEF's type=bool made them True)."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "y", "on"):
        return True
    if s in ("false", "0", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def base_parser(description, default_config, default_output):
    """ALBEF's common arguments; launchers add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config)
    p.add_argument("--output_dir", default=default_output)
    p.add_argument("--checkpoint", default="", help="model weights to start from (ALBEF-style .pth or .safetensors)")
    p.add_argument("--text_encoder", default=None,
                   help="local BERT directory (vocab.txt [+ config.json and weights]); overrides the config")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", default=42, type=int)
    p.add_argument("--world_size", default=1, type=int, help="ignored: taken from the launcher's environment")
    p.add_argument("--dist_url", default="env://", help="ignored: env:// is always used")
    p.add_argument("--distributed", default=True, type=str2bool, help="ignored: taken from the environment")
    p.add_argument("--resume", default="", help="a checkpoint path, or 'latest' in output_dir")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides, e.g. optimizer.lr=1e-4 batch_size=32")
    return p


def parse_launcher(parser):
    """Parse a launcher's arguments, then load, override (``--opts``) and validate its config."""
    args = parser.parse_args()
    if str(getattr(args, "resume", "")).lower() in ("false", "0", "no", "none"):   # ALBEF passes --resume False
        args.resume = ""
    config = apply_overrides(load_config(args.config), args.opts)
    if args.text_encoder:
        config["text_encoder"] = args.text_encoder
    validate(config)
    return args, config
