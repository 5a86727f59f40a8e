"""The inference API and its commands give the launchers' numbers (tasks/api.py, tools/search.py, ...)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """A tiny retrieval config and a random-weight pretraining checkpoint (ALBEF's layout), and a VQA one."""
    from models import MODELS
    from test_engine import write_config
    d = tmp_path_factory.mktemp("api")
    cfg = json.load(open(write_config(tiny_world, str(d / "base.yaml"))))
    cfg.update(k_test=4, batch_size_test=8, answer_list=os.path.join(tiny_world, "answer_list.json"),
               vqa_root=tiny_world, vg_root=tiny_world, eos="[SEP]")
    config = str(d / "model.yaml")
    json.dump(cfg, open(config, "w"))
    torch.manual_seed(0)
    torch.save({"model": MODELS["pretrain"](cfg).state_dict()}, d / "pretrain.pth")
    torch.manual_seed(1)
    torch.save({"model": MODELS["vqa"](cfg).state_dict()}, d / "vqa.pth")
    return {"config": config, "cfg": cfg, "ckpt": str(d / "pretrain.pth"), "vqa": str(d / "vqa.pth"), "dir": d}


def test_features_and_itm_scores_are_the_retrieval_evaluations(trained, tiny_world):
    from dataset import create_dataset
    from tasks.api import load_model
    from tasks.retrieval import encode_images, encode_texts, reference_scores
    m = load_model(trained["config"], trained["ckpt"], "cpu")
    cfg = dict(m.config, test_file=os.path.join(tiny_world, "retrieval_test.json"), image_root=tiny_world)
    ds = create_dataset("re_test", cfg)
    states, atts, img_eval, _ = encode_images(m.model, ds, torch.device("cpu"), batch_size=8, num_workers=0)
    t_atts, t_states, txt_eval = encode_texts(m.model, m.tokenizer, ds.text, torch.device("cpu"), 30)
    paths = [os.path.join(tiny_world, a["image"]) for a in ds.ann]
    captions = [c for a in ds.ann for c in a["caption"]]
    img = m.encode_image(paths)
    txt = m.encode_text(captions)
    assert torch.allclose(img, img_eval, atol=1e-5) and torch.allclose(txt, txt_eval, atol=1e-5)
    # ITM: the evaluation's re-scoring of text 3's top 4 images equals the API's pairs
    sims = img_eval @ txt_eval.t()
    _, t2i = reference_scores(m.model, sims, states, t_states, t_atts, 4, image_rows=[], text_rows=[3])
    top = sims[:, 3].topk(4).indices
    got = m.itm_scores([paths[i] for i in top.tolist()], [captions[3]] * 4)
    assert torch.allclose(got, t2i[3, top], atol=1e-4)


def test_index_query_orders_by_cosine_and_reranks_by_itm(trained, tiny_world, tmp_path):
    from tasks.api import load_model
    from tools import search
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    names = sorted(os.listdir(os.path.join(tiny_world, "images")))[:10]
    for i, n in enumerate(names):
        (images / ("sub" if i % 2 else "") / n).write_bytes(open(os.path.join(tiny_world, "images", n), "rb").read())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    index = str(tmp_path / "index")
    added, failed = search.build_index(trained["config"], trained["ckpt"], str(images), index, part=4,
                                       log=lambda *_: None)
    assert added == 10 and len(failed) == 1 and "broken.jpg" in failed[0][0]
    assert "broken.jpg" in open(os.path.join(index, "failed.txt")).read()
    assert search.build_index(trained["config"], trained["ckpt"], str(images), index, log=lambda *_: None) == (0, [])
    m = load_model(trained["config"], trained["ckpt"], "cpu")
    feats, paths, _ = search.load_index(index)
    text = "a red circle"
    cos = (m.encode_image(paths) @ m.encode_text([text]).t())[:, 0].numpy()
    rows = search.query(index, text=text, top=10)
    assert [r["image"] for r in rows] == [paths[i] for i in np.argsort(-cos, kind="stable")]
    assert np.allclose([r["score"] for r in rows], np.sort(cos)[::-1], atol=1e-5)
    rer = search.query(index, text=text, top=10, rerank=4)
    top4 = [paths[i] for i in np.argsort(-cos, kind="stable")[:4]]
    itm = m.itm_scores(top4, [text] * 4).numpy()
    assert [r["image"] for r in rer[:4]] == [top4[i] for i in np.argsort(-itm, kind="stable")]
    assert [r["image"] for r in rer[4:]] == [r["image"] for r in rows[4:]]
    # image -> text over a file of captions
    caps = tmp_path / "caps.txt"
    caps.write_text("a red circle\na blue square\ntwo small shapes\n")
    i2t = search.query(index, image=paths[0], texts=str(caps), top=3)
    sims = (m.encode_image([paths[0]]) @ m.encode_text(caps.read_text().split("\n")[:3]).t())[0]
    assert [r["text"] for r in i2t] == [caps.read_text().split("\n")[i] for i in sims.argsort(descending=True)]
    # another model is refused
    other = tmp_path / "other.pth"
    sd = torch.load(trained["ckpt"], weights_only=True)
    sd["model"]["itm_head.bias"] = sd["model"]["itm_head.bias"] + 1
    torch.save(sd, other)
    with pytest.raises(search.IndexError_, match="build a new index"):
        search.query(index, text=text, checkpoint=str(other))
    with pytest.raises(search.IndexError_, match="no image files"):
        (tmp_path / "empty").mkdir()
        search.build_index(trained["config"], trained["ckpt"], str(tmp_path / "empty"), str(tmp_path / "i2"))


@pytest.mark.slow
def test_index_killed_mid_run_resumes_to_the_same_index(trained, tiny_world, tmp_path):
    from tools import search
    images = os.path.join(tiny_world, "images")
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    cmd = [sys.executable, "-m", "tools.search", "index", "--config", trained["config"], "--checkpoint",
           trained["ckpt"], "--images", images, "--part", "1", "--batch_size", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd + ["--out", cut], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while not os.path.isfile(os.path.join(cut, "part_00001.txt")) and time.time() - t < 240:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_cut = len(search.parts(cut))
    assert 1 <= n_cut < len(os.listdir(images))
    assert subprocess.run(cmd + ["--out", cut], cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert subprocess.run(cmd + ["--out", whole], cwd=ROOT, env=env, capture_output=True).returncode == 0
    fa, pa, _ = search.load_index(cut)
    fb, pb, _ = search.load_index(whole)
    assert pa == pb and len(pa) == len(os.listdir(images)) and np.array_equal(np.asarray(fa), np.asarray(fb))


def test_answers_are_vqa_evaluations(trained, tiny_world, tmp_path):
    from dataset import create_dataset
    from dataset.vqa_dataset import read_answer_list
    from tasks.api import load_model
    from tasks.vqa import predict
    m = load_model(trained["config"], trained["vqa"], "cpu")
    first = json.load(open(os.path.join(tiny_world, "vqa_test.json")))[:12]
    json.dump(first, open(tmp_path / "q.json", "w"))
    cfg = dict(m.config, test_file=str(tmp_path / "q.json"))
    ds = create_dataset("vqa_test", cfg)
    answers = read_answer_list(cfg["answer_list"])
    want, _, _ = predict(m.model, ds, answers, m.tokenizer, cfg, torch.device("cpu"))
    want = sorted(want, key=lambda r: [a["question_id"] for a in ds.ann].index(r["question_id"]))
    ann = ds.ann
    got = m.answer([os.path.join(tiny_world, ann[i]["image"]) for i in range(12)], [ann[i]["question"] for i in range(12)],
                   answers)
    assert [a for a, _ in got] == [w["answer"] for w in want]
    with pytest.raises(ValueError, match="VQA checkpoint"):
        load_model(trained["config"], trained["ckpt"], "cpu").answer([], [], answers)


def test_gradcam_is_groundings_map(trained, tiny_world, tmp_path):
    from dataset import create_dataset
    from dataset.collate import Collate
    from tasks.api import load_model
    from tasks.grounding import gradcam, grid_size
    m = load_model(trained["config"], trained["ckpt"], "cpu")
    cfg = dict(m.config, test_file=[os.path.join(tiny_world, "refcoco+_test.json")], image_root=tiny_world)
    ds = create_dataset("grounding_test", cfg)
    batch = Collate(m.tokenizer)([ds[i] for i in range(3)])
    want = gradcam(m.model, batch["image"], batch["input_ids"], batch["attention_mask"], "itm", 1, grid_size(cfg))
    for i in range(3):
        got = m.gradcam(ds.image_path(i), ds.ann[i]["text"], block_num=1)
        assert torch.allclose(got, want[i], atol=1e-5)
    from tools.ground import main
    assert main(["--config", trained["config"], "--checkpoint", trained["ckpt"], "--image", ds.image_path(0),
                 "--text", ds.ann[0]["text"], "--block_num", "1", "--out", str(tmp_path / "h.png")]) == 0
    assert os.path.getsize(tmp_path / "h.png") > 1000


def test_classify_by_prompted_itc_and_the_command(trained, tiny_world, tmp_path, capsys):
    import torch.nn.functional as F
    from tasks.api import load_model
    from tools.classify import main
    m = load_model(trained["config"], trained["ckpt"], "cpu")
    imgs = [os.path.join(tiny_world, "images", n) for n in sorted(os.listdir(os.path.join(tiny_world, "images")))[:3]]
    names, templates = ["circle", "square"], ("a {}.", "a photo of a {}.")
    probs = m.classify(imgs, names, templates=templates)
    cls = F.normalize(torch.stack([m.encode_text([t.format(n) for t in templates]).mean(0) for n in names]), dim=-1)
    assert torch.allclose(probs, (m.encode_image(imgs) @ cls.t() / m.model.temp).softmax(-1), atol=1e-5)
    with pytest.raises(ValueError, match="at least one class"):
        m.classify(imgs, [])
    # re-ranked: each image's top 2 of 3 classes re-scored by ITM on the first template, renormalised
    three = ["circle", "square", "triangle"]
    plain = m.classify(imgs, three, templates=templates)
    rer = m.classify(imgs, three, templates=templates, rerank=2)
    for i, p in enumerate(imgs):
        top = plain[i].topk(2).indices
        want = torch.zeros(3)
        want[top] = m.itm_scores([p, p], [f"a {three[c]}." for c in top.tolist()]).softmax(-1)
        assert torch.allclose(rer[i], want, atol=1e-5)
    for n in names:
        (tmp_path / "labelled" / n).mkdir(parents=True)
    for i, p in enumerate(imgs):
        (tmp_path / "labelled" / names[i % 2] / os.path.basename(p)).write_bytes(open(p, "rb").read())
    assert main(["--config", trained["config"], "--checkpoint", trained["ckpt"], "--images",
                 str(tmp_path / "labelled"), "--classes", "circle,square", "--labels"]) == 0
    out = capsys.readouterr()
    rows = out.out.strip().splitlines()[1:]
    assert len(rows) == 3
    labelled = [str(tmp_path / "labelled" / names[i % 2] / os.path.basename(p)) for i, p in enumerate(imgs)]
    pred = m.classify(sorted(labelled), names).argmax(1).tolist()
    right = sum(names[c] == os.path.basename(os.path.dirname(f)) for c, f in zip(pred, sorted(labelled)))
    assert f"accuracy {100 * right / 3:.2f} ({right} of 3; chance 50.00)" in out.err


def test_clip_benchmark_runs_its_retrieval_and_zero_shot_classification(trained, tiny_world):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from tools.clip_benchmark import register
    register()
    from dataset.caption_dataset import load_image
    from tasks.api import clip_benchmark_triple
    model, transform, tokenizer = clip_benchmark_triple(trained["config"], trained["ckpt"], "cpu")
    ann = json.load(open(os.path.join(tiny_world, "retrieval_test.json")))[:6]
    images = [transform(load_image(os.path.join(tiny_world, a["image"]))) for a in ann]

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(ann)

        def __getitem__(self, i):
            return images[i], ann[i]["caption"]
    loader = torch.utils.data.DataLoader(Pairs(), batch_size=3, collate_fn=lambda b: (torch.stack([x[0] for x in b]),
                                                                                       [x[1] for x in b]))
    metrics = zr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 2])
    # the same recalls from the API's features, as CLIP-style papers count them
    from tasks.api import load_model
    m = load_model(trained["config"], trained["ckpt"], "cpu")
    caps = [(i, c) for i, a in enumerate(ann) for c in a["caption"]]
    sims = m.encode_text([c for _, c in caps]) @ m.encode_image([os.path.join(tiny_world, a["image"]) for a in ann]).t()
    own = torch.tensor([i for i, _ in caps])
    for k in (1, 2):
        t2i = (sims.topk(k, dim=1).indices == own[:, None]).any(1).float().mean().item()
        i2t = sum(bool((own[sims[:, j].topk(k).indices] == j).any()) for j in range(len(ann))) / len(ann)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    class Labelled(torch.utils.data.Dataset):   # torchvision-style: clip_benchmark reads .classes
        classes = ["circle", "square"]

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], i % 2
    cls = torch.utils.data.DataLoader(Labelled(), batch_size=3)
    metrics = zc.evaluate(model, cls, tokenizer, ["circle", "square"], ["a photo of a {c}."], "cpu", amp=False)
    paths = [os.path.join(tiny_world, a["image"]) for a in ann]
    pred = (m.encode_image(paths) @ m.encode_text(["a photo of a circle.", "a photo of a square."]).t()).argmax(1)
    assert metrics["acc1"] == pytest.approx((pred == torch.arange(len(ann)) % 2).float().mean().item())


