"""ALBEF-family models. Each task module exposes a class named ``ALBEF``, as in the original code."""
from models import model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval, model_ve, model_vqa

MODELS = {
    "pretrain": model_pretrain.ALBEF,
    "retrieval": model_retrieval.ALBEF,
    "vqa": model_vqa.ALBEF,
    "nlvr": model_nlvr.ALBEF,
    "ve": model_ve.ALBEF,
    "pretrain_nlvr": model_pretrain_nlvr.ALBEF,
}
