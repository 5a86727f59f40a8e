"""VQA evaluation (ALBEF's): every question ranked over ``answer_list`` with ``k_test`` candidates, batched
over questions and split over ranks without padding; the official result file merged on rank 0; the
official VQA accuracy where the split has human answers."""
import contextlib
import json
import os
import re

import torch

from dataset import eval_batch_size
from models.batch import concepts_of, to_device
from dataset.collate import vqa_collate
from dataset.vqa_dataset import read_answer_list
from engine.splits import check_split, with_texts_cut
from schema import value
from tasks.image_groups import group_loader
from utils import all_reduce_sum, broadcast_object, is_main_process, save_result


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
    loader = group_loader(dataset, vqa_collate(tokenizer, train=False, vc_max_tokens=value(config, "vc_max_tokens")),
                          eval_batch_size(config), int(value(config, "num_workers")))
    results, bad, cut = [], 0, 0
    k = int(value(config, "k_test"))
    for batch in loader:
        cut += batch.get("texts_cut", 0)
        b = to_device(batch, device)
        concepts = concepts_of(b)
        with autocast():
            ids, _ = model.answer(b["image"], b["question_ids"], b["question_mask"], a_ids, a_mask, k,
                                  concepts=concepts, rows=b["rows"])
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
        position = {a["question_id"]: i for i, a in enumerate(dataset.ann)}   # the split's order
        merged = save_result(results, result_dir, name, key="question_id", order=lambda r: position[r["question_id"]])
        metrics = {}
        if is_main_process():
            metrics = with_texts_cut({"questions": len(merged), "unreadable_images": bad}, cut, "questions")
            if all("answer" in a for a in dataset.ann):
                metrics.update(vqa_score(merged, dataset.ann, value(config, "vqa_always_normalize")))
            with open(os.path.join(result_dir, f"{name}_metrics.json"), "w") as f:
                json.dump(metrics, f)
            types = "".join(f", {k[len('accuracy_'):]} {v:.2f}" for k, v in metrics.items() if k.startswith("accuracy_"))
            print(f"{split}: {len(merged)} questions -> {os.path.join(result_dir, name + '.json')}"
                  + (f"; VQA accuracy {metrics['accuracy']:.2f} ({types[2:]})" if "accuracy" in metrics else ""))
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


# ------------------------------------------------------------------ the official VQA accuracy
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodyd": "somebody'd",
    "somebodys": "somebody's", "someoned": "someone'd", "someones": "someone's", "somethingd": "something'd",
    "somethings": "something's", "thats": "that's", "thered": "there'd", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")


def _punctuation(text):
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_NUM.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text):
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text):
    """The official normalisation of one answer (whitespace, punctuation, number words, articles,
    contractions)."""
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction, answers, always_normalize=False):
    """The official VQA accuracy of one prediction against the human ``answers`` (usually 10): the mean over
    the leave-one-out subsets of min(#matching humans / 3, 1). As the official script, answers are
    normalised only when the humans disagree, unless ``always_normalize``."""
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if always_normalize or len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        pred = normalize_answer(pred)
    scores = [min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == pred) / 3)
              for i in range(len(answers))]
    return sum(scores) / len(scores)


def vqa_score(results, annotations, always_normalize=False):
    """Overall and per-answer-type accuracy (in %) of ``results`` ([{question_id, answer}]) against annotation
    entries with ``question_id`` and ``answer`` (a list of human answers; ``answer_type`` when present)."""
    pred = {r["question_id"]: r["answer"] for r in results}
    total, by_type = [], {}
    for a in annotations:
        answers = a["answer"] if isinstance(a["answer"], list) else [a["answer"]]
        acc = vqa_accuracy(pred[a["question_id"]], answers, always_normalize) if a["question_id"] in pred else 0.0
        total.append(acc)
        if a.get("answer_type"):
            by_type.setdefault(a["answer_type"], []).append(acc)
    out = {"accuracy": 100 * sum(total) / max(len(total), 1), "questions": len(total),
           "answered": sum(1 for a in annotations if a["question_id"] in pred)}
    out.update({f"accuracy_{t}": 100 * sum(v) / len(v) for t, v in sorted(by_type.items())})
    return out


if __name__ == "__main__":   # python -m tasks.vqa --config configs/demo/VQA.yaml
    import argparse
    from engine.config import load_config, validate
    p = argparse.ArgumentParser(description="blind baselines (majority answer, question prior) on test_file")
    p.add_argument("--config", required=True)
    print(json.dumps(prior_baselines(validate(load_config(p.parse_args().config))), indent=1))
