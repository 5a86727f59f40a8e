"""The classification path NLVR2 and SNLI-VE share: finetuning a ``cls_head`` with ALBEF's momentum-distilled
cross-entropy, exact evaluation, per-example predictions, and the launcher both ``NLVR.py`` and ``VE.py`` are.

Evaluation splits the examples over ranks without padding (ALBEF's padded ``DistributedSampler`` counts some
twice), sums one confusion matrix over ranks, and writes every example's prediction to
``output_dir/result/<task>_<split>_<tag>.json``. Accuracy and per-class counts go to ``results.jsonl`` /
``results.md``; the checkpoint is selected on val accuracy and the test split evaluated once, with it.
"""
import contextlib
import json
import os
from collections import Counter

import torch

from dataset import create_dataset, eval_batch_size
from dataset.cls_dataset import TASKS
from dataset.collate import Collate
from engine.config import base_parser, parse_launcher
from engine.logger import Results
from engine.splits import check_split, with_texts_cut
from models.batch import concepts_of, to_device
from schema import ConfigError, value
from tasks.finetune import build, finetune
from tasks.image_groups import group_loader
from utils import all_reduce_sum, is_main_process, save_result


@torch.no_grad()
def predict(model, dataset, tokenizer, config, device, autocast=None):
    """This rank's share of the examples -> (rows ``{index, label, prediction}``, confusion [C, C] on
    ``device``: gold x predicted, unreadable image count)."""
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    n_cls = len(dataset.task.classes)
    confusion = torch.zeros(n_cls, n_cls, dtype=torch.float64, device=device)
    loader = group_loader(dataset, Collate(tokenizer, vc_max_tokens=value(config, "vc_max_tokens")),
                          eval_batch_size(config), int(value(config, "num_workers")))
    rows, bad, cut = [], 0, 0
    for batch in loader:
        cut += batch.get("texts_cut", 0)
        b = to_device(batch, device)
        concepts = concepts_of(b)
        with autocast():
            logits = model.predict_grouped(b["image"], b["rows"], b["input_ids"], b["attention_mask"],
                                           concepts=concepts)
        pred = logits.float().argmax(1)
        gold = b["label"]
        confusion.index_put_((gold, pred), torch.ones_like(pred, dtype=confusion.dtype), accumulate=True)
        # one host copy per batch, for the per-example file
        for i, g, p in zip(batch["idx"].tolist(), batch["label"].tolist(), pred.tolist()):
            rows.append({"index": i, "sentence": dataset.ann[i]["sentence"], "label": dataset.task.classes[g],
                         "prediction": dataset.task.classes[p]})
        bad += len(batch["bad"])
    model.train(was_training)
    return rows, confusion, bad, cut


def metrics_from(confusion, classes):
    """Accuracy (percent) overall and per gold class, with the counts."""
    c = confusion.cpu()
    total = float(c.sum())
    out = {"accuracy": 100.0 * float(c.diag().sum()) / max(total, 1.0), "examples": int(total)}
    for k, name in enumerate(classes):
        n = float(c[k].sum())
        out[f"n_{name}"] = int(n)
        out[f"acc_{name}"] = 100.0 * float(c[k, k]) / n if n else 0.0
        out[f"predicted_{name}"] = int(c[:, k].sum())
    return out


def evaluate(model, dataset, tokenizer, config, device, result_dir, tag, autocast=None):
    """Collective: metrics of one split on every rank; rank 0 writes the predictions file."""
    rows, confusion, bad, cut = predict(model, dataset, tokenizer, config, device, autocast)
    confusion = all_reduce_sum(confusion)
    bad, cut = (int(x) for x in all_reduce_sum(torch.tensor([bad, cut], dtype=torch.float64)).tolist())
    merged = save_result(rows, result_dir, f"{dataset.task.name}_{tag}", key="index", order=lambda r: r["index"])
    metrics = metrics_from(confusion, dataset.task.classes)
    if bad:
        metrics["unreadable_images"] = bad
        print(f"{bad} unreadable evaluation images read as blank ones")
    metrics = with_texts_cut(metrics, cut, "sentences")
    if is_main_process() and len(merged) != metrics["examples"]:
        raise RuntimeError(f"{tag}: {len(merged)} predictions for {metrics['examples']} counted examples")
    return metrics


def majority_baseline(config, task, split="test"):
    """Accuracy of always answering the training split's majority class, on ``split``."""
    from dataset.caption_dataset import as_list, read_json_list
    files = {"train": "train_file", "val": "val_file", "test": "test_file"}
    labels = {s: [TASKS[task].labels[a["label"]] for f in as_list(config[files[s]])
                  for a in read_json_list(f, {"label": (str, bool)}, files[s])] for s in ("train", split)}
    top = Counter(labels["train"]).most_common(1)[0][0]
    return {"task": task, "split": split, "majority_class": TASKS[task].classes[top],
            "accuracy": 100.0 * sum(y == top for y in labels[split]) / len(labels[split])}


def main(task, description, default_config, default_output):
    """The NLVR.py / VE.py launcher: finetune from a checkpoint, select on val, test once; ``--evaluate``
    evaluates ``--checkpoint`` on val and test."""
    from models import MODELS
    from models.base import bert_config_from
    from models.checkpoint import remap_nlvr_pretrain, strip_bert
    from models.model_nlvr import nlvr_num_layers
    parser = base_parser(description, default_config, default_output)
    parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint on val and test, no training")
    args, config = parse_launcher(parser, task=task)
    if task == "nlvr":   # a text-assignment or NLVR checkpoint as it is, a pretraining one with ALBEF's surgery
        bc = bert_config_from(config)
        remap = lambda sd: remap_nlvr_pretrain(sd, bc.fusion_layer, nlvr_num_layers(bc))   # noqa: E731
    else:
        remap = strip_bert
    env, tokenizer, model = build(args, config, MODELS[task], remap=remap)
    splits = {s: create_dataset(f"{task}_{s}", config) for s in ("val", "test") if config.get(f"{s}_file")}
    splits = {s: d for s, d in splits.items() if check_split(config, f"{s}_file", s, len(d))}
    classes = TASKS[task].classes
    results = Results(args.output_dir, env.main, columns=("accuracy", *(f"acc_{c}" for c in classes)))
    result_dir = os.path.join(args.output_dir, "result")

    def run_eval(m, split, autocast, tag, **info):
        metrics = evaluate(m, splits[split], tokenizer, config, env.device, result_dir, f"{split}_{tag}", autocast)
        return results.add(split, metrics, **info)

    def train():
        if config.get("batch_size_train") is None and config.get("batch_size") is None:
            raise ConfigError("config: missing required key 'batch_size_train' (or ALBEF NLVR's 'batch_size')")
        return create_dataset(f"{task}_train", config, seed=args.seed), Collate(tokenizer, vc_max_tokens=value(config, "vc_max_tokens"))

    finetune(args, config, env, model, list(splits), run_eval, "accuracy", task, results.COLUMNS, train)


if __name__ == "__main__":   # python -m tasks.classification --task nlvr --config configs/demo/NLVR.yaml
    import argparse
    from engine.config import load_config, validate
    p = argparse.ArgumentParser(description="majority-class accuracy on test_file (NLVR2 / SNLI-VE configs)")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--config", required=True)
    a = p.parse_args()
    print(json.dumps(majority_baseline(validate(load_config(a.config)), a.task), indent=1))
