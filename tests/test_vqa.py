"""VQA: the official accuracy, exact batched answer ranking, the data format, result files, VQA.py end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config, tiny_text
from tasks.vqa import normalize_answer, vqa_accuracy, vqa_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accuracy_normalises_like_the_official_script():
    assert normalize_answer("Two") == "2" and normalize_answer("a dog") == "dog"
    assert normalize_answer("dont") == "don't" and normalize_answer("don't") == "don't"
    assert normalize_answer("yes.") == "yes" and normalize_answer("yes!") == "yes" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("the  red, car") == "red car" and normalize_answer("1,000") == "1000"
    # the humans disagree: everything is normalised; 3 of 10 match -> leave-one-out mean (3 * 2/3 + 7) / 10
    answers = ["2", "2", "two"] + ["3"] * 7
    assert vqa_accuracy("Two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("a 3", answers) == pytest.approx((7 * 1 + 3 * 1) / 10)   # 7 match: always 1
    assert vqa_accuracy("dont", ["don't"] * 5 + ["no"] * 5) == pytest.approx(1.0)
    assert vqa_accuracy("a dog", ["dog", "dog", "cat"] + ["cat"] * 7) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # the humans agree: the official script compares the raw strings; always_normalize compares normalised ones
    assert vqa_accuracy("two", ["2"] * 10) == 0.0 and vqa_accuracy("two", ["2"] * 10, always_normalize=True) == 1.0
    assert vqa_accuracy("2", ["2"] * 10) == 1.0 and vqa_accuracy(" 2\n", ["2"] * 10) == 1.0


def test_score_overall_and_per_answer_type():
    ann = [{"question_id": 1, "answer": ["yes"] * 10, "answer_type": "yes/no"},
           {"question_id": 2, "answer": ["2"] * 10, "answer_type": "number"},
           {"question_id": 3, "answer": ["red"] * 10, "answer_type": "other"}]
    s = vqa_score([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "3"}], ann)
    assert s["accuracy"] == pytest.approx(100 / 3) and s["accuracy_yes/no"] == 100 and s["accuracy_number"] == 0
    assert s["questions"] == 3 and s["answered"] == 2   # a missing answer scores 0


def reference_rank(m, states, atts, answers, answer_atts, k, double):
    """ALBEF's rank_answer for one question at a time, written out step by step."""
    import torch.nn.functional as F
    ids_out, probs_out = [], []
    for b in range(states.shape[0]):
        st, at = states[b:b + 1], atts[b:b + 1]
        first = m.text_decoder(answers[:1, :1], encoder_hidden_states=st, encoder_attention_mask=at).logits[0, 0]
        p_first = F.softmax(first, -1)[answers[:, 1]]
        top_p, top_i = p_first.topk(k)
        scores = []
        for p, a in zip(top_p, top_i.tolist()):
            logits = m.text_decoder(answers[a:a + 1], attention_mask=answer_atts[a:a + 1], encoder_hidden_states=st,
                                    encoder_attention_mask=at).logits[0]
            logp = F.log_softmax(logits, -1)
            n = int(answer_atts[a].sum())
            seq = sum(logp[t, answers[a, t + 1]] for t in range(n - 1))
            scores.append(seq + (p.log() if double else 0))
        probs = torch.softmax(torch.stack(scores), 0)
        order = probs.argsort(descending=True)
        ids_out.append(top_i[order]), probs_out.append(probs[order])
    return torch.stack(ids_out), torch.stack(probs_out)


@pytest.mark.parametrize("double", [True, False])
def test_batched_ranking_equals_the_per_question_reference(double):
    from models import MODELS
    torch.manual_seed(0)
    m = MODELS["vqa"](tiny_config(distill=False, rank_answer_double_count=double)).eval()
    g = torch.Generator().manual_seed(1)
    answers = torch.randint(104, 120, (9, 5), generator=g)
    answers[:, 0] = 101
    lengths = [2, 3, 4, 5, 3, 2, 4, 5, 3]
    for a, n in enumerate(lengths):
        answers[a, n - 1] = 102
        answers[a, n:] = 0
    atts = (answers != 0).long()
    q = tiny_text(5)
    with torch.no_grad():
        states = m.encode_question(torch.randn(5, 3, 32, 32), q["input_ids"], q["attention_mask"])
        ids, probs = m.rank_answer(states, q["attention_mask"], answers, atts, k=4)
        ref_ids, ref_probs = reference_rank(m, states, q["attention_mask"], answers, atts, 4, double)
    assert torch.equal(ids, ref_ids) and torch.allclose(probs, ref_probs, atol=1e-5)


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def test_dataset_weights_eos_roots_and_collate(tmp_path, tiny_world):
    from PIL import Image
    from dataset import transforms as T
    from dataset.caption_dataset import AnnotationError
    from dataset.collate import vqa_collate
    from dataset.vqa_dataset import vqa_dataset
    from models.tokenization import ALBEFTokenizer
    os.makedirs(tmp_path / "coco"), os.makedirs(tmp_path / "vg")
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "coco" / "a.jpg")
    Image.new("RGB", (20, 20), (0, 0, 200)).save(tmp_path / "vg" / "a.jpg")
    ann = [{"dataset": "vqa", "image": "a.jpg", "question": "What color is it?", "answer": ["red", "red", "blue"]},
           {"dataset": "vg", "image": "a.jpg", "question": "Is there a circle?", "answer": "yes"}]
    ds = vqa_dataset([write(tmp_path / "t.json", ann)], T.test_transform(16), str(tmp_path / "coco"),
                     str(tmp_path / "vg"))
    img, q, answers, weights, idx, bad = (ds[0][k] for k in ("image", "question", "answers", "weights", "idx", "bad"))
    assert q == "what color is it" and answers == ["red[SEP]", "blue[SEP]"] and weights == pytest.approx([2 / 3, 1 / 3])
    assert img[0].mean() > img[2].mean()   # from vqa_root: the red image
    img, q, answers, weights, idx, bad = (ds[1][k] for k in ("image", "question", "answers", "weights", "idx", "bad"))
    assert answers == ["yes[SEP]"] and weights == [0.5] and img[2].mean() > img[0].mean()   # vg_root, ALBEF's 0.5
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    batch = vqa_collate(tok, train=True)([ds[0], ds[1]])
    assert batch["k"].tolist() == [2, 1] and batch["answer_ids"].shape[0] == 3 and batch["n"] == 2
    assert torch.allclose(batch["weights"], torch.tensor([2 / 3, 1 / 3, 0.5]))
    assert (batch["answer_ids"] == tok.sep_token_id).sum(1).tolist() == [1, 1, 1]   # eos on every answer
    with pytest.raises(AnnotationError, match=r"t2.json.*entry 0: missing field 'question'"):
        vqa_dataset([write(tmp_path / "t2.json", [{"image": "a.jpg", "answer": "x"}])], None, "r", "r")
    with pytest.raises(AnnotationError, match=r"missing field 'question_id'"):
        vqa_dataset([write(tmp_path / "t3.json", ann)], None, "r", "r", split="test")
    with pytest.raises(AnnotationError, match="'vg_root' is not set"):
        vqa_dataset([write(tmp_path / "t4.json", ann)], None, "r", None)


