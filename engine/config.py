"""YAML configs (ruamel.yaml), ``--opts key=value`` overrides and validation of every key at start-up."""
import argparse
import io
import os

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from schema import KEYS, ConfigError, check, describe, suggest, translate  # noqa: F401 - the schema lives there


def _yaml():
    y = YAML(typ="safe", pure=True)
    return y


def load_config(path):
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = _yaml().load(f)
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path!r} is not UTF-8 text ({e})") from None
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


def validate(cfg, task=None, where="config"):
    """The schema's checks (``schema.check``) after reading the forks' own spellings (``schema.translate``)."""
    for note in translate(cfg):
        print(note)
    return check(cfg, task=task, where=where)


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
                known = KEYS if node is cfg else set(node)
                raise ConfigError(f"--opts: unknown key {key!r}{suggest(p, known)}")
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
    p.add_argument("--force_process_group", action="store_true",
                   help="build a process group even for one process (one GPU: every collective through NCCL)")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides, e.g. optimizer.lr=1e-4 batch_size=32")
    return p


def parse_launcher(parser, task=None, adjust=None):
    """Parse a launcher's arguments, then load, override (``--opts``) and validate its config for ``task``.
    ``adjust(args, config)`` applies launcher flags that set config keys (MAFA's --filter_config, ...)."""
    args = parser.parse_args()
    if str(getattr(args, "resume", "")).lower() in ("false", "0", "no", "none"):   # ALBEF passes --resume False
        args.resume = ""
    config = apply_overrides(load_config(args.config), args.opts)
    if args.text_encoder:
        config["text_encoder"] = args.text_encoder
    if adjust:
        adjust(args, config)
    validate(config, task=task)
    return args, config


if __name__ == "__main__":   # python -m engine.config: every key with its type, default, range and meaning
    print(describe())
