"""VQA: answer ranking batched over questions against one question at a time, and one training step.

    python benchmarks/vqa.py                                    # demo model, 200 questions, 23 answers
    python benchmarks/vqa.py --answers 3128 --k_test 128 --device cuda   # VQA v2's answer list size

Same model, same inputs: ``rank_answer`` over ``--batch`` questions at once against a loop over single
questions (checked equal), then samples/s of a VQA training step (momentum distillation on). Prints
questions/s of both, their ratio, and the step's samples/s.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import timed   # noqa: E402
from engine.config import load_config   # noqa: E402
from models.model_vqa import ALBEF   # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo/VQA.yaml")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--answers", type=int, default=23, help="answer-list size (VQA v2: 3,128)")
    ap.add_argument("--k_test", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="questions ranked at once")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    cfg = dict(load_config(a.config), text_encoder=None, text_decoder=None)
    torch.manual_seed(0)
    model = ALBEF(cfg).to(device).eval()
    vocab, res = model.bert_config.vocab_size, cfg["image_res"]
    g = torch.Generator().manual_seed(0)
    answers = torch.randint(5, vocab, (a.answers, 4), generator=g)
    answers[:, 0], answers[:, -1] = 2, 3
    a_ids, a_mask = answers.to(device), torch.ones_like(answers).to(device)
    q_ids = torch.randint(5, vocab, (a.questions, 8), generator=g)
    q_ids[:, 0] = 2
    q_ids, q_mask = q_ids.to(device), torch.ones_like(q_ids).to(device)
    images = torch.randn(a.questions, 3, res, res, generator=g).to(device)
    k = min(a.k_test, a.answers)

    def rank(bs):
        out = []
        with torch.no_grad():
            for s in range(0, a.questions, bs):
                ids, _ = model.answer(images[s:s + bs], q_ids[s:s + bs], q_mask[s:s + bs], a_ids, a_mask, k)
                out.append(ids[:, 0])
        return torch.cat(out)
    rank(a.batch)   # warm-up
    batched, t_b = timed(lambda: rank(a.batch), device)
    single, t_s = timed(lambda: rank(1), device)
    agree = (batched == single).float().mean().item()
    print(f"ranking {a.questions} questions over {a.answers} answers, k_test {k}, {device}")
    print(f"  batched ({a.batch} at once): {a.questions / t_b:9.1f} questions/s")
    print(f"  per question (reference):   {a.questions / t_s:9.1f} questions/s   ratio {t_s / t_b:.2f}x; "
          f"same prediction for {100 * agree:.1f}% of questions")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    bs, per = int(cfg.get("batch_size_train", 32)), 3
    kk = torch.full((bs,), per, dtype=torch.long, device=device)
    ans = a_ids[torch.randint(a.answers, (bs * per,), generator=g)]
    w = torch.full((bs * per,), 1.0 / per, device=device)

    def step():
        loss = model({"image": images[:bs], "question_ids": q_ids[:bs], "question_mask": q_mask[:bs],
                      "answer_ids": ans, "answer_mask": torch.ones_like(ans), "k": kk, "weights": w},
                     alpha=0.4)["loss_vqa"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    _, t = timed(lambda: [step() for _ in range(5)], device)
    print(f"training step (batch {bs}, {per} answers each, distill): {5 * bs / t:9.1f} samples/s")


if __name__ == "__main__":
    main()
