"""Time one finetuning step (forward + backward + AdamW) of NLVR2 and SNLI-VE beside retrieval's at the same batch.

    python benchmarks/cls_step.py                      # ViT-B/16 + BERT-base at 384 px (ALBEF's), batch 2
    python benchmarks/cls_step.py --size demo --batch 32

All three models distil from momentum copies as ALBEF's configs do. NLVR2 reads two images per example through
18 text layers (6 + 2 x 6 fusion layers); SNLI-VE is one image through 12; retrieval adds ITC against the queue
and three ITM passes (one positive, two negatives per example). Figures are samples/s and the step time as a
ratio to retrieval's, measured in the same run.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_step_time   # noqa: E402
from engine.config import load_config   # noqa: E402
from models.batch import as_batch   # noqa: E402
from models import MODELS   # noqa: E402
from optim import create_optimizer   # noqa: E402


def config_for(size, res):
    if size == "base":
        return {"image_res": res, "vision_width": 768, "embed_dim": 256, "temp": 0.07, "queue_size": 57600,
                "momentum": 0.995, "alpha": 0.4, "distill": True, "bert_config": "configs/config_bert.json"}
    cfg = load_config("configs/demo/NLVR.yaml")
    keep = ("image_res", "patch_size", "vision_width", "vision_depth", "vision_heads", "bert_config")
    return {**{k: cfg[k] for k in keep}, "embed_dim": 64, "queue_size": 256, "momentum": 0.99, "alpha": 0.4,
            "distill": True, "temp": 0.07}


def measure(task, cfg, batch, device, precision, steps, warmup):
    torch.manual_seed(0)
    model = MODELS[task](cfg).to(device).train()
    opt = create_optimizer({"opt": "adamW", "lr": 2e-5, "weight_decay": 0.02}, model)
    vocab = model.bert_config.vocab_size
    n_img = 2 if task == "nlvr" else 1
    image = torch.randn(n_img * batch, 3, cfg["image_res"], cfg["image_res"], device=device)
    ids = torch.randint(1000 % vocab, vocab, (batch, 30), device=device)
    ids[:, 0] = 101 % vocab
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    targets = torch.randint(0, 2, (batch,), device=device)
    idx = torch.arange(batch, device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else (
        lambda: torch.autocast(device.type, enabled=False))
    def step():
        with ctx():
            if task == "retrieval":
                out = model(as_batch(image, text, idx=idx), alpha=0.4)
                loss = sum(v for k, v in out.items() if k.startswith("loss"))
            else:
                loss = model(as_batch(image, text, targets=targets), alpha=0.4)["loss_cls"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch / median_step_time(step, steps, warmup, device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["base", "demo"], default="base")
    p.add_argument("--res", type=int, default=384)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    prec = "bf16" if device.type == "cuda" else "fp32"
    cfg = config_for(a.size, a.res)
    cfg["queue_size"] -= cfg["queue_size"] % a.batch
    print(f"finetuning step, size={a.size}, {cfg['image_res']} px, batch={a.batch}, device={device}, {prec}, "
          f"torch {torch.__version__}")
    base = measure("retrieval", cfg, a.batch, device, prec, a.steps, a.warmup)
    print(f"{'retrieval (baseline)':22s} {base:8.2f} samples/s")
    for task, name in (("nlvr", "NLVR2 (2 images)"), ("ve", "SNLI-VE")):
        sps = measure(task, cfg, a.batch, device, prec, a.steps, a.warmup)
        print(f"{name:22s} {sps:8.2f} samples/s   step time {base / sps:.2f}x retrieval's")


if __name__ == "__main__":
    main()
