"""CE-CLIP's hard-negative generator (tools/hard_negatives.py) and the compositional benchmarks' readers
and scoring (tasks/compositional.py)."""
import json
import os
import random

import pytest
import torch

from tasks import compositional as comp
from tools import hard_negatives as hn

LEXICON = {"man": "NOUN", "woman": "NOUN", "dog": "NOUN", "park": "NOUN", "ball": "NOUN", "red": "ADJ",
           "small": "ADJ", "runs": "VERB", "throws": "VERB", "is": "AUX", "a": "DET", "the": "DET", "in": "ADP",
           "to": "ADP", "with": "ADP"}


def tagger(texts):
    """A spaCy stand-in: whitespace tokens, POS from a lexicon."""
    return [[(w, LEXICON.get(w, "X"), " ") for w in t.split()] for t in texts]


def test_relation_swap_exchanges_whole_words_and_needs_three_distinct_nouns():
    toks = tagger(["a woman throws a ball to a man in the park"])[0]
    assert hn.relation_swap(toks) == "a ball throws a woman to a man in the park"
    assert hn.relation_swap(tagger(["a man with a dog"])[0]) is None            # two nouns only
    assert hn.relation_swap(tagger(["a man and a man in the park"])[0]) is None  # equal nouns: no negative
    # CE-CLIP's substring replace would also have changed "woman": the swap touches whole words only
    toks = tagger(["a man throws a ball to a woman in the park"])[0]
    assert hn.relation_swap(toks) == "a ball throws a man to a woman in the park"


def test_masked_picks_a_word_of_the_type_and_none_without_one():
    rng = random.Random(0)
    toks = tagger(["a small dog runs in the park"])[0]
    assert hn.masked(toks, "attribute", rng) == "a <mask> dog runs in the park"
    assert hn.masked(toks, "action", rng) == "a small dog <mask> in the park"
    assert hn.masked(toks, "object", rng) in ("a small <mask> runs in the park", "a small dog runs in the <mask>")
    assert hn.masked(tagger(["the man is in the park"])[0], "action", rng) is None   # AUX is no action


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A random 2-layer BERT masked LM over the demo vocabulary, saved as a local HF directory."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    from dataset.synthetic import write_vocab
    d = str(tmp_path_factory.mktemp("mlm"))
    write_vocab(d)
    have = set(open(os.path.join(d, "vocab.txt")).read().split())
    with open(os.path.join(d, "vocab.txt"), "a") as f:   # the test sentences' words
        f.write("".join(w + "\n" for w in LEXICON if w not in have))
    tok = BertTokenizer(os.path.join(d, "vocab.txt"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_fill_mask_takes_the_ranked_candidate(tiny_mlm):
    fill = hn.FillMask(tiny_mlm, rank=3)
    out = fill(["a <mask> dog runs in the park", "a small dog <mask> in the park"])
    assert all(o is not None and "<mask>" not in o and "[MASK]" not in o for o in out)
    # the 4th of the top 5 differs from the 1st
    first = hn.FillMask(tiny_mlm, rank=0)(["a <mask> dog runs in the park"])[0]
    assert first != out[0]
    with pytest.raises(hn.GenerationError, match="not a directory"):
        hn.FillMask(str(tiny_mlm) + "_missing")


def test_generator_writes_four_types_per_caption_and_resumes(tiny_mlm, tmp_path):
    ann = [{"image": "a.jpg", "caption": "a woman throws a red ball to a man in the park"},
           {"image": "b.jpg", "caption": ["a small dog runs in the park", "the man is in the park"]}]
    src, out = tmp_path / "ann.json", str(tmp_path / "hn.json")
    src.write_text(json.dumps(ann))
    fill = hn.FillMask(tiny_mlm)
    hn.run(str(src), out, tagger, fill, batch_size=1)
    res = json.load(open(out))
    assert res[0]["hn_valid"][0] == 1 and res[0]["hard_negatives"][0] == "a ball throws a red woman to a man in the park"
    assert len(res[0]["hard_negatives"]) == 4 and all(res[0]["hn_valid"][1:])
    assert len(res[1]["hard_negatives"]) == 2 and res[1]["hn_valid"][1][:2] == [0, 0]   # no swap, no adjective
    assert res[1]["hard_negatives"][1][0] == "###" and res[1]["image"] == "b.jpg"
    assert not os.path.exists(out + ".partial.jsonl")
    # a run killed after the first entry: the second run generates the rest only, with the same result
    out2 = str(tmp_path / "hn2.json")
    with open(out2 + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"i": 0, "hard_negatives": [res[0]["hard_negatives"]], "hn_valid": [res[0]["hn_valid"]]})
                + "\n" + '{"i": 1, "hard_neg')   # a line cut by the kill
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return tagger(texts)
    hn.run(str(src), out2, counting, fill, batch_size=8)
    assert calls == [2] and json.load(open(out2)) == res
    # the training dataset accepts the file, and refuses it once a caption's negatives are missing
    from dataset.caption_dataset import AnnotationError, pretrain_dataset
    assert len(pretrain_dataset(out, lambda x: x, hard_negatives=True)) == 2
    res[1]["hn_valid"] = res[1]["hn_valid"][:1]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(res))
    with pytest.raises(AnnotationError, match="entry 1: fields 'hard_negatives'"):
        pretrain_dataset(str(broken), lambda x: x, hard_negatives=True)


