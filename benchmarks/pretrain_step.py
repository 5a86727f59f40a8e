"""Time one ALBEF pretraining step (forward + backward + AdamW) and print samples/s and peak memory.

    python benchmarks/pretrain_step.py --size base --batch 4            # ViT-B/16 + BERT-base, 256 px
    python benchmarks/pretrain_step.py --size demo --batch 32           # the demo model
    python benchmarks/pretrain_step.py --compare mafa --size base --batch 4

Variants measured in the same run: the default (SDPA attention, bf16 autocast on CUDA) against eager
attention in fp32, the originals' setting. Figures are printed as ratios to that baseline.
``--compare mafa``: MAFA's step (GRIT's plus the frozen filter's ECM pass) against GRIT's, same batch, at
both ends of the connection count (each connection adds a pair to MAFA's MLM batch): none, and all 2B.
``--compare modes``: today's path, the exact savings, + compile, + bf16 and + bf16 + compile (CUDA), gradient
checkpointing (memory), each in its own process (its own peak memory), with FLOPs, TFLOP/s and MFU.
``--compare ce``: CE-CLIP's losses (ITC-hn, then + CMR + IMC; four negative captions per sample through the
text encoder) against plain ALBEF, same batch.
``--compare vicha``: ALBEF + H-ITC, + visual concepts (8 concept tokens: ViCHA draws 4 words), + MIM, + all
three against plain ALBEF, same batch.
"""
import argparse
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import median_step_time   # noqa: E402
from engine.config import load_config   # noqa: E402
from models.batch import as_batch   # noqa: E402
from models.objectives.ecm import ConnectionDiscriminator   # noqa: E402
from models.model_pretrain import ALBEF   # noqa: E402
from models.model_retrieval import ALBEF as RetrievalModel   # noqa: E402
from optim import create_optimizer   # noqa: E402


def config_for(size):
    if size == "base":
        return {"image_res": 256, "vision_width": 768, "embed_dim": 256, "temp": 0.07, "queue_size": 65536,
                "momentum": 0.995, "alpha": 0.4, "mlm_probability": 0.15, "bert_config": "configs/config_bert.json"}
    cfg = load_config("configs/demo/Pretrain.yaml")
    geometry = {k: cfg[k] for k in ("image_res", "patch_size", "vision_width", "vision_depth", "vision_heads",
                                    "embed_dim", "temp", "mlm_probability", "bert_config")}
    return {**geometry, "queue_size": 256, "momentum": 0.99, "alpha": 0.4}   # ALBEF's recipe at demo size


GRIT = {"use_momentum": False, "distill": False, "itc_consistency_weight": 0.2, "itm_negative_selection": "argmax",
        "mlm_probability": 0.5}


