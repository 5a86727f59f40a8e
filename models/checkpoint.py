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
    present: set = field(default_factory=set)   # the top-level modules the loaded state dict has

    def unexpected_missing(self):
        """Missing keys of modules the checkpoint has: a real mismatch, unlike a new task head or a
        momentum copy (``_m``, remade from the loaded weights)."""
        return [k for k in self.missing if k.split(".")[0] in self.present and not k.split(".")[0].endswith("_m")]

    def grouped(self):
        """A few lines for the console: the keys grouped by module, what is expected said once."""
        def groups(keys):
            count = {}
            for k in keys:
                count[k.split(".")[0]] = count.get(k.split(".")[0], 0) + 1
            return ", ".join(f"{m} ({n})" for m, n in sorted(count.items()))
        bad = self.unexpected_missing()
        new = [k for k in self.missing if k not in bad]
        lines = [f"loaded {self.path}"]
        if self.interpolated:
            lines.append(f"  pos_embed interpolated: {', '.join(self.interpolated)}")
        if new:
            lines.append(f"  new, as expected for a checkpoint of another task (task heads, momentum copies): "
                         f"{groups(new)}")
        if self.momentum_copied:
            lines.append(f"  momentum copies made from the loaded weights: {', '.join(self.momentum_copied)}")
        if self.unexpected:
            lines.append(f"  not used (other tasks' heads, queues, momentum copies): {groups(self.unexpected)}")
        if bad:
            lines.append(f"  WARNING: {len(bad)} keys missing from modules the checkpoint has (not expected: the "
                         f"config may not match it): {groups(bad)}; e.g. {', '.join(sorted(bad)[:3])}")
        return "\n".join(lines)

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
    report.present = {k.split(".")[0] for k in sd}
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


# ---------------------------------------------------------------------------------------------- released files
# The released checkpoints the launchers load (nothing is downloaded: give the folder they are in). The layout
# is what ``describe`` reads from a file; the parameters are counted by ``python -m models.checkpoint --manifest``.
def _r(file, kind, what, config, launcher, params):
    return {"file": file, "kind": kind, "what": what, "config": config, "launcher": launcher, "parameters": params}


# parameters: counted on our models built from the config (on the meta device), momentum copies included where
# the file has them
RELEASED = {
    "albef_14m": _r("ALBEF.pth", "pretrain", "ALBEF pretrained on 14M images (MLM layout, momentum, queues)",
                    "configs/Pretrain.yaml; finetune with any task config", "Retrieval.py, VQA.py, VE.py, Grounding.py, "
                    "Pretrain_nlvr.py", "419.9M"),
    "albef_4m": _r("ALBEF_4M.pth", "pretrain", "ALBEF pretrained on 4M images", "as albef_14m", "as albef_14m", "419.9M"),
    "albef_coco": _r("mscoco.pth", "retrieval", "ALBEF finetuned for COCO retrieval (384 px, momentum, queues)",
                     "configs/Retrieval_coco.yaml", "Retrieval.py --evaluate", "419.1M"),
    "albef_flickr": _r("flickr30k.pth", "retrieval", "ALBEF finetuned for Flickr30K retrieval",
                       "configs/Retrieval_flickr.yaml", "Retrieval.py --evaluate", "419.1M"),
    "albef_vqa": _r("vqa.pth", "vqa", "ALBEF finetuned for VQA v2 (answer decoder)",
                    "configs/VQA.yaml with decoder_distill: false (its era)", "VQA.py --evaluate", "580.7M"),
    "albef_nlvr_ta": _r("pretrain_model_nlvr.pth", "pretrain_nlvr", "ALBEF after NLVR2 text-assignment pretraining "
                        "(18 layers, no momentum copies)", "configs/NLVR.yaml", "NLVR.py", "258.9M"),
    "albef_refcoco": _r("refcoco.pth", "retrieval", "ALBEF finetuned for RefCOCO+ grounding (a bare state dict, no "
                        "momentum copies)", "configs/Grounding.yaml", "Grounding.py --evaluate", "about 210M"),
    "vicha_4m": _r("vicha/4m_models/pretrain/checkpoint_last.pth", "pretrain", "ViCHA pretrained on 4M images "
                   "(H-ITC projections, concept encoder)", "configs/Pretrain_vicha.yaml; finetune with *_vicha.yaml",
                   "Retrieval.py, VQA.py, NLVR.py, VE.py", "514.6M"),
    "vicha_1m": _r("vicha/1m_models/pretrain/checkpoint_last.pth", "pretrain", "ViCHA pretrained on 1M images",
                   "as vicha_4m", "as vicha_4m", "514.6M"),
    "vicha_4m_coco": _r("vicha/4m_models/coco/checkpoint_best.pth", "retrieval", "ViCHA 4M finetuned for COCO "
                        "retrieval", "a ViCHA retrieval config (kw_img_model: true)", "Retrieval.py --evaluate", "-"),
}
# GRIT-VLP and MAFA released no weights; their runs write the same layouts (pretrain without _m and queues).
NEEDED = {"retrieval": ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
          "vqa": ("visual_encoder.", "text_encoder.", "text_decoder."),
          "nlvr": ("visual_encoder.", "text_encoder.", "cls_head."), "ve": ("visual_encoder.", "text_encoder.", "cls_head.")}