def test_generator_errors_name_the_file_and_what_is_missing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(hn.GenerationError, match="entry 0: needs 'caption'"):
        hn.load_entries(str(bad))
    with pytest.raises(hn.GenerationError, match="no such file"):
        hn.load_entries(str(tmp_path / "missing.json"))
    try:
        import spacy  # noqa: F401
        with pytest.raises(hn.GenerationError, match="no such spaCy pipeline"):
            hn.spacy_tagger(str(tmp_path / "no_pipeline"))
    except ImportError:
        with pytest.raises(hn.GenerationError, match="spaCy is not installed"):
            hn.spacy_tagger("en_core_web_sm")


# ---------------------------------------------------------------------------------------------- benchmarks
def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_sugarcrepe_valse_and_aro_readers(tmp_path):
    sc = tmp_path / "sc"
    write(str(sc / "swap_att.json"), {"0": {"filename": "x.jpg", "caption": "a red cube", "negative_caption": "a cube red"}})
    write(str(sc / "add_obj.json"), {"7": {"filename": "y.jpg", "caption": "c", "negative_caption": "d"}})
    cases = comp.read_sugarcrepe(str(sc), "/img")
    assert [c["subset"] for c in cases] == ["add_obj", "swap_att"]
    assert cases[1]["texts"] == ["a red cube", "a cube red"] and cases[1]["image"] == "/img/x.jpg"
    va = tmp_path / "valse"
    write(str(va / "existence.json"), {
        "a": {"caption": "there is a dog", "foil": "there is no dog", "image_file": "v.jpg", "mturk": {"caption": 3}},
        "b": {"caption": "x", "foil": "y", "image_file": "w.jpg", "mturk": {"caption": 1}}})   # not validated
    cases = comp.read_valse(str(va), "/img")
    assert len(cases) == 1 and cases[0]["texts"] == ["there is a dog", "there is no dog"]
    rel = [{"image_path": "r.jpg", "bbox_x": 1, "bbox_y": 2, "bbox_w": 3, "bbox_h": 4, "true_caption": "the cat is on the mat",
            "false_caption": "the mat is on the cat", "relation_name": "on"}]
    write(str(tmp_path / "aro" / "visual_genome_relation.json"), rel)
    cases = comp.read_aro_vg(str(tmp_path / "aro" / "visual_genome_relation.json"), "/img", "relation")
    assert cases[0]["box"] == [1, 2, 3, 4] and cases[0]["group"] == "on"
    with pytest.raises(comp.BenchmarkError, match="missing field"):
        write(str(tmp_path / "b" / "x.json"), {"0": {"filename": "x.jpg", "caption": "c"}})
        comp.read_sugarcrepe(str(tmp_path / "b"), "/img")


def test_aro_order_foils_are_the_four_perturbations():
    rng = random.Random(0)
    cap = "a small dog runs in the red park"
    foils = comp.aro_order_foils(cap, rng, lambda ws: [LEXICON.get(w, "X") for w in ws])
    assert len(foils) == 4 and all(sorted(f.split()) == sorted(cap.split()) for f in foils)
    words = cap.split()
    content = {1, 2, 6, 7}   # small dog red park
    assert [w for i, w in enumerate(foils[0].split()) if i not in content] == [w for i, w in enumerate(words)
                                                                               if i not in content]
    assert [w for i, w in enumerate(foils[1].split()) if i in content] == [words[i] for i in sorted(content)]
    assert sorted(foils[2].split()[:3]) == sorted(words[:3])   # within trigrams
    with pytest.raises(comp.BenchmarkError, match="POS tagger"):
        comp.aro_order_foils(cap, rng, None)