def make_step(cfg, batch, device, attn, precision, with_filter=None, savings=True, compile_backend=None):
    """(step(), the eager model): one forward + backward + AdamW step on fixed random inputs."""
    torch.manual_seed(0)
    model = ALBEF({**cfg, "attn_implementation": attn}).to(device).train()
    model.exact_savings = savings
    if with_filter:   # a frozen retrieval model of the same size; with_filter: (low, high) thresholds
        filt = RetrievalModel({**cfg, "attn_implementation": attn, "use_momentum": False, "distill": False})
        model.set_discriminator(ConnectionDiscriminator(filt, *with_filter).to(device))
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    vocab = model.bert_config.vocab_size
    image = torch.randn(batch, 3, cfg["image_res"], cfg["image_res"], device=device)
    ids = torch.randint(1000 % vocab, vocab, (batch, 25), device=device)
    ids[:, 0] = 101 % vocab
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    concepts = None
    if cfg.get("kw_img_model"):
        kw = ids[:, :8].clone()
        concepts = (kw, torch.ones_like(kw))
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else (
        lambda: torch.autocast(device.type, enabled=False))
    alpha = torch.tensor(0.4)   # a tensor, as the engine passes it
    hn = None
    if model.hn is not None:   # CE-CLIP: four negative captions per sample, all valid
        hn_ids = torch.randint(1000 % vocab, vocab, (4 * batch, 25), device=device)
        hn_ids[:, 0] = 101 % vocab
        hn = (hn_ids, torch.ones_like(hn_ids), torch.ones(batch, 4, dtype=torch.bool, device=device))

    def step(m=run):
        with ctx():
            out = m(as_batch(image, text, concepts=concepts, hard_negatives=hn), alpha=alpha)
            loss = sum(v for k, v in out.items() if k.startswith("loss"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out
    return step, model


def count_flops(step, model, batch):
    """FLOPs of one step per sample (torch.utils.flop_counter), on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step(model)
    return fc.get_total_flops() / batch


def measure(cfg, batch, device, attn, precision, steps, warmup, with_filter=None, counts=None, savings=True,
            flops=None, compile_backend=None):
    """(samples/s, peak memory GiB); with ``flops`` (a list) also appends the FLOPs of one step per sample
    (counted on the eager model)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, model = make_step(cfg, batch, device, attn, precision, with_filter, savings, compile_backend)

    def count(out):
        if counts is not None:
            for k, v in out.items():
                if k.startswith("count_"):
                    counts.setdefault(k[len("count_"):], []).append(int(v))
    sec = median_step_time(step, steps, warmup, device, after=count)
    if flops is not None:   # counted on one more step, outside the timing
        flops.append(count_flops(step, model, batch))
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return batch / sec, peak


PEAK_TFLOPS = {"A100": {"fp32": 19.5, "bf16": 312.0}, "H100": {"fp32": 67.0, "bf16": 989.0},
               "H200": {"fp32": 67.0, "bf16": 989.0}}   # dense, SXM


def peak_tflops(a, device, precision):
    if a.peak_tflops:
        return a.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS.items():
            if key in name:
                return peaks[precision]
    return None


def compare_savings(a, cfg, device):
    """Today's plain step against the exact savings (shared image K/V, MLM heads at masked positions), with
    the FLOPs per sample from torch.utils.flop_counter, achieved TFLOP/s and MFU where a peak is known. Both
    models live in this process and their steps alternate, so drift in the machine's speed hits both."""
    from benchmarks.timing import timed
    prec = "bf16" if device.type == "cuda" else "fp32"
    print(f"ALBEF pretraining step, size={a.size}, batch={a.batch}, device={device}, {prec}, torch {torch.__version__}"
          f", {a.steps} alternating timed steps each")
    names = ("plain (the path before the savings)", "exact savings (default)")
    steps = [make_step(cfg, a.batch, device, "sdpa", prec, savings=sv) for sv in (False, True)]
    times = [[], []]
    for r in range(a.warmup + a.steps):
        for k, (step, _) in enumerate(steps if r % 2 == 0 else steps[::-1]):
            k = k if r % 2 == 0 else 1 - k
            _, sec = timed(step, device)
            if r >= a.warmup:
                times[k].append(sec)
    base = None
    for name, (step, model), t in zip(names, steps, times):
        sps = a.batch / sorted(t)[len(t) // 2]
        flops = count_flops(step, model, a.batch)
        base = base or sps
        achieved = flops * sps / 1e12
        pk = peak_tflops(a, device, prec)
        mfu = f"  MFU {100 * achieved / pk:.1f}% of {pk:g}" if pk else ""
        print(f"{name:38s} {sps:8.3f} samples/s  {sps / base:5.3f}x  {flops / 1e9:7.1f} GFLOP/sample  "
              f"{achieved:6.3f} TFLOP/s{mfu}")


MODES = {   # name: (savings, compile, bf16, gradient checkpointing)
    "plain": (False, False, False, False), "savings": (True, False, False, False),
    "savings+compile": (True, True, False, False), "savings+bf16": (True, False, True, False),
    "savings+bf16+compile": (True, True, True, False), "grad_ckpt": (False, False, False, True),
    "grad_ckpt+bf16": (False, False, True, True)}
MODE_NAMES = {"plain": "today's path before the savings", "savings": "exact savings (default)",
              "savings+compile": "+ torch.compile", "savings+bf16": "+ bf16 autocast",
              "savings+bf16+compile": "+ bf16 + torch.compile", "grad_ckpt": "gradient checkpointing",
              "grad_ckpt+bf16": "gradient checkpointing + bf16"}


def one_mode(a, cfg, device):
    """One mode in this process (its own peak memory, no compiled frames of another mode): a JSON line."""
    import json
    import time
    savings, comp, bf16, ckpt = MODES[a.mode]
    flops = []
    t0 = time.perf_counter()
    sps, peak = measure({**cfg, "grad_checkpointing": ckpt}, a.batch, device, "sdpa", "bf16" if bf16 else "fp32",
                        a.steps, a.warmup, savings=savings and not ckpt, flops=flops,
                        compile_backend=a.compile_backend if comp else None)
    print(json.dumps({"mode": a.mode, "samples_per_s": sps, "peak_gib": peak, "flops": flops[0],
                      "seconds": time.perf_counter() - t0}))


def compare_modes(a, device):
    """Each mode in its own process, side by side: samples/s against the first mode, peak memory, FLOPs per
    sample, achieved TFLOP/s (the exact-savings step's FLOPs: the work the step needs; checkpointing's
    recomputation and the plain path's extra work count as overhead) and MFU where a peak is known."""
    import json
    import subprocess
    modes = [m for m in a.modes.split(",") if device.type == "cuda" or "bf16" not in m]
    mem = "peak GPU memory" if device.type == "cuda" else "peak process RSS"
    print(f"ALBEF pretraining step, size={a.size}, batch={a.batch}, device={device}, torch {torch.__version__}, "
          f"compile backend {a.compile_backend}" + ("" if device.type == "cuda" else " (bf16 modes: CUDA only)"))
    rows = {}
    for m in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", m, "--size", a.size, "--batch", str(a.batch),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device,
               "--compile_backend", a.compile_backend]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{MODE_NAMES[m]:34s} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
            continue
        rows[m] = json.loads(r.stdout.strip().splitlines()[-1])
        base, row = next(iter(rows.values())), rows[m]   # the first mode that ran
        useful = rows.get("savings", row)["flops"]
        achieved = useful * row["samples_per_s"] / 1e12
        pk = peak_tflops(a, device, "bf16" if "bf16" in m else "fp32")
        mfu = f"  MFU {100 * achieved / pk:5.1f}% of {pk:g}" if pk else ""
        print(f"{MODE_NAMES[m]:34s} {row['samples_per_s']:8.2f} samples/s {row['samples_per_s'] / base['samples_per_s']:6.3f}x"
              f"  {mem} {row['peak_gib']:6.2f} GiB  {row['flops'] / 1e9:7.1f} GFLOP/sample counted  "
              f"{achieved:7.3f} TFLOP/s{mfu}  ({row['seconds']:.0f} s with compilation)", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["base", "demo"], default="base")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compare", choices=["precision", "mafa", "vicha", "savings", "modes", "ce"], default="precision")
    p.add_argument("--modes", default=",".join(MODES), help=f"--compare modes: which, of {','.join(MODES)}")
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)   # one mode, run by --compare modes
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: known CUDA GPUs, none on CPU)")
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = config_for(a.size)
    if a.mode:
        one_mode(a, cfg, device)
        return
    if a.compare == "modes":
        compare_modes(a, device)
        return
    if a.compare == "savings":
        compare_savings(a, cfg, device)
        return
    if a.compare == "vicha":
        prec = "bf16" if device.type == "cuda" else "fp32"
        n = 5 if a.size == "base" else 1   # the demo BERT has 2 text layers
        hitc = {"return_hidden_state": True, "num_hidden_align": n, "ita_hidden_weight": 0.1}
        mae = {"mae": True, "mask_ratio": 0.75, "mim_decoder_heads": 16 if a.size == "base" else 4}
        print(f"ViCHA components, size={a.size}, batch={a.batch}, device={device}, {prec}")
        base = None
        vcs = {"kw_img_model": True, "num_hidden_layers_kw": 2}
        for name, extra in (("ALBEF", {}), ("+ H-ITC", hitc), ("+ concepts", vcs), ("+ MIM", mae),
                            ("+ all three", {**hitc, **vcs, **mae})):
            sps, _ = measure({**cfg, **extra}, a.batch, device, "sdpa", prec, a.steps, a.warmup)
            base = base or sps
            print(f"{name:16s} {sps:8.2f} samples/s   step time {base / sps:.2f}x ALBEF's")
        return
    if a.compare == "ce":
        prec = "bf16" if device.type == "cuda" else "fp32"
        print(f"CE-CLIP losses, size={a.size}, batch={a.batch}, device={device}, {prec}")
        base = None
        for name, extra in (("ALBEF", {}), ("+ ITC-hn", {"hn_itc": True}),
                            ("+ ITC-hn + CMR + IMC", {"hn_itc": True, "cmr_weight": 0.2, "imc_weight": 0.3})):
            sps, _ = measure({**cfg, **extra}, a.batch, device, "sdpa", prec, a.steps, a.warmup)
            base = base or sps
            print(f"{name:22s} {sps:8.2f} samples/s   step time {base / sps:.2f}x ALBEF's")
        return
    if a.compare == "mafa":
        prec = "bf16" if device.type == "cuda" else "fp32"
        print(f"GRIT vs MAFA pretraining step, size={a.size}, batch={a.batch}, device={device}, {prec}")
        grit, _ = measure({**cfg, **GRIT}, a.batch, device, "sdpa", prec, a.steps, a.warmup)
        print(f"GRIT {grit:8.2f} samples/s")
        # each connection adds one pair to MAFA's MLM batch: time the two ends, none and every candidate
        for name, thresholds in (("no connections", (1.0, 1.0)), ("all connected", (0.0, 0.0))):
            counts = {}
            mafa, _ = measure({**cfg, **GRIT, "itc_consistency_weight": 0.0, "itc_label_smoothing": 0.5}, a.batch,
                              device, "sdpa", prec, a.steps, a.warmup, with_filter=thresholds, counts=counts)
            conn = sum(counts["ecm_connections"]) / len(counts["ecm_connections"])
            print(f"MAFA {mafa:8.2f} samples/s   step time {grit / mafa:.2f}x GRIT's   "
                  f"({name}: {conn:.0f} of {2 * a.batch} candidates per step)")
        return
    runs = [("baseline: eager attention, fp32", "eager", "fp32"), ("SDPA, fp32", "sdpa", "fp32")]
    if device.type == "cuda":
        runs.append(("SDPA, bf16 autocast (default on CUDA)", "sdpa", "bf16"))
    print(f"ALBEF pretraining step, size={a.size}, batch={a.batch}, device={device}, torch {torch.__version__}")
    base = None
    for name, attn, prec in runs:
        sps, peak = measure(cfg, a.batch, device, attn, prec, a.steps, a.warmup)
        base = base or sps
        mem = "peak GPU memory" if device.type == "cuda" else "peak process RSS"
        print(f"{name:40s} {sps:8.2f} samples/s  {sps / base:5.2f}x baseline  {mem} {peak:.2f} GiB")


if __name__ == "__main__":
    main()
