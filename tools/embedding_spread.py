"""Diagnose a pretraining checkpoint: ITC-only zero-shot retrieval and the spread of the features.

    python tools/embedding_spread.py --config configs/demo/Pretrain.yaml --checkpoint output/demo/checkpoint_09.pth

A spread near 0 across captions (or images) means the features collapsed and every ranking ties.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import create_dataset   # noqa: E402
from engine.config import load_config   # noqa: E402
from tasks.retrieval import encode_images, encode_texts, itm_eval   # noqa: E402
from models.checkpoint import load_checkpoint   # noqa: E402
from models.model_pretrain import ALBEF   # noqa: E402
from models.tokenization import ALBEFTokenizer   # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    a = ap.parse_args()
    cfg = load_config(a.config)
    tok = ALBEFTokenizer(cfg.get("tokenizer") or cfg["text_encoder"])
    model = ALBEF(cfg, tok)
    load_checkpoint(model, a.checkpoint, strict=True, verbose=False)
    model.eval()
    ds = create_dataset("re_test", cfg)
    dev = torch.device("cpu")
    with torch.no_grad():
        _, _, text_emb = encode_texts(model, tok, ds.text, dev)
        _, _, image_emb, _ = encode_images(model, ds, dev, num_workers=0, tokenizer=tok)
    sims = (image_emb @ text_emb.t()).numpy()
    print("ITC-only", {k: round(v, 2) for k, v in itm_eval(sims, sims.T, ds.txt2img, ds.img2txt).items()})
    print(f"feature std across images {image_emb.std(0).mean():.4f}, across captions {text_emb.std(0).mean():.4f}, "
          f"temp {model.temp.item():.4f}")


if __name__ == "__main__":
    main()