def test_describe_names_the_layout_and_safetensors_loads_the_same(trained, tmp_path):
    from models.checkpoint import describe, load_file, to_safetensors
    d = describe(trained["ckpt"])
    assert d["kind"] == "pretrain" and d["momentum_weights"] and d["queue"] and d["fusion_layer"] == 1
    assert d["a load would miss"]["retrieval"] == [] and d["a load would miss"]["vqa"] == []
    assert d["a load would miss"]["nlvr"] == ["cls_head"]
    assert describe(trained["vqa"])["kind"] == "vqa"
    out = to_safetensors(trained["ckpt"], str(tmp_path / "p.safetensors"))
    a, b = torch.load(trained["ckpt"], weights_only=True)["model"], load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_that_does_not_fit_the_config_or_the_task_is_refused(trained, tmp_path):
    from tasks.api import load_model
    wide = dict(trained["cfg"], embed_dim=32)
    path = tmp_path / "wide.yaml"
    json.dump(wide, open(path, "w"))
    with pytest.raises(ValueError, match="(?s)shape mismatch.*vision_proj"):
        load_model(str(path), trained["ckpt"], "cpu")
    with pytest.raises(FileNotFoundError, match="neither a file nor a released name"):
        load_model(trained["config"], "nope.pth", "cpu")
    with pytest.raises(ValueError, match="VQA checkpoint has no ITC"):
        load_model(trained["config"], trained["vqa"], "cpu").encode_text(["x"])
