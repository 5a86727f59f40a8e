"""Bitwise fixtures of every preset: a refactor must change no number.

    python -m tools.fixtures record            # writes tests/fixtures/presets.json
    python -m tools.fixtures check [NAME ...]  # reruns and compares (tests/test_presets.py runs it)

Each preset is a short run of a launcher on a tiny generated world (CPU, one thread, seed 42): 2 epochs of a
few steps, with its evaluation. Recorded: every number of ``log.txt`` but timings (the epoch's losses with
``print_freq: 1`` average every step), a hash of the final weights, and a hash of the result files. The
comparison is exact when torch and the CPU are the recorded ones; elsewhere float rounding may differ, so
only the losses are compared, to a relative 1e-4.
"""
import argparse
import glob
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "presets.json")
TIMING = ("epoch_seconds", "samples_per_second", "seconds", "time")


def fingerprint():
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"torch": torch.__version__, "cpu": cpu}


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def world(root):
    """The tiny world, a random tiny pretraining checkpoint and MAFA's filter, once per directory."""
    from dataset.synthetic import build_world
    if os.path.isfile(os.path.join(root, "stats.json")):
        return root
    build_world(root, seed=1, n_train=48, n_val=16, n_test=16, size=32)
    ann = json.load(open(os.path.join(root, "pretrain.json")))
    for a in ann:   # ViCHA's concepts: the caption's words, a stable stand-in for tools/visual_concepts.py
        a["kwords"] = sorted({w for c in a["caption"] for w in c.split()})[:6]
    write(os.path.join(root, "pretrain_vc.json"), ann)
    return root


def base(w):
    return {
        "train_file": [os.path.join(w, "pretrain.json")], "image_root": w, "tokenizer": os.path.join(w, "vocab"),
        "bert_config": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "fusion_layer": 1, "encoder_width": 32,
                        "max_position_embeddings": 40},
        "image_res": 32, "patch_size": 8, "vision_width": 32, "vision_depth": 1, "vision_heads": 2, "embed_dim": 16,
        "batch_size": 8, "temp": 0.07, "mlm_probability": 0.15, "queue_size": 24, "momentum": 0.995, "alpha": 0.4,
        "num_workers": 0, "print_freq": 1, "ckpt_every_steps": 0, "tensorboard": False, "k_test": 4,
        "batch_size_test": 8,
        "optimizer": {"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02},
        "schedular": {"sched": "cosine", "lr": 1e-3, "epochs": 2, "min_lr": 1e-5, "decay_rate": 1, "warmup_lr": 1e-5,
                      "warmup_epochs": 1, "cooldown_epochs": 0, "warmup_block": 2},
    }


GRIT = dict(use_momentum=False, distill=False, itc_consistency_weight=0.2, itm_negative_selection="argmax",
            mlm_probability=0.5, grit={"collect_size": 48, "search_space": 16})


def presets(w, tmp):
    """name -> (launcher, config, extra arguments)."""
    b = base(w)
    pre = dict(b, test_file=os.path.join(w, "retrieval_test.json"))
    ckpt = os.path.join(tmp, "pretrain.pth")
    filt = {k: b[k] for k in ("bert_config", "image_res", "patch_size", "vision_width", "vision_depth",
                              "vision_heads", "embed_dim", "temp")}
    filt.update(use_momentum=False, distill=False)
    finetune = {k: v for k, v in b.items() if k not in ("train_file", "batch_size", "mlm_probability")}
    finetune["batch_size_train"] = 8

    def split(name, n, key):
        return write(os.path.join(tmp, f"{key}.json"), json.load(open(os.path.join(w, name)))[:n])

    return {
        "albef": ("Pretrain.py", pre, []),
        "albef_in_batch": ("Pretrain.py", dict(pre, use_momentum=False, distill=False), []),
        "grit": ("Pretrain.py", dict(pre, **GRIT), []),
        "mafa": ("Pretrain.py", dict(pre, **dict(GRIT, itc_consistency_weight=0.0, itc_label_smoothing=0.5, ecm={
            "filter_config": write(os.path.join(tmp, "filter.yaml"), filt),
            "filter_checkpoint": os.path.join(tmp, "filter.pth"), "low_threshold": 0.45, "high_threshold": 0.5})), []),
        "vicha": ("Pretrain.py", dict(pre, train_file=[os.path.join(w, "pretrain_vc.json")], kw_img_model=True,
                                      num_hidden_layers_kw=1, randkw_p=0.5, return_hidden_state=True,
                                      num_hidden_align=1, mae=True, mim_decoder_heads=2, test_file=None, vision_depth=2,
                                      bert_config=dict(b["bert_config"], num_hidden_layers=4, fusion_layer=2)), []),
        "ce_clip_losses": ("Pretrain.py", dict(pre, train_file=[os.path.join(w, "pretrain_hn.json")], hn_itc=True,
                                               cmr_weight=0.2, imc_weight=0.3, cmr_threshold="mean"), []),
        "text_assignment": ("Pretrain_nlvr.py", dict(b, max_steps=8), ["--checkpoint", ckpt]),
        "retrieval": ("Retrieval.py", dict(finetune, train_file=[split("retrieval_train.json", 64, "re_train")],
                                           val_file=os.path.join(w, "retrieval_val.json"),
                                           test_file=os.path.join(w, "retrieval_test.json")), ["--checkpoint", ckpt]),
        "vqa": ("VQA.py", dict(finetune, train_file=[split("vqa_train.json", 48, "vqa_train")],
                               test_file=split("vqa_test.json", 21, "vqa_test"),
                               answer_list=os.path.join(w, "answer_list.json"), vqa_root=w, vg_root=w),
                ["--checkpoint", ckpt]),
        "nlvr": ("NLVR.py", dict(finetune, train_file=split("nlvr_train.json", 32, "nlvr_train"),
                                 val_file=split("nlvr_val.json", 11, "nlvr_dev"),
                                 test_file=split("nlvr_test.json", 13, "nlvr_test")),
                 ["--checkpoint", os.path.join(tmp, "ta.pth")]),
        "ve": ("VE.py", dict(finetune, train_file=split("ve_train.json", 32, "ve_train"),
                             val_file=split("ve_val.json", 11, "ve_dev"), test_file=split("ve_test.json", 13, "ve_test"),
                             image_root=os.path.join(w, "images")), ["--checkpoint", ckpt]),
        "grounding": ("Grounding.py", dict(finetune, batch_size=8, train_file=split("refcoco+_train.json", 32, "g_train"),
                                           test_file=[split("refcoco+_val.json", 9, "g_val"),
                                                      split("refcoco+_test.json", 11, "g_test")],
                                           refcoco_data=w, det_file=os.path.join(w, "refcoco+", "dets.json"),
                                           grounding_pictures=0), ["--checkpoint", ckpt, "--block_num", "1"]),
    }