def vqa_config(world, path, **extra):
    from test_engine import write_config
    cfg = json.load(open(write_config(world, path)))
    for k in ("train_file", "image_root", "batch_size", "queue_size", "mlm_probability", "ckpt_every_steps"):
        cfg.pop(k)
    test = json.load(open(os.path.join(world, "vqa_test.json")))[:47]   # not divisible by 2 ranks
    cfg.update(train_file=[os.path.join(world, "vqa_train.json")], test_file=write(path + ".test.json", test),
               answer_list=os.path.join(world, "answer_list.json"), vqa_root=world, vg_root=world,
               batch_size_train=8, batch_size_test=5, k_test=4, **extra)
    cfg["schedular"]["epochs"] = 1
    return write(path, cfg)


@pytest.mark.slow
def test_vqa_py_finetunes_evaluates_and_reevaluates_the_same(tiny_world, tmp_path):
    from models import MODELS
    from test_engine import load, pretrain_checkpoint, run
    ckpt = pretrain_checkpoint(tiny_world, tmp_path)
    config = vqa_config(tiny_world, str(tmp_path / "vqa.yaml"))
    out = str(tmp_path / "vqa")
    r = run([sys.executable, os.path.join(ROOT, "VQA.py"), "--config", config, "--checkpoint", ckpt,
             "--output_dir", out, "--device", "cpu"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert "train_loss_vqa" in log[0] and 0 <= log[0]["test_accuracy"] <= 100 and log[0]["test_questions"] == 47
    # the readable line gives the accuracy per answer type, as the README quotes it
    line = next(x for x in r.stdout.splitlines() if "VQA accuracy" in x)
    assert all(f"{t} {log[0][f'test_accuracy_{t}']:.2f}" in line for t in ("yes/no", "number", "other"))
    first = json.load(open(os.path.join(out, "result", "vqa_result_epoch0.json")))
    assert sorted(x["question_id"] for x in first) == sorted(x["question_id"] for x in
                                                            json.load(open(config + ".test.json")))
    answers = set(json.load(open(os.path.join(tiny_world, "answer_list.json"))))
    assert all(x["answer"] in answers for x in first)
    # the launcher's key surgery: the decoder takes the fusion layer and the MLM head, nothing stays random
    from models.base import bert_config_from
    from models.checkpoint import load_checkpoint, remap_vqa
    cfg = json.load(open(config))
    model = MODELS["vqa"](cfg)
    report = load_checkpoint(model, ckpt, remap=lambda sd: remap_vqa(sd, bert_config_from(cfg).fusion_layer),
                             verbose=False)
    assert not [k for k in report.missing if k.startswith(("text_decoder", "text_encoder", "visual_encoder"))]
    sd_pre = load(ckpt)["model"]
    assert torch.equal(model.state_dict()["text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"],
                       sd_pre["text_encoder.bert.encoder.layer.1.crossattention.self.query.weight"])
    # --evaluate of the saved checkpoint, under two ranks, writes the same result file
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29741",
             os.path.join(ROOT, "VQA.py"), "--config", config, "--checkpoint", os.path.join(out, "checkpoint_00.pth"),
             "--output_dir", out, "--device", "cpu", "--evaluate"])
    again = json.load(open(os.path.join(out, "result", "vqa_result_evaluate.json")))
    assert len(again) == 47 and sorted(again, key=lambda x: x["question_id"]) == \
        sorted(first, key=lambda x: x["question_id"])
    assert not [f for f in os.listdir(os.path.join(out, "result")) if "_rank" in f]


def test_the_blind_baselines_command_runs(tiny_world, tmp_path):
    config = vqa_config(tiny_world, str(tmp_path / "vqa.yaml"))
    r = subprocess.run([sys.executable, "-m", "tasks.vqa", "--config", config], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.find("{"):])
    assert 0 <= out["majority"]["accuracy"] <= out["question_prior"]["accuracy"] + 100 and out["majority_answer"]