def checkpoint_kind(sd):
    """What a state dict is, from its keys: pretrain, retrieval (also grounding and MAFA's filter), vqa, nlvr,
    ve or pretrain_nlvr."""
    if any(k.startswith("text_decoder.") for k in sd):
        return "vqa"
    if "ta_head.weight" in sd:
        return "pretrain_nlvr"
    if "cls_head.2.weight" in sd:
        return "nlvr" if sd["cls_head.2.weight"].shape[0] == 2 else "ve"
    if any(k.startswith("text_encoder.bert.") for k in sd):
        return "pretrain"
    return "retrieval"


def find_released(name, dirs=()):
    """The path of a released checkpoint by its manifest name, under one of ``dirs`` (nothing is downloaded)."""
    if name not in RELEASED:
        raise FileNotFoundError(f"checkpoint {name!r} is neither a file nor a released name ({', '.join(RELEASED)})")
    rel = RELEASED[name]["file"]
    for d in dirs or (".",):
        for cand in (os.path.join(d, rel), os.path.join(d, os.path.basename(rel))):
            if os.path.isfile(cand):
                return cand
    raise FileNotFoundError(f"released checkpoint {name!r} ({rel}) is not under {list(dirs) or ['.']}; download it "
                            "once and name its folder")


def describe(path):
    """What a checkpoint file is, from its keys and shapes: a dict (``--describe`` prints it)."""
    sd = extract_state_dict(load_file(path))
    keys = list(sd)

    def layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})
    text = "text_encoder.bert.encoder.layer." if any(k.startswith("text_encoder.bert.") for k in keys) \
        else "text_encoder.encoder.layer."
    n_text = layers(text)
    fusion = min((int(k[len(text):].split(".")[0]) for k in keys if k.startswith(text) and ".crossattention." in k),
                 default=n_text)
    pos = sd.get("visual_encoder.pos_embed")
    kind = checkpoint_kind(sd)
    out = {"file": path, "kind": kind, "tensors": len(keys), "parameters": int(sum(v.numel() for v in sd.values()
                                                                                   if torch.is_tensor(v))),
           "vit_blocks": layers("visual_encoder.blocks."), "text_layers": n_text, "fusion_layer": fusion,
           "image_res": None if pos is None else int(round((pos.shape[1] - 1) ** 0.5)) *
           int(sd["visual_encoder.patch_embed.proj.weight"].shape[-1]),
           "momentum_weights": any("_m." in k for k in keys), "queue": "image_queue" in sd,
           "visual_concepts": any(k.startswith("kw_encoder.") for k in keys),
           "hidden_alignment": any(k.startswith("vision_proj_hidden.") for k in keys)}
    # what a load into each task model (after the launcher's key surgery) would miss: new heads are expected
    mapped = {"retrieval": strip_bert(sd), "vqa": remap_vqa(sd, fusion) if text.startswith("text_encoder.bert")
              else sd, "nlvr": sd, "ve": strip_bert(sd)}
    out["a load would miss"] = {task: sorted({p.rstrip(".") for p in need if not any(k.startswith(p) for k in m)})
                                for task, need in NEEDED.items() for m in [mapped[task]]}
    return out


def to_safetensors(path, out):
    """Write a checkpoint's state dict as safetensors (tensors only, shared storage cloned): loading it never
    unpickles anything again."""
    from safetensors.torch import save_file
    sd = {k: v.detach().clone().contiguous() for k, v in extract_state_dict(load_file(path)).items() if torch.is_tensor(v)}
    save_file(sd, out)
    return out


def main(argv=None):
    import argparse
    import json
    p = argparse.ArgumentParser(description="describe or convert ALBEF-family checkpoint files")
    p.add_argument("--describe", metavar="FILE")
    p.add_argument("--to-safetensors", nargs=2, metavar=("FILE", "OUT"))
    p.add_argument("--manifest", action="store_true", help="the released checkpoints by name")
    a = p.parse_args(argv)
    if a.describe:
        print(json.dumps(describe(a.describe), indent=1))
    if a.to_safetensors:
        print(to_safetensors(*a.to_safetensors))
    if a.manifest:
        for name, r in RELEASED.items():
            print(f"{name:14s} {r['file']:45s} {r['kind']:13s} {r['parameters']:>11s}  {r['what']}; config: "
                  f"{r['config']}; launcher: {r['launcher']}")


if __name__ == "__main__":
    main()
