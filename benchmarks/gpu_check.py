"""The device checks in one command: each stage timed and guarded (a failing stage is recorded, the rest run),
results in ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``. Every stage also runs on a CPU, tiny, so the
script is never broken when a GPU session comes.

    python benchmarks/gpu_check.py --out output/gpu_check                       # every stage, tiny on CPU
    python benchmarks/gpu_check.py --stages ecm_precision --filter_config configs/demo/Retrieval.yaml \\
        --filter_checkpoint output/demo_filter/checkpoint_best.pth --data data/demo/retrieval_train.json \\
        --image_root data/demo

Stages:
- ``environment``: torch / CUDA / NCCL versions, the device, its memory, bf16 support.
- ``ecm_precision``: MAFA's filter in bf16 against fp32 on the same candidate pairs (each anchor's hardest
  in-batch negative by the fp32 filter's ITC features): the largest change of P(match) and the share of ECM
  decisions (0.5 / 0.8) that differ. With a trained filter and its data (``--filter_config ...``), on them;
  otherwise on a randomly initialised filter of ``--ecm_size`` (demo or base) with random inputs, which
  measures the numerics only. On CPU bf16 runs where the CPU supports it.
"""
import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def environment(a, device):
    out = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(name=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1), bf16=torch.cuda.is_bf16_supported(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    else:
        out.update(name=platform.processor() or platform.machine())
    return out


def _random_filter(size, device):
    """A randomly initialised retrieval model as the filter (demo or base size) and a tokenizer-free input."""
    from models.objectives.ecm import ConnectionDiscriminator
    from models.model_retrieval import ALBEF
    bert = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "fusion_layer": 6, "encoder_width": 768, "max_position_embeddings": 512}
    cfg = {"image_res": 256, "patch_size": 16, "vision_width": 768, "vision_depth": 12, "vision_heads": 12,
           "embed_dim": 256, "bert_config": bert, "use_momentum": False, "distill": False}
    if size == "demo":
        bert.update(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    fusion_layer=1, encoder_width=32, max_position_embeddings=40)
        cfg.update(image_res=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, embed_dim=16)
    torch.manual_seed(0)
    model = ALBEF(cfg)
    # each precision its own copy: .to() casts the weights in place
    return (lambda precision: ConnectionDiscriminator(copy.deepcopy(model), precision=precision).to(device)), cfg


def _batches_random(cfg, n_batches, batch, device):
    g = torch.Generator().manual_seed(1)
    vocab = cfg["bert_config"]["vocab_size"]
    for _ in range(n_batches):
        image = torch.randn(batch, 3, cfg["image_res"], cfg["image_res"], generator=g)
        ids = torch.randint(104, vocab, (batch, 12), generator=g)
        ids[:, 0] = 101
        yield image.to(device), ids.to(device), torch.ones_like(ids).to(device)


def _batches_data(a, cfg, tok, n_batches, batch, device):
    from Get_ECM_example import Items
    from dataset.transforms import test_transform
    ds = Items(a.data, test_transform(cfg["image_res"]), a.image_root)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(ds), generator=g)
    for b in range(min(n_batches, len(ds) // batch)):
        items = [ds[int(i)] for i in order[b * batch:(b + 1) * batch]]
        text = tok([s["caption"] for s in items], padding="longest", truncation=True, max_length=30)
        yield (torch.stack([x["image"] for x in items]).to(device), text["input_ids"].to(device),
               text["attention_mask"].to(device))


@torch.no_grad()
def ecm_precision(a, device):
    from models.objectives.ecm import decide, hardest_two
    if a.filter_config:
        from engine.config import load_config
        from tasks.ecm_filter import build_discriminator
        from models.tokenization import ALBEFTokenizer
        cfg = load_config(a.filter_config)
        tok = ALBEFTokenizer(cfg.get("tokenizer") or cfg["text_encoder"])
        ecm = {"filter_config": a.filter_config, "filter_checkpoint": a.filter_checkpoint}
        make = lambda p: build_discriminator({**ecm, "filter_precision": p}, tok, device)   # noqa: E731
        batches = _batches_data(a, cfg, tok, a.ecm_batches, a.ecm_batch, device)
        source = f"trained filter {a.filter_checkpoint} on {a.data}"
    else:
        make, cfg = _random_filter(a.ecm_size, device)
        batches = _batches_random(cfg, a.ecm_batches, a.ecm_batch, device)
        source = f"randomly initialised {a.ecm_size}-size filter, random inputs (numerics only)"
    f32, f16 = make("fp32"), make("bf16")
    low, high = f32.low, f32.high
    pairs = flips = 0
    max_diff = 0.0
    for image, ids, att in batches:
        m = f32.model
        img_f = m.encode_image(image)[1]
        txt_f = m.encode_text(ids, att)[1]
        sim = img_f @ txt_f.t()
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        n1, _, _ = hardest_two(sim, eye)       # image k -> text
        m1, _, _ = hardest_two(sim.t(), eye)   # text k -> image
        rows = torch.arange(len(sim), device=sim.device)
        text_idx, image_idx = torch.cat([rows, n1]), torch.cat([m1, rows])
        p32 = f32.match_prob(image, ids, att, text_idx, image_idx)
        p16 = f16.match_prob(image, ids, att, text_idx, image_idx)
        pairs += len(p32)
        flips += int((decide(p32, low, high) != decide(p16, low, high)).sum())
        max_diff = max(max_diff, float((p32 - p16).abs().max()))
    share = flips / max(pairs, 1)
    return {"source": source, "pairs": pairs, "max_abs_p_change": round(max_diff, 5), "decisions_differing": flips,
            "share_differing": round(share, 5), "thresholds": [low, high],
            "verdict": "bf16 default holds (<= 0.5% of decisions differ)" if share <= 0.005 else
            "more than 0.5% of decisions differ: make fp32 the filter's default"}


STAGES = {"environment": environment, "ecm_precision": ecm_precision}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="output/gpu_check")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {list(STAGES)}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--filter_config", default="")
    ap.add_argument("--filter_checkpoint", default="")
    ap.add_argument("--data", default="", help="ALBEF retrieval-train JSON for the ECM candidates")
    ap.add_argument("--image_root", default="")
    ap.add_argument("--ecm_size", default="demo", choices=("demo", "base"))
    ap.add_argument("--ecm_batches", type=int, default=8)
    ap.add_argument("--ecm_batch", type=int, default=32)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for name in [s for s in a.stages.split(",") if s]:
        t0 = time.time()
        try:
            results[name] = {"ok": True, **STAGES[name](a, device)}
        except Exception as e:   # noqa: BLE001 - one failing stage must not stop the others
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "traceback"}}), flush=True)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| stage | ok | seconds | result |", "|---|---|---|---|"]
    for name, r in results.items():
        shown = r.get("error") or ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("ok", "seconds", "traceback"))
        lines.append(f"| {name} | {r['ok']} | {r['seconds']} | {shown} |")
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
