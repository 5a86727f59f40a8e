"""Retrieval evaluation: the fast procedure against ALBEF's per-query loop, same model, data and k_test.

    python benchmarks/retrieval_eval.py                     # 1,000 demo images, 5,000 captions, k_test 256
    python benchmarks/retrieval_eval.py --checkpoint output/demo/checkpoint_best.pth --config configs/demo/Retrieval.yaml
    python benchmarks/retrieval_eval.py --shape albef --ref_queries 20   # ALBEF's token and layer counts

Generates a demo-world test split of ``--images`` images (5 captions each) in a temporary folder, encodes
it once, then times only the ITM re-scoring (the part that differs): ``score_matrices`` against
``reference_scores``. Prints both times, the ratio, the largest score difference and both metric sets.

The per-query loop costs the same for every query (k pairs padded to 30 tokens), so ``--ref_queries N``
times it on N random image queries and 5N text queries, scales the time to all queries and checks those
rows against the fast scores; 0 (the default) runs it on every query.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import timed   # noqa: E402
from dataset import create_dataset   # noqa: E402
from dataset.synthetic import build_world   # noqa: E402
from engine.config import load_config   # noqa: E402
from tasks.retrieval import encode_images, encode_texts, itm_eval, reference_scores, score_matrices   # noqa: E402
from models.checkpoint import load_checkpoint, strip_bert   # noqa: E402
from models.model_retrieval import ALBEF   # noqa: E402
from models.xbert import BertConfig   # noqa: E402
from models.tokenization import ALBEFTokenizer   # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo/Retrieval.yaml")
    ap.add_argument("--checkpoint", default="", help="weights to load (random init if empty)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--k_test", type=int, default=256, help="256 as in Retrieval_coco.yaml")
    ap.add_argument("--pair_batch", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--ref_queries", type=int, default=0, help="time the reference on a sample (see above)")
    ap.add_argument("--shape", default="demo", choices=["demo", "albef"],
                    help="albef: the demo widths with ALBEF's retrieval geometry (384 px / 16 px patches = "
                         "577 image tokens, 12 BERT layers of which 6 fuse)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as world:
        build_world(world, seed=7, n_train=0, n_val=0, n_test=a.images, size=96)
        cfg = load_config(a.config)
        cfg.update(test_file=os.path.join(world, "retrieval_test.json"), image_root=world,
                   tokenizer=os.path.join(world, "vocab"))
        if a.shape == "albef":
            bert = BertConfig.from_config(cfg["bert_config"]).to_dict()
            bert.update(num_hidden_layers=12, fusion_layer=6)
            cfg.update(image_res=384, patch_size=16, bert_config=bert)
        tok = ALBEFTokenizer(cfg["tokenizer"])
        model = ALBEF(cfg, tok)
        if a.checkpoint:
            load_checkpoint(model, a.checkpoint, remap=strip_bert, verbose=False)
        model.to(dev).eval()
        ds = create_dataset("re_test", cfg)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
        with torch.no_grad(), ctx:
            atts, txt_states, txt_feats = encode_texts(model, tok, ds.text, dev)
            img_states, img_atts, img_feats, _ = encode_images(model, ds, dev, num_workers=2, tokenizer=tok)
            sims = img_feats.float() @ txt_feats.float().t()
            print(f"{len(ds)} images, {len(ds.text)} captions, k_test {a.k_test}, {a.device} {a.dtype}, "
                  f"{torch.get_num_threads()} threads")

            (i2t, t2i), t_fast = timed(lambda: score_matrices(model, sims, img_states, txt_states, atts, a.k_test,
                                                              a.pair_batch, image_atts=img_atts), dev)
            print(f"fast     {t_fast:8.1f} s", flush=True)
            ni, nt = sims.shape
            g = torch.Generator().manual_seed(0)
            rows_i = torch.randperm(ni, generator=g)[:a.ref_queries].tolist() if a.ref_queries else list(range(ni))
            rows_t = torch.randperm(nt, generator=g)[:5 * a.ref_queries].tolist() if a.ref_queries else list(range(nt))
            (r_i2t, r_t2i), t_ref = timed(lambda: reference_scores(model, sims, img_states, txt_states, atts,
                                                                   a.k_test, rows_i, rows_t, img_atts), dev)
            t_ref *= (ni + nt) / (len(rows_i) + len(rows_t))
            note = (f"  (timed on {len(rows_i)} image + {len(rows_t)} text queries of {ni} + {nt}, scaled)"
                    if a.ref_queries else "")
            print(f"per-query reference {t_ref:8.1f} s{note}")
    diff = max((i2t[rows_i] - r_i2t[rows_i]).abs().max().item(), (t2i[rows_t] - r_t2i[rows_t]).abs().max().item())
    m_fast = itm_eval(i2t.cpu().numpy(), t2i.cpu().numpy(), ds.txt2img, ds.img2txt)
    print(f"speed-up {t_ref / t_fast:.1f}x   max |score difference| on the reference rows {diff:.2e}")
    print("fast     ", {k: round(v, 2) for k, v in m_fast.items()})
    if not a.ref_queries:
        m_ref = itm_eval(r_i2t.cpu().numpy(), r_t2i.cpu().numpy(), ds.txt2img, ds.img2txt)
        print("reference", {k: round(v, 2) for k, v in m_ref.items()}, "identical:", m_fast == m_ref)


if __name__ == "__main__":
    main()
