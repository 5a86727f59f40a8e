"""Every figure the README quotes from the demo world, produced by running its commands in README order.

    python benchmarks/readme_figures.py                       # all steps, seed 42 (about an hour on 2 cores)
    python benchmarks/readme_figures.py --seeds 42 1 2        # the plain demo's range over seeds as well
    python benchmarks/readme_figures.py --only pretrain grounding

Each step runs one README command (CPU, into ``--out``), reads its figure from the files the command writes
(``results.jsonl``, ``log.txt``, JSON it prints) and its wall time; the table at the end is what the README
quotes, also written to ``<out>/figures.json`` and ``figures.md``. A step whose inputs are missing is skipped
with the reason; a failing command is reported and the others still run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def last_row(out, split):
    rows = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    return [r for r in rows if r.get("split") == split][-1]


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
         lambda out, _: {k: last_row(demo, "test (zero-shot)")[k] for k in ("r_mean", "txt_r1", "img_r1")}, []),
        ("retrieval", r("Retrieval.py", "--config", "configs/demo/Retrieval.yaml", "--checkpoint", ck, "--output_dir",
                        f"{o}/retrieval", *cpu),
         lambda out, _: {k: last_row(f"{o}/retrieval", "test")[k] for k in ("r_mean", "txt_r1", "img_r1")}, [ck]),
        ("vqa", r("VQA.py", "--config", "configs/demo/VQA.yaml", "--checkpoint", ck, "--output_dir", f"{o}/vqa", *cpu),
         lambda out, _: {k[5:]: v for k, v in log(f"{o}/vqa")[-1].items() if k.startswith("test_accuracy")}, [ck]),
        ("vqa_baselines", r("-m", "tasks.vqa", "--config", "configs/demo/VQA.yaml"),
         lambda out, s: {k: json_out(s)[k]["accuracy"] for k in ("majority", "question_prior")}, []),
        ("text_assignment", r("Pretrain_nlvr.py", "--config", "configs/demo/NLVR_pretrain.yaml", "--checkpoint", ck,
                              "--output_dir", f"{o}/ta", *cpu),
         lambda out, _: {"loss_ta": round(log(f"{o}/ta")[-1]["train_loss_ta"], 3)}, [ck]),
        ("nlvr", r("NLVR.py", "--config", "configs/demo/NLVR.yaml", "--checkpoint", f"{o}/ta/checkpoint_04.pth",
                   "--output_dir", f"{o}/nlvr", *cpu),
         lambda out, _: {"test": last_row(f"{o}/nlvr", "test")["accuracy"],
                         "val_best": max(x["accuracy"] for x in [json.loads(y) for y in
                                         open(f"{o}/nlvr/results.jsonl")] if x["split"] == "val")},
         [f"{o}/ta/checkpoint_04.pth"]),
        ("ve", r("VE.py", "--config", "configs/demo/VE.yaml", "--checkpoint", ck, "--output_dir", f"{o}/ve", *cpu),
         lambda out, _: {"test": last_row(f"{o}/ve", "test")["accuracy"]}, [ck]),
        ("nlvr_majority", r("-m", "tasks.classification", "--task", "nlvr", "--config", "configs/demo/NLVR.yaml"),
         lambda out, s: {"accuracy": json_out(s)["accuracy"]}, []),
        ("grounding", r("Grounding.py", "--config", "configs/demo/Grounding.yaml", "--checkpoint", ck, "--block_num",
                        "3", "--output_dir", f"{o}/grounding", *cpu),
         lambda out, _: {"val_d": max(x["val_d"] for x in [json.loads(y) for y in open(f"{o}/grounding/results.jsonl")]
                                      if x["split"] == "val"),
                         **{k: last_row(f"{o}/grounding", "test")[k] for k in ("testA_d", "testB_d")}}, [ck]),
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
        ("ce_clip", r("Pretrain.py", "--config", "configs/demo/Pretrain_ce.yaml", "--output_dir", f"{o}/demo_ce", *cpu),
         lambda out, _: {"r_mean": last_row(f"{o}/demo_ce", "test (zero-shot)")["r_mean"]}, []),
        ("siglip", r("Pretrain.py", "--config", "configs/demo/Pretrain.yaml", "--output_dir", f"{o}/siglip", *cpu,
                     "--opts", "itc_loss=sigmoid", "siglip_init_bias=-3.43"),
         lambda out, _: {"r_mean": last_row(f"{o}/siglip", "test (zero-shot)")["r_mean"]}, []),
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
    ]


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
        return {"step": name, "seconds": seconds, **figures(None, r.stdout)}
    except Exception as e:   # noqa: BLE001 - report and go on
        return {"step": name, "seconds": seconds, "figure_error": f"{type(e).__name__}: {e}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="output/figures")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="the first runs every step; the others "
                   "the plain demo pretraining only (its range)")
    p.add_argument("--only", nargs="*", default=None)
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
    for i, seed in enumerate(a.seeds):
        for name, cmd, fig, needs in steps(a.out, seed):
            if (i > 0 and name != "pretrain") or (a.only and name not in a.only):
                continue
            row = {"seed": seed, **run_step(f"{name}_s{seed}" if i else name, cmd, fig, needs, a.out)}
            rows.append(row)
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
