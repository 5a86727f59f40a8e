"""VQA evaluation (ALBEF's): every question ranked over ``answer_list`` with ``k_test`` candidates, batched
over questions and split over ranks without padding; the official result file merged on rank 0; the
official VQA accuracy where the split has human answers."""
import contextlib
import json
import os

import torch

from dataset import shard_loader
from models.batch import concepts_of
from dataset.vqa_dataset import VQACollate, read_answer_list
from engine.splits import check_split, with_texts_cut
from schema import value
from utils import all_reduce_sum, broadcast_object, is_main_process, save_result, vqa_score


def tokenize_answer_list(answer_list, tokenizer, eos, device):
    """The candidates as ALBEF tokenizes them: each with ``eos`` appended, padded to the longest."""
    t = tokenizer([a + eos for a in answer_list], padding="longest")
    return t["input_ids"].to(device), t["attention_mask"].to(device)


@torch.no_grad()
def predict(model, dataset, answer_list, tokenizer, config, device, autocast=None):
    """This rank's share of the questions -> ([{question_id, answer}], number of unreadable images)."""
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    a_ids, a_mask = tokenize_answer_list(answer_list, tokenizer, value(config, "eos"), device)
    loader = shard_loader(dataset, config, VQACollate(tokenizer, train=False,
                                                      vc_max_tokens=value(config, "vc_max_tokens")))
    results, bad, cut = [], 0, 0
    k = int(value(config, "k_test"))
    for batch in loader:
        cut += batch.get("texts_cut", 0)
        concepts = concepts_of(batch)
        if concepts is not None:
            concepts = tuple(c.to(device) for c in concepts)
        with autocast():
            ids, _ = model.answer(batch["image"].to(device), batch["question_ids"].to(device),
                                  batch["question_mask"].to(device), a_ids, a_mask, k, concepts=concepts)
        for qid, p in zip(batch["question_id"], ids[:, 0].tolist()):   # re-ranked: the best comes first
            results.append({"question_id": qid, "answer": answer_list[p]})
        bad += len(batch["bad"])
    model.train(was_training)
    return results, bad, cut


def evaluator(config, tokenizer, device, output_dir, split="test", autocast=None):
    """``run(model, tag)`` -> metrics: writes ``output_dir/result/vqa_result_<tag>.json`` and, where the
    split's annotations hold answers, scores it (``test_accuracy`` ...). None when the split is empty and
    ``empty_splits: skip``."""
    from dataset import create_dataset
    dataset = create_dataset(f"vqa_{split}", config)
    if not check_split(config, f"{split}_file", split, len(dataset)):
        return None
    answer_list = read_answer_list(value(config, "answer_list"))
    result_dir = os.path.join(output_dir, "result")

    def run(model, tag):
        results, bad, cut = predict(model, dataset, answer_list, tokenizer, config, device, autocast)
        bad, cut = (int(x) for x in all_reduce_sum(torch.tensor([bad, cut], dtype=torch.float64)).tolist())
        name = f"vqa_result_{tag}" if split == "test" else f"vqa_{split}_result_{tag}"
        merged = save_result(results, result_dir, name, key="question_id")
        metrics = {}
        if is_main_process():
            metrics = with_texts_cut({"questions": len(merged), "unreadable_images": bad}, cut, "questions")
            if all("answer" in a for a in dataset.ann):
                metrics.update(vqa_score(merged, dataset.ann, value(config, "vqa_always_normalize")))
            with open(os.path.join(result_dir, f"{name}_metrics.json"), "w") as f:
                json.dump(metrics, f)
            print(f"{split}: {len(merged)} questions -> {os.path.join(result_dir, name + '.json')}"
                  + (f"; VQA accuracy {metrics['accuracy']:.2f}" if "accuracy" in metrics else ""))
        return {f"{split}_{k}": v for k, v in broadcast_object(metrics).items()}

    return run


def prior_baselines(config):
    """Blind baselines on the test split: the majority training answer for every question, and the majority
    training answer of questions that start with the same three words (a language prior)."""
    from collections import Counter
    from dataset.caption_dataset import as_list, read_json_list
    train = [a for f in as_list(config["train_file"]) for a in read_json_list(f, {"question": str}, "train_file")]
    test = [a for f in as_list(config["test_file"]) for a in read_json_list(f, {"question_id": (int, str)}, "test_file")]
    def top(answers):
        return Counter(answers).most_common(1)[0][0]

    def prefix(a):
        return " ".join(a["question"].lower().split()[:3])
    majority = top([x for a in train for x in as_list(a["answer"])])
    by_prefix = {}
    for a in train:
        by_prefix.setdefault(prefix(a), []).extend(as_list(a["answer"]))
    by_prefix = {p: top(v) for p, v in by_prefix.items()}
    always = value(config, "vqa_always_normalize")
    return {"majority": vqa_score([{"question_id": a["question_id"], "answer": majority} for a in test], test, always),
            "question_prior": vqa_score([{"question_id": a["question_id"], "answer": by_prefix.get(prefix(a), majority)}
                                         for a in test], test, always),
            "majority_answer": majority}


if __name__ == "__main__":   # python -m engine.vqa_eval --config configs/demo/VQA.yaml
    import argparse
    from engine.config import load_config, validate
    p = argparse.ArgumentParser(description="blind baselines (majority answer, question prior) on test_file")
    p.add_argument("--config", required=True)
    print(json.dumps(prior_baselines(validate(load_config(p.parse_args().config))), indent=1))
