"""Evaluation by distinct image (tasks/image_groups.py): each image encoded once, the same predictions."""
import json
import os

import torch

from conftest import tiny_config, tiny_text


def test_groups_keep_first_seen_order_and_every_example_once(tiny_world):
    from dataset import create_dataset
    from tasks.image_groups import batches, group_by_image
    cfg = dict(tiny_config(), test_file=os.path.join(tiny_world, "ve_test.json"), image_root=os.path.join(tiny_world, "images"),
               max_words=30)
    ds = create_dataset("ve_test", cfg)
    groups = group_by_image(ds)
    flat = [i for _, idx in groups for i in idx]
    assert sorted(flat) == list(range(len(ds))) and len(groups) < len(ds)
    firsts = [idx[0] for _, idx in groups]
    assert firsts == sorted(firsts)   # first-seen order
    for key, idx in groups:
        assert all(tuple(ds.image_paths(i)) == key for i in idx)
    packed = batches(groups, 5)
    assert [g for b in packed for g in b] == list(range(len(groups)))
    assert all(sum(len(groups[g][1]) for g in b) <= 5 or len(b) == 1 for b in packed)


def test_grouped_classification_equals_one_pass_per_example():
    from models import MODELS
    torch.manual_seed(0)
    images, rows = torch.randn(3, 3, 32, 32), torch.tensor([0, 0, 2, 1, 2])
    text = tiny_text(5, pad_first=True)
    for kind, n_img in (("ve", 1), ("nlvr", 2)):
        m = MODELS[kind](tiny_config()).eval()
        imgs = torch.randn(3 * n_img, 3, 32, 32) if n_img == 2 else images
        with torch.no_grad():
            got = m.predict_grouped(imgs, rows, text["input_ids"], text["attention_mask"])
            if n_img == 1:
                want = m.predict(imgs[rows], text["input_ids"], text["attention_mask"])
            else:
                want = m.predict(torch.cat([imgs[:3][rows], imgs[3:][rows]]), text["input_ids"], text["attention_mask"])
        assert torch.allclose(got, want, atol=1e-5), kind
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_grouped_vqa_answers_equal_one_pass_per_question():
    from models import MODELS
    torch.manual_seed(0)
    m = MODELS["vqa"](tiny_config(distill=False)).eval()
    images, rows = torch.randn(2, 3, 32, 32), torch.tensor([1, 0, 1, 1])
    q = tiny_text(4, 6, seed=1, pad_first=True)
    a = tiny_text(7, 5, seed=2, pad_first=False)
    a["input_ids"][3:, 3:] = 0
    a["attention_mask"][3:, 3:] = 0
    got = m.answer(images, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"], 3, rows=rows)
    want = m.answer(images[rows], q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"], 3)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-5)


def test_grouped_gradcam_equals_one_pass_per_expression():
    from models import MODELS
    from tasks.grounding import gradcam
    torch.manual_seed(0)
    m = MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)).eval()
    images, rows = torch.randn(2, 3, 32, 32), torch.tensor([0, 1, 1])
    text = tiny_text(3, pad_first=True)
    for mode, block in (("itm", 2), ("itc", 1)):
        got = gradcam(m, images, text["input_ids"], text["attention_mask"], mode, block, 4, rows=rows)
        want = gradcam(m, images[rows], text["input_ids"], text["attention_mask"], mode, block, 4)
        assert torch.allclose(got, want, atol=1e-6), mode


def test_ve_evaluation_reads_each_image_once_and_predicts_as_before(tiny_world, tmp_path, monkeypatch):
    """The grouped VE evaluation against a plain loop over the examples: the same predictions, each image read
    once."""
    from dataset import create_dataset
    from dataset.caption_dataset import ImageTextDataset
    from dataset.collate import Collate
    from models import MODELS
    from models.tokenization import ALBEFTokenizer
    from tasks.classification import evaluate
    cfg = dict(tiny_config(), test_file=os.path.join(tiny_world, "ve_test.json"),
               image_root=os.path.join(tiny_world, "images"), batch_size_test=6, num_workers=0,
               bert_config=dict(tiny_config()["bert_config"], vocab_size=128))
    ds = create_dataset("ve_test", cfg)
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    torch.manual_seed(0)
    m = MODELS["ve"](cfg).eval()
    reads = []
    real = ImageTextDataset.read_for_eval
    monkeypatch.setattr(ImageTextDataset, "read_for_eval", lambda self, i, r: reads.append(i) or real(self, i, r))
    metrics = evaluate(m, ds, tok, cfg, torch.device("cpu"), str(tmp_path), "t")
    assert len(reads) == len({tuple(ds.image_paths(i)) for i in range(len(ds))}) < len(ds)
    rows = json.load(open(tmp_path / "ve_t.json"))
    assert [r["index"] for r in rows] == list(range(len(ds))) and metrics["examples"] == len(ds)
    with torch.no_grad():
        batch = Collate(tok)([ds[i] for i in range(len(ds))])
        pred = m.predict(batch["image"], batch["input_ids"], batch["attention_mask"]).argmax(1).tolist()
    assert [r["prediction"] for r in rows] == [ds.task.classes[p] for p in pred]
