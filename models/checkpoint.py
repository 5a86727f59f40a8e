"""Local checkpoint loading: ALBEF / GRIT / MAFA / ViCHA state dicts, HF BERT directories, DeiT weights.

Never downloads, never unpickles code (``weights_only=True`` or safetensors). Key surgery follows what each
ALBEF task script does to a pretraining checkpoint; every load reports missing and unexpected keys, and a
shape mismatch is an error that names the key.
"""
import os
import re
from dataclasses import dataclass, field

import torch

from models.vit import interpolate_pos_embed

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")


def _missing(path, config_key):
    where = f" (config key '{config_key}')" if config_key else ""
    return FileNotFoundError(f"checkpoint file not found: {path!r}{where}")


def load_file(path, config_key=None):
    """Read a ``.pth``/``.bin``/``.safetensors`` file into a dict, without executing pickled code."""
    if not path or not os.path.isfile(path):
        raise _missing(path, config_key)
    where = f" (config key '{config_key}')" if config_key else ""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as st_load
        try:
            return st_load(path, device="cpu")
        except Exception as e:   # noqa: BLE001 - a truncated or foreign file: name it
            raise RuntimeError(f"cannot read safetensors file {path!r}{where}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # corrupt file, or a pickle that needs arbitrary code: both refused
        raise RuntimeError(f"cannot load checkpoint {path!r}{where} with weights_only=True: {e}") from None


def extract_state_dict(ckpt):
    """Accept ``{'model': sd, ...}`` (every ALBEF script), ``{'state_dict': sd}`` or a bare state dict."""
    sd = ckpt
    for k in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
            break
    if not isinstance(sd, dict):
        raise ValueError("checkpoint holds no state dict")
    if sd and all(k.startswith("module.") for k in sd):   # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


# ---------------------------------------------------------------------------------------------- key surgery
def strip_bert(sd):
    """``text_encoder.bert.X -> text_encoder.X`` (and ``_m``), as Retrieval/VE/Grounding do."""
    return {k.replace("bert.", "", 1) if "bert." in k else k: v for k, v in sd.items()}


def remap_vqa(sd, fusion_layer):
    """Pretraining layout -> VQA: encoder keeps all layers; decoder = embeddings + fusion layers + MLM head."""
    if not any(".bert." in k for k in sd if k.startswith("text_encoder")):
        return sd   # already a VQA checkpoint
    out = {}
    pat = re.compile(r"^(text_encoder(?:_m)?)\.bert\.encoder\.layer\.(\d+)\.(.*)$")
    for key, v in sd.items():
        if not key.startswith("text_encoder"):
            out[key] = v
            continue
        if ".bert." in key:
            out[key.replace("bert.", "", 1)] = v
        m = pat.match(key)
        if m:
            n = int(m.group(2))
            if n >= fusion_layer:
                dec = m.group(1).replace("text_encoder", "text_decoder")
                out[f"{dec}.bert.encoder.layer.{n - fusion_layer}.{m.group(3)}"] = v
        else:
            out[key.replace("text_encoder", "text_decoder", 1)] = v
    return out


def remap_nlvr_pretrain(sd, fusion_layer, num_layers=None):
    """12-layer pretraining layout -> 18-layer NLVR text encoder: fusion layer n -> 2n-f and 2n-f+1 (ALBEF's
    Pretrain_nlvr.py). With ``num_layers`` (the NLVR encoder's depth) a checkpoint already in that layout (a
    text-assignment or NLVR checkpoint) passes unchanged, so NLVR.py takes either kind."""
    out = {}
    pat = re.compile(r"^(text_encoder(?:_m)?)\.encoder\.layer\.(\d+)\.(.*)$")
    sd = strip_bert(sd)
    if num_layers is not None:
        found = 1 + max((int(m.group(2)) for m in map(pat.match, sd) if m), default=-1)
        if found == num_layers:
            return sd
        if 2 * found - fusion_layer != num_layers:
            raise ValueError(f"the checkpoint's text encoder has {found} layers: neither the pretraining layout "
                             f"({(num_layers + fusion_layer) // 2}) nor the NLVR one ({num_layers}) of this config")
    for key, v in sd.items():
        m = pat.match(key)
        if m and int(m.group(2)) >= fusion_layer:
            n = int(m.group(2))
            for j in (2 * n - fusion_layer, 2 * n - fusion_layer + 1):
                out[f"{m.group(1)}.encoder.layer.{j}.{m.group(3)}"] = v
        else:
            out[key] = v
    return out


@dataclass
class LoadReport:
    path: str
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    interpolated: list = field(default_factory=list)
    momentum_copied: list = field(default_factory=list)

    def summary(self, limit=12):
        def short(keys):
            keys = sorted(keys)
            s = ", ".join(keys[:limit])
            return s + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
        lines = [f"loaded {self.path}"]
        if self.interpolated:
            lines.append(f"  pos_embed interpolated: {', '.join(self.interpolated)}")
        lines.append(f"  missing keys ({len(self.missing)}): {short(self.missing) if self.missing else '-'}")
        lines.append(f"  unexpected keys ({len(self.unexpected)}): {short(self.unexpected) if self.unexpected else '-'}")
        if self.momentum_copied:
            lines.append(f"  momentum copies made from the loaded weights: {', '.join(self.momentum_copied)}")
        return "\n".join(lines)


def load_into(model, sd, path="<state dict>", strict=False, config_key=None, verbose=True):
    """Load ``sd`` into ``model``: interpolate pos_embeds, fill ``position_ids``, check shapes, report."""
    own = model.state_dict()
    sd = dict(sd)
    report = LoadReport(path)
    for key in list(sd):
        if key.endswith("pos_embed") and key in own and sd[key].shape != own[key].shape:
            enc = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
            sd[key] = interpolate_pos_embed(sd[key], enc)
            report.interpolated.append(key)
    for key in own:   # newer HF files drop the persistent position_ids buffer; it is a constant
        if key.endswith("embeddings.position_ids") and key not in sd:
            sd[key] = own[key]
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        where = f" (config key '{config_key}')" if config_key else ""
        lines = "\n".join(f"  {k}: checkpoint {a} vs model {b}" for k, a, b in bad[:20])
        raise ValueError(f"shape mismatch loading {path!r}{where}; the model config does not match the "
                         f"checkpoint:\n{lines}")
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    if strict and (report.missing or report.unexpected):
        raise RuntimeError("strict load failed\n" + report.summary(limit=50))
    model.load_state_dict(sd, strict=False)
    # momentum copies the checkpoint lacks start as copies of the loaded online weights, not random
    missing = set(report.missing)
    remade = [n for n in getattr(model, "momentum_names", [])
              if any(k.startswith(f"{n}_m.") for k in missing) and hasattr(model, "copy_params")]
    if remade:
        model.copy_params(remade)
        report.momentum_copied = remade
    if verbose:
        print(report.summary())
    return report


def load_checkpoint(model, path, remap=None, strict=False, config_key="checkpoint", verbose=True):
    """Load an ALBEF-family checkpoint file into ``model``; ``remap`` is a function sd -> sd (or None)."""
    sd = extract_state_dict(load_file(path, config_key))
    if remap is not None:
        sd = remap(sd)
    return load_into(model, sd, path, strict=strict, config_key=config_key, verbose=verbose)


# ---------------------------------------------------------------------------------------------- initialisation
def find_weights(directory, config_key):
    if os.path.isfile(directory):
        return directory
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{config_key}: no such file or directory {directory!r}")
    for name in WEIGHT_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{config_key}: {directory!r} holds none of {', '.join(WEIGHT_FILES)}")


def hf_bert_state_dict(path, config_key="text_encoder"):
    """Weights of a local HF BERT directory or file, keyed as ours (``bert.*`` body, ``cls.*`` MLM head)."""
    sd = extract_state_dict(load_file(find_weights(path, config_key), config_key))
    out = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k.startswith(("pooler.", "bert.pooler.")) or "seq_relationship" in k:
            continue
        if k.startswith(("embeddings.", "encoder.")):
            k = "bert." + k
        out[k] = v
    return out


def init_text_encoder(text_encoder, path, config_key="text_encoder", verbose=True):
    """Initialise an MLM-headed (``.bert``/``.cls``) or plain BertModel from a local HF BERT."""
    sd = hf_bert_state_dict(path, config_key)
    if not hasattr(text_encoder, "bert"):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    return load_into(text_encoder, sd, path, config_key=config_key, verbose=verbose)


def init_visual_encoder(visual_encoder, path, config_key="vision_init", verbose=True):
    """Initialise the ViT from DeiT / timm weights (``head.*`` dropped, ``pos_embed`` interpolated)."""
    sd = extract_state_dict(load_file(find_weights(path, config_key), config_key))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head", "fc_norm", "dist_token", "head_dist"))}
    return load_into(visual_encoder, sd, path, config_key=config_key, verbose=verbose)
