"""Building MAFA's frozen filter from the ``ecm`` config group: a launcher's job (it reads a YAML file and a
checkpoint), kept out of ``models/``."""
import os

from engine.config import load_config, validate
from models.checkpoint import load_checkpoint, strip_bert
from models.objectives.ecm import ConnectionDiscriminator
from models.model_retrieval import ALBEF as RetrievalModel
from schema import value


def build_discriminator(ecm_cfg, tokenizer, device):
    """MAFA's filter from the ``ecm`` config group: a retrieval model from ``filter_config`` (built without
    momentum encoders or queues), weights from ``filter_checkpoint``. Anything missing is an error."""
    ecm = {"ecm": ecm_cfg}
    path, ckpt = ecm_cfg.get("filter_config"), ecm_cfg.get("filter_checkpoint")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"filter config not found: {path!r} (config key 'ecm.filter_config')")
    if not ckpt or not os.path.isfile(ckpt):
        raise FileNotFoundError(f"filter checkpoint not found: {ckpt!r} (config key 'ecm.filter_checkpoint'); "
                                "MAFA never trains with an untrained filter")
    cfg = dict(validate(load_config(path), where=f"filter config {path!r}"), use_momentum=False, distill=False,
               text_encoder=None, vision_init=None)
    if cfg.get("kw_img_model"):   # the filter scores raw images; the batch carries the trainee's concepts
        raise ValueError(f"filter config {path!r} (config key 'ecm.filter_config') sets kw_img_model: a MAFA "
                         "filter with visual concepts is not supported; use a filter without them")
    model = RetrievalModel(cfg, tokenizer)
    report = load_checkpoint(model, ckpt, remap=strip_bert, config_key="ecm.filter_checkpoint", verbose=False)
    needed = [k for k in report.missing if k.startswith(("visual_encoder.", "text_encoder.", "itm_head."))]
    if needed:
        shown = ", ".join(sorted(needed)[:8]) + (f", ... ({len(needed) - 8} more)" if len(needed) > 8 else "")
        raise RuntimeError(f"filter checkpoint {ckpt!r} (config key 'ecm.filter_checkpoint') lacks {len(needed)} "
                           f"weights the filter needs: {shown}")
    return ConnectionDiscriminator(model, float(value(ecm, "ecm.low_threshold")),
                                   float(value(ecm, "ecm.high_threshold")),
                                   str(value(ecm, "ecm.filter_precision"))).to(device)
