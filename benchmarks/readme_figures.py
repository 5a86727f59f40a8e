"""Every figure the README quotes from the demo world, produced by running its commands in README order.

    python benchmarks/readme_figures.py                       # all steps, seed 42 (about 70 minutes on 2 cores)
    python benchmarks/readme_figures.py --seeds 42 1 2        # the plain demo's range over seeds as well
    python benchmarks/readme_figures.py --only pretrain grounding   # these again; the other rows are kept
    python benchmarks/readme_figures.py --reread              # the figures again from an earlier run's files

Each step runs one README command (CPU, into ``--out``), reads its figure from the files the command writes
(``results.jsonl``, ``log.txt``, JSON it prints) and its wall time; the table at the end is what the README
quotes, also written to ``<out>/figures.json`` and ``figures.md``. A step whose inputs are missing is skipped
with the reason; a failing command is reported and the others still run.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def last_row(out, split, selected=False):
    """The last row of a split; with selected, the val row of the epoch the test row names."""
    rows = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    if selected:
        epoch = [r for r in rows if r.get("split") == "test"][-1]["epoch"]
        return [r for r in rows if r.get("split") == split and r.get("epoch") == epoch][-1]
    return [r for r in rows if r.get("split") == split][-1]


def classification(out, classes):
    """Test accuracy with its per-class accuracies, and val accuracy at the selected epoch."""
    test = last_row(out, "test")
    return {"test": test["accuracy"], **{k: test[f"acc_{k}"] for k in classes}, "epoch": test["epoch"],
            "val": last_row(out, "val", selected=True)["accuracy"]}


def log(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.txt"))]


def json_out(stdout):
    """The last JSON object a command printed (possibly over several lines)."""
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1:] if start >= 0 else stdout[stdout.find("{"):])


def steps(o, seed):
    """(name, command, figures(out dir, stdout) -> dict, needs) in README order."""
    demo = f"{o}/demo_s{seed}"
    ck = f"{demo}/checkpoint_09.pth"
    cpu = ["--device", "cpu", "--seed", str(seed)]
    r = lambda *a: [PY, *a]   # noqa: E731
    return [
        ("pretrain", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", demo, *cpu),
         lambda out, _: {**{k: last_row(demo, "test (zero-shot)")[k] for k in ("r_mean", "txt_r1", "img_r1")},
                         "hard_neg_sim_epoch3": log(demo)[3]["train_hard_neg_sim"]}, []),
        ("retrieval", r("Retrieval.py", "--config", "configs/demo/Retrieval.yaml", "--checkpoint", ck, "--output_dir",
                        f"{o}/retrieval", *cpu),
         lambda out, _: {k: last_row(f"{o}/retrieval", "test")[k] for k in ("r_mean", "txt_r1", "img_r1")}, [ck]),
        ("vqa", r("VQA.py", "--config", "configs/demo/VQA.yaml", "--checkpoint", ck, "--output_dir", f"{o}/vqa", *cpu),
         lambda out, _: {k[5:]: v for k, v in log(f"{o}/vqa")[-1].items() if k.startswith("test_accuracy")}, [ck]),
        ("vqa_5_epochs", r("VQA.py", "--config", "configs/demo/VQA.yaml", "--checkpoint", ck, "--output_dir",
                           f"{o}/vqa_5", *cpu, "--opts", "schedular.epochs=5"),
         lambda out, _: {"accuracy": log(f"{o}/vqa_5")[-1]["test_accuracy"]}, [ck]),
        ("vqa_baselines", r("-m", "tasks.vqa", "--config", "configs/demo/VQA.yaml"),
         lambda out, s: {k: json_out(s)[k]["accuracy"] for k in ("majority", "question_prior")}, []),
        ("text_assignment", r("Pretrain_nlvr.py", "--config", "configs/demo/NLVR_pretrain.yaml", "--checkpoint", ck,
                              "--output_dir", f"{o}/ta", *cpu),
         lambda out, _: {"loss_ta_first": round(log(f"{o}/ta")[0]["train_loss_ta"], 3),
                         "loss_ta_last": round(log(f"{o}/ta")[-1]["train_loss_ta"], 3)}, [ck]),
        ("nlvr", r("NLVR.py", "--config", "configs/demo/NLVR.yaml", "--checkpoint", f"{o}/ta/checkpoint_04.pth",
                   "--output_dir", f"{o}/nlvr", *cpu),
         lambda out, _: classification(f"{o}/nlvr", ("False", "True")),
         [f"{o}/ta/checkpoint_04.pth"]),
        ("nlvr_from_pretraining", r("NLVR.py", "--config", "configs/demo/NLVR.yaml", "--checkpoint", ck,
                                    "--output_dir", f"{o}/nlvr_no_ta", *cpu),
         lambda out, _: classification(f"{o}/nlvr_no_ta", ("False", "True")), [ck]),
        ("ve", r("VE.py", "--config", "configs/demo/VE.yaml", "--checkpoint", ck, "--output_dir", f"{o}/ve", *cpu),
         lambda out, _: classification(f"{o}/ve", ("contradiction", "neutral", "entailment")), [ck]),
        ("nlvr_majority", r("-m", "tasks.classification", "--task", "nlvr", "--config", "configs/demo/NLVR.yaml"),
         lambda out, s: {"accuracy": json_out(s)["accuracy"]}, []),
        ("grounding", r("Grounding.py", "--config", "configs/demo/Grounding.yaml", "--checkpoint", ck, "--block_num",
                        "3", "--output_dir", f"{o}/grounding", *cpu),
         lambda out, _: {"val_d": last_row(f"{o}/grounding", "val", selected=True)["val_d"],
                         **{k: last_row(f"{o}/grounding", "test")[k] for k in ("epoch", "testA_d", "testB_d")}}, [ck]),
        ("grounding_checkpoint_alone", r("Grounding.py", "--config", "configs/demo/Grounding.yaml", "--checkpoint", ck,
                                         "--block_num", "3", "--evaluate", "--output_dir", f"{o}/grounding_alone", *cpu),
         lambda out, _: {"val_d": last_row(f"{o}/grounding_alone", "val")["val_d"],
                         **{k: last_row(f"{o}/grounding_alone", "test")[k] for k in ("testA_d", "testB_d")}}, [ck]),
        ("grounding_pictures", r("Grounding.py", "--config", "configs/demo/Grounding.yaml", "--checkpoint",
                                 f"{o}/grounding/checkpoint_best.pth", "--block_num", "3", "--evaluate", "--output_dir",
                                 f"{o}/grounding_pictures", *cpu, "--opts", "grounding_pictures=12"),
         lambda out, _: {"first_12_val_right": sum(x["correct"] for x in json.load(open(
             f"{o}/grounding_pictures/result/grounding_val_evaluate.json"))[:12])}, [f"{o}/grounding/checkpoint_best.pth"]),
        ("grounding_sheet", r("-m", "tasks.grounding", "--sheet", f"{o}/grounding_pictures/result/pictures_val_evaluate",
                              "--out", f"{o}/grounding_demo.jpg"),
         lambda out, _: {}, [f"{o}/grounding_pictures/result/pictures_val_evaluate"]),
        ("grounding_baselines", r("-m", "tasks.grounding", "--config", "configs/demo/Grounding.yaml"),
         lambda out, s: json_out(s), []),
        ("grit_warm", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--checkpoint",
                        f"{demo}/checkpoint_02.pth", "--output_dir", f"{o}/warm_grit", *cpu, "--opts", "train_epochs=2",
                        "grit={collect_size: 960, search_space: 320}"),
         lambda out, _: {k: round(v, 3) for k, v in log(f"{o}/warm_grit")[0].items() if k.startswith("grit_")},
         [f"{demo}/checkpoint_02.pth"]),
        ("mafa_filter", r("Retrieval.py", "--config", "configs/demo/Retrieval.yaml", "--checkpoint", ck, "--output_dir",
                          f"{o}/filter", *cpu, "--opts", "schedular.epochs=6"),
         lambda out, _: {"r_mean": last_row(f"{o}/filter", "test")["r_mean"]}, [ck]),
        ("ecm_example", r("Get_ECM_example.py", "--filter_config", "configs/demo/Retrieval.yaml", "--filter_checkpoint",
                          f"{o}/filter/checkpoint_best.pth", "--device", "cpu", "--data", "data/demo/retrieval_train.json",
                          "--image_root", "data/demo", "--ground_truth", "data/demo/false_negatives.json",
                          "--output_dir", f"{o}/ecm_example"),
         lambda out, _: {k: round(v, 3) for k, v in json.load(open(f"{o}/ecm_example/stats.json")).items()
                         if k in ("precision", "base_rate", "recall", "connections")},
         [f"{o}/filter/checkpoint_best.pth"]),
        *vicha_steps(o, ck, cpu),
        ("ce_clip", r("Pretrain.py", "--config", "configs/demo/Pretrain_ce.yaml", "--output_dir", f"{o}/demo_ce", *cpu),
         lambda out, _: {"r_mean": last_row(f"{o}/demo_ce", "test (zero-shot)")["r_mean"],
                         "hard_neg_sim_epoch3": log(f"{o}/demo_ce")[3]["train_hard_neg_sim"]}, []),
        *compositional_steps(o, ck, cpu),
        ("siglip", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", f"{o}/siglip", *cpu,
                     "--opts", "itc_loss=sigmoid", "siglip_init_bias=-3.43"),
         lambda out, _: {"r_mean": last_row(f"{o}/siglip", "test (zero-shot)")["r_mean"]}, []),
        ("siglip_paper_bias", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir",
                                f"{o}/siglip_b10", *cpu, "--opts", "itc_loss=sigmoid"),
         lambda out, _: {"r_mean": last_row(f"{o}/siglip_b10", "test (zero-shot)")["r_mean"],
                         "loss_ita_epochs_0_to_7": [round(x["train_loss_ita"], 2) for x in log(f"{o}/siglip_b10")[:8]]},
         []),
        ("search_index", r("-m", "tools.search", "index", "--config", "configs/demo/Pretrain.yaml", "--checkpoint", ck,
                           "--images", "output/demo_test_images", "--out", f"{o}/index", "--device", "cpu"),
         lambda out, _: {}, [ck, "output/demo_test_images"]),
        ("search_recall", r("benchmarks/search.py", "--index", f"{o}/index", "--captions", "data/demo/retrieval_test.json",
                            "--rerank", "16"),
         lambda out, s: {"itc": s.split("ITC: ")[1].split("\n")[0], "itm16": s.split("top 16: ")[1].split("\n")[0]},
         [f"{o}/index"]),
        ("shards", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", f"{o}/shards", *cpu,
                     "--opts", "train_file=data/demo/shards/{00000..00005}.tar"),
         lambda out, _: {"r_mean": last_row(f"{o}/shards", "test (zero-shot)")["r_mean"]}, []),
        ("shards_index", r("-m", "dataset.store", "--ann", "data/demo/shards/*.tar", "--out", f"{o}/shards.arrow"),
         lambda out, _: {}, []),
        ("shards_indexed", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", f"{o}/shards_indexed",
                             *cpu, "--opts", f"train_file=[{o}/shards.arrow]"),
         lambda out, _: {"r_mean": last_row(f"{o}/shards_indexed", "test (zero-shot)")["r_mean"]}, [f"{o}/shards.arrow"]),
    ]


def vicha_steps(o, ck, cpu):
    """ViCHA's demo: concepts scored by the demo checkpoint's ITC heads, then the pretraining with all three parts."""
    def assign(src, dst):
        return [PY, "tools/visual_concepts.py", "assign", "--ann", f"data/demo/{src}", "--out", f"{o}/{dst}", "--vocab",
                "data/demo/vc_vocab.json", "--image_root", "data/demo", "--topk", "6", "--albef_config",
                "configs/demo/Pretrain.yaml", "--albef_checkpoint", ck, "--device", "cpu", "--no_progress"]
    return [
        ("vicha_concepts", assign("pretrain.json", "pretrain_kw.json"), lambda out, _: {}, [ck]),
        ("vicha_concepts_test", assign("retrieval_test.json", "retrieval_test_kw.json"), lambda out, _: {}, [ck]),
        ("vicha", [PY, "Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", f"{o}/vicha", *cpu,
                   "--opts", f"train_file=[{o}/pretrain_kw.json]", f"test_file={o}/retrieval_test_kw.json",
                   "kw_img_model=true", "randkw_p=0.5", "return_hidden_state=true", "num_hidden_align=1",
                   "ita_hidden_weight=0.1", "mae=true", "mim_decoder_heads=4", "mae_lambda=0.1"],
         lambda out, _: {k: last_row(f"{o}/vicha", "test (zero-shot)")[k] for k in ("r_mean", "txt_r1", "img_r1")},
         [f"{o}/pretrain_kw.json", f"{o}/retrieval_test_kw.json"]),
    ]


def compositional(ckpt):
    """The SugarCrepe-format demo benchmark on one checkpoint: the family averages and the replace subsets."""
    cmd = [PY, "-m", "tasks.compositional", "--config", "configs/demo/Pretrain.yaml", "--checkpoint", ckpt,
           "--benchmark", "sugarcrepe", "--data", "data/demo/compositional", "--image_root", "data/demo",
           "--output_dir", os.path.join(os.path.dirname(ckpt), "compositional"), "--device", "cpu"]

    def figures(out, stdout):
        m = json_out(stdout)
        return {f"{s}_{k}": m[s][k] for s in ("itc", "itm") for k in ("avg_replace", "avg_swap", "avg_add")} | \
            {f"{s}_{k}": m[s][k] for s in ("itc", "itm") for k in ("replace_att", "replace_obj", "replace_rel")}
    return cmd, figures


def compositional_steps(o, ck, cpu):
    """CE-CLIP's table: plain and CE from scratch, then 3 more epochs of each from the plain checkpoint."""
    warm = ["train_epochs=3", "schedular.epochs=3", "optimizer.lr=1e-4", "schedular.lr=1e-4",
            "schedular.warmup_epochs=0"]
    runs = [("warm_plain", "Pretrain.yaml", []), ("warm_ce", "Pretrain_ce.yaml", []),
            ("warm_ce_own", "Pretrain_ce.yaml", ["hn_scope=own", "imc_weight=0"])]
    out = []
    for name, ckpt in (("plain", ck), ("ce_clip", f"{o}/demo_ce/checkpoint_09.pth")):
        out.append((f"compositional_{name}", *compositional(ckpt), [ckpt]))
    for name, cfg, extra in runs:
        d = f"{o}/{name}"
        out.append((name, [PY, "Pretrain.py", "--config", f"configs/demo/{cfg}", "--checkpoint", ck, "--output_dir", d,
                           *cpu, "--opts", *warm, *extra],
                    lambda _o, _s, d=d: {"r_mean": last_row(d, "test (zero-shot)")["r_mean"]}, [ck]))
        out.append((f"compositional_{name}", *compositional(f"{d}/checkpoint_02.pth"), [f"{d}/checkpoint_02.pth"]))
    return out


