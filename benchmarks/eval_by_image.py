"""Evaluation by distinct image against one pass per example, same model, same examples, same run.

    python benchmarks/eval_by_image.py                            # demo-size VE model, 48 px
    python benchmarks/eval_by_image.py --size base --images 4     # ViT-B/16 384 px + BERT-base

For ``--per_image`` examples per image (SNLI-VE test: about 18; RefCOCO+ testA 7.6; VQA val 5.3; and 1, where
grouping can only cost), the VE model predicts every example twice: once per example (the image through the
ViT and the fusion's keys and values for each example, the path before tasks/image_groups.py) and grouped
(each image once, its keys and values shared). Prints examples/s, the ratio and whether the predictions agree.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MODELS   # noqa: E402


def config(size):
    if size == "base":
        bert = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "fusion_layer": 6, "encoder_width": 768, "max_position_embeddings": 512}
        return {"image_res": 384, "patch_size": 16, "vision_width": 768, "vision_depth": 12, "vision_heads": 12,
                "embed_dim": 256, "bert_config": bert, "distill": False}
    bert = {"vocab_size": 128, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 512, "fusion_layer": 2, "encoder_width": 128, "max_position_embeddings": 64}
    return {"image_res": 48, "patch_size": 8, "vision_width": 128, "vision_depth": 4, "vision_heads": 4,
            "embed_dim": 64, "bert_config": bert, "distill": False}


def timed(fn, repeat):
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t) / repeat, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("demo", "base"), default="demo")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--per_image", type=int, nargs="+", default=[18, 8, 5, 1])
    p.add_argument("--batch", type=int, default=32, help="examples per batch (both paths)")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = config(a.size)
    model = MODELS["ve"](cfg).eval()
    res = cfg["image_res"]
    images = torch.randn(a.images, 3, res, res)
    print(f"VE model ({a.size}, {res} px), {a.images} images, batches of {a.batch} examples, "
          f"{torch.get_num_threads()} threads")
    for per in a.per_image:
        n = a.images * per
        rows = torch.arange(a.images).repeat_interleave(per)
        ids = torch.randint(1000 if a.size == "base" else 104, 30522 if a.size == "base" else 128, (n, 20))
        ids[:, 0] = 101
        mask = torch.ones_like(ids)

        @torch.no_grad()
        def per_example():
            return torch.cat([model.predict(images[rows[s:s + a.batch]], ids[s:s + a.batch], mask[s:s + a.batch])
                              for s in range(0, n, a.batch)])

        @torch.no_grad()
        def grouped():
            out, step = [], max(1, a.batch // per)   # whole groups per batch, about a.batch examples
            for g in range(0, a.images, step):
                sel = (rows >= g) & (rows < g + step)
                out.append(model.predict_grouped(images[g:g + step], rows[sel] - g, ids[sel], mask[sel]))
            return torch.cat(out)
        t_old, old = timed(per_example, a.repeat)
        t_new, new = timed(grouped, a.repeat)
        same = bool(torch.equal(old.argmax(1), new.argmax(1)))
        print(f"  {per:2d} examples per image: per example {n / t_old:8.1f} examples/s, grouped {n / t_new:8.1f} "
              f"({t_old / t_new:.2f}x); same predictions: {same}, max logit difference "
              f"{(old - new).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