def checkpoints(w, tmp):
    """The random starting weights of the finetuning presets (seed 0), written once."""
    from models import MODELS
    if os.path.isfile(os.path.join(tmp, "ta.pth")):
        return
    b = base(w)
    torch.manual_seed(0)
    torch.save({"model": MODELS["pretrain"](b).state_dict()}, os.path.join(tmp, "pretrain.pth"))
    torch.manual_seed(0)
    torch.save({"model": MODELS["retrieval"](dict(b, use_momentum=False, distill=False)).state_dict()},
               os.path.join(tmp, "filter.pth"))
    torch.manual_seed(0)
    torch.save({"model": MODELS["pretrain_nlvr"](b).state_dict()}, os.path.join(tmp, "ta.pth"))


def tensor_hash(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        if torch.is_tensor(v):
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if v.numel() else b"")
    return h.hexdigest()[:16]


def numbers(record):
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and
            k not in TIMING and not k.endswith("_seconds")}


def run_preset(name, spec, tmp):
    launcher, cfg, extra = spec
    out = os.path.join(tmp, "out", name)
    config = write(os.path.join(tmp, f"{name}.yaml"), {k: v for k, v in cfg.items() if v is not None})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, launcher), "--config", config, "--output_dir", out,
                        "--device", "cpu", "--seed", "42", *extra], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"preset {name}: {launcher} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    log = [numbers(json.loads(line)) for line in open(os.path.join(out, "log.txt"))]
    latest = open(os.path.join(out, "latest")).read().strip()
    sd = torch.load(os.path.join(out, os.path.basename(latest)), map_location="cpu", weights_only=True)["model"]
    results = {}
    for path in sorted(glob.glob(os.path.join(out, "result", "*.json")) + glob.glob(os.path.join(out, "results.jsonl"))):
        text = open(path, "rb").read()
        if path.endswith("results.jsonl"):   # rows carry paths and times: keep their numbers
            text = json.dumps([numbers(json.loads(x)) for x in text.decode().splitlines()]).encode()
        results[os.path.relpath(path, out)] = hashlib.sha256(text).hexdigest()[:16]
    return {"log": log, "weights": tensor_hash(sd), "results": results}


def run_all(names=None, tmp=None, jobs=2):
    tmp = tmp or tempfile.mkdtemp(prefix="fixtures_")
    w = world(os.path.join(tmp, "world"))
    checkpoints(w, tmp)
    specs = presets(w, tmp)
    names = names or list(specs)
    with ThreadPoolExecutor(jobs) as pool:
        got = dict(zip(names, pool.map(lambda n: run_preset(n, specs[n], tmp), names)))
    return got


def compare(want, got, exact):
    """Differences as lines (empty: equal)."""
    bad = []
    for name, g in got.items():
        w = want["presets"].get(name)
        if w is None:
            bad.append(f"{name}: no fixture recorded")
            continue
        if len(w["log"]) != len(g["log"]):
            bad.append(f"{name}: {len(g['log'])} log records, recorded {len(w['log'])}")
        for i, (a, b) in enumerate(zip(w["log"], g["log"])):
            for k in sorted(set(a) | set(b)):
                x, y = a.get(k), b.get(k)
                same = x == y if exact or not k.startswith("train_loss") else (
                    x is not None and y is not None and abs(x - y) <= 1e-4 * max(abs(x), 1e-8))
                if not same and (exact or k.startswith("train_loss")):
                    bad.append(f"{name}: record {i} {k}: {y!r}, recorded {x!r}")
        if exact:
            if w["weights"] != g["weights"]:
                bad.append(f"{name}: final weights differ (hash {g['weights']}, recorded {w['weights']})")
            if w["results"] != g["results"]:
                bad.append(f"{name}: result files differ: {g['results']} vs recorded {w['results']}")
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("record", "check"))
    p.add_argument("names", nargs="*")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    got = run_all(args.names, jobs=args.jobs)
    if args.mode == "record":
        old = json.load(open(FIXTURES)) if os.path.isfile(FIXTURES) and args.names else {"presets": {}}
        old["presets"].update(got)
        old["environment"] = fingerprint()
        os.makedirs(os.path.dirname(FIXTURES), exist_ok=True)
        with open(FIXTURES, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)
        print(f"recorded {len(got)} presets in {FIXTURES}")
        return 0
    want = json.load(open(FIXTURES))
    exact = want["environment"] == fingerprint()
    bad = compare(want, got, exact)
    print(f"{len(got)} presets, {'bitwise' if exact else 'losses to 1e-4 (another torch or CPU)'}: "
          f"{'equal' if not bad else f'{len(bad)} differences'}")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
