"""Grad-CAM throughput: expressions/s batched (one forward and one backward per batch) against one expression
at a time (ALBEF's loop), same model, same inputs; the maps are compared too.

    python benchmarks/grounding.py                       # the demo model, 256 expressions
    python benchmarks/grounding.py --size base --expressions 16 --batch 8    # ViT-B/16 + BERT-base, 384 px
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import timed   # noqa: E402
from engine.config import load_config   # noqa: E402
from tasks.grounding import gradcam   # noqa: E402
from models.model_retrieval import ALBEF   # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["demo", "base"], default="demo")
    p.add_argument("--expressions", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mode", choices=["itm", "itc"], default="itm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    if a.size == "base":
        cfg = {"image_res": 384, "vision_width": 768, "embed_dim": 256, "queue_size": 64, "use_momentum": False,
               "distill": False, "bert_config": "configs/config_bert.json"}
        block = 8
    else:
        c = load_config("configs/demo/Grounding.yaml")
        cfg = {k: c[k] for k in ("image_res", "patch_size", "vision_width", "vision_depth", "vision_heads",
                                 "embed_dim", "bert_config")}
        cfg.update(use_momentum=False, distill=False)
        block = 3
    torch.manual_seed(0)
    model = ALBEF(cfg).to(dev).eval()
    grid = cfg["image_res"] // cfg.get("patch_size", 16)
    n, res = a.expressions, cfg["image_res"]
    images = torch.randn(n, 3, res, res, device=dev)
    vocab = model.bert_config.vocab_size
    ids = torch.randint(1000 % vocab, vocab, (n, 12), device=dev)
    ids[:, 0] = 101 % vocab
    mask = torch.ones_like(ids)

    def run(bs):
        return torch.cat([gradcam(model, images[s:s + bs], ids[s:s + bs], mask[s:s + bs], a.mode, block, grid)
                          for s in range(0, n, bs)])
    run(a.batch)   # warm-up
    batched, t_b = timed(lambda: run(a.batch), dev)
    single, t_s = timed(lambda: run(1), dev)
    err = (batched - single).abs().max().item() / max(single.abs().max().item(), 1e-12)
    print(f"Grad-CAM ({a.mode}, layer {block}), size={a.size}, {n} expressions, {dev}")
    print(f"  batched ({a.batch} at once): {n / t_b:8.1f} expressions/s")
    print(f"  one at a time (ALBEF):     {n / t_s:8.1f} expressions/s   ratio {t_s / t_b:.2f}x; "
          f"max relative map difference {err:.1e}")


if __name__ == "__main__":
    main()
