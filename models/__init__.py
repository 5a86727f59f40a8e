"""ALBEF-family models. Each task module exposes a class named ``ALBEF``, as in the original code.

``MODELS`` (task name -> class) is built on first use, so that importing one module of the package (``python
-m models.checkpoint``) does not import every model.
"""


def __getattr__(name):
    if name == "MODELS":
        from models import model_nlvr, model_pretrain, model_pretrain_nlvr, model_retrieval, model_ve, model_vqa
        return {"pretrain": model_pretrain.ALBEF, "retrieval": model_retrieval.ALBEF, "vqa": model_vqa.ALBEF,
                "nlvr": model_nlvr.ALBEF, "ve": model_ve.ALBEF, "pretrain_nlvr": model_pretrain_nlvr.ALBEF}
    raise AttributeError(f"module 'models' has no attribute {name!r}")
