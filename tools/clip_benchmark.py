"""clip_benchmark on an ALBEF-family checkpoint: registers the model type ``albef`` (``--model`` is the config,
``--pretrained`` the checkpoint), then runs clip_benchmark's own command line.

    pip install clip-benchmark
    python -m tools.clip_benchmark eval --model_type albef --model configs/Retrieval_coco.yaml \\
        --pretrained mscoco.pth --dataset cifar10 --dataset_root data/cifar10 --task zeroshot_classification

Features are the ITC space's (``tasks.api.clip_benchmark_triple``), captions tokenized as ALBEF's retrieval
evaluation tokenizes them. Nothing is downloaded by this adapter; clip_benchmark's datasets are the user's.
"""
import sys


def load_albef(model_name, pretrained, cache_dir=None, device="cpu"):
    from tasks.api import clip_benchmark_triple
    return clip_benchmark_triple(model_name, pretrained, device)


def accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's top-k accuracy, which calls float() on a 1-element array (an error from NumPy 2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def register():
    """The model type ``albef``, and the NumPy 2 fix of the accuracy (the same numbers)."""
    import clip_benchmark.models as models
    from clip_benchmark.metrics import zeroshot_classification
    models.TYPE2FUNC["albef"] = load_albef
    if "albef" not in models.MODEL_TYPES:
        models.MODEL_TYPES.append("albef")
    zeroshot_classification.accuracy = accuracy


if __name__ == "__main__":
    register()
    from clip_benchmark.cli import main
    sys.exit(main())