def test_scoring_counts_ties_as_wrong_and_summarizes_per_family_and_macro():
    cases = [{"subset": "swap_att", "texts": ["t", "f"], "group": None, "image": "", "box": None},
             {"subset": "replace_att", "texts": ["t", "f"], "group": None, "image": "", "box": None},
             {"subset": "replace_obj", "texts": ["t", "f", "g"], "group": None, "image": "", "box": None}]

    def score_fn(images, texts):
        s = {2: torch.tensor([1.0, 0.5]), 3: torch.tensor([1.0, 0.2, 1.0])}   # the 3-way case ties
        return {"itc": torch.stack([s[len(t)] for t in texts])}
    right, bad = comp.evaluate_cases(cases, score_fn, lambda x: torch.zeros(3, 4, 4), 4, batch_size=2)
    assert right["itc"] == [True, True, False] and bad == 3   # no image exists: blank and counted
    m = comp.summarize("sugarcrepe", cases, right)["itc"]
    assert m["swap_att"] == 100.0 and m["replace_obj"] == 0.0 and m["avg_replace"] == 50.0 and m["avg_swap"] == 100
    aro = [{"subset": "vg_relation", "group": g, "texts": ["t", "f"]} for g in ("on", "on", "facing")]
    m = comp.summarize("aro", aro, {"itc": [True, False, False]})["itc"]
    assert m["vg_relation_macro"] == 50.0   # "facing" is symmetric: left out of the macro average


def test_albef_scores_match_the_model_pieces(tiny_world):
    from conftest import tiny_config
    from models import MODELS
    from models.tokenization import ALBEFTokenizer
    torch.manual_seed(0)
    tok = ALBEFTokenizer(os.path.join(tiny_world, "vocab"))
    model = MODELS["retrieval"](tiny_config(use_momentum=False, distill=False)).eval()
    images = torch.randn(2, 3, 32, 32)
    texts = [["a red circle", "a blue circle"], ["a square", "two shapes"]]
    s = comp.albef_scores(model, images, texts, tok, torch.device("cpu"))
    t = tok(["a blue circle"], padding="longest", truncation=True, max_length=30)
    with torch.no_grad():
        emb, feat = model.encode_text(t["input_ids"], t["attention_mask"])
        iemb, ifeat = model.encode_image(images[:1])
        itm = model.itm_head(model.fuse(emb, t["attention_mask"], iemb))[0, 1].item()
    assert s["itc"][0, 1].item() == pytest.approx(float(ifeat[0] @ feat[0]), abs=1e-5)
    assert s["itm"][0, 1].item() == pytest.approx(itm, abs=1e-4)
    assert torch.allclose(s["sum"], s["itc"] + s["itm"])


def test_command_scores_a_pretraining_checkpoint_on_the_demo_set(tiny_world, tmp_path):
    """The demo world's SugarCrepe-format set, a pretraining checkpoint (text encoder under 'bert.'), and the
    results files; a checkpoint without the encoders is refused."""
    from test_engine import pretrain_checkpoint, write_config
    ckpt = pretrain_checkpoint(tiny_world, tmp_path)
    cfg = write_config(tiny_world, str(tmp_path / "c.yaml"))
    args = ["--config", cfg, "--checkpoint", ckpt, "--benchmark", "sugarcrepe", "--data",
            os.path.join(tiny_world, "compositional"), "--image_root", tiny_world, "--output_dir", str(tmp_path / "o"),
            "--device", "cpu"]
    metrics = comp.main(args)
    n = sum(len(json.load(open(os.path.join(tiny_world, "compositional", f))))
            for f in os.listdir(os.path.join(tiny_world, "compositional")))
    assert metrics["itc"]["cases"] == n and {"avg_replace", "avg_swap", "avg_add"} <= metrics["itm"].keys()
    rows = [json.loads(line) for line in open(tmp_path / "o" / "results.jsonl")]
    assert [r["split"] for r in rows] == ["sugarcrepe (itc)", "sugarcrepe (itm)", "sugarcrepe (sum)"]
    assert (tmp_path / "o" / "results.md").exists()
    torch.save({"model": {"temp": torch.tensor(0.07)}}, tmp_path / "empty.pth")
    with pytest.raises(comp.BenchmarkError, match="lacks"):
        comp.main(args[:2] + ["--checkpoint", str(tmp_path / "empty.pth")] + args[4:])