def base(step):
    """A step's name without the seed suffix of the extra seeds' rows."""
    return re.sub(r"_s\d+$", "", step)


def tidy(figures):
    return {k: round(v, 3) if isinstance(v, float) else tidy(v) if isinstance(v, dict) else v
            for k, v in figures.items()}


def run_step(name, cmd, figures, needs, log_dir):
    missing = [p for p in needs if not os.path.exists(p)]
    if missing:
        return {"step": name, "skipped": f"needs {missing}"}
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = round(time.time() - t, 1)
    with open(os.path.join(log_dir, f"{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode:
        return {"step": name, "failed": r.stderr.strip().splitlines()[-1:] or ["exit code"], "seconds": seconds}
    try:
        return {"step": name, "seconds": seconds, **tidy(figures(None, r.stdout))}
    except Exception as e:   # noqa: BLE001 - report and go on
        return {"step": name, "seconds": seconds, "figure_error": f"{type(e).__name__}: {e}"}


def reread_step(name, figures, log_dir, earlier):
    """The figures of a step that already ran, from its log and output files (its time from ``earlier``)."""
    path = os.path.join(log_dir, f"{name}.log")
    if not os.path.isfile(path):
        return {"step": name, "skipped": "not run"}
    stdout = open(path).read().split("\n", 1)[1]
    keep = {k: v for k, v in earlier.items() if k in ("seconds", "failed", "skipped")}
    if "failed" in keep or "skipped" in keep:
        return {"step": name, **keep}
    try:
        return {"step": name, **keep, **tidy(figures(None, stdout))}
    except Exception as e:   # noqa: BLE001 - report and go on
        return {"step": name, **keep, "figure_error": f"{type(e).__name__}: {e}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="output/figures")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="the first runs every step; the others "
                   "the plain demo pretraining only (its range)")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--reread", action="store_true", help="run nothing: the figures again from the logs and "
                   "output files of an earlier run in --out (its times kept)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if not os.path.isfile(os.path.join(ROOT, "data/demo/stats.json")):
        subprocess.run([PY, "-m", "dataset.synthetic", "--out", "data/demo"], cwd=ROOT, check=True)
    if not os.path.isdir(os.path.join(ROOT, "output/demo_test_images")):
        import glob
        import shutil
        os.makedirs(os.path.join(ROOT, "output/demo_test_images"))
        for f in glob.glob(os.path.join(ROOT, "data/demo/images/test_*")):
            shutil.copy(f, os.path.join(ROOT, "output/demo_test_images"))
    rows = []
    old = os.path.join(a.out, "figures.json")
    if a.only and os.path.isfile(old):   # keep the other steps' rows of an earlier run
        rows = [r for r in json.load(open(old)) if base(r["step"]) not in a.only]
    earlier = {r["step"]: r for r in json.load(open(old))} if os.path.isfile(old) else {}
    order = [name for name, *_ in steps(a.out, a.seeds[0])]
    for i, seed in enumerate(a.seeds):
        for name, cmd, fig, needs in steps(a.out, seed):
            if (i > 0 and name != "pretrain") or (a.only and name not in a.only):
                continue
            step = f"{name}_s{seed}" if i else name
            if a.reread:
                row = {"seed": seed, **reread_step(step, fig, a.out, earlier.get(step, {}))}
                rows = [r for r in rows if r["step"] != step]
            else:
                row = {"seed": seed, **run_step(step, cmd, fig, needs, a.out)}
            rows.append(row)
            rows.sort(key=lambda r: (order.index(base(r["step"])) if base(r["step"]) in order else len(order),
                                     r["seed"] != a.seeds[0]))
            print(json.dumps(row), flush=True)
            with open(os.path.join(a.out, "figures.json"), "w") as f:
                json.dump(rows, f, indent=1)
    lines = ["| step | seed | seconds | figures |", "|---|---|---|---|"]
    for r in rows:
        figs = {k: v for k, v in r.items() if k not in ("step", "seed", "seconds")}
        lines.append(f"| {r['step']} | {r['seed']} | {r.get('seconds', '')} | "
                     + ", ".join(f"{k} {v}" for k, v in figs.items()) + " |")
    with open(os.path.join(a.out, "figures.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
